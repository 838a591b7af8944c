"""Monitoring: exporters on every served host, Prometheus on the hosts of group `monitoring`.

Nothing here does anything unless the inventory has a `monitoring` group. Then:
- every host (each serves a llama-server) gets Debian's node exporter, with a textfile that
  names the filesystem holding its models, and GPU hosts the pinned nvidia_gpu_exporter;
- each host of the group gets Debian's Prometheus, its configuration rendered from the whole
  inventory (a host removed from the inventory leaves the targets on the next run), checked
  with promtool before it is put in place and reloaded only when it changed, and each served
  host's API key in a credentials file readable by root and Prometheus only.

A served host's key is copied while the run executes, after the bring-up has generated it:
read from the served host and written to the monitoring host by pyinfra's connectors with
their output off, so it never appears in the run's output (not even with -vvv, which prints
facts), on a command line or in the repository.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from io import StringIO
from typing import Any

from pyinfra import logger
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.command import StringCommand
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.facts import FactBase
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import State
from pyinfra.context import host, inventory, state
from pyinfra.facts.files import Directory, File, FindFiles, Sha256File
from pyinfra.operations import apt, files, python, server, systemd

from llamahost import monitoring as m
from llamahost.config import ConfigError, HostConfig, resolve
from llamahost.render import exec_line

PROMETHEUS = "prometheus.service"
NODE_EXPORTER = "prometheus-node-exporter.service"
# The key shape llamahost.config accepts, and the 48 alphanumerics the bring-up generates.
_KEY = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")


class MountPoint(FactBase[str]):
    """The mount point of the filesystem that holds a path (or its nearest existing parent:
    on a first run the model directory is created later)."""

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f'p={p}; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; stat -c %m -- "$p"'

    def process(self, output: list[str]) -> str:
        return output[0].strip() if output else "/"


class KeyDigest(FactBase[str | None]):
    """sha256 of a key file's content without whitespace; None when there is no file.

    Compares keys on two hosts without reading them, whatever line ending each file has."""

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f"if [ -f {p} ]; then tr -d ' \\t\\r\\n' <{p} | sha256sum; fi"

    def process(self, output: list[str]) -> str | None:
        return output[0].split()[0] if output else None


def enabled() -> bool:
    """Monitoring is on when the inventory has a `monitoring` group."""
    return bool(inventory.get_group(m.GROUP, []))


def _monitoring_config(name: str, data: dict[str, Any]) -> m.MonitoringConfig:
    try:
        return m.resolve_monitoring(name, data)
    except ConfigError as e:
        raise PyinfraError(str(e)) from None


def _apt(name: str, packages: list[str]) -> OperationMeta:
    return apt.packages(
        name=name,
        packages=packages,
        update=True,
        cache_time=24 * 3600,
        no_recommends=True,
    )


# ---------------------------------------------------------------- served hosts
def exporters(cfg: HostConfig) -> None:
    """On every host: the node exporter, and the GPU exporter on GPU hosts."""
    if not enabled():
        return
    mon = _monitoring_config(host.name, host.data.dict())
    try:  # checked before any operation: a GPU host without the pinned sha256 stops the run
        gpu = m.gpu_exporter(host.name, mon) if cfg.profile.uses_gpu else None
    except ConfigError as e:
        raise PyinfraError(str(e)) from None
    _node_exporter(cfg, mon)
    if gpu is not None:
        _gpu_exporter(gpu, mon)


def _default_args(name: str, path: str, args: str) -> OperationMeta:
    # Written before the package is installed: dpkg keeps a conffile that is already there
    # (pyinfra's apt runs with --force-confold), so the first start already uses it.
    return files.template(
        name=name,
        src="templates/monitoring/default-args.j2",
        dest=path,
        mode="0644",
        args=args,
    )


def _node_exporter(cfg: HostConfig, mon: m.MonitoringConfig) -> None:
    settings = _default_args(
        "Node exporter settings",
        "/etc/default/prometheus-node-exporter",
        m.node_exporter_args(mon),
    )
    pkg = _apt("Install the node exporter", ["prometheus-node-exporter"])
    files.directory(name="Node exporter textfile directory", path=m.TEXTFILE_DIR, mode="0755")
    mount = host.get_fact(MountPoint, path=cfg.model_dir)
    files.put(
        name="Name the model filesystem for the alerts",
        src=StringIO(m.model_filesystem_textfile(cfg.model_dir, mount)),
        dest=f"{m.TEXTFILE_DIR}/llamahost.prom",
        mode="0644",
    )
    _start(NODE_EXPORTER, settings, pkg)


def _gpu_exporter(gpu: m.GpuExporter, mon: m.MonitoringConfig) -> None:
    root = gpu.binary.rsplit("/", 1)[0]
    files.directory(name="GPU exporter directory", path=root, mode="0755")
    files.download(
        name=f"Download nvidia_gpu_exporter {mon.monitoring_gpu_exporter_version}",
        src=gpu.url,
        dest=gpu.archive,
        sha256sum=gpu.sha256,
        mode="0644",
    )
    if not host.get_fact(File, path=gpu.binary):
        # Shell because files.unarchive refuses, while planning, an archive that is only
        # downloaded later in the run. The fact above makes a rerun extract nothing.
        server.shell(
            name="Extract nvidia_gpu_exporter",
            commands=[
                shlex.join(
                    [
                        "tar",
                        "-xzf",
                        gpu.archive,
                        "-C",
                        root,
                        "--no-same-owner",
                        "nvidia_gpu_exporter",
                    ]
                )
            ],
        )
    unit = files.template(
        name=f"Render {m.GPU_EXPORTER_UNIT}",
        src="templates/monitoring/nvidia-gpu-exporter.service.j2",
        dest=f"/etc/systemd/system/{m.GPU_EXPORTER_UNIT}",
        mode="0644",
        version=mon.monitoring_gpu_exporter_version,
        exec_start=exec_line(gpu.binary, m.gpu_exporter_args(gpu)),
    )
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
    started = systemd.service(
        name=f"Enable and start {m.GPU_EXPORTER_UNIT}",
        service=m.GPU_EXPORTER_UNIT,
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"Restart {m.GPU_EXPORTER_UNIT} (its unit changed)",
        service=m.GPU_EXPORTER_UNIT,
        running=True,
        restarted=True,
        _if=lambda: unit.did_change() and not started.did_change(),
    )


# ---------------------------------------------------------------- monitoring hosts
def prometheus() -> None:
    """On a host of group `monitoring`: Prometheus scraping every llama-server of the
    inventory (a no-op on other hosts)."""
    if m.GROUP not in host.groups:
        return
    mon = _monitoring_config(host.name, host.data.dict())
    try:
        served = [m.served_host(h.name, h.data.dict()) for h in inventory]
        scrape = m.targets(host.name, served)
    except ConfigError as e:
        raise PyinfraError(str(e)) from None

    settings = _default_args(
        "Prometheus settings", "/etc/default/prometheus", m.prometheus_args(mon)
    )
    pkg = _apt("Install Prometheus", ["prometheus"])
    _credentials(scrape)
    installed = _configuration(mon, scrape)
    started, restart = _start(PROMETHEUS, settings, pkg)
    systemd.service(
        name=f"Reload {PROMETHEUS} (its configuration changed)",
        service=PROMETHEUS,
        reloaded=True,
        _if=lambda: installed.did_change() and not (restart() or started.did_change()),
    )


def _start(
    unit: str, settings: OperationMeta, pkg: OperationMeta
) -> tuple[OperationMeta, Callable[[], bool]]:
    """Enabled and running; restarted when its settings changed, unless this run installed
    or started it (it already reads them then). Returns the start and the restart's test."""
    started = systemd.service(
        name=f"Enable and start {unit}", service=unit, running=True, enabled=True
    )

    def restart() -> bool:
        return settings.did_change() and not (pkg.did_change() or started.did_change())

    systemd.service(
        name=f"Restart {unit} (its settings changed)",
        service=unit,
        running=True,
        restarted=True,
        _if=restart,
    )
    return started, restart


