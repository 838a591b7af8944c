"""The gateway (hosts of group `gateway`): HAProxy running the configuration the inventory
renders, its secrets private, every served host of the inventory in rotation."""

from __future__ import annotations

from typing import Any

import pytest

from llamahost import layout
from llamahost.gateway import haproxy as hx
from tests.compliance.conftest import TARGETS
from tests.compliance.inventory import Target


@pytest.fixture
def gateway(target: Target) -> Target:
    if not target.spec.is_gateway:
        pytest.skip(f"{target.name} is not in group 'gateway', so it runs no HAProxy")
    return target


def test_haproxy_runs_the_rendered_configuration(
    gateway: Target, host: Any, request: pytest.FixtureRequest
) -> None:
    """HAProxy is enabled, active, and runs the configuration rendered from the inventory.

    docs/gateway.md: one server per served host, maxconn = its --parallel; checked with
    `haproxy -c` before it is put in place.
    """
    svc = host.service(layout.HAPROXY)
    assert svc.is_enabled and svc.is_running, f"{layout.HAPROXY} is not enabled and running"
    served = [t.spec for t in request.config.stash[TARGETS] if t.spec.serves]
    want = hx.haproxy_cfg(gateway.name, gateway.spec.gateway, hx.servers(gateway.name, served))
    have = host.file(layout.HAPROXY_CONFIG).content_string
    assert have == want, f"{layout.HAPROXY_CONFIG} differs from what the inventory renders"
    check = host.run(f"haproxy -c -q -f {layout.HAPROXY_CONFIG}")
    assert check.rc == 0, check.stderr[-500:]


def test_gateway_secrets_are_root_haproxy_0640(gateway: Target, host: Any) -> None:
    """The gateway's TLS key and key maps are root:haproxy 0640 in a 0750 directory."""
    d = host.file(layout.GATEWAY_DIR)
    assert (d.user, d.group, d.mode) == ("root", "haproxy", 0o750), layout.GATEWAY_DIR
    for path in (layout.GATEWAY_PEM, layout.GATEWAY_CLIENTS_MAP, layout.GATEWAY_BACKEND_KEYS_MAP):
        f = host.file(path)
        assert f.exists, f"{path} is missing"
        assert (f.user, f.group, f.mode) == ("root", "haproxy", 0o640), (path, f.mode)


def test_every_served_host_is_in_rotation(
    gateway: Target, host: Any, request: pytest.FixtureRequest
) -> None:
    """Every served host of the inventory is a server of the gateway, and up.

    docs/gateway.md: health checks on /health every 2 s; a host out of rotation is down
    (or drained by a rollout that stopped).
    """
    out = host.run(
        f"echo 'show stat' | socat -t 5 stdio unix-connect:{layout.HAPROXY_ADMIN_SOCKET}"
    )
    assert out.rc == 0, out.stderr[-300:]
    stats = hx.server_stats(out.stdout)
    names = {hx.server_name(t.name) for t in request.config.stash[TARGETS] if t.spec.serves}
    assert set(stats) == names, f"servers {sorted(stats)}, inventory {sorted(names)}"
    assert hx.out_of_rotation(stats) == [], {n: s.status for n, s in stats.items()}


def test_the_gateway_limits_outlive_a_reload(
    gateway: Target, host: Any, request: pytest.FixtureRequest
) -> None:
    """docs/gateway.md#fairness-and-reloads: with a rate limit or a failed-authentication
    limit, the running HAProxy has its local peer, on a socket only HAProxy's user can
    reach, and the link that leads a reloaded (old) process back to it from its chroot."""
    served = [t.spec for t in request.config.stash[TARGETS] if t.spec.serves]
    want = hx.haproxy_cfg(gateway.name, gateway.spec.gateway, hx.servers(gateway.name, served))
    if "peers llamahost" not in want:
        pytest.skip(f"{gateway.name} has no rate limit and no failed-authentication limit")
    d = host.file(layout.GATEWAY_SOCKETS_DIR)
    assert (d.user, d.group, d.mode) == ("haproxy", "haproxy", 0o700), layout.GATEWAY_SOCKETS_DIR
    sock = host.file(layout.GATEWAY_PEERS_SOCKET)
    assert sock.is_socket, f"{layout.GATEWAY_PEERS_SOCKET} is not a socket"
    assert (sock.user, sock.mode) == ("haproxy", 0o600), layout.GATEWAY_PEERS_SOCKET
    link = host.run(f"readlink {layout.GATEWAY_SOCKETS_LINK}")
    assert link.stdout.strip() == layout.GATEWAY_SOCKETS_IN_CHROOT, (
        f"{layout.GATEWAY_SOCKETS_LINK} must link to {layout.GATEWAY_SOCKETS_IN_CHROOT}: "
        "without it a reload starts the limits' counts again"
    )
    peers = host.run(
        f"echo 'show peers' | socat -t 5 stdio unix-connect:{layout.HAPROXY_ADMIN_SOCKET}"
    )
    assert "id=local(local" in peers.stdout, peers.stdout[-500:]
