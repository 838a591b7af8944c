"""Monitoring: exporters on every served host, Prometheus on the hosts of group `monitoring`.

Nothing here does anything unless the inventory has a `monitoring` group. Then:
- every served host gets Debian's node exporter, with a textfile that names the filesystem
  holding its models, and GPU hosts the pinned nvidia_gpu_exporter;
- every gateway host (serving or not) gets the node exporter too, with a textfile of its TLS
  certificate's end date that a timer refreshes every hour (and the deploy at each change);
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

import shlex
from io import StringIO

from pyinfra import logger
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import State
from pyinfra.context import host, inventory, state
from pyinfra.facts.files import Directory, File, FindFiles, Sha256File
from pyinfra.operations import apt, files, python, server, systemd

from llamahost import layout, render
from llamahost.checks import ConfigError
from llamahost.monitoring import exporters as ex
from llamahost.monitoring import scrape
from llamahost.monitoring.settings import GROUP, MonitoringConfig
from llamahost.spec import HostSpec
from tasks import secret
from tasks.activate import activate
from tasks.facts import KeyDigest, MountPoint
from tasks.preflight import inventory_specs_or_refuse, refuse, served_specs


def enabled() -> bool:
    """Monitoring is on when the inventory has a `monitoring` group."""
    return bool(inventory.get_group(GROUP, []))


def _apt(name: str, packages: list[str]) -> OperationMeta:
    return apt.packages(
        name=name,
        packages=packages,
        update=True,
        cache_time=24 * 3600,
        no_recommends=True,
    )


# ---------------------------------------------------------------- served hosts
def exporters(spec: HostSpec) -> None:
    """On every served host: the node exporter, and the GPU exporter on GPU hosts; on every
    gateway host the node exporter and its certificate's end date."""
    if not enabled() or not (spec.serves or spec.is_gateway):
        return
    _node_exporter(spec)
    if spec.serves and spec.uses_gpu:
        _gpu_exporter(ex.gpu_exporter(spec.monitoring), spec.monitoring)
    if spec.is_gateway:
        _tls_expiry()


def refresh_tls_expiry(certificate: OperationMeta) -> None:
    """On a gateway of a monitored inventory: the textfile follows a new certificate at
    once, not at the next hourly run of the timer."""
    if not enabled():
        return
    server.shell(
        name="Export the new certificate's end date",
        commands=[f"systemctl start {layout.TLS_EXPIRY_UNIT}"],
        _if=certificate.did_change,
    )


def _tls_expiry() -> None:
    files.directory(name="Toolkit scripts directory", path=layout.BIN_DIR, mode="0755")
    service, timer = ex.tls_expiry_units(layout.TLS_EXPIRY_SCRIPT, layout.TEXTFILE_DIR)
    changed = [
        files.put(
            name="Script that exports the gateway certificate's end date",
            src=StringIO(ex.tls_expiry_script(layout.GATEWAY_PEM, layout.TLS_EXPIRY_TEXTFILE)),
            dest=layout.TLS_EXPIRY_SCRIPT,
            mode="0755",
        ),
        files.put(
            name=f"Render {layout.TLS_EXPIRY_UNIT}",
            src=StringIO(service),
            dest=f"{layout.SYSTEMD_DIR}/{layout.TLS_EXPIRY_UNIT}",
            mode="0644",
        ),
        files.put(
            name=f"Render {layout.TLS_EXPIRY_TIMER}",
            src=StringIO(timer),
            dest=f"{layout.SYSTEMD_DIR}/{layout.TLS_EXPIRY_TIMER}",
            mode="0644",
        ),
    ]
    systemd.daemon_reload(
        name="Reload systemd units", _if=lambda: any(op.did_change() for op in changed[1:])
    )
    systemd.service(
        name=f"Enable and start {layout.TLS_EXPIRY_TIMER}",
        service=layout.TLS_EXPIRY_TIMER,
        running=True,
        enabled=True,
    )
    # The first value now (before the gateway step, the certificate may not exist yet:
    # then no series, and that step's change exports it).
    server.shell(
        name="Export the gateway certificate's end date",
        commands=[f"systemctl start {layout.TLS_EXPIRY_UNIT}"],
        _if=lambda: any(op.did_change() for op in changed),
    )


def _default_args(name: str, path: str, args: str) -> OperationMeta:
    # Written before the package is installed: dpkg keeps a conffile that is already there
    # (pyinfra's apt runs with --force-confold), so the first start already uses it.
    return files.put(name=name, src=StringIO(render.default_args(args)), dest=path, mode="0644")


def _node_exporter(spec: HostSpec) -> None:
    settings = _default_args(
        "Node exporter settings",
        layout.NODE_EXPORTER_DEFAULTS,
        ex.node_exporter_args(spec.monitoring),
    )
    pkg = _apt("Install the node exporter", ["prometheus-node-exporter"])
    files.directory(name="Node exporter textfile directory", path=layout.TEXTFILE_DIR, mode="0755")
    if spec.serves:
        model_dir = spec.cfg.model_dir
        mount = host.get_fact(MountPoint, path=model_dir)
        files.put(
            name="Name the model filesystem for the alerts",
            src=StringIO(ex.model_filesystem_textfile(model_dir, mount)),
            dest=layout.MODEL_FS_TEXTFILE,
            mode="0644",
        )
    activate(
        layout.NODE_EXPORTER, restart_on=[settings], why="its settings changed", installed_by=[pkg]
    )


