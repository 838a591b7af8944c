"""One validated spec per host: the only way from inventory data to what a host should be.

``resolve_host`` checks every setting row of every concern (the core, the GPU stack,
monitoring), refuses unknown ``llama_*`` keys once, runs each concern's cross-checks,
applies the model lock, and reports every bad field of the host in one ``ConfigError``.
The deploy's preflight, ``python -m llamahost plan`` and the compliance checks call it and
nothing else, so they cannot disagree about a value.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamahost import instances as inst
from llamahost import lock as locks
from llamahost import ports
from llamahost.checks import PREFIX, ConfigError, FieldError, Setting, check_rows
from llamahost.config import SETTINGS, HostConfig, Profile, core_values, cross_checks
from llamahost.gateway import settings as gateway_settings
from llamahost.gateway.settings import GATEWAY_SETTINGS, GatewayConfig
from llamahost.gpu import settings as gpu_settings
from llamahost.gpu.settings import GPU_SETTINGS, GpuSettings
from llamahost.layout import REPO
from llamahost.monitoring.settings import GROUP, MONITORING_SETTINGS, MonitoringConfig

# Every concern's rows, in the order of the README's variables table.
CONCERNS: tuple[tuple[str, tuple[Setting, ...]], ...] = (
    ("core", SETTINGS),
    ("gpu", GPU_SETTINGS),
    ("monitoring", MONITORING_SETTINGS),
    ("gateway", GATEWAY_SETTINGS),
)
WHERE_LISTED = "every setting is listed in README.md, section Variables"


def setting_keys() -> list[str]:
    """Every inventory key this toolkit reads, in the README's order."""
    return [PREFIX + s.key for _, rows in CONCERNS for s in rows]


@dataclass(frozen=True)
class LockState:
    path: Path | None  # None: no lock configured
    entry: dict[str, Any] | None  # the host's entry, when the lock has one

    @property
    def label(self) -> str:
        if self.path is None:
            return "not configured"
        return "locked" if self.entry is not None else "missing: run `make lock`"


@dataclass(frozen=True)
class HostSpec:
    """What one host should be. Its data can hold secrets: kept out of repr()."""

    name: str
    cfg: HostConfig
    gpu: GpuSettings
    monitoring: MonitoringConfig
    gateway: GatewayConfig
    lock: LockState
    ssh_hostname: str | None  # where SSH reaches it, as the inventory says
    monitored: bool  # the inventory has a `monitoring` group
    is_gateway: bool = False  # the host is in group `gateway` (runs HAProxy)
    is_monitoring: bool = False  # the host is in group `monitoring` (runs Prometheus)
    # llama_firewall set false on a served host of an inventory with a `gateway` group: its
    # llama port stays open to the network, and the run says so.
    firewall_declined: bool = False
    # The GPUs and NUMA nodes the host's sysfs shows (tasks/instances.py), once read; None
    # where the host was not asked (`plan` offline): `per-gpu` then counts one instance.
    topology: inst.Topology | None = None

    @property
    def instances(self) -> tuple[inst.Instance, ...]:
        """Its llama-servers (llamahost/instances.py): one, or several on a GPU host
        (``per-gpu``) or as ``llama_instances`` says; none on a host that serves none."""
        if not self.serves:
            return ()
        p = self.cfg.profile
        return inst.layout(
            self.cfg.instances,
            port=p.port,
            uses_gpu=p.uses_gpu,
            device=p.device,
            topology=self.topology,
        )

    @property
    def serves(self) -> bool:
        """The host runs a llama-server (``llama_serve``, true unless set false)."""
        return self.gateway.serve

    @property
    def profile(self) -> Profile:
        return self.cfg.profile

    @property
    def uses_gpu(self) -> bool:
        """The profile serves from a GPU. Decides the unit's GPU lines, so the deploy and
        the compliance checks render the same unit whatever the host's hardware."""
        return self.cfg.profile.uses_gpu

    @property
    def address(self) -> str:
        """How other hosts (Prometheus, a gateway) reach this one."""
        return self.monitoring.monitoring_address or self.ssh_hostname or self.name


def lock_file(model_lock: str) -> Path:
    """A relative ``llama_model_lock`` is relative to the repository (where deploy.py is),
    whatever the current directory: the deploy, plan and compliance read the same file."""
    p = Path(model_lock)
    return p if p.is_absolute() else REPO / p


