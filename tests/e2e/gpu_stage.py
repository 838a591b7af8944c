"""deploy.py up to the GPU stack, for the real run of tasks/gpu.py on the test host.

Steps 0, 1 and 3 of deploy.py as they are there (the spec, service account, run-time
packages, the GPU stack), the CUDA toolkit as step 4 installs it on the host that
compiles, then llama-server's unit rendered for the host's GPU profile, without starting
it. The memory plan of step 0 is left out (it reads the model's header from the Hub, which
plays no part here). The model download (step 2) is left out: it runs in the background
and proves nothing here. The rest of step 4 (the CUDA build) and what follows are left out
because the CUDA build cannot run on the test host: the CUDA toolkit there is an empty
stand-in from tests/support/fakenvidia.py (no nvcc). The sm_80 compile itself is checked
by `make test-cuda-build` (about 26 min on 2 cores, not part of `make test`).

Run by tests/e2e/test_gpu_stack.py: pyinfra inventory/local.py tests/e2e/gpu_stage.py
"""

from pyinfra.operations import apt, systemd

from llamahost import build as builds
from tasks import gpu, packages, preflight, service

# 0., 1. and 3. As in deploy.py.
spec = preflight.validated_spec()
dist = preflight.distribution()
cpus = preflight.cpu_count()
service.account(spec.cfg)
packages.install()
stack = gpu.install(spec, dist)
preflight.profile_matches_hardware(spec, stack.gpu, stack.memory_mib)

# 4., its CUDA package only, as on the host that compiles (tasks/llama_cpp.py; the GPU stack
# itself installs none): the toolkit from the repository the stack set up.
if stack.gpu:
    cuda = builds.cuda_packages(spec.gpu.cuda_version, compiles=True)
    apt.packages(name=f"CUDA {spec.gpu.cuda_version} toolkit, to compile llama.cpp", packages=cuda)

# 6., the unit only: rendered and loaded (the reload is service.run's first step), never
# started: there is no llama-server binary here.
unit = service.unit(spec, cpus)
systemd.daemon_reload(name="Reload systemd units", _if=unit.files_changed[0].did_change)
