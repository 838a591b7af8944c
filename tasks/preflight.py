"""Validate the host's inventory data and plan its memory before any operation is planned.

pyinfra runs deploy.py for every host before it executes anything, so an error raised
here stops the whole run with no host changed.
"""

from collections.abc import Generator

from pyinfra import logger
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import Directory, File

from llamahost import distro, layout
from llamahost.checks import ConfigError
from llamahost.fleet import inventory_specs
from llamahost.gateway.settings import GROUP as GATEWAY
from llamahost.memory import MIB
from llamahost.monitoring.settings import GROUP
from llamahost.plan import check_gpu_memory, instance_rows, plan_for, render
from llamahost.spec import HostSpec, port_errors, resolve_host
from tasks.facts import OnlineCpus, OsRelease
from tasks.instances import resolved


def refuse(message: str) -> PyinfraError:
    """A refusal, set apart from the plan's printout: it starts its own paragraph."""
    return PyinfraError(f"\n\nREFUSED {message}\n")


def validated_spec() -> HostSpec:
    """The host's spec: every setting of every concern checked, the model lock applied."""
    try:
        return resolve_host(
            host.name,
            host.data.dict(),
            monitored=bool(host.inventory.get_group(GROUP, [])),
            is_gateway=GATEWAY in host.groups,
            is_monitoring=GROUP in host.groups,
            gatewayed=bool(host.inventory.get_group(GATEWAY, [])),
        )
    except ConfigError as e:
        raise refuse(str(e)) from None


def inventory_specs_or_refuse() -> list[HostSpec]:
    """Every host of the inventory, as the deploy and `plan` see it (the checks across
    hosts included); any invalid one stops the run."""
    specs, errors = inventory_specs([(h.name, h.data.dict(), h.groups) for h in host.inventory])
    if errors:
        raise refuse("\n".join(str(e) for e in errors))
    return specs


def served_specs() -> list[HostSpec]:
    """Every host of the inventory that serves a llama-server (what gateways balance,
    Prometheus scrapes, firewalls protect), with its instances as its GPUs make them."""
    return [resolved(s) for s in inventory_specs_or_refuse() if s.serves]


def host_spec() -> HostSpec:
    """The host's spec, planned: a bad value, a check across hosts that fails (the same as
    `plan`'s: a firewall with no gateway, a drain shorter than the gateways' server timeout)
    or a plan that does not fit stops the run."""
    spec = resolved(validated_spec())
    inventory_specs_or_refuse()
    if not spec.serves:  # nothing to plan: no model, no llama-server
        return spec
    clashes = port_errors(spec)  # with the instances the host's GPUs make
    if clashes:
        raise refuse(str(ConfigError(host.name, clashes)))
    hp = plan_for(spec)
    if not hp.fits:
        reasons = "".join(f"\n  {p}" for p in hp.problems) or "\n  it does not fit the GPU"
        raise refuse(
            f"host {host.name!r}: the plan refuses this configuration (nothing was changed):"
            f"{reasons}\n\nthe plan:\n{render(hp)}"
        )
    if hp.est is None:
        logger.warning(f"[{host.name}] no model metadata: memory not planned ({hp.shape_source})")
    rows = instance_rows(hp)
    if rows:
        logger.info(f"{host.print_prefix}llama-server instances:\n" + "\n".join(rows[1:]))
    return spec


def paths_are_ours(spec: HostSpec) -> None:
    """The directories whose owner and mode the deploy sets (the key's, the models') either
    do not exist yet or are already root:<service user>: the deploy never takes over a
    directory it did not create. The key file, if present, belongs to root."""
    cfg = spec.cfg
    user = cfg.service_user
    for field, path in (
        ("api_key_file", layout.parent(cfg.api_key_file)),
        ("model_dir", cfg.model_dir),
    ):
        found = host.get_fact(Directory, path=path)
        if found and (found["user"], found["group"]) != ("root", user):
            raise refuse(
                f"host {host.name!r}: llama_{field}: {path} exists, owned by "
                f"{found['user']}:{found['group']}; the deploy would make it root:{user} "
                "0750 and only does so for directories it creates: choose a path that does "
                f"not exist yet, or chown root:{user} it yourself (nothing was changed)"
            )
    key = host.get_fact(File, path=cfg.api_key_file)
    if key and key["user"] != "root":
        raise refuse(
            f"host {host.name!r}: llama_api_key_file: {cfg.api_key_file} exists, owned by "
            f"{key['user']}, not root: not a key this toolkit wrote (nothing was changed)"
        )


def distribution() -> distro.Distribution:
    """The host's distribution; any other than the supported ones stops the run."""
    os_release: list[str] = host.get_fact(OsRelease)
    try:
        return distro.distribution(host.name, distro.parse_os_release("\n".join(os_release)))
    except distro.Unsupported as e:
        raise refuse(str(e)) from None


def profile_matches_hardware(spec: HostSpec, gpu_path: bool, memory_mib: tuple[int, ...]) -> None:
    """A GPU profile on a host where the GPU path is not taken would fail to start; a plan
    made for more GPU memory than nvidia-smi reports would run out of it (each GPU on its
    own, with the instances it holds)."""
    hp = plan_for(spec) if spec.uses_gpu and len(spec.instances) > 1 else None
    total = hp.est.total_gpu // MIB if hp is not None and hp.est is not None else None
    problems = check_gpu_memory(spec.cfg, memory_mib, spec.instances, total)
    if problems:
        raise refuse(f"host {host.name!r}: {problems[0]} (nothing was changed)")
    if spec.uses_gpu and not gpu_path:
        raise refuse(
            f"host {host.name!r}: llama_profile = {spec.profile.name!r} needs an NVIDIA GPU and "
            "this host takes the CPU path (no GPU found, or llama_gpu_stack 'off'); use "
            "llama_profile 'cpu-demo', or llama_gpu_stack 'on' (nothing was changed)"
        )


def build_jobs(spec: HostSpec, cpus: int) -> int:
    return cpus if spec.cfg.cpp_build_jobs == "auto" else int(spec.cfg.cpp_build_jobs)


def cpu_count() -> int:
    cpus = host.get_fact(OnlineCpus)
    if not cpus:
        raise refuse(f"host {host.name!r}: could not read the number of online CPUs")
    return int(cpus)


@operation()
def join() -> Generator[str, None, None]:
    """An operation every host runs, which changes nothing: pyinfra orders operations by
    merging each host's own sequence, so an operation only a monitoring or gateway host
    runs is not ordered after the served hosts' bring-up unless every host shares one
    operation between them (as tasks/llama_cpp.py's join orders the pushes after the
    fetch). Call it at one line of deploy.py that every host reaches."""
    host.noop("every host has reached this point")
    yield from ()