def _unknown_keys(data: Mapping[str, Any]) -> list[FieldError]:
    known = setting_keys()
    suffixes = [k[len(PREFIX) :] for k in known]
    errors = []
    for key in data:
        if not key.startswith(PREFIX) or key in known:
            continue
        # Close matches only, compared without the common prefix: "llama_prot" suggests
        # llama_port; "llama_temperature" (llama.cpp's long name) llama_temp; a key like
        # "llama_distribution" suggests nothing rather than a misleading guess.
        wrong = key[len(PREFIX) :]
        near = (
            difflib.get_close_matches(wrong, suffixes, n=1, cutoff=0.75)
            or [s for s in suffixes if len(s) >= 4 and wrong.startswith(s)][:1]
        )
        hint = f"; did you mean {PREFIX}{near[0]}?" if near else ""
        errors.append(FieldError(key, data[key], f"is not a known setting{hint} ({WHERE_LISTED})"))
    return errors


def _monitored_checks(cfg: HostConfig, mon: MonitoringConfig) -> list[FieldError]:
    """What a `monitoring` group asks of every served host."""
    errors = []
    if not cfg.profile.metrics:
        errors.append(
            FieldError(
                PREFIX + "metrics",
                False,
                f"the inventory has a {GROUP!r} group, which scrapes every llama-server: "
                "set it true",
            )
        )
    if cfg.profile.uses_gpu and mon.monitoring_gpu_exporter_sha256 is None:
        errors.append(
            FieldError(
                PREFIX + "monitoring_gpu_exporter_sha256",
                None,
                f"required on a GPU host when the inventory has a {GROUP!r} group: the "
                "sha256 of the archive, from checksums.txt of release "
                f"v{mon.monitoring_gpu_exporter_version}",
            )
        )
    return errors


def _apply_lock(cfg: HostConfig, errors: list[FieldError]) -> tuple[HostConfig, LockState]:
    if cfg.model_lock is None:
        return cfg, LockState(None, None)
    path = lock_file(cfg.model_lock)
    try:
        entry = locks.entry_for(cfg, locks.load(path))
    except locks.LockError as e:
        errors.append(FieldError(PREFIX + "model_lock", cfg.model_lock, str(e)))
        return cfg, LockState(path, None)
    if entry is None:
        return cfg, LockState(path, None)
    if cfg.model_sha256 and cfg.model_sha256 != entry["sha256"]:
        errors.append(
            FieldError(
                PREFIX + "model_sha256",
                cfg.model_sha256,
                f"differs from the lock's {entry['sha256']} for {locks.key(cfg)} "
                f"({path}): remove it or run `make lock` again",
            )
        )
        return cfg, LockState(path, entry)
    return locks.apply(cfg, entry), LockState(path, entry)


def listeners(
    served: Sequence[inst.Instance],
    cfg: HostConfig,
    gateway: GatewayConfig,
    mon: MonitoringConfig,
    *,
    monitored: bool,
    is_gateway: bool,
    is_monitoring: bool,
) -> list[ports.Listener]:
    """Every TCP listener the deploy puts on this host (the gateway's per-host proxies are
    unix sockets), in the order a clash is reported."""
    out = []
    for x in served:
        what = "llama-server" if x.index is None else f"llama-server instance {x.index}"
        out.append(ports.Listener("port", what, cfg.profile.host, x.port))
    if is_gateway:
        out.append(
            ports.Listener(
                "gateway_port", "the gateway", gateway.gateway_listen, gateway.gateway_port
            )
        )
    if is_monitoring:
        out.append(
            ports.Listener(
                "monitoring_prometheus_port",
                "Prometheus",
                mon.monitoring_prometheus_host,
                mon.monitoring_prometheus_port,
            )
        )
    if monitored and (gateway.serve or is_gateway):
        out.append(
            ports.Listener(
                "monitoring_node_exporter_port",
                "the node exporter",
                mon.monitoring_exporter_host,
                mon.monitoring_node_exporter_port,
            )
        )
        if gateway.serve and cfg.profile.uses_gpu:
            out.append(
                ports.Listener(
                    "monitoring_gpu_exporter_port",
                    "the GPU exporter",
                    mon.monitoring_exporter_host,
                    mon.monitoring_gpu_exporter_port,
                )
            )
    return out


