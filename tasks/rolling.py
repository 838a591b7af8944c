"""Disruption no client notices: llama-server behind the fleet's gateways (docs/gateway.md).

llama-server cannot drain (on SIGTERM it ends the requests it holds), so whatever takes a
served host out (a restart because its unit, binary, model or key changed; a reboot into a
new driver) goes through one gate, ``drained()``:

1. every gateway answers its runtime API (else nothing is drained: the rollout stops);
2. the bound: at most ``llama_rolling_max_unavailable`` servers out of rotation at once,
   counting those any gateway already sees out (DOWN, MAINT, DRAIN) and those this run
   took out; the host waits for room (bounded) or the rollout stops with the reason;
3. drained on every gateway (a marker on the gateway records it, so a run that dies is
   repaired by the next: tasks/gateway.repair_left_drained), its requests in flight
   finish (bounded by the drain timeout); a gateway whose answer is unknown is "not
   drained": the host is put back and the rollout stops, never restarted with requests on;
4. the disruptive action (restart, which waits for ``/health`` 200 in the unit's
   ExecStartPost; or reboot and wait);
5. the gateways follow the host as it now is (its API key in the keys map, its address
   and port, its slots as maxconn: runtime API and the map file the next reload reads),
   and so do the monitoring hosts (Prometheus's credentials file, read at every scrape);
6. ready on every gateway, and seen UP on every gateway before the next host goes out.
   A host that does not come back stops the rollout: the hosts after it are not touched
   and keep serving their running configuration.

A failure after the drain puts the host back to ready on the gateways that drained it.
The restart the deploy owes is recorded on the host (layout.RESTART_PENDING) until it
succeeds, so the next run resumes the rollout even though the files it changed are in place.
"""

from __future__ import annotations

import functools
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gevent.lock  # type: ignore[import-untyped]  # pyinfra runs hosts as greenlets
from pyinfra import context, logger
from pyinfra.api.command import StringCommand
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import State
from pyinfra.context import host
from pyinfra.facts.files import File
from pyinfra.operations import files, python

from llamahost import layout
from llamahost.gateway import haproxy as hx
from llamahost.gateway.settings import GROUP
from llamahost.instances import Instance
from llamahost.monitoring import scrape
from llamahost.monitoring.settings import GROUP as MONITORING_GROUP
from llamahost.spec import HostSpec
from tasks import secret
from tasks.preflight import served_specs

# Per run (keyed by the state): the first host whose change failed (the hosts after it
# wait), and the servers this run has out of rotation now.
_stopped: dict[int, str] = {}
_ours: dict[int, set[str]] = {}
# Per run: the servers it retired (another instance count): out of rotation until the
# gateways' reload removes them, counted by no bound.
_retired: dict[int, set[str]] = {}
# One writer of a gateway's keys map at a time (hosts of one batch run concurrently).
_map_locks: dict[str, gevent.lock.Semaphore] = {}

READY_WAIT_S = 60  # after /health 200, how long the gateways may take to see it up
UNKNOWN_GRACE_S = 30  # how long a drained gateway may not answer before the host goes back
ROOM_WAIT_S = 180  # how long a host waits for servers already out to come back


def gateways() -> list[str]:
    return [h.name for h in context.state.inventory.get_group(GROUP, [])]


def monitoring_hosts() -> list[str]:
    return [h.name for h in context.state.inventory.get_group(MONITORING_GROUP, [])]


def max_unavailable() -> int:
    """The fleet's bound: the smallest any served host asks for."""
    return min((s.gateway.rolling_max_unavailable for s in served_specs()), default=1)


def stopped(state: State) -> str | None:
    """The host at which this run's rollout stopped, if it did."""
    return _stopped.get(id(state))


def refuse_unbounded() -> None:
    """``--no-wait`` runs every host's operations at once and ignores ``_parallel``: with
    gateways that would drain and restart every host together. Refused before any change."""
    if gateways() and "--no-wait" in sys.argv:
        raise PyinfraError(
            "--no-wait is refused with a `gateway` group: it runs every host's operations at "
            "once, so every served host would be drained and restarted together "
            "(llama_rolling_max_unavailable could not hold); run without it"
        )


