"""HAProxy's configuration for a gateway host, rendered from the whole inventory, and the
runtime API's words and answers. Pure: no pyinfra.

One frontend terminates TLS, admits clients by their own key (a map file: key → client
name), limits each client's request rate, and hands requests to backend ``llama``: one
server per served host, least connections, ``maxconn`` = that host's ``--parallel``, so
excess requests wait in HAProxy's bounded queue instead of in one llama-server's unbounded
one. Each of those servers is a small internal proxy (an abstract socket) that sets the
chosen host's own API key (a second map: server → key), so no client ever holds a host key
and no key is in the configuration, on a command line or in a diff.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from llamahost import layout, render
from llamahost.addresses import hostport, reach
from llamahost.checks import PREFIX, ConfigError, FieldError
from llamahost.gateway.settings import RETRY_AFTER_S, GatewayConfig
from llamahost.spec import HostSpec

BACKEND = "llama"  # the backend every served host is a server of
_SERVER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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
    """The backend servers of ``gateway``, in inventory order; a gateway with none is
    refused."""
    out = [
        Server(
            host=s.name,
            name=server_name(s.name),
            address=hostport(_reach(gateway, s), s.profile.port),
            maxconn=s.profile.parallel,
        )
        for s in served
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


def haproxy_cfg(gateway: str, gw: GatewayConfig, backends: list[Server]) -> str:
    """/etc/haproxy/haproxy.cfg of a gateway host."""
    return render.template(
        "gateway/haproxy.cfg.j2",
        host=gateway,
        gw=gw,
        bind=hostport(gw.gateway_listen, gw.gateway_port),
        servers=backends,
        backend=BACKEND,
        retry_after=RETRY_AFTER_S,
        admin_socket=layout.HAPROXY_ADMIN_SOCKET,
        pem=layout.GATEWAY_PEM,
        clients_map=layout.GATEWAY_CLIENTS_MAP,
        backend_keys_map=layout.GATEWAY_BACKEND_KEYS_MAP,
    )


# ---------------------------------------------------------------- runtime API
def set_state(server: str, state: str) -> str:
    """The runtime API command that puts ``server`` of the backend in drain/ready/maint."""
    if state not in ("drain", "ready", "maint"):
        raise ValueError(state)
    if not _SERVER_NAME.fullmatch(server):
        raise ValueError(server)
    return f"set server {BACKEND}/{server} state {state}"


SHOW_STAT = "show stat"


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
