"""The llama-server service: its user, key, unit, and a restart only when something changed."""

from io import StringIO

from pyinfra.api.operation import OperationMeta
from pyinfra.context import host
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from llamahost import layout, render
from llamahost.config import HostConfig
from llamahost.spec import HostSpec
from tasks import rolling, secret
from tasks.activate import activate


def account(cfg: HostConfig) -> None:
    server.group(name="Service group", group=cfg.service_user, system=True)
    server.user(  # noqa: S604  (shell= is the login shell, not a subprocess)
        name="Service user (no shell, no home)",
        user=cfg.service_user,
        group=cfg.service_user,
        system=True,
        shell="/usr/sbin/nologin",
        home="/nonexistent",
        create_home=False,
        ensure_home=False,
    )


def api_key(cfg: HostConfig) -> OperationMeta:
    """Key file readable by root and the service group only. Its content is never printed,
    in any mode (tasks/secret.py). Returns the operation that changes when the key does."""
    files.directory(
        name="Key directory",
        path=layout.parent(cfg.api_key_file),
        user="root",
        group=cfg.service_user,
        mode="0750",
    )
    if cfg.api_key is not None:
        written = secret.file(
            name="API key (supplied)",
            path=cfg.api_key_file,
            secret=secret.Secret(cfg.api_key),
            user="root",
            group=cfg.service_user,
            mode="0640",
        )
        # A mode or owner changed by hand is put back without a restart: only a new key
        # restarts the server.
        files.file(
            name="API key file mode and owner",
            path=cfg.api_key_file,
            user="root",
            group=cfg.service_user,
            mode="0640",
        )
        return written
    if not host.get_fact(File, path=cfg.api_key_file):
        # Shell because the key must be made on the host and never pass through pyinfra's
        # output: 48 random alphanumerics, created 0600 and renamed into place.
        server.shell(
            name="API key (generated on the host)",
            commands=[
                f"umask 077; tr -dc A-Za-z0-9 </dev/urandom | head -c 48 >{cfg.api_key_file}.tmp"
                f" && mv {cfg.api_key_file}.tmp {cfg.api_key_file}"
            ],
        )
    return files.file(
        name="API key file mode and owner",
        path=cfg.api_key_file,
        user="root",
        group=cfg.service_user,
        mode="0640",
    )


def unit(spec: HostSpec, cpu_count: int) -> OperationMeta:
    files.put(
        name="Install the health wait script",
        src="files/llama_wait_healthy.py",
        dest=layout.HEALTH_SCRIPT,
        mode="0755",
    )
    return files.put(
        name=f"Render {layout.UNIT} (profile {spec.profile.name})",
        src=StringIO(render.unit(spec, cpu_count)),
        dest=layout.UNIT_PATH,
        mode="0644",
    )


def run(spec: HostSpec, unit_op: OperationMeta, restart_when: list[OperationMeta]) -> None:
    """Enable and start; restart only when the unit, binary, model or key changed. Behind
    gateways, that restart is a drained one, a few hosts at a time (tasks/rolling.py)."""
    if not rolling.gateways():
        activate(layout.UNIT, unit_file=unit_op, restart_on=restart_when, clear_failed=True)
        return
    systemd.daemon_reload(name="Reload systemd units", _if=unit_op.did_change)
    started = activate(layout.UNIT, clear_failed=True).started
    rolling.restart(
        spec, [unit_op, *restart_when], started, max_unavailable=rolling.max_unavailable()
    )
