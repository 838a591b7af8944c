"""The llama-server service: its user, key, unit, and a restart only when something changed."""

from io import StringIO
from typing import Any

from pyinfra.api.facts import FactBase
from pyinfra.api.operation import OperationMeta
from pyinfra.context import host
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from llamahost.config import HostConfig
from llamahost.render import unit_context
from tasks import model

UNIT = "llama-server.service"
HEALTH_SCRIPT = "/opt/llamahost/bin/llama-wait-healthy"


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
    """Key file readable by root and the service group only. Its content is never printed."""
    key_dir = cfg.api_key_file.rsplit("/", 1)[0] or "/"
    files.directory(
        name="Key directory", path=key_dir, user="root", group=cfg.service_user, mode="0750"
    )
    if cfg.api_key is not None:
        return files.put(
            name="API key (supplied)",
            src=StringIO(cfg.api_key + "\n"),
            dest=cfg.api_key_file,
            user="root",
            group=cfg.service_user,
            mode="0640",
        )
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


def unit(
    cfg: HostConfig, binary: str, cpu_count: int, unit_lines: tuple[str, ...] = ()
) -> OperationMeta:
    files.put(
        name="Install the health wait script",
        src="files/llama_wait_healthy.py",
        dest=HEALTH_SCRIPT,
        mode="0755",
    )
    return files.template(
        name=f"Render {UNIT} (profile {cfg.profile.name})",
        src="templates/llama-server.service.j2",
        dest=f"/etc/systemd/system/{UNIT}",
        mode="0644",
        gpu_unit_lines=unit_lines,
        **unit_variables(cfg, binary, cpu_count),
    )


class UnitActiveState(FactBase[str]):
    """A unit's ActiveState: active, activating, failed, inactive..."""

    def command(self, unit: str) -> str:
        return f"systemctl show -p ActiveState --value {unit}"

    def process(self, output: list[str]) -> str:
        return "".join(output).strip()


def unit_variables(cfg: HostConfig, binary: str, cpu_count: int) -> dict[str, Any]:
    """The template's variables (the compliance suite renders the unit with them too)."""
    return unit_context(cfg, binary, HEALTH_SCRIPT, cpu_count, model.FETCH_SCRIPT)


def run(unit_op: OperationMeta, restart_when: list[OperationMeta]) -> None:
    """Enable and start; restart only when the unit, binary, model or key changed.

    A fresh start already runs the new configuration, so it is not followed by a restart.
    """
    systemd.daemon_reload(name="Reload systemd units", _if=unit_op.did_change)
    if host.get_fact(UnitActiveState, unit=UNIT) not in ("active", "reloading"):
        # A unit that kept failing (a model refused, an OOM) hits its start limit, and
        # systemd refuses to start it again until that is cleared: the deploy, which starts
        # it next, is the deliberate "try again" the limit waits for. Also while it is
        # still retrying: the limit may be hit between this plan and the start.
        server.shell(
            name=f"Clear {UNIT}'s failed state and start limit (it is not running)",
            commands=[f"systemctl reset-failed {UNIT} 2>/dev/null || true"],
        )
    started = systemd.service(
        name=f"Enable and start {UNIT}", service=UNIT, running=True, enabled=True
    )
    changes = [unit_op, *restart_when]
    systemd.service(
        name=f"Restart {UNIT} (its configuration changed)",
        service=UNIT,
        running=True,
        restarted=True,
        _if=lambda: any(op.did_change() for op in changes) and not started.did_change(),
    )