def _credentials(scrape: list[m.Target]) -> None:
    """One credentials file per served host: root:prometheus 0640 in a 0750 directory."""
    files.directory(
        name="Prometheus credentials directory",
        path=m.KEYS_DIR,
        user="root",
        group="prometheus",
        mode="0750",
    )
    for t in scrape:
        _credential(t)
    present = (
        host.get_fact(FindFiles, path=m.KEYS_DIR, maxdepth=1)
        if host.get_fact(Directory, path=m.KEYS_DIR)
        else []
    )
    for stale in sorted(set(present or []) - {t.key_file for t in scrape}):
        files.file(
            name=f"Remove the key of a host no longer in the inventory ({stale})",
            path=stale,
            present=False,
        )


def _credential(t: m.Target) -> None:
    served = inventory.get_host(t.host)
    cfg = resolve(served.name, served.data.dict())
    if cfg.api_key is not None:
        # The inventory supplies the key (e.g. from the controller's environment): the same
        # bytes service.api_key writes on the served host.
        files.put(
            name=f"API key of {t.host} for Prometheus (supplied)",
            src=StringIO(cfg.api_key + "\n"),
            dest=t.key_file,
            user="root",
            group="prometheus",
            mode="0640",
        )
        return
    # The file exists before promtool checks the configuration (it refuses a missing one);
    # an empty one makes the scrape fail with 401 until the key is there.
    files.file(
        name=f"Credentials file for {t.host}",
        path=t.key_file,
        user="root",
        group="prometheus",
        mode="0640",
    )
    if served not in state.active_hosts:
        if not host.get_fact(File, path=t.key_file):
            logger.warning(
                f"[{host.name}] {t.host} is not in this run, so its generated key cannot be "
                "read: its scrape fails until a run that includes it"
            )
        return
    # Hashes only while planning (facts are printed at -vvv); the key itself is copied
    # when the run executes, after the bring-up has generated it on a fresh host.
    theirs = served.get_fact(KeyDigest, path=cfg.api_key_file)
    ours = host.get_fact(KeyDigest, path=t.key_file)
    if theirs is None or theirs != ours:
        python.call(
            name=f"Copy the API key of {t.host} to Prometheus",
            function=_copy_key,
            served_name=t.host,
            src=cfg.api_key_file,
            dest=t.key_file,
        )