def resolve_host(
    name: str,
    data: Mapping[str, Any],
    *,
    monitored: bool = False,
    is_gateway: bool = False,
    is_monitoring: bool = False,
    gatewayed: bool = False,
    use_lock: bool = True,
) -> HostSpec:
    """Validate a host's inventory data; raise ConfigError listing every bad field.

    ``monitored``: the inventory has a `monitoring` group (its hosts scrape this one).
    ``is_gateway``: the host is in group `gateway` (its controller files are checked).
    ``is_monitoring``: the host is in group `monitoring`.
    ``gatewayed``: the inventory has a `gateway` group (``llama_firewall: auto`` turns on).
    ``use_lock`` false: do not apply ``llama_model_lock`` (the plan's what-if, the lock
    command that writes it).
    """
    errors = _unknown_keys(data)
    profile_name, prof, core = core_values(data, errors)
    gpu = check_rows(GPU_SETTINGS, data, errors)
    mon = check_rows(MONITORING_SETTINGS, data, errors)
    gw = check_rows(GATEWAY_SETTINGS, data, errors)
    if errors:  # cross-checks read values: only once every row is valid
        raise ConfigError(name, errors)
    assert profile_name is not None  # a bad one is in errors
    errors += cross_checks(prof, core) + gpu_settings.cross_checks(gpu)
    declined = gw["firewall"] is False and gatewayed and gw["serve"]
    if gw["firewall"] == "auto":
        gw["firewall"] = gatewayed and gw["serve"]
    gateway = GatewayConfig(**gw)
    errors += gateway_settings.cross_checks(gateway, is_gateway=is_gateway)
    cfg = HostConfig(host_name=name, profile=Profile(name=profile_name, **prof), **core)
    monitoring = MonitoringConfig(**mon)
    if not gateway.serve and not (is_gateway or is_monitoring):
        errors.append(
            FieldError(
                PREFIX + "serve",
                False,
                "a host that serves no llama-server must be in group `gateway` or "
                "`monitoring`: otherwise the deploy has nothing to do there",
            )
        )
    if monitored and gateway.serve:
        errors += _monitored_checks(cfg, monitoring)
    layout = inst.layout(
        cfg.instances,
        port=cfg.profile.port,
        uses_gpu=cfg.profile.uses_gpu,
        device=cfg.profile.device,
        topology=None,
    )
    errors += ports.clashes(
        listeners(
            layout if gateway.serve else (),
            cfg,
            gateway,
            monitoring,
            monitored=monitored,
            is_gateway=is_gateway,
            is_monitoring=is_monitoring,
        )
    )
    if errors:
        raise ConfigError(name, errors)
    serving_lock = use_lock and gateway.serve  # a host that serves nothing has no model
    cfg, lock = _apply_lock(cfg, errors) if serving_lock else (cfg, LockState(None, None))
    if errors:
        raise ConfigError(name, errors)
    ssh_hostname = data.get("ssh_hostname")
    return HostSpec(
        name=name,
        cfg=cfg,
        gpu=GpuSettings(**gpu),
        monitoring=monitoring,
        gateway=gateway,
        lock=lock,
        ssh_hostname=ssh_hostname if isinstance(ssh_hostname, str) else None,
        monitored=monitored,
        is_gateway=is_gateway,
        is_monitoring=is_monitoring,
        firewall_declined=declined,
    )


def port_errors(spec: HostSpec) -> list[FieldError]:
    """The host's port plan with its instances as the host's GPUs make them (a ``per-gpu``
    host's count is known once its topology is read)."""
    last = spec.instances[-1] if spec.instances else None
    if last is not None and last.port > 65535:
        return [
            FieldError(
                PREFIX + "port",
                spec.profile.port,
                f"the host's {len(spec.instances)} instances (llama_instances "
                f"{spec.cfg.instances!r}) take ports up to {last.port}, past 65535: a lower "
                "llama_port",
            )
        ]
    return ports.clashes(
        listeners(
            spec.instances,
            spec.cfg,
            spec.gateway,
            spec.monitoring,
            monitored=spec.monitored,
            is_gateway=spec.is_gateway,
            is_monitoring=spec.is_monitoring,
        )
    )


def inventory_specs(
    hosts: Sequence[tuple[str, Mapping[str, Any], Sequence[str]]], *, use_lock: bool = True
) -> tuple[list[HostSpec], list[ConfigError]]:
    """Every host of an inventory, as (name, data, groups) from pyinfra: the specs of the
    valid ones and the errors of the others."""
    monitored = any(GROUP in groups for _, _, groups in hosts)
    gatewayed = any(gateway_settings.GROUP in groups for _, _, groups in hosts)
    specs, errors = [], []
    for name, data, groups in hosts:
        try:
            specs.append(
                resolve_host(
                    name,
                    data,
                    monitored=monitored,
                    is_gateway=gateway_settings.GROUP in groups,
                    is_monitoring=GROUP in groups,
                    gatewayed=gatewayed,
                    use_lock=use_lock,
                )
            )
        except ConfigError as e:
            errors.append(e)
    return specs, errors
