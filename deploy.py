"""Take a host to a tuned llama-server: `pyinfra INVENTORY deploy.py`.

Reads like the bring-up checklist; each step is one module in tasks/.
"""

from tasks import (
    firewall,
    gateway,
    gpu,
    llama_cpp,
    model,
    monitoring,
    packages,
    preflight,
    rolling,
    service,
)

# 0. Inventory data valid (every setting, one spec per host), the distribution supported,
#    and on served hosts their paths free or already the toolkit's and the profile's memory
#    planned (else the run stops before any change on any host).
spec = preflight.host_spec()
dist = preflight.distribution()
rolling.refuse_unbounded()

# 0b. On gateways: what an earlier run drained and never put back goes back first.
gateway.repair_left_drained(spec)

# A host with llama_serve: false runs only what its groups ask (steps 8 and 9).
if spec.serves:
    preflight.paths_are_ours(spec)
    cpus = preflight.cpu_count()
    cfg = spec.cfg

    # 1. Service account, build dependencies.
    service.account(cfg)
    packages.install()

    # 2. The model download starts: it runs in the background while the driver and the
    #    build proceed (step 5 waits for it).
    download = model.start(cfg)

    # 3. GPU stack: driver, persistence mode; the CPU path when no GPU is found (the CUDA
    #    packages come with step 4, by build role).
    stack = gpu.install(spec, dist)
    preflight.profile_matches_hardware(spec, stack.gpu, stack.memory_mib)

    # 4. llama.cpp from the pinned commit (with CUDA for the GPU's architecture): built by
    #    one host per build id, copied from the controller's cache to the others.
    binary = llama_cpp.build(
        cfg,
        dist,
        jobs=preflight.build_jobs(spec, cpus),
        gpu_cmake_args=stack.cmake_args,
        check_devices=stack.gpu and stack.ready,
        cuda_version=spec.gpu.cuda_version if stack.gpu else None,
    )

    # 5. The model downloaded and verified.
    fetched = model.finish(download)

    # 6. Exposure: with llama_firewall, the llama port only from the gateway hosts, the
    #    exporters only from the monitoring hosts (before llama-server first listens).
    firewall.apply(spec)

    # 7. API key, unit for the host's profile, start; restart only on change (drained on
    #    the gateways, when there are any). Not while a driver reboot is pending.
    key = service.api_key(cfg)
    unit = service.unit(spec, cpus)
    if not stack.gpu or stack.ready:
        service.run(spec, unit, [binary, key, *([fetched] if fetched else [])])

# Every host waits here until the served hosts are brought up: the monitoring and gateway
# hosts read the API keys that step 7 may just have generated.
preflight.join(name="Served hosts brought up (every host waits here)")

# 8a. The exporters, when the inventory has a `monitoring` group: on served hosts, and on
#     gateway hosts (their certificate's end date) whether they serve or not.
monitoring.exporters(spec)

# 8. Monitoring: on the `monitoring` hosts, Prometheus scraping every llama-server of the
#    inventory.
monitoring.prometheus(spec)

# 9. Gateway, on the hosts of group `gateway`: HAProxy with TLS and client keys in front of
#    every llama-server of the inventory (restarts above go through it, drained).
gateway.install(spec)
