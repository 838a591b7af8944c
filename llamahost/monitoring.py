"""Monitoring: who scrapes whom, and the files Prometheus and the exporters are given.

Pure logic, no pyinfra. The hosts of the inventory group ``monitoring`` run Prometheus and
scrape every llama-server of the inventory, plus a node exporter on every served host and a
GPU exporter on the GPU hosts. The scrape configuration is rendered from the whole inventory
on every run, so a host removed from the inventory leaves the targets on the next run.

llama-server's ``/metrics`` needs the API key and each host may have its own, so each served
host is one scrape job with its own credentials file; a relabel gives them all the job
label ``llama-server`` so rules and dashboards see one job.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jinja2

from llamahost.config import (
    PREFIX,
    ConfigError,
    FieldError,
    Setting,
    check_rows,
    either,
    http_url,
    integer,
    listen_address,
    optional,
    pattern,
    resolve,
    sha256_hex,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "templates" / "monitoring"
RULES_FILE = REPO / "files" / "monitoring" / "llama-server.rules.yml"
DASHBOARD_FILE = REPO / "files" / "monitoring" / "llama-server-dashboard.json"

GROUP = "monitoring"  # inventory group whose hosts run Prometheus

# On the monitoring hosts (Debian's prometheus package).
PROMETHEUS_DIR = "/etc/prometheus"
PROMETHEUS_CONFIG = f"{PROMETHEUS_DIR}/prometheus.yml"
RULES_NAME = "llama-server.rules.yml"
RULES_PATH = f"{PROMETHEUS_DIR}/rules/{RULES_NAME}"
# The config refers to its rules by a relative path, so a staged copy is validated with the
# staged rules and the live copy loads the live ones.
RULES_REF = f"rules/{RULES_NAME}"
STAGE_DIR = f"{PROMETHEUS_DIR}/llamahost/staged"
KEYS_DIR = f"{PROMETHEUS_DIR}/llamahost/keys"

# On the served hosts.
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # Debian's node exporter default
MODEL_FS_METRIC = "llamahost_model_filesystem_info"
GPU_EXPORTER_PREFIX = "/opt/llamahost/nvidia-gpu-exporter"
GPU_EXPORTER_UNIT = "nvidia-gpu-exporter.service"

# Job labels that rules and the dashboard select on.
LLAMA_JOB = "llama-server"
NODE_JOB = "node"
GPU_JOB = "nvidia-gpu"
OWN_METRICS = (MODEL_FS_METRIC,)

PINNED_GPU_EXPORTER_VERSION = "1.14.0"
GPU_EXPORTER_URL = (
    "https://github.com/utkuozdemir/nvidia_gpu_exporter/releases/download/"
    "v{version}/nvidia_gpu_exporter-nvml_{version}_linux_x86_64.tar.gz"
)

duration = pattern(r"[1-9][0-9]{0,5}(?:ms|s|m|h|d|w|y)", "a duration like 15s, 12h or 15d")


# An IP address (the same check as --host) or a DNS name.
scrape_address = either(
    listen_address,
    pattern(
        r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*",
        "a DNS name",
    ),
    "a DNS name or an IP address",
)


# Rows in the shape of llamahost.config.SETTINGS (keys without the llama_ prefix).
MONITORING_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "monitoring_prometheus_host",
        "127.0.0.1",
        listen_address,
        "Prometheus listen address on the `monitoring` hosts. Prometheus has no login: keep "
        "it on loopback and reach it with `ssh -L`, or put an authenticating proxy in front.",
    ),
    Setting("monitoring_prometheus_port", 9090, integer(1, 65535), "Prometheus port."),
    Setting(
        "monitoring_retention",
        "15d",
        duration,
        "How long Prometheus keeps samples (`--storage.tsdb.retention.time`).",
    ),
    Setting("monitoring_scrape_interval", "15s", duration, "Scrape and rule evaluation interval."),
    Setting(
        "monitoring_address",
        None,
        optional(scrape_address),
        "Address the `monitoring` hosts reach this host at; default its `ssh_hostname`, "
        "else its inventory name.",
    ),
    Setting(
        "monitoring_exporter_host",
        "0.0.0.0",  # noqa: S104  (remote Prometheus must reach it; see the README)
        listen_address,
        "Listen address of the node and GPU exporters on served hosts.",
    ),
    Setting("monitoring_node_exporter_port", 9100, integer(1, 65535), "Node exporter port."),
    Setting("monitoring_gpu_exporter_port", 9835, integer(1, 65535), "GPU exporter port."),
    Setting(
        "monitoring_gpu_exporter_version",
        PINNED_GPU_EXPORTER_VERSION,
        pattern(r"[0-9]+\.[0-9]+\.[0-9]+", "a version like 1.14.0"),
        "nvidia_gpu_exporter release (NVML build) on GPU hosts.",
    ),
    Setting(
        "monitoring_gpu_exporter_url",
        GPU_EXPORTER_URL,
        http_url,
        "Where GPU hosts download its archive; `{version}` is replaced.",
    ),
    Setting(
        "monitoring_gpu_exporter_sha256",
        None,
        optional(sha256_hex),
        "sha256 of that archive (the release's `checksums.txt`); required on GPU hosts "
        "when the inventory has a `monitoring` group.",
    ),
)
MONITORING_KEYS = tuple(PREFIX + s.key for s in MONITORING_SETTINGS)


@dataclass(frozen=True)
class MonitoringConfig:
    monitoring_prometheus_host: str
    monitoring_prometheus_port: int
    monitoring_retention: str
    monitoring_scrape_interval: str
    monitoring_address: str | None
    monitoring_exporter_host: str
    monitoring_node_exporter_port: int
    monitoring_gpu_exporter_port: int
    monitoring_gpu_exporter_version: str
    monitoring_gpu_exporter_url: str
    monitoring_gpu_exporter_sha256: str | None


assert [f.name for f in fields(MonitoringConfig)] == [s.key for s in MONITORING_SETTINGS]


def resolve_monitoring(host_name: str, data: Mapping[str, Any]) -> MonitoringConfig:
    """Validate a host's monitoring settings; raise ConfigError listing every bad field."""
    errors: list[FieldError] = []
    values = check_rows(MONITORING_SETTINGS, data, errors)
    if errors:
        raise ConfigError(host_name, errors)
    return MonitoringConfig(**values)


