"""The exporters on every served host: Debian's node exporter (with a textfile naming the
model filesystem) and, on GPU hosts, the pinned nvidia_gpu_exporter. On gateway hosts the
node exporter too, with a textfile of the gateway certificate's end date that a timer
refreshes."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from llamahost import layout
from llamahost.addresses import hostport
from llamahost.monitoring.settings import MonitoringConfig

MODEL_FS_METRIC = "llamahost_model_filesystem_info"
TLS_EXPIRY_METRIC = "llamahost_tls_cert_not_after_seconds"
OWN_METRICS = (MODEL_FS_METRIC, TLS_EXPIRY_METRIC)


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


def tls_expiry_script(pem: str, textfile: str) -> str:
    """A shell script that writes the end date of ``pem``'s first certificate (the one
    HAProxy serves; never the key) to the node exporter's ``textfile``, all at once; with
    no readable certificate it removes the textfile (no series, no alert)."""
    head = (
        f"# HELP {TLS_EXPIRY_METRIC} When the gateway TLS certificate expires (notAfter), "
        "seconds since the epoch."
    )
    series = f'{TLS_EXPIRY_METRIC}{{path="{_label_value(pem)}"}}'
    return f"""#!/bin/sh
# Managed by llamahost (pyinfra). Local edits are overwritten by the next deploy.
# The gateway certificate's end date for the node exporter's textfile collector (alert
# GatewayCertificateExpiresSoon); run by {layout.TLS_EXPIRY_TIMER} and by the deploy.
set -eu
pem={shlex.quote(pem)}
out={shlex.quote(textfile)}
if end=$(openssl x509 -noout -enddate -in "$pem" 2>/dev/null) &&
    t=$(LC_ALL=C date -u -d "${{end#notAfter=}}" +%s); then
    # Not *.prom until complete: the collector reads only whole files.
    tmp=$(mktemp "$out.XXXXXX")
    printf '%s\\n' {shlex.quote(head)} {shlex.quote(f"# TYPE {TLS_EXPIRY_METRIC} gauge")} \\
        {shlex.quote(series)}" $t" >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$out"
else
    rm -f "$out"
    echo "no certificate readable in $pem: $out removed" >&2
fi
"""


def tls_expiry_units(script: str, textfile_dir: str) -> tuple[str, str]:
    """The oneshot service that runs ``script`` and the timer that runs it every hour (the
    end date comes closer without any deploy)."""
    service = f"""# Managed by llamahost (pyinfra). Local edits are overwritten by the next deploy.
[Unit]
Description=Export the gateway TLS certificate's end date for the node exporter

[Service]
Type=oneshot
ExecStart={script}
# Reads the certificate (root:haproxy 0640), writes the textfile directory only.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={textfile_dir}
ProtectHome=yes
PrivateTmp=yes
PrivateNetwork=yes
"""
    timer = """# Managed by llamahost (pyinfra). Local edits are overwritten by the next deploy.
[Unit]
Description=Export the gateway TLS certificate's end date every hour

[Timer]
OnCalendar=hourly
RandomizedDelaySec=5m
Persistent=yes

[Install]
WantedBy=timers.target
"""
    return service, timer


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
