# Every target bootstraps what it needs: system packages (apt-get, as root) and the venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INVENTORY ?= inventory/prod.py
# debootstrap + systemd-nspawn make the local test host; ssh reaches it; prometheus brings
# promtool for the rules tests (this image's policy-rc.d keeps the daemon from starting);
# gnupg and openssl sign and serve the stand-in NVIDIA repository (tests/support/fakenvidia.py);
# haproxy checks the gateway configuration the unit tests render (haproxy -c).
SYSTEM_PACKAGES := debootstrap systemd-container openssh-client curl ca-certificates prometheus \
	gnupg openssl haproxy nftables iproute2 socat

# The load generator of `make bench`, in its own environment: aiperf's pins (huggingface-hub
# < 2) conflict with ours, so it cannot be an extra of this package. Pinned in one place.
BENCH_VENV := .cache/bench-venv
AIPERF_VERSION := $(shell sed -n 's/^AIPERF_VERSION = "\(.*\)"/\1/p' llamahost/bench/__init__.py)

.PHONY: help sysdeps venv lint unit e2e test test-ready testdata demo demo-destroy demo-bench demo-roll plan lock test-cuda-build compliance \
	bench-venv bench

help:
	@echo "make demo          the whole stack on a local Debian 12 host: llama-server (tiny model),"
	@echo "                   the TLS gateway, Prometheus with the alert rules"
	@echo "make demo-bench    sweep the demo through its gateway with aiperf (plot, CSV, JSON)"
	@echo "make demo-roll TEMP=0.5  a rolling change of the demo, watched (requests ok/failed)"
	@echo "make demo-destroy  remove the local host"
	@echo "make test          lint, type-check, unit tests, end-to-end tests on a fresh local host"
	@echo "make unit          fast tests of the pure logic and the GPU plan tests"
	@echo "make test-cuda-build  compile llama-server for sm_80 without a GPU (about 22 min on 2 cores)"
	@echo "make compliance INVENTORY=...  the bring-up checklist asserted on every host (testinfra)"
	@echo "make plan INVENTORY=...  memory fit, per-conversation context, command line per host"
	@echo "make lock INVENTORY=...  pin each host's model (file, commit, sha256) in <inventory>.lock.json"
	@echo "make bench INVENTORY=...  concurrency sweep with aiperf per host: JSON, CSV, PNG, summary"
	@echo "production:        pyinfra $(INVENTORY) deploy.py"

sysdeps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit tests/plan tests/monitoring \
		tests/fetch tests/secrets tests/compliance/test_gpu_parse.py tests/compliance/test_gpu_checks.py

bench-venv: $(BENCH_VENV)/.installed-$(AIPERF_VERSION)
$(BENCH_VENV)/.installed-$(AIPERF_VERSION): llamahost/bench/__init__.py
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q 'aiperf==$(AIPERF_VERSION)'
	touch $@

e2e: sysdeps venv bench-venv
	$(BIN)/pytest -q tests/e2e

# Everything the tests need, prepared in parallel (apt-get, the two venvs, the debootstrap
# tree and the llama.cpp source archive are independent downloads), then every test.
test:
	$(MAKE) -j4 test-ready
	$(BIN)/pytest -q --junitxml=reports/junit.xml

test-ready: sysdeps venv bench-venv lint testdata

# The test hosts' debootstrap tree (.cache/rootfs) and the pinned llama.cpp source archive.
testdata: sysdeps venv
	$(BIN)/python -c 'from tests.support import llama_src, testhost; testhost.base_rootfs(); llama_src.archive()'

test-cuda-build: venv
	bash tests/cuda_build/run.sh

compliance: venv
	bash tests/compliance/run.sh $(INVENTORY)

plan: venv
	$(BIN)/python -m llamahost plan $(INVENTORY)

lock: venv
	$(BIN)/python -m llamahost lock $(INVENTORY)

# After `make demo`, `make bench INVENTORY=inventory/local.py` sweeps the demo through its
# gateway (as `make demo-bench` does) with the demo's settings and the tiny model's tokenizer
# (the demo's Hub endpoint is gone once it is up).
DEMO_UP = $(and $(filter inventory/local.py,$(INVENTORY)),$(wildcard .cache/demo/clients))
DEMO_ENV = LLAMAHOST_LOCAL_GATEWAY=1 LLAMAHOST_LOCAL_MONITORING=1 LLAMAHOST_LOCAL_INSTANCES=2

bench: venv bench-venv
	$(if $(DEMO_UP),$(DEMO_ENV)) $(BIN)/python -m llamahost bench $(INVENTORY) \
		$(if $(LIMIT),--limit $(LIMIT)) \
		$(if $(DEMO_UP),--gateway --tokenizer .cache/demo/tokenizer)

demo: sysdeps venv
	$(BIN)/python -m tests.support.demo up

# The demo through its gateway, swept with aiperf: the same as the line above.
demo-bench:
	$(MAKE) bench INVENTORY=inventory/local.py

# A rolling change of the demo, watched: `make demo-roll TEMP=0.5`.
demo-roll: venv
	LLAMAHOST_LOCAL_TEMP=$(TEMP) $(BIN)/python -m tests.support.demo roll

demo-destroy: venv
	$(BIN)/python -m tests.support.demo down
