"""The one way a service is brought up: enabled and started, restarted only when what it
reads changed, and never restarted right after this run started it (a fresh start
already reads the new configuration). Used by every service the deploy manages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyinfra.api.operation import OperationMeta
from pyinfra.context import host
from pyinfra.operations import server, systemd

from tasks.facts import UnitActiveState


@dataclass(frozen=True)
class Activation:
    started: OperationMeta  # "enabled and running": changed when this run started it
    restarts: Callable[[], bool]  # whether this run restarts it (known as the run executes)


def activate(
    unit: str,
    *,
    unit_file: OperationMeta | None = None,
    restart_on: Sequence[OperationMeta] = (),
    why: str = "its configuration changed",
    installed_by: Sequence[OperationMeta] = (),
    reload_on: Sequence[OperationMeta] = (),
    clear_failed: bool = False,
) -> Activation:
    """Enable and start ``unit``; restart it when ``unit_file`` or any of ``restart_on``
    changed, unless this run started it or installed it (``installed_by``: a package
    whose install starts it with the new settings already in place); reload it when any of
    ``reload_on`` changed and it was neither started nor restarted.

    ``clear_failed``: a unit that is not running gets its failed state and start limit
    cleared first, so that "fix and rerun" starts a unit that had given up.
    """
    if unit_file is not None:
        systemd.daemon_reload(name="Reload systemd units", _if=unit_file.did_change)
    if clear_failed and host.get_fact(UnitActiveState, unit=unit) not in ("active", "reloading"):
        # A unit that kept failing (a model refused, an OOM) hits its start limit, and
        # systemd refuses to start it again until that is cleared: the deploy, which starts
        # it next, is the deliberate "try again" the limit waits for. Also while it is
        # still retrying: the limit may be hit between this plan and the start.
        server.shell(
            name=f"Clear {unit}'s failed state and start limit (it is not running)",
            commands=[f"systemctl reset-failed {unit} 2>/dev/null || true"],
        )
    started = systemd.service(
        name=f"Enable and start {unit}", service=unit, running=True, enabled=True
    )
    changes = [*([unit_file] if unit_file is not None else []), *restart_on]

    def fresh() -> bool:
        return started.did_change() or any(op.did_change() for op in installed_by)

    def restarts() -> bool:
        return any(op.did_change() for op in changes) and not fresh()

    if changes:
        systemd.service(
            name=f"Restart {unit} ({why})",
            service=unit,
            running=True,
            restarted=True,
            _if=restarts,
        )
    if reload_on:
        systemd.service(
            name=f"Reload {unit} (its configuration changed)",
            service=unit,
            reloaded=True,
            # Not suppressed by installed_by: a package that started the daemon did so
            # with the configuration it shipped, which reload_on has just replaced.
            _if=lambda: (
                any(op.did_change() for op in reload_on)
                and not (restarts() or started.did_change())
            ),
        )
    return Activation(started, restarts)