@dataclass(frozen=True)
class Follow:
    """What the gateways and monitoring hosts must learn about a host while it is out."""

    server: str  # its HAProxy server name (the host's, or host:N for an instance)
    backends: dict[str, hx.Server]  # gateway → the server as that gateway reaches it
    key_file: str  # its API key file on the host (read after the change)
    supplied_key: secret.Secret | None  # or the key the inventory supplies
    monitoring: dict[str, str]  # monitoring host → its credentials file for this host


def follow_of(spec: HostSpec, instance: Instance) -> Follow:
    """Planned on the served host: how each gateway reaches this llama-server of it, and
    where each monitoring host keeps the host's key."""
    server = instance.server(hx.server_name(spec.name))
    return Follow(
        server=server,
        backends={
            g: next(b for b in hx.servers(g, [spec]) if b.name == server) for g in gateways()
        },
        key_file=spec.cfg.api_key_file,
        supplied_key=None if spec.cfg.api_key is None else secret.Secret(spec.cfg.api_key),
        monitoring={m: scrape.key_file(spec.name) for m in monitoring_hosts()},
    )


def restart(
    spec: HostSpec,
    instance: Instance,
    changes: Sequence[OperationMeta],
    started: OperationMeta,
    max_unavailable: int,
) -> None:
    """Restart one llama-server of the host through the gateways when any of ``changes``
    changed (or an earlier run owes it), unless this run started it. A host's instances
    are restarted one after the other (one operation each), so never two of them out
    because of this run."""
    unit = instance.unit
    pending = layout.restart_pending(unit)
    owed = bool(host.get_fact(File, path=pending))

    def changed() -> bool:
        return any(op.did_change() for op in changes)

    files.directory(name="llamahost state directory", path=layout.parent(layout.RESTART_PENDING),
                    user="root", group="root", mode="0755")  # fmt: skip
    files.file(
        name=f"Record that {unit} owes a restart",
        path=pending,
        present=True,
        _if=lambda: changed() and not started.did_change(),
    )
    python.call(
        name=f"Restart {unit} through the gateways (drain, restart, follow, ready)",
        function=drained,
        action=functools.partial(_restart, unit=unit),
        what="restart",
        follow=follow_of(spec, instance),
        gateway_names=gateways(),
        drain_timeout=spec.gateway.rolling_drain_timeout,
        max_unavailable=max_unavailable,
        _if=lambda: (changed() or owed) and not started.did_change(),
        _parallel=max_unavailable,
    )
    files.file(
        name=f"A fresh start of {unit} owes no restart",
        path=pending,
        present=False,
        _if=started.did_change,
    )


def retire(spec: HostSpec, unit: str, server: str, max_unavailable: int) -> None:
    """Stop a llama-server the host's new layout no longer has (another instance count):
    drained on the gateways first, then stopped and disabled; it stays drained there until
    the gateways' next reload (this run's step 9) removes it."""
    python.call(
        name=f"Retire {unit} through the gateways (drain, stop)",
        function=drained,
        action=functools.partial(_stop, unit=unit),
        what="retire",
        follow=Follow(server, {}, spec.cfg.api_key_file, None, {}),
        gateway_names=gateways(),
        drain_timeout=spec.gateway.rolling_drain_timeout,
        max_unavailable=max_unavailable,
        retire=True,
        _parallel=max_unavailable,
    )


# ---------------------------------------------------------------- connections
def run(state: State, target: Host, command: str, stdin: str | None = None) -> tuple[bool, str]:
    """A command on another host of the inventory, output off; (False, why) when that
    host cannot be reached."""
    try:
        if not target.connected:
            target.connect(reason="to drain a served host", raise_exceptions=True)
        extra = {"_stdin": stdin, "_get_pty": False} if stdin is not None else {}
        ok, out = target.run_shell_command(
            StringCommand(command),
            print_output=False,
            print_input=state.print_input,  # the command, which holds no secret
            **{**secret.connector_args(state, target), **extra},
        )
    except Exception as e:  # unreachable: every kind of connection failure is an answer
        return False, f"{target.name} cannot be reached ({type(e).__name__}: {e})"
    return ok, "\n".join(out.stdout_lines + out.stderr_lines)


