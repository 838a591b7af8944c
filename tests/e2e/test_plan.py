"""Plan and lock against the real test host and the local Hub endpoint.

- the memory estimate against the buffers llama-server itself reports at load (`-lv 4`),
  run on the test host with the tiny model;
- `python -m llamahost lock` resolves the model through the Hub API of the local endpoint;
  the deploy then serves exactly that commit, verified; a lock whose sha256 the file does
  not have stops the deploy before the service is touched.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llamahost.gguf_header import read_file
from llamahost.memory import MIB, ModelShape, estimate
from llamahost.spec import resolve_host
from tests.e2e.conftest import MODEL_FILE, MODEL_REPO, REPO, Run, Site

pytestmark = pytest.mark.e2e

RUN_FLAGS = "-c 4096 --parallel 2 -b 2048 -ub 512 -ctk q8_0 -ctv q8_0 -fa on --fit off"


def _env(site: Site, lock: Path) -> dict[str, str]:
    return {**site.env(), "LLAMAHOST_LOCAL_LOCK": str(lock)}


def test_estimate_within_10_percent_of_llama_servers_report(site: Site, deployed: Run) -> None:
    model = site.sh("find /var/lib/llama-models -name '*.gguf' | head -n 1").strip()
    # The server is stopped by timeout once it has printed its buffers.
    log = site.host.run(
        f"timeout -s INT 8 /opt/llama.cpp/current/bin/llama-server -m {model} "
        f"--host 127.0.0.1 --port 1 {RUN_FLAGS} -lv 4 2>&1; true",
        check=False,
    ).stdout

    def reported(what: str) -> float:
        m = re.search(rf"CPU(?:_Mapped)? +{what} buffer size = +([0-9.]+) MiB", log)
        assert m, f"no '{what} buffer size' in llama-server's log:\n{log[-3000:]}"
        return float(m.group(1))

    shape = ModelShape.from_header(read_file(site.hub.hub.root / MODEL_REPO / MODEL_FILE))
    est = estimate(
        shape,
        n_ctx=4096,
        parallel=2,
        micro_batch=512,
        type_k="q8_0",
        type_v="q8_0",
        flash_attn=True,
        kv_unified=False,
        offload=False,
        reserve_mib=0,
    )
    for what, ours in (("model", est.weights_host), ("KV", est.kv), ("compute", est.compute)):
        theirs = reported(what)
        assert abs(ours / MIB - theirs) / theirs < 0.10, (what, ours / MIB, theirs)


def _lock(site: Site, path: Path) -> dict[str, dict[str, object]]:
    p = subprocess.run(
        [sys.executable, "-m", "llamahost", "lock", "inventory/local.py"],
        cwd=REPO,
        env=_env(site, path),
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    models: dict[str, dict[str, object]] = json.loads(path.read_text())["models"]
    return models


def test_lock_pins_the_served_bytes(site: Site, deployed: Run, tmp_path: Path) -> None:
    lock = tmp_path / "local.lock.json"
    (entry,) = _lock(site, lock).values()
    served = site.hub.hub.root / MODEL_REPO / MODEL_FILE
    assert entry["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
    assert entry["size"] == served.stat().st_size
    assert entry["commit"] == site.hub.hub.commit(site.hub.hub.root / MODEL_REPO)

    run = site.deploy(env=_env(site, lock))
    assert run.rc == 0, run.output[-4000:]
    cfg = resolve_host(
        "x",
        {
            "llama_model_repo": MODEL_REPO,
            "llama_model_file": MODEL_FILE,
            "llama_model_revision": str(entry["commit"]),
        },
    ).cfg
    assert site.sh(f"head -n 1 {cfg.model_path}.sha256").strip() == entry["sha256"]
    assert f"-m {cfg.model_path}" in site.sh(
        "grep ^ExecStart= /etc/systemd/system/llama-server.service"
    )
    assert site.get("/health").status_code == 200
    assert site.deploy(env=_env(site, lock)).changed_operations() == []

    # A lock whose sha256 the file does not have: refetched, refused, nothing promoted.
    before = site.service("ActiveEnterTimestampMonotonic", "MainPID")
    bad = tmp_path / "bad.lock.json"
    data = json.loads(lock.read_text())
    for e in data["models"].values():
        e["sha256"] = "0" * 64
    bad.write_text(json.dumps(data))
    refused = site.deploy(env=_env(site, bad))
    assert refused.rc != 0
    assert refused.stopped_at().startswith("Download ")
    assert "not promoted" in refused.stderr
    assert site.service("ActiveEnterTimestampMonotonic", "MainPID") == before
    assert site.sh(f"head -n 1 {cfg.model_path}.sha256").strip() == entry["sha256"]

    # Back to the inventory without a lock.
    assert site.deploy().rc == 0


def test_plan_refuses_an_oversized_profile_before_any_change(site: Site, deployed: Run) -> None:
    before = site.fingerprint()
    run = site.deploy("--data", "llama_context=32768", "--data", "llama_parallel=1")
    assert run.rc != 0
    assert "the plan refuses this configuration (nothing was changed)" in run.stderr
    assert "trained context (8192)" in run.stderr
    assert site.fingerprint() == before
