"""The GPU stack's decisions, from recorded command output. Pure: no pyinfra here.

What the host says (``/etc/os-release``, ``lspci``, ``nvidia-smi``, ``/proc/modules``,
``/proc/driver/nvidia/version``, ``dpkg``) goes in as text; out come the distribution, the
GPUs, the exact driver packages for the distribution, the reboot decision and the CMake
arguments of the CUDA build. ``tasks/gpu.py`` turns them into operations.

Sources of the package names and file contents (docs/gpu-stack.md):

* Ubuntu, Canonical's archive: the ``-server`` packages of a pinned branch, open kernel
  modules by default, precompiled and Canonical-signed (Secure Boot) where a
  ``linux-modules-nvidia-<branch>-server[-open]-<kernel flavour>`` package follows the
  host's kernel metapackage (the way ``ubuntu-drivers`` picks it), DKMS otherwise.
* Debian 12 (and Ubuntu on request): NVIDIA's CUDA repository through ``cuda-keyring``
  1.1-1, with the branch's ``nvidia-driver-pinning-<branch>`` package installed first so
  that unversioned packages cannot move to a newer branch.
* CUDA always comes from NVIDIA's repository (the distributions ship older versions):
  the toolkit only on the host that compiles llama.cpp, the CUDA runtime and cuBLAS on a
  host that receives a built tree (llamahost.build.cuda_packages).
"""

# The package's modules, one concern each: settings (rows and checks), host (what the host
# says: lspci, nvidia-smi, modules), cuda (the build's architectures and flags), driver
# (packages per distribution, pinning, holds), current (the driver a host already has:
# what runs, its source, what a move replaces), reboot (reboot and readiness). Their names
# are re-exported here for callers that think of "the GPU stack" as one thing. The
# supported distributions are llamahost.distro's, checked by the deploy's preflight.
from llamahost.gpu.cuda import *  # noqa: F403
from llamahost.gpu.current import *  # noqa: F403
from llamahost.gpu.driver import *  # noqa: F403
from llamahost.gpu.host import *  # noqa: F403
from llamahost.gpu.reboot import *  # noqa: F403
from llamahost.gpu.settings import *  # noqa: F403
