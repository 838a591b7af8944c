"""The exporters on every served host: Debian's node exporter (with a textfile naming the
model filesystem) and, on GPU hosts, the pinned nvidia_gpu_exporter."""

from __future__ import annotations

from dataclasses import dataclass

from llamahost import layout
from llamahost.addresses import hostport
from llamahost.monitoring.settings import MonitoringConfig

MODEL_FS_METRIC = "llamahost_model_filesystem_info"
OWN_METRICS = (MODEL_FS_METRIC,)


def node_exporter_args(mon: MonitoringConfig) -> str:
    """ARGS for Debian's /etc/default/prometheus-node-exporter."""
    return " ".join(
        [
            "--web.listen-address="
            + hostport(mon.monitoring_exporter_host, mon.monitoring_node_exporter_port),
            f"--collector.textfile.directory={layout.TEXTFILE_DIR}",
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


def gpu_exporter(mon: MonitoringConfig) -> GpuExporter:
    """Where the pinned GPU exporter comes from and goes (its sha256 is required on a GPU
    host of a monitored inventory: llamahost.spec refuses the host without it)."""
    sha = mon.monitoring_gpu_exporter_sha256
    if sha is None:
        raise ValueError("llama_monitoring_gpu_exporter_sha256 is unset")
    version = mon.monitoring_gpu_exporter_version
    # A new version or a new archive is a new directory (and a new unit: a restart).
    root = f"{layout.GPU_EXPORTER_PREFIX}/{version}-{sha[:12]}"
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
