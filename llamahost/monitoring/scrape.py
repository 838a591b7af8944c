"""Who scrapes whom, and the files Prometheus is given.

The hosts of the inventory group ``monitoring`` scrape every llama-server of the inventory,
the node exporter of every served host and the GPU exporter of GPU hosts; the scrape
configuration is rendered from the whole inventory on every run, so a host removed from the
inventory leaves the targets on the next run.

llama-server's ``/metrics`` needs the API key and each host may have its own, so each served
host is one scrape job with its own credentials file; a relabel gives them all the job
label ``llama-server`` so rules and dashboards see one job.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from llamahost import layout, render
from llamahost.addresses import hostport, local, reach
from llamahost.checks import PREFIX
from llamahost.monitoring.settings import MonitoringConfig
from llamahost.spec import HostSpec

# Job labels that rules and the dashboard select on.
LLAMA_JOB = "llama-server"
NODE_JOB = "node"
GPU_JOB = "nvidia-gpu"


# ---------------------------------------------------------------- who is scraped
@dataclass(frozen=True)
class ServedHost:
    """One llama-server of the inventory, as the monitoring hosts see it."""

    name: str
    address: str  # how other hosts reach it
    port: int  # llama-server's --port (its first instance's)
    listen: str  # llama-server's --host
    uses_gpu: bool
    metrics: bool
    exporter_host: str
    node_exporter_port: int
    gpu_exporter_port: int
    # Its instances as (index, port, GPU): ((None, port, None),) for a single llama-server.
    instances: tuple[tuple[int | None, int, int | None], ...] = ()


def served_host(spec: HostSpec) -> ServedHost:
    return ServedHost(
        instances=tuple((x.index, x.port, x.gpu) for x in spec.instances),
        name=spec.name,
        address=spec.address,
        port=spec.profile.port,
        listen=spec.profile.host,
        uses_gpu=spec.uses_gpu,
        metrics=spec.profile.metrics,
        exporter_host=spec.monitoring.monitoring_exporter_host,
        node_exporter_port=spec.monitoring.monitoring_node_exporter_port,
        gpu_exporter_port=spec.monitoring.monitoring_gpu_exporter_port,
    )


@dataclass(frozen=True)
class Instance:
    """One llama-server instance of a host with several: its labels beside ``host``."""

    llama: str  # host:port
    index: int  # the `llama_instance` label
    gpu: int | None  # the `gpu` label (its GPU's index, as nvidia-smi numbers it)


@dataclass(frozen=True)
class Target:
    host: str  # inventory name: the `host` label
    llama: str  # host:port of llama-server (its first instance's)
    node: str  # host:port of the node exporter
    gpu: str | None  # host:port of the GPU exporter, GPU hosts only
    key_file: str  # the credentials file on the monitoring host
    instances: tuple[Instance, ...] = ()  # a host with several llama-servers: each one


def _reach(monitoring_host: str, s: ServedHost, listen: str, what: str, key: str) -> str:
    return reach(monitoring_host, s.name, s.address, listen, what, key)


def key_file(host_name: str) -> str:
    """The credentials file of a served host's key on the monitoring hosts."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", host_name)
    if safe != host_name or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha256(host_name.encode()).hexdigest()[:8]}"
    return f"{layout.KEYS_DIR}/{safe}.key"


def targets(monitoring_host: str, served: Iterable[ServedHost]) -> list[Target]:
    """What Prometheus on ``monitoring_host`` scrapes, in inventory order."""
    out = []
    for s in served:
        llama = _reach(monitoring_host, s, s.listen, "llama-server", PREFIX + "host")
        exp = _reach(
            monitoring_host,
            s,
            s.exporter_host,
            "the exporters",
            PREFIX + "monitoring_exporter_host",
        )
        several = tuple(
            Instance(hostport(llama, port), i, g) for i, port, g in s.instances if i is not None
        )
        out.append(
            Target(
                host=s.name,
                instances=several,
                llama=hostport(llama, s.port),
                node=hostport(exp, s.node_exporter_port),
                gpu=hostport(exp, s.gpu_exporter_port) if s.uses_gpu else None,
                key_file=key_file(s.name),
            )
        )
    return out


@dataclass(frozen=True)
class NodeTarget:
    """A node exporter with no llama-server beside it: a gateway host that serves nothing
    (its certificate's end date, alert GatewayCertificateExpiresSoon)."""

    host: str  # inventory name: the `host` label
    node: str  # host:port of the node exporter


def gateway_node_targets(monitoring_host: str, gateways: Iterable[HostSpec]) -> list[NodeTarget]:
    """The node exporters of the gateway hosts that serve nothing (a gateway that serves is
    one of ``targets`` already), in inventory order."""
    out = []
    for g in gateways:
        if not g.is_gateway or g.serves:
            continue
        mon = g.monitoring
        exp = reach(monitoring_host, g.name, g.address, mon.monitoring_exporter_host,
                    "the exporters", PREFIX + "monitoring_exporter_host")  # fmt: skip
        out.append(NodeTarget(host=g.name, node=hostport(exp, mon.monitoring_node_exporter_port)))
    return out


# ---------------------------------------------------------------- Prometheus's files
def prometheus_yml(
    monitoring_host: str,
    mon: MonitoringConfig,
    scrape: list[Target],
    nodes: Iterable[NodeTarget] = (),
) -> str:
    """The Prometheus configuration of a monitoring host; ``nodes``: node exporters with no
    llama-server (gateways that serve nothing), in job ``node`` with the others."""
    return render.template(
        "monitoring/prometheus.yml.j2",
        host=monitoring_host,
        mon=mon,
        self_target=hostport(
            local(mon.monitoring_prometheus_host),
            mon.monitoring_prometheus_port,
        ),
        targets=scrape,
        nodes=list(nodes),
        rules=layout.RULES_REF,
        llama_job=LLAMA_JOB,
        node_job=NODE_JOB,
        gpu_job=GPU_JOB,
    )


def prometheus_args(mon: MonitoringConfig) -> str:
    """ARGS for Debian's /etc/default/prometheus (values are validated: no quoting needed)."""
    return " ".join(
        [
            f"--config.file={layout.PROMETHEUS_CONFIG}",
            "--web.listen-address="
            + hostport(mon.monitoring_prometheus_host, mon.monitoring_prometheus_port),
            f"--storage.tsdb.retention.time={mon.monitoring_retention}",
        ]
    )
