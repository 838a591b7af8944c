"""Validate the host's inventory data before any operation is planned.

pyinfra runs deploy.py for every host before it executes anything, so an error raised
here stops the whole run with no host changed.
"""

from pyinfra.api.exceptions import PyinfraError
from pyinfra.context import host
from pyinfra.facts.hardware import Cpus

from llamahost.config import ConfigError, HostConfig, resolve


def host_config() -> HostConfig:
    try:
        return resolve(host.name, host.data.dict())
    except ConfigError as e:
        raise PyinfraError(str(e)) from None


def build_jobs(cfg: HostConfig, cpus: int) -> int:
    return cpus if cfg.cpp_build_jobs == "auto" else int(cfg.cpp_build_jobs)


def cpu_count() -> int:
    cpus = host.get_fact(Cpus)
    if not cpus:
        raise PyinfraError(f"host {host.name!r}: could not read the number of online CPUs")
    return int(cpus)
