"""HAProxy's configuration for a gateway host, rendered from the whole inventory, and the
runtime API's words and answers. Pure: no pyinfra.

One frontend terminates TLS, admits clients by their own key (a map file: key → client
name), limits each client's request rate, and hands requests to backend ``llama``: one
server per served host, least connections, ``maxconn`` = that host's ``--parallel``, so
excess requests wait in HAProxy's bounded queue instead of in one llama-server's unbounded
one. Each of those servers is a small internal proxy (a unix socket in a directory only
HAProxy's user can enter) that sets the
chosen host's own API key (a second map: server → key), so no client ever holds a host key
and no key is in the configuration, on a command line or in a diff.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from llamahost import layout, render
from llamahost.addresses import hostport, reach
from llamahost.checks import PREFIX, ConfigError, FieldError
from llamahost.gateway.settings import API_PATHS, HEALTH_PATHS, RETRY_AFTER_S, GatewayConfig
from llamahost.spec import HostSpec

BACKEND = "llama"  # the backend every served host is a server of
_SERVER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A server as the runtime API names it: a host's, or an instance's (``host:N``).
_SERVER = re.compile(r"[A-Za-z0-9_.-]{1,64}(?::[0-9]{1,2})?")


@dataclass(frozen=True)
class Server:
    """One served host as a gateway sees it."""

    host: str  # inventory name
    name: str  # HAProxy server name (the runtime API's handle)
    address: str  # host:port of its llama-server, from the gateway
    maxconn: int  # its --parallel


def server_name(host_name: str) -> str:
    """HAProxy's name for a served host: the inventory name when it is safe as one."""
    if _SERVER_NAME.fullmatch(host_name) and not host_name.startswith("."):
        return host_name
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host_name).lstrip(".")[:48]
    return f"{safe}-{hashlib.sha256(host_name.encode()).hexdigest()[:8]}"


def _reach(gateway: str, spec: HostSpec) -> str:
    return reach(gateway, spec.name, spec.address, spec.profile.host, "llama-server",
                 PREFIX + "host")  # fmt: skip


def servers(gateway: str, served: Iterable[HostSpec]) -> list[Server]:
    """The backend servers of ``gateway``, in inventory order: one per llama-server, so a
    host with several instances is several servers (``host:N``); a gateway with none is
    refused."""
    out = [
        Server(
            host=s.name,
            name=x.server(server_name(s.name)),
            address=hostport(_reach(gateway, s), x.port),
            maxconn=s.profile.parallel,
        )
        for s in served
        for x in s.instances
    ]
    if not out:
        raise ConfigError(
            gateway,
            [
                FieldError(
                    "group gateway",
                    gateway,
                    "has no served host to send requests to: every host of the inventory has "
                    "llama_serve: false",
                )
            ],
        )
    names = [s.name for s in out]
    assert len(set(names)) == len(names), names
    return out


@dataclass(frozen=True)
class HaproxyError:
    """An error HAProxy itself answers, as JSON in the OpenAI error shape."""

    code: int
    kind: str  # the OpenAI error's type
    message: str
    retry: bool = False  # with Retry-After: a retry may succeed


# Every status HAProxy may answer by itself (http-error accepts these), so that no client
# ever gets its HTML pages. 502 and 504 carry no Retry-After: the request itself may be
# why (a server that crashed on it, a generation longer than the timeout).
HAPROXY_ERRORS = (
    HaproxyError(400, "invalid_request_error", "Bad request"),
    HaproxyError(403, "permission_error", "Forbidden"),
    HaproxyError(408, "timeout_error", "Request not received in time"),
    HaproxyError(413, "invalid_request_error", "Request body too large"),
    HaproxyError(500, "server_error", "Internal error in the gateway"),
    HaproxyError(501, "invalid_request_error", "Not implemented"),
    HaproxyError(502, "server_error", "The host ended the request without an answer"),
    HaproxyError(503, "unavailable_error", "No host can take the request now; retry later", True),
    HaproxyError(504, "timeout_error", "The host did not answer in time"),
)