def api(state: State, gateway: Host, command: str) -> tuple[bool, str]:
    """One runtime API command, as standard input (a key in it is on no command line)."""
    sock = f"unix-connect:{layout.HAPROXY_ADMIN_SOCKET}"
    return run(state, gateway, f"socat -t 5 stdio {sock}", stdin=command + "\n")


NOT_SET_UP = "# not set up as a gateway yet"


def _stats(state: State, gateway: Host) -> dict[str, hx.ServerStat] | None:
    """The gateway's servers, or None when its answer is unknown (never "no servers"). A
    gateway host the toolkit has not set up yet (this run's step 9 will) has none."""
    sock = f"unix-connect:{layout.HAPROXY_ADMIN_SOCKET}"
    ok, out = run(
        state,
        gateway,
        f"if [ ! -d {layout.GATEWAY_DIR} ]; then echo {shlex.quote(NOT_SET_UP)}; exit 0; fi; "
        f"socat -t 5 stdio {sock}",
        stdin=hx.SHOW_STAT + "\n",
    )
    if not ok:
        return None
    if out.startswith(NOT_SET_UP):
        return {}
    try:
        return hx.server_stats(out)
    except ValueError:
        return None


def marker(server: str) -> str:
    return f"{layout.GATEWAY_DRAINED_DIR}/{server}"


# ---------------------------------------------------------------- the gate
def drained(
    state: State,
    host: Host,
    action: Callable[[State, Host], tuple[bool, str]],
    what: str,
    follow: Follow,
    gateway_names: list[str],
    drain_timeout: int,
    max_unavailable: int,
    retire: bool = False,
    together: frozenset[str] = frozenset(),
) -> bool:
    """Take ``host`` out of every gateway's rotation, run ``action`` (the restart or the
    reboot), let the gateways and monitoring hosts follow it, and put it back. ``retire``:
    a server that goes away (stopped by ``action``): drained, and left so. ``together``:
    the host's other servers, out with this one (a reboot), counted as one toward the
    bound."""
    say = f"[{host.name}]"
    run = id(state)
    server = follow.server

    def stop(why: str) -> bool:
        _stopped.setdefault(run, host.name)
        logger.error(f"{say} {why}; the rollout stops here")
        return False

    if run in _stopped:
        logger.error(
            f"{say} not {what}ed: the rollout stopped at {_stopped[run]}; this host keeps "
            "serving its running configuration"
        )
        return False
    gws = [state.inventory.get_host(n) for n in gateway_names]

    # 1. Every gateway answers; 2. room under the bound (waiting for servers already out).
    deadline = time.monotonic() + ROOM_WAIT_S
    ours = _ours.setdefault(run, set())
    while True:
        views: dict[str, dict[str, hx.ServerStat]] = {}
        for gw in gws:
            view = _stats(state, gw)
            if view is None:
                return stop(
                    f"not {what}ed: gateway {gw.name} does not answer its runtime API, so it "
                    "cannot be drained there (nothing was drained)"
                )
            views[gw.name] = view
        gone = _retired.get(run, set())
        room, out = hx.may_go_out(server, views, ours, max_unavailable, together | gone)
        if room:
            break
        if time.monotonic() > deadline:
            return stop(
                f"not {what}ed: {', '.join(out)} out of rotation for {ROOM_WAIT_S} s and "
                f"llama_rolling_max_unavailable is {max_unavailable}"
            )
        time.sleep(1)
    ours.add(server)
    try:
        return _out_and_back(
            state, host, action, what, follow, gws, views, drain_timeout, stop, retire
        )
    finally:
        ours.discard(server)