def _gpu_exporter(gpu: ex.GpuExporter, mon: MonitoringConfig) -> None:
    root = layout.parent(gpu.binary)
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
    unit = files.put(
        name=f"Render {layout.GPU_EXPORTER_UNIT}",
        src=StringIO(
            render.gpu_exporter_unit(
                mon.monitoring_gpu_exporter_version, gpu.binary, ex.gpu_exporter_args(gpu)
            )
        ),
        dest=layout.GPU_EXPORTER_UNIT_PATH,
        mode="0644",
    )
    activate(layout.GPU_EXPORTER_UNIT, unit_file=unit, why="its unit changed")


# ---------------------------------------------------------------- monitoring hosts
def prometheus(spec: HostSpec) -> None:
    """On a host of group `monitoring`: Prometheus scraping every llama-server of the
    inventory (a no-op on other hosts)."""
    if GROUP not in host.groups:
        return
    served = served_specs()
    try:
        targets = scrape.targets(host.name, [scrape.served_host(s) for s in served])
        nodes = scrape.gateway_node_targets(host.name, inventory_specs_or_refuse())
    except ConfigError as e:
        raise refuse(str(e)) from None
    mon = spec.monitoring
    settings = _default_args(
        "Prometheus settings", layout.PROMETHEUS_DEFAULTS, scrape.prometheus_args(mon)
    )
    pkg = _apt("Install Prometheus", ["prometheus"])
    _credentials(targets, {s.name: s for s in served})
    installed = _configuration(mon, targets, nodes)
    activate(
        layout.PROMETHEUS,
        restart_on=[settings],
        why="its settings changed",
        installed_by=[pkg],
        reload_on=[installed],
    )


def _credentials(targets: list[scrape.Target], specs: dict[str, HostSpec]) -> None:
    """One credentials file per served host: root:prometheus 0640 in a 0750 directory."""
    files.directory(
        name="Prometheus credentials directory",
        path=layout.KEYS_DIR,
        user="root",
        group="prometheus",
        mode="0750",
    )
    for t in targets:
        _credential(t, specs[t.host])
    present = (
        host.get_fact(FindFiles, path=layout.KEYS_DIR, maxdepth=1)
        if host.get_fact(Directory, path=layout.KEYS_DIR)
        else []
    )
    for stale in sorted(set(present or []) - {t.key_file for t in targets}):
        files.file(
            name=f"Remove the key of a host no longer in the inventory ({stale})",
            path=stale,
            present=False,
        )


def _credential(t: scrape.Target, spec: HostSpec) -> None:
    served = inventory.get_host(t.host)
    cfg = spec.cfg
    if cfg.api_key is not None:
        # The inventory supplies the key (e.g. from the controller's environment): the same
        # bytes service.api_key writes on the served host, by the same path that never
        # prints them (tasks/secret.py).
        secret.file(
            name=f"API key of {t.host} for Prometheus (supplied)",
            path=t.key_file,
            secret=secret.Secret(cfg.api_key),
            user="root",
            group="prometheus",
            mode="0640",
        )
        files.file(
            name=f"Credentials file for {t.host}",
            path=t.key_file,
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


def _copy_key(state: State, host: Host, served_name: str, src: str, dest: str) -> bool:
    """Runs while the run executes, on the monitoring host. Output off on both ends; the
    key is written as tasks/secret.py writes any secret (never through pyinfra's upload,
    whose sudo path leaves it world-readable in /tmp for a moment)."""
    key = secret.read_api_key(state, served_name, src)
    return secret.write(
        state, host, dest, secret.Secret(key), user="root", group="prometheus", mode="0640"
    )


def _configuration(
    mon: MonitoringConfig, targets: list[scrape.Target], nodes: list[scrape.NodeTarget]
) -> OperationMeta:
    """Stage the configuration and rules, check them with promtool, then put them in place.

    The live configuration names its rules by a relative path, so the check of the staged
    copy reads the staged rules. A failed check leaves the live files and Prometheus alone.
    """
    staged_config = f"{layout.STAGE_DIR}/prometheus.yml"
    staged_rules = f"{layout.STAGE_DIR}/{layout.RULES_REF}"
    files.directory(
        name="Prometheus staging directory", path=f"{layout.STAGE_DIR}/rules", mode="0755"
    )
    staged = [
        files.put(
            name="Stage the Prometheus configuration",
            src=StringIO(scrape.prometheus_yml(host.name, mon, targets, nodes)),
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
    pairs = [(staged_config, layout.PROMETHEUS_CONFIG), (staged_rules, layout.RULES_PATH)]
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
                    install(staged_rules, layout.RULES_PATH),
                    install(staged_config, layout.PROMETHEUS_CONFIG),
                ]
            )
        ],
        _if=(lambda: any(op.did_change() for op in staged)) if live else None,
    )
