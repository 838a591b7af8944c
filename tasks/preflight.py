"""Validate the host's inventory data and plan its memory before any operation is planned.

pyinfra runs deploy.py for every host before it executes anything, so an error raised
here stops the whole run with no host changed.
"""

from pyinfra import logger
from pyinfra.api.exceptions import PyinfraError
from pyinfra.context import host
from pyinfra.facts.hardware import Cpus

from llamahost import lock as locks
from llamahost.config import ConfigError, HostConfig, resolve
from llamahost.plan import check_gpu_memory, plan_for, render


def host_config() -> HostConfig:
    """The host's configuration, pinned by the model lock when one is configured."""
    try:
        hp = plan_for(resolve(host.name, host.data.dict()))
    except (ConfigError, locks.LockError) as e:
        raise PyinfraError(str(e)) from None
    if not hp.fits:
        raise PyinfraError(
            f"host {host.name!r}: the plan refuses this configuration (nothing was changed):\n"
            + render(hp)
        )
    if hp.est is None:
        logger.warning(f"[{host.name}] no model metadata: memory not planned ({hp.shape_source})")
    return hp.cfg


def profile_matches_hardware(cfg: HostConfig, gpu_path: bool, memory_mib: tuple[int, ...]) -> None:
    """A GPU profile on a host where the GPU path is not taken would fail to start; a plan
    made for more GPU memory than nvidia-smi reports would run out of it."""
    problems = check_gpu_memory(cfg, memory_mib)
    if problems:
        raise PyinfraError(f"host {host.name!r}: {problems[0]} (nothing was changed)")
    if cfg.profile.uses_gpu and not gpu_path:
        raise PyinfraError(
            f"host {host.name!r}: llama_profile = {cfg.profile.name!r} needs an NVIDIA GPU and "
            "this host takes the CPU path (no GPU found, or llama_gpu_stack 'off'); use "
            "llama_profile 'cpu-demo', or llama_gpu_stack 'on' (nothing was changed)"
        )


def build_jobs(cfg: HostConfig, cpus: int) -> int:
    return cpus if cfg.cpp_build_jobs == "auto" else int(cfg.cpp_build_jobs)


def cpu_count() -> int:
    cpus = host.get_fact(Cpus)
    if not cpus:
        raise PyinfraError(f"host {host.name!r}: could not read the number of online CPUs")
    return int(cpus)