def _out_and_back(
    state: State,
    host: Host,
    action: Callable[[State, Host], tuple[bool, str]],
    what: str,
    follow: Follow,
    gws: list[Host],
    views: dict[str, dict[str, hx.ServerStat]],
    drain_timeout: int,
    stop: Callable[[str], bool],
    retire: bool = False,
) -> bool:
    say = f"[{host.name}]"
    server = follow.server
    # A gateway that does not list the server yet (a host new to the inventory) gets it
    # with its next reload, at its current address.
    having = [gw for gw in gws if server in views[gw.name]]
    for gw in gws:
        if gw not in having:
            logger.info(f"{say} not yet a server of {gw.name} (added by its next reload)")

    def put_back(on: list[Host]) -> None:
        for gw in on:
            ok, out = api(state, gw, hx.set_state(server, "ready"))
            if ok and not out.strip():
                run(state, gw, f"rm -f {shlex.quote(marker(server))}")
            else:
                logger.error(f"{say} could not be put back to ready on {gw.name}: {out.strip()}")

    # 3. Out of rotation on every gateway that has it; a marker first, so a run that dies
    #    here is repaired by the next.
    out_on: list[Host] = []
    for gw in having:
        mark = f"mkdir -p {layout.GATEWAY_DRAINED_DIR} && touch {shlex.quote(marker(server))}"
        ok_mark, why_mark = run(state, gw, mark)
        ok, out = api(state, gw, hx.set_state(server, "drain")) if ok_mark else (False, "")
        if not ok or out.strip():
            put_back(out_on)
            return stop(
                f"not {what}ed: gateway {gw.name} does not answer its runtime API "
                f"({(out or why_mark).strip() or 'no answer'}), so it could not be drained "
                "there; put back where it was drained"
            )
        out_on.append(gw)
    t0 = time.monotonic()
    answered = t0  # the last time every gateway answered
    while out_on:
        views = {gw.name: v for gw in out_on if (v := _stats(state, gw)) is not None}
        unknown = [gw.name for gw in out_on if gw.name not in views]
        left = sum(s.in_flight for v in views.values() if (s := v.get(server)) is not None)
        if not unknown:
            answered = time.monotonic()
            if left == 0:
                break
        elif time.monotonic() - answered > min(UNKNOWN_GRACE_S, drain_timeout):
            put_back(out_on)
            return stop(
                f"not {what}ed: gateway {', '.join(unknown)} does not answer its runtime API "
                f"(for {min(UNKNOWN_GRACE_S, drain_timeout)} s), so whether its requests "
                "finished there is unknown; put back where it was drained"
            )
        if not unknown and time.monotonic() - t0 > drain_timeout:
            logger.warning(
                f"{say} still {left} requests in flight after the drain timeout "
                f"({drain_timeout} s): they are cut"
            )
            break
        time.sleep(0.5)
    logger.info(f"{say} drained on {len(out_on)} gateways in {time.monotonic() - t0:.1f} s")

    # 4. The change itself.
    ok, why = action(state, host)
    if not ok:
        return stop(
            f"did not come back after its {what}; it stays out of rotation (the next run "
            f"puts it back first). {why}"
        )
    if retire:
        # Gone: drained until the gateways' reload removes it; no marker to put it back,
        # and no bound counts it from now on.
        _retired.setdefault(id(state), set()).add(server)
        for gw in out_on:
            run(state, gw, f"rm -f {shlex.quote(marker(server))}")
        logger.info(f"{say} {server} retired (drained, stopped)")
        return True

    # 5. The gateways and monitoring hosts follow the host as it now is.
    followed, why = _follow(state, host, follow, out_on)
    if why:
        # The gateways that have followed can talk to it: it serves through them. The
        # others keep it drained (and their marker): the next run puts it back there first.
        put_back(followed)
        where = ", ".join(gw.name for gw in followed) or "no gateway"
        return stop(f"{what}ed, but {why}; back in rotation on {where} only")

    # 6. Back in rotation, and seen up on every gateway before the next host goes out.
    for gw in out_on:
        ok, out = api(state, gw, hx.set_state(server, "ready"))
        if not ok or out.strip():
            return stop(f"{what}ed, but {gw.name} refused to set it ready ({out.strip()})")
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        down = []
        for gw in out_on:
            view = _stats(state, gw)
            seen = view.get(server) if view is not None else None
            if seen is None or not seen.status.startswith("UP"):
                down.append(gw.name)
        if not down:
            break
        if time.monotonic() > deadline:
            return stop(
                f"{what}ed and set ready, but not UP on {', '.join(down)} within "
                f"{READY_WAIT_S} s (health check failing: the gateway cannot reach it)"
            )
        time.sleep(0.5)
    for gw in out_on:
        run(state, gw, f"rm -f {shlex.quote(marker(server))}")
    logger.info(f"{say} {what}ed and back in rotation")
    return True