def api_paths(gw: GatewayConfig) -> dict[str, list[str]]:
    """The API's paths by the one method each takes (GET admits HEAD too)."""
    out: dict[str, list[str]] = {}
    for path, method in API_PATHS:
        out.setdefault(method, []).append(path)
    return out


def max_in_flight(gw: GatewayConfig, backends: list[Server]) -> int:
    """Requests in flight one client key may have: the setting, or with ``auto`` half the
    served hosts' slots, rounded up (0: no limit)."""
    if gw.gateway_max_in_flight == "auto":
        return max(1, -(-sum(s.maxconn for s in backends) // 2))
    return int(gw.gateway_max_in_flight)


def haproxy_cfg(gateway: str, gw: GatewayConfig, backends: list[Server]) -> str:
    """/etc/haproxy/haproxy.cfg of a gateway host."""
    return render.template(
        "gateway/haproxy.cfg.j2",
        host=gateway,
        gw=gw,
        errors=HAPROXY_ERRORS,
        api_paths=api_paths(gw),
        allow={"GET": "GET, HEAD", "POST": "POST"},
        extra_paths=list(gw.gateway_extra_paths),
        health_paths=list(HEALTH_PATHS),
        bind=hostport(gw.gateway_listen, gw.gateway_port),
        servers=backends,
        max_in_flight=max_in_flight(gw, backends),
        backend=BACKEND,
        retry_after=RETRY_AFTER_S,
        admin_socket=layout.HAPROXY_ADMIN_SOCKET,
        chroot=layout.HAPROXY_CHROOT,
        sockets_dir=layout.GATEWAY_SOCKETS_DIR,
        sockets_in_chroot=layout.GATEWAY_SOCKETS_IN_CHROOT,
        pem=layout.GATEWAY_PEM,
        clients_map=layout.GATEWAY_CLIENTS_MAP,
        backend_keys_map=layout.GATEWAY_BACKEND_KEYS_MAP,
        peers=bool(gw.gateway_rate_limit or gw.gateway_auth_failure_limit),
        peers_socket=layout.GATEWAY_PEERS_SOCKET,
    )


# ---------------------------------------------------------------- runtime API
def set_state(server: str, state: str) -> str:
    """The runtime API command that puts ``server`` of the backend in drain/ready/maint."""
    if state not in ("drain", "ready", "maint"):
        raise ValueError(state)
    if not _SERVER.fullmatch(server):
        raise ValueError(server)
    return f"set server {BACKEND}/{server} state {state}"


SHOW_STAT = "show stat"


def inner_proxy(server: str) -> str:
    """The per-host proxy whose one server is the host's llama-server (haproxy.cfg.j2)."""
    return f"llamahost-{server}"


def set_key(server: str, key: str, keys_map: str = layout.GATEWAY_BACKEND_KEYS_MAP) -> str:
    """The runtime API command that gives ``server`` its host's API key in the backend keys
    map (the map the per-host proxy reads for every request). Sent as standard input, never
    on a command line."""
    if not _SERVER.fullmatch(server):
        raise ValueError(server)
    if not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", key):
        raise ValueError("an API key holds no space, quote or control character")
    return f"set map {keys_map} {server} {key}"


def set_address(server: str, address: str) -> str:
    """The runtime API command that points the per-host proxy of ``server`` at
    ``address`` (host:port, from the gateway): ``addr`` for an IP, ``fqdn`` for a name
    (resolved by the configuration's resolvers)."""
    if not _SERVER.fullmatch(server):
        raise ValueError(server)
    host_part, _, port = address.rpartition(":")
    host_part = host_part.strip("[]")
    if not port.isdigit() or not re.fullmatch(r"[A-Za-z0-9.:_-]+", host_part):
        raise ValueError(address)
    where = f"{inner_proxy(server)}/{server}"
    try:
        ipaddress.ip_address(host_part)
    except ValueError:
        return f"set server {where} fqdn {host_part}"  # the port stays the configured one
    return f"set server {where} addr {host_part} port {port}"


def set_maxconn(server: str, maxconn: int) -> str:
    if not _SERVER.fullmatch(server) or maxconn < 1:
        raise ValueError((server, maxconn))
    return f"set maxconn server {BACKEND}/{server} {maxconn}"


def follow(s: Server, key: str, keys_map: str = layout.GATEWAY_BACKEND_KEYS_MAP) -> list[str]:
    """What a gateway must learn while ``s``'s host is drained for a restart, so that the
    host is set ready only once the gateway can talk to it: its key, address and slots."""
    return [
        set_key(s.name, key, keys_map),
        set_address(s.name, s.address),
        set_maxconn(s.name, s.maxconn),
    ]


def api_refused(answer: str) -> bool:
    """Whether a runtime API answer to a set command is a refusal: they answer nothing on
    success (``set server ... addr`` answers a line starting with "IP changed" or "no need
    to change")."""
    text = answer.strip()
    ok_prefixes = ("IP changed", "no need to change", "port changed", "FQDN changed")
    return bool(text) and not all(
        line.strip().startswith(ok_prefixes) or not line.strip() for line in text.splitlines()
    )


def backend_keys_text(entries: dict[str, str]) -> str:
    """The backend keys map file: ``server key`` lines."""
    return "".join(f"{name} {key}\n" for name, key in entries.items())


def parse_backend_keys(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def serves_config_check(backends: list[Server], socket: str, wait_s: int = 30) -> str:
    """A shell command that waits until the running HAProxy lists exactly ``backends`` as
    the servers of its backend, and fails saying so otherwise. A reload whose new process
    cannot start (a port or socket taken) leaves the old one running and still exits 0:
    this is how the deploy notices."""
    want = " ".join(sorted(s.name for s in backends))
    stat = f"echo {SHOW_STAT!r} | socat -t 5 stdio unix-connect:{socket}"
    have = (
        f'{stat} | awk -F, \'$1 == "{BACKEND}" && $2 != "BACKEND" {{print $2}}\' '
        "| LC_ALL=C sort | tr '\\n' ' ' | sed 's/ $//'"
    )
    return (
        f"for i in $(seq {wait_s}); do [ \"$({have})\" = '{want}' ] && exit 0; sleep 1; done; "
        f"echo 'HAProxy does not run the new configuration (servers: '\"$({have})\"'; "
        f"expected: {want}); see journalctl -u haproxy' >&2; exit 1"
    )


@dataclass(frozen=True)
class ServerStat:
    status: str  # UP, DOWN, DRAIN, MAINT, "no check", ...
    in_flight: int  # scur: requests being served
    queued: int  # qcur: requests waiting for this server


def server_stats(show_stat: str) -> dict[str, ServerStat]:
    """``show stat`` CSV → the backend's servers by name."""
    lines = show_stat.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError("not the answer of `show stat`")
    head = lines[0][2:].split(",")
    col = {name: i for i, name in enumerate(head)}
    out = {}
    for line in lines[1:]:
        row = line.split(",")
        if len(row) < len(head) or row[col["pxname"]] != BACKEND:
            continue
        sv = row[col["svname"]]
        if sv in ("FRONTEND", "BACKEND"):
            continue
        out[sv] = ServerStat(
            status=row[col["status"]],
            in_flight=int(row[col["scur"]] or 0),
            queued=int(row[col["qcur"]] or 0),
        )
    return out


def out_of_rotation(stats: dict[str, ServerStat]) -> list[str]:
    """Servers that take no new request now."""
    return sorted(n for n, s in stats.items() if not s.status.startswith("UP"))


def may_go_out(
    server: str,
    views: dict[str, dict[str, ServerStat]],
    ours: set[str],
    max_unavailable: int,
    together: Iterable[str] = (),
) -> tuple[bool, list[str]]:
    """Whether ``server`` may be taken out of rotation now without more than
    ``max_unavailable`` servers out at once, counting the servers any gateway sees out
    (DOWN, MAINT, DRAIN, ...) and those this run has taken out (``ours``). ``together``:
    servers that go out with this one (the instances of a host that reboots), counted as
    one with it. Returns the decision and the servers counted as out."""
    out = set(ours)
    for stats in views.values():
        out |= set(out_of_rotation(stats))
    out.discard(server)
    out -= set(together)
    return len(out) < max_unavailable, sorted(out)
