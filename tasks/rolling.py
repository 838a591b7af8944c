"""Restarts no client notices: llama-server behind the fleet's gateways (docs/gateway.md).

llama-server cannot drain (on SIGTERM it ends the requests it holds), so when the deploy
must restart it (its unit, binary, model or key changed) and the inventory has gateways,
the restart goes: drain this host on every gateway (HAProxy's runtime API on its local
admin socket), wait until no request is in flight on it (bounded), restart, which waits for
``/health`` 200 (the unit's ExecStartPost), set it ready again and wait until the gateways
see it up. pyinfra runs this operation ``rolling_max_unavailable`` hosts at a time.

A host that does not come back stays out of rotation and stops the rollout: the hosts after
it are not restarted and keep serving their running configuration. The restart the deploy
owes is recorded on the host (layout.RESTART_PENDING) until it succeeds, so the next run
resumes the rollout even though the files it changed are already in place.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence

from pyinfra import logger
from pyinfra.api.command import StringCommand
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import State
from pyinfra.context import host, inventory
from pyinfra.facts.files import File
from pyinfra.operations import files, python

from llamahost import layout
from llamahost.gateway import haproxy as hx
from llamahost.gateway.settings import GROUP
from llamahost.spec import HostSpec
from tasks import secret

# The first host of this run whose restart failed, per run: the hosts after it wait.
_stopped: dict[int, str] = {}
READY_WAIT_S = 60  # after /health 200, how long the gateways may take to see it up


def gateways() -> list[str]:
    return [h.name for h in inventory.get_group(GROUP, [])]


def restart(
    spec: HostSpec,
    changes: Sequence[OperationMeta],
    started: OperationMeta,
    max_unavailable: int,
) -> None:
    """Restart llama-server through the gateways when any of ``changes`` changed (or an
    earlier run owes it), unless this run started it."""
    owed = bool(host.get_fact(File, path=layout.RESTART_PENDING))

    def changed() -> bool:
        return any(op.did_change() for op in changes)

    files.directory(name="llamahost state directory", path=layout.parent(layout.RESTART_PENDING),
                    user="root", group="root", mode="0755")  # fmt: skip
    files.file(
        name="Record that llama-server owes a restart",
        path=layout.RESTART_PENDING,
        present=True,
        _if=lambda: changed() and not started.did_change(),
    )
    python.call(
        name="Restart llama-server through the gateways (drain, restart, ready)",
        function=_drained_restart,
        server=hx.server_name(spec.name),
        gateway_names=gateways(),
        drain_timeout=spec.gateway.rolling_drain_timeout,
        _if=lambda: (changed() or owed) and not started.did_change(),
        _parallel=max_unavailable,
    )
    files.file(
        name="A fresh start owes no restart",
        path=layout.RESTART_PENDING,
        present=False,
        _if=started.did_change,
    )


def _run(state: State, target: Host, command: str) -> tuple[bool, str]:
    if not target.connected:
        target.connect(reason="to drain a served host", raise_exceptions=True)
    ok, out = target.run_shell_command(
        StringCommand(command),
        print_output=False,
        print_input=state.print_input,
        **secret.connector_args(state, target),
    )
    return ok, "\n".join(out.stdout_lines + out.stderr_lines)


def _api(state: State, gateway: Host, command: str) -> tuple[bool, str]:
    sock = f"unix-connect:{layout.HAPROXY_ADMIN_SOCKET}"
    return _run(state, gateway, f"echo {shlex.quote(command)} | socat -t 5 stdio {sock}")


def _stats(state: State, gateway: Host) -> dict[str, hx.ServerStat]:
    ok, out = _api(state, gateway, hx.SHOW_STAT)
    return hx.server_stats(out) if ok else {}


def _drained_restart(
    state: State, host: Host, server: str, gateway_names: list[str], drain_timeout: int
) -> bool:
    say = f"[{host.name}]"
    if id(state) in _stopped:
        logger.error(
            f"{say} not restarted: the rollout stopped at {_stopped[id(state)]}, which did not "
            "come back; this host keeps serving its running configuration"
        )
        return False
    gws = [state.inventory.get_host(n) for n in gateway_names]
    # 1. Out of rotation on every gateway that has it.
    drained = []
    for gw in gws:
        ok, out = _api(state, gw, hx.set_state(server, "drain"))
        if ok and out.strip() == "":
            drained.append(gw)
        else:
            logger.info(f"{say} not in rotation on {gw.name} ({out.strip() or 'no answer'})")
    # 2. Its requests in flight finish (bounded).
    t0 = time.monotonic()
    while drained:
        busy = {gw.name: _stats(state, gw).get(server) for gw in drained}
        left = sum(s.in_flight for s in busy.values() if s is not None)
        if left == 0:
            break
        if time.monotonic() - t0 > drain_timeout:
            logger.warning(f"{say} still {left} requests in flight after {drain_timeout} s")
            break
        time.sleep(0.5)
    logger.info(f"{say} drained on {len(drained)} gateways in {time.monotonic() - t0:.1f} s")
    # 3. Restart; the unit's ExecStartPost waits for /health 200.
    ok, _ = _run(state, host, f"systemctl restart {layout.UNIT}")
    if not ok:
        _stopped.setdefault(id(state), host.name)
        _, journal = _run(state, host, f"journalctl -u {layout.UNIT} -n 25 --no-pager -o cat")
        logger.error(
            f"{say} llama-server did not come back; it stays out of rotation and the rollout "
            f"stops here. Its journal:\n{journal}"
        )
        return False
    # 4. Back in rotation, and seen up before the next host goes out.
    for gw in drained:
        _api(state, gw, hx.set_state(server, "ready"))
    deadline = time.monotonic() + READY_WAIT_S
    while drained and time.monotonic() < deadline:
        up = [_stats(state, gw).get(server) for gw in drained]
        if all(s is not None and s.status.startswith("UP") for s in up):
            break
        time.sleep(0.5)
    _run(state, host, f"rm -f {layout.RESTART_PENDING}")
    logger.info(f"{say} restarted and back in rotation")
    return True
