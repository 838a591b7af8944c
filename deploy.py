"""Take a host to a tuned llama-server: `pyinfra INVENTORY deploy.py`.

Reads like the bring-up checklist; each step is one module in tasks/.
"""

from tasks import llama_cpp, model, packages, preflight, service

# 0. Inventory data valid for this host (else the run stops before any change).
cfg = preflight.host_config()
cpus = preflight.cpu_count()

# 1. Service account, build dependencies.
service.account(cfg)
packages.install()

# 2. llama.cpp built from the pinned commit.
binary = llama_cpp.build(cfg, jobs=preflight.build_jobs(cfg, cpus))

# 3. The model, pre-downloaded and verified.
fetched = model.download(cfg)

# 4. API key, unit for the host's profile, start; restart only on change.
key = service.api_key(cfg)
unit = service.unit(cfg, llama_cpp.binary_path(cfg), cpus)
service.run(unit, [binary, key, *([fetched] if fetched else [])])