def _follow(state: State, host: Host, f: Follow, out_on: list[Host]) -> tuple[list[Host], str]:
    """The host's key, address and slots, as each gateway (runtime API and keys map file)
    and each monitoring host (credentials file) must now know them. Returns the gateways
    that have followed, and why the others have not ("" when all have)."""
    followed: list[Host] = []
    if f.supplied_key is not None:
        key = f.supplied_key.reveal().strip()
    else:
        try:
            key = secret.read_api_key(state, host.name, f.key_file)
        except PyinfraError as e:
            return followed, str(e)
    # Prometheus first: it scrapes the host directly, drained or not.
    for name, path in f.monitoring.items():
        mon = state.inventory.get_host(name)
        there, _ = run(state, mon, f"test -d {shlex.quote(layout.parent(path))}")
        if not there:
            continue  # Prometheus not set up there yet: this run's step 8 copies the key
        ok = secret.write(
            state, mon, path, secret.Secret(key), user="root", group="prometheus", mode="0640"
        )
        if not ok:
            return followed, f"its key could not be written for Prometheus on {name}"
    for gw in out_on:
        s = f.backends[gw.name]
        for command in hx.follow(s, key):
            ok, out = api(state, gw, command)
            shown = command if command.startswith("set server") else " ".join(command.split()[:3])
            if not ok:
                return followed, (
                    f"gateway {gw.name} does not answer its runtime API ({out.strip()}), so it "
                    f"cannot follow the host ({shown})"
                )
            if hx.api_refused(out):
                return followed, f"gateway {gw.name} refused {shown!r}: {out.strip()}"
        ok, why = _write_map_entry(state, gw, f.server, key)
        if not ok:
            return followed, why
        followed.append(gw)
    return followed, ""


def _write_map_entry(state: State, gw: Host, server: str, key: str) -> tuple[bool, str]:
    """The keys map file on the gateway with ``server``'s entry set, for the next reload."""
    lock = _map_locks.setdefault(gw.name, gevent.lock.Semaphore())
    with lock:
        ok, text = run(state, gw, f"cat -- {layout.GATEWAY_BACKEND_KEYS_MAP}")
        entries = hx.parse_backend_keys(text) if ok else {}
        if entries.get(server) == key:
            return True, ""
        entries[server] = key
        ok = secret.write(
            state,
            gw,
            layout.GATEWAY_BACKEND_KEYS_MAP,
            secret.Secret(hx.backend_keys_text(entries)),
            user="root",
            group="haproxy",
            mode="0640",
        )
    return ok, "" if ok else f"the keys map could not be written on {gw.name}"


# ---------------------------------------------------------------- actions
def _restart(state: State, host: Host, unit: str = layout.UNIT) -> tuple[bool, str]:
    """Restart a llama-server unit; its ExecStartPost waits for /health 200."""
    ok, _ = run(state, host, f"systemctl restart {shlex.quote(unit)}")
    if ok:
        run(state, host, f"rm -f {shlex.quote(layout.restart_pending(unit))}")
        return True, ""
    _, journal = run(state, host, f"journalctl -u {shlex.quote(unit)} -n 25 --no-pager -o cat")
    return False, f"Its journal:\n{journal}"


