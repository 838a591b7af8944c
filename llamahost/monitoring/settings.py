"""Monitoring's settings: Prometheus on the `monitoring` hosts, the exporters on served
hosts, and the pinned GPU exporter."""

from __future__ import annotations

from dataclasses import dataclass, fields

from llamahost.checks import (
    Setting,
    either,
    http_url,
    listen_address,
    optional,
    pattern,
    sha256_hex,
    unprivileged_port,
)

GROUP = "monitoring"  # inventory group whose hosts run Prometheus

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
    Setting(
        "monitoring_prometheus_port",
        9090,
        unprivileged_port("Prometheus"),
        "Prometheus port (1024 to 65535).",
    ),
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
    Setting(
        "monitoring_node_exporter_port",
        9100,
        unprivileged_port("the node exporter"),
        "Node exporter port (1024 to 65535).",
    ),
    Setting(
        "monitoring_gpu_exporter_port",
        9835,
        unprivileged_port("the GPU exporter"),
        "GPU exporter port (1024 to 65535).",
    ),
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
