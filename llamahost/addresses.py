"""How one host of the inventory reaches a service of another (a gateway its llama-servers,
Prometheus the llama-servers and exporters). Pure logic, no pyinfra."""

from __future__ import annotations

import ipaddress

from llamahost.checks import ConfigError, FieldError


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def local(listen: str) -> str:
    """The address a process on the same host connects to."""
    ip = ipaddress.ip_address(listen)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return listen


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a name
        return False


def reach(client: str, host: str, address: str, listen: str, what: str, key: str) -> str:
    """Where ``client`` connects to ``what`` of ``host``, which listens on ``listen``.

    ``address`` is how other hosts reach ``host`` (its monitoring address, SSH address or
    name). On the same host: loopback (or the listen address). A service listening on one
    address answers only there, so that address is used; one listening on every address is
    reached at ``address``. A loopback-only service is reachable from another host only when
    both are on one machine (``address`` is loopback too, as test hosts are); otherwise the
    setting ``key`` of ``host`` is refused."""
    if client == host:
        return local(listen)
    ip = ipaddress.ip_address(listen)
    if ip.is_loopback and not _is_loopback(address):
        raise ConfigError(
            host,
            [
                FieldError(
                    key,
                    listen,
                    f"{what} listens on loopback only, so {client!r} cannot reach it: listen on "
                    "0.0.0.0 or an address it reaches (and firewall the port, docs/gateway.md)",
                )
            ],
        )
    return address if ip.is_unspecified else listen
