"""One port plan per host: every TCP listener the toolkit puts on a host, and the refusals.

Two listeners clash when they share a port and their addresses overlap: the same address,
or a wildcard (``0.0.0.0`` covers every IPv4 address, ``::`` every address, IPv4 included,
as Linux binds it dual-stack by default). The deploy would otherwise restart a serving host
into a unit that cannot bind. ``resolve_host`` runs this for the plan, the deploy's
preflight and the compliance suite alike, before any host is touched.

Ports below 1024 need a privilege: HAProxy (the gateway) binds them as root before it drops
to its user; llama-server, Prometheus and the exporters run as unprivileged users with no
capabilities, so their ports are refused below 1024 by their settings' checks
(``checks.unprivileged_port``) rather than granted ``CAP_NET_BIND_SERVICE``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from llamahost.checks import PREFIX, FieldError


@dataclass(frozen=True)
class Listener:
    setting: str  # the port's setting, without the llama_ prefix
    what: str  # what listens, in words
    address: str
    port: int


def overlap(a: str, b: str) -> bool:
    """Whether two listen addresses share a socket space (the same or a wildcard's)."""
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if x == y:
        return True
    for one, other in ((x, y), (y, x)):
        if one.is_unspecified and (one.version == 6 or other.version == 4):
            return True
    return False


def clashes(listeners: list[Listener]) -> list[FieldError]:
    """A field error for every listener that shares a port and address with an earlier one;
    each names both settings and what is allowed."""
    errors = []
    for i, later in enumerate(listeners):
        for earlier in listeners[:i]:
            if later.port == earlier.port and overlap(later.address, earlier.address):
                errors.append(
                    FieldError(
                        PREFIX + later.setting,
                        later.port,
                        f"{later.what} on {later.address} would share port {later.port} with "
                        f"{earlier.what} ({PREFIX}{earlier.setting}) on {earlier.address}: "
                        "every listener on a host needs a port of its own on its address",
                    )
                )
                break
    return errors
