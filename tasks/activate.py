"""The one way a service is brought up: enabled and started, restarted only when what it
reads changed, and never restarted right after this run started it (a fresh start
already reads the new configuration). Used by every service the deploy manages.

A start or restart that fails prints the unit's last journal lines in the deploy's output
(the reason: a model refused, a port taken), so that the operator need not log in to
read why; the failed operation stops the host's run as before.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from io import StringIO

from pyinfra.api.operation import OperationMeta, operation
from pyinfra.context import host
from pyinfra.facts.files import Sha256File
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus
from pyinfra.operations import files, server, systemd

from tasks.facts import UnitActiveState

# Journal lines printed when a start or restart fails: llama-server's own error (the model
# loader's message) and systemd's verdict fit in far fewer.
JOURNAL_LINES = 30


def _unit_name(unit: str) -> str:
    return unit if "." in unit else f"{unit}.service"


def control_command(verb: str, unit: str) -> str:
    """``systemctl VERB UNIT``; when it fails, the unit's last journal lines on standard
    error (pyinfra prints a failed command's output), and the failure kept."""
    u = shlex.quote(unit)
    return (
        f"systemctl {verb} {u} || {{ rc=$?; journalctl --sync 2>/dev/null;"
        f" echo '{unit} did not {verb}; its last journal lines:' >&2;"
        f" journalctl -u {u} -n {JOURNAL_LINES} --no-pager -o cat >&2; exit $rc; }}"
    )


@operation()
def service(
    unit: str, enabled: bool = False, restarted: bool = False
) -> Generator[str, None, None]:
    """Running (started when it is not, restarted when ``restarted`` and it is), enabled
    when ``enabled``: pyinfra's systemd.service with running=True, the same facts and
    commands, but a failed start or restart shows the unit's journal."""
    unit = _unit_name(unit)
    is_running = host.get_fact(SystemdStatus, services=[unit]).get(unit)
    if not is_running:
        yield control_command("start", unit)
    elif restarted:
        yield control_command("restart", unit)
    else:
        host.noop(f"service {unit} is running")
    if enabled and not host.get_fact(SystemdEnabled, services=[unit]).get(unit, False):
        yield f"systemctl enable {shlex.quote(unit)}"


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
    started = service(name=f"Enable and start {unit}", unit=unit, enabled=True)
    changes = [*([unit_file] if unit_file is not None else []), *restart_on]

    def fresh() -> bool:
        return started.did_change() or any(op.did_change() for op in installed_by)

    def restarts() -> bool:
        return any(op.did_change() for op in changes) and not fresh()

    if changes:
        service(name=f"Restart {unit} ({why})", unit=unit, restarted=True, _if=restarts)
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


def checked_put(
    what: str,
    text: str,
    *,
    staged: str,
    live: str,
    check: str,
    when: Callable[[], bool] | None = None,
) -> OperationMeta:
    """A configuration file put in place only once its program accepts it: ``text`` is
    uploaded to ``staged``, ``check`` (a command with ``{}`` for the staged path, e.g.
    ``haproxy -c -q -f {}``) must pass, and only then is it installed at ``live`` (0644,
    a rename). A refused file leaves the live one and its service alone; a later run checks
    again (also when the staged file is unchanged but the live one differs). ``when``: a
    condition, known as the run executes, without which nothing is put in place."""
    up = files.put(name=f"Stage {what}", src=StringIO(text), dest=staged, mode="0644")
    live_sha = host.get_fact(Sha256File, path=live)
    same = live_sha is not None and live_sha == host.get_fact(Sha256File, path=staged)
    s, lv = shlex.quote(staged), shlex.quote(live)
    # Shell because the check is the program's own.
    return server.shell(
        name=f"Check {what} ({check.split(' {}')[0]}) and put it in place",
        commands=[f"{check.format(s)} && install -m 0644 {s} {lv}.new && mv -f {lv}.new {lv}"],
        _if=lambda: (up.did_change() or not same) and (when is None or when()),
    )