def _connector_args(state: State, target: Host) -> dict[str, Any]:
    """The connector arguments (sudo and the like) that target's data asks for."""
    arguments, _ = pop_global_arguments(state, target, {})
    return {k: v for k, v in arguments.items() if k in CONNECTOR_ARGUMENT_KEYS}


def _copy_key(state: State, host: Host, served_name: str, src: str, dest: str) -> None:
    """Runs while the run executes, on the monitoring host. Output off on both ends."""
    served = state.inventory.get_host(served_name)
    if not served.connected:
        served.connect(reason="to read its API key", raise_exceptions=True)
    ok, out = served.run_shell_command(
        StringCommand("cat", "--", src),
        print_output=False,
        print_input=state.print_input,
        **_connector_args(state, served),
    )
    key = "".join(out.stdout_lines).strip() if ok else ""
    if not _KEY.fullmatch(key):
        raise PyinfraError(f"{served_name}: could not read an API key from {src}")
    # The file exists already, 0640 root:prometheus: writing into it keeps its mode.
    if not host.put_file(
        StringIO(key + "\n"),
        dest,
        print_output=False,
        print_input=state.print_input,
        **_connector_args(state, host),
    ):
        raise PyinfraError(f"{host.name}: could not write {dest}")


def _configuration(mon: m.MonitoringConfig, scrape: list[m.Target]) -> OperationMeta:
    """Stage the configuration and rules, check them with promtool, then put them in place.

    The live configuration names its rules by a relative path, so the check of the staged
    copy reads the staged rules. A failed check leaves the live files and Prometheus alone.
    """
    staged_config = f"{m.STAGE_DIR}/prometheus.yml"
    staged_rules = f"{m.STAGE_DIR}/{m.RULES_REF}"
    files.directory(name="Prometheus staging directory", path=f"{m.STAGE_DIR}/rules", mode="0755")
    staged = [
        files.put(
            name="Stage the Prometheus configuration",
            src=StringIO(m.prometheus_yml(host.name, mon, scrape)),
            dest=staged_config,
            mode="0644",
        ),
        files.put(
            name="Stage the alert rules",
            src="files/monitoring/llama-server.rules.yml",
            dest=staged_rules,
            mode="0644",
        ),
    ]
    pairs = [(staged_config, m.PROMETHEUS_CONFIG), (staged_rules, m.RULES_PATH)]
    live = all(
        host.get_fact(Sha256File, path=a) is not None
        and host.get_fact(Sha256File, path=a) == host.get_fact(Sha256File, path=b)
        for a, b in pairs
    )

    def install(src: str, dest: str) -> str:
        return " && ".join(
            [
                shlex.join(["install", "-D", "-m", "0644", src, dest + ".new"]),
                shlex.join(["mv", "-f", dest + ".new", dest]),
            ]
        )

    # Shell because the check is promtool's. It runs when a staged file changed, or when
    # the live files differ from the staged ones (a check that failed on an earlier run).
    return server.shell(
        name="Check the Prometheus configuration with promtool and put it in place",
        commands=[
            " && ".join(
                [
                    shlex.join(["promtool", "check", "config", staged_config]),
                    install(staged_rules, m.RULES_PATH),
                    install(staged_config, m.PROMETHEUS_CONFIG),
                ]
            )
        ],
        _if=(lambda: any(op.did_change() for op in staged)) if live else None,
    )