def _stop(state: State, host: Host, unit: str) -> tuple[bool, str]:
    """Stop and disable a llama-server unit that the host's layout no longer has."""
    u, pending = shlex.quote(unit), shlex.quote(layout.restart_pending(unit))
    command = (
        f"systemctl disable --now {u} && systemctl reset-failed {u}; rm -f {pending}; "
        f"! systemctl -q is-active {u}"
    )
    ok, out = run(state, host, command)
    return ok, "" if ok else f"it could not be stopped: {out.strip()}"


REBOOT_DELAY_S = 10  # before the first reconnection attempt


def reboot(spec: HostSpec, reasons: str, reboot_timeout: int, max_unavailable: int) -> None:
    """A reboot through the same gate as a restart: drained on every gateway first, at
    most ``max_unavailable`` hosts out at once (counting those already out), back in
    rotation once llama-server answers again. A host with several instances has every one
    drained before it reboots (each gate inside the previous one's action), the host's
    servers counted as one toward the bound."""
    follows = [follow_of(spec, x) for x in spec.instances]
    together = frozenset(f.server for f in follows)
    gate = functools.partial(
        drained,
        what="reboot",
        gateway_names=gateways(),
        drain_timeout=spec.gateway.rolling_drain_timeout,
        max_unavailable=max_unavailable,
        together=together,
    )
    action: Callable[[State, Host], tuple[bool, str]] = functools.partial(
        _reboot, reboot_timeout=reboot_timeout, units=tuple(x.unit for x in spec.instances)
    )
    for f in reversed(follows[1:]):
        action = functools.partial(_inner_gate, gate=gate, action=action, follow=f)
    python.call(
        name=f"Reboot into the NVIDIA driver, drained on the gateways: {reasons}",
        function=gate,
        action=action,
        follow=follows[0],
        _parallel=max_unavailable,
    )


def _inner_gate(
    state: State,
    host: Host,
    gate: Callable[..., bool],
    action: Callable[[State, Host], tuple[bool, str]],
    follow: Follow,
) -> tuple[bool, str]:
    ok = gate(state, host, action=action, follow=follow)
    return ok, "" if ok else f"{follow.server} did not come back (above)"


def _uptime(state: State, target: Host) -> float | None:
    ok, out = run(state, target, "cut -d' ' -f1 /proc/uptime")
    try:
        return float(out.split()[0]) if ok else None
    except (ValueError, IndexError):
        return None


def _reboot(
    state: State, target: Host, reboot_timeout: int, units: tuple[str, ...] = (layout.UNIT,)
) -> tuple[bool, str]:
    """As pyinfra's server.reboot (detached reboot, reconnect, uptime lower than before),
    then llama-server active again (its ExecStartPost waits for /health 200)."""
    from pyinfra.connectors.util import clear_askpass_cache, remove_any_sudo_askpass_file

    remove_any_sudo_askpass_file(target)
    before = _uptime(state, target)
    if before is None:
        return False, "its uptime could not be read before the reboot"
    run(state, target, "( sleep 1 && reboot ) </dev/null >/dev/null 2>&1 &")
    time.sleep(REBOOT_DELAY_S)
    clear_askpass_cache(target)
    target.disconnect()
    deadline = time.monotonic() + reboot_timeout
    while True:
        target.connect(show_errors=False)
        if target.connected:
            now = _uptime(state, target)
            if now is not None and now < before + REBOOT_DELAY_S:
                break
        if time.monotonic() > deadline:
            return False, f"it did not come back within {reboot_timeout} s of the reboot"
        time.sleep(1)
    clear_askpass_cache(target)
    for name in units:
        unit = shlex.quote(name)
        wait = (
            f"systemctl is-enabled --quiet {unit} || exit 0; "
            f"for i in $(seq {reboot_timeout}); do systemctl is-active --quiet {unit} && "
            "exit 0; sleep 1; done; exit 1"
        )
        ok, _ = run(state, target, wait)
        if not ok:
            _, journal = run(state, target, f"journalctl -u {unit} -b -n 25 --no-pager -o cat")
            return False, f"{name} is not active after the reboot. Its journal:\n{journal}"
    return True, ""
