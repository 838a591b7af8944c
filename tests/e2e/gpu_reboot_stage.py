"""deploy.py's steps 0 and 3 alone (the spec, the GPU stack), for a fleet host behind the
gateways given the stand-ins of a GPU (tests/e2e/test_gateway.py): the driver install
reboots it, and that reboot goes through the rolling gate (drained on every gateway
first). The rest of the deploy is left out: the CUDA build cannot run on a test host, and
the host keeps serving its CPU build of llama-server, which starts again at boot.

Run as: pyinfra GATEWAY_INVENTORY tests/e2e/gpu_reboot_stage.py --limit HOST
"""

from tasks import gpu, preflight, rolling

spec = preflight.validated_spec()
dist = preflight.distribution()
rolling.refuse_unbounded()
if spec.serves:
    gpu.install(spec, dist)