# ---------------------------------------------------------------- who is scraped
@dataclass(frozen=True)
class ServedHost:
    """One llama-server of the inventory, as the monitoring hosts see it."""

    name: str
    address: str  # how other hosts reach it
    port: int  # llama-server's --port
    listen: str  # llama-server's --host
    uses_gpu: bool
    metrics: bool
    exporter_host: str
    node_exporter_port: int
    gpu_exporter_port: int


def served_host(name: str, data: Mapping[str, Any]) -> ServedHost:
    """From a host's inventory data; raises ConfigError naming the host and field."""
    cfg = resolve(name, data)
    mon = resolve_monitoring(name, data)
    ssh_hostname = data.get("ssh_hostname")
    address = mon.monitoring_address or (ssh_hostname if isinstance(ssh_hostname, str) else name)
    return ServedHost(
        name=name,
        address=address,
        port=cfg.profile.port,
        listen=cfg.profile.host,
        uses_gpu=cfg.profile.uses_gpu,
        metrics=cfg.profile.metrics,
        exporter_host=mon.monitoring_exporter_host,
        node_exporter_port=mon.monitoring_node_exporter_port,
        gpu_exporter_port=mon.monitoring_gpu_exporter_port,
    )


@dataclass(frozen=True)
class Target:
    host: str  # inventory name: the `host` label
    llama: str  # host:port of llama-server
    node: str  # host:port of the node exporter
    gpu: str | None  # host:port of the GPU exporter, GPU hosts only
    key_file: str  # the credentials file on the monitoring host


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _loopback_for(listen: str) -> str | None:
    """The address a process on the same host uses; None if only other hosts can."""
    ip = ipaddress.ip_address(listen)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return listen


def _reach(monitoring_host: str, s: ServedHost, listen: str, what: str, key: str) -> str:
    if s.name == monitoring_host:
        return _loopback_for(listen) or listen
    if ipaddress.ip_address(listen).is_loopback:
        raise ConfigError(
            s.name,
            [
                FieldError(
                    key,
                    listen,
                    f"{what} listens on loopback only, so Prometheus on {monitoring_host!r} "
                    "cannot reach it: listen on 0.0.0.0 or an address it can reach",
                )
            ],
        )
    return s.address


def key_file(host_name: str) -> str:
    """The credentials file of a served host's key on the monitoring hosts."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", host_name)
    if safe != host_name or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha256(host_name.encode()).hexdigest()[:8]}"
    return f"{KEYS_DIR}/{safe}.key"


def targets(monitoring_host: str, served: Iterable[ServedHost]) -> list[Target]:
    """What Prometheus on ``monitoring_host`` scrapes, in inventory order."""
    out = []
    for s in served:
        if not s.metrics:
            raise ConfigError(
                s.name,
                [
                    FieldError(
                        PREFIX + "metrics",
                        False,
                        f"the inventory has a {GROUP!r} group, which scrapes every "
                        "llama-server: set it true",
                    )
                ],
            )
        llama = _reach(monitoring_host, s, s.listen, "llama-server", PREFIX + "host")
        exp = _reach(
            monitoring_host,
            s,
            s.exporter_host,
            "the exporters",
            PREFIX + "monitoring_exporter_host",
        )
        out.append(
            Target(
                host=s.name,
                llama=hostport(llama, s.port),
                node=hostport(exp, s.node_exporter_port),
                gpu=hostport(exp, s.gpu_exporter_port) if s.uses_gpu else None,
                key_file=key_file(s.name),
            )
        )
    return out


# ---------------------------------------------------------------- rendered files
def _env() -> jinja2.Environment:
    env = jinja2.Environment(  # noqa: S701  (YAML and unit files, not HTML)
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # JSON strings are YAML strings: any value is quoted safely.
    env.filters["q"] = json.dumps
    return env


def prometheus_yml(monitoring_host: str, mon: MonitoringConfig, scrape: list[Target]) -> str:
    """The Prometheus configuration of a monitoring host."""
    return (
        _env()
        .get_template("prometheus.yml.j2")
        .render(
            host=monitoring_host,
            mon=mon,
            self_target=hostport(
                _loopback_for(mon.monitoring_prometheus_host) or "127.0.0.1",
                mon.monitoring_prometheus_port,
            ),
            targets=scrape,
            rules=RULES_REF,
            llama_job=LLAMA_JOB,
            node_job=NODE_JOB,
            gpu_job=GPU_JOB,
        )
    )


def prometheus_args(mon: MonitoringConfig) -> str:
    """ARGS for Debian's /etc/default/prometheus (values are validated: no quoting needed)."""
    return " ".join(
        [
            f"--config.file={PROMETHEUS_CONFIG}",
            "--web.listen-address="
            + hostport(mon.monitoring_prometheus_host, mon.monitoring_prometheus_port),
            f"--storage.tsdb.retention.time={mon.monitoring_retention}",
        ]
    )


def node_exporter_args(mon: MonitoringConfig) -> str:
    """ARGS for Debian's /etc/default/prometheus-node-exporter."""
    return " ".join(
        [
            "--web.listen-address="
            + hostport(mon.monitoring_exporter_host, mon.monitoring_node_exporter_port),
            f"--collector.textfile.directory={TEXTFILE_DIR}",
        ]
    )


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def model_filesystem_textfile(model_dir: str, mountpoint: str) -> str:
    """A node exporter textfile naming the mount that holds the models, for the alert."""
    return (
        f"# HELP {MODEL_FS_METRIC} The filesystem that holds llama-server's models (always 1).\n"
        f"# TYPE {MODEL_FS_METRIC} gauge\n"
        f'{MODEL_FS_METRIC}{{model_dir="{_label_value(model_dir)}",'
        f'mountpoint="{_label_value(mountpoint)}"}} 1\n'
    )


@dataclass(frozen=True)
class GpuExporter:
    url: str
    sha256: str
    archive: str  # where the host keeps the download
    binary: str  # the extracted executable
    listen: str


def gpu_exporter(host_name: str, mon: MonitoringConfig) -> GpuExporter:
    """Where the pinned GPU exporter comes from and goes; its sha256 is required."""
    sha = mon.monitoring_gpu_exporter_sha256
    if sha is None:
        raise ConfigError(
            host_name,
            [
                FieldError(
                    PREFIX + "monitoring_gpu_exporter_sha256",
                    None,
                    "required on a GPU host when the inventory has a 'monitoring' group: the "
                    "sha256 of the archive, from checksums.txt of release "
                    f"v{mon.monitoring_gpu_exporter_version}",
                )
            ],
        )
    version = mon.monitoring_gpu_exporter_version
    # A new version or a new archive is a new directory (and a new unit: a restart).
    root = f"{GPU_EXPORTER_PREFIX}/{version}-{sha[:12]}"
    return GpuExporter(
        url=mon.monitoring_gpu_exporter_url.replace("{version}", version),
        sha256=sha,
        archive=f"{root}/nvidia_gpu_exporter.tar.gz",
        binary=f"{root}/nvidia_gpu_exporter",
        listen=hostport(mon.monitoring_exporter_host, mon.monitoring_gpu_exporter_port),
    )


def gpu_exporter_args(exp: GpuExporter) -> list[str]:
    return [
        f"--web.listen-address={exp.listen}",
        # XID events (the driver's error numbers) come only through NVML, not nvidia-smi.
        "--collect.backend=nvml",
    ]
