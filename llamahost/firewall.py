"""The served hosts' firewall, when ``llama_firewall`` is on: which sources may open which
ports, and the nftables file that says so (docs/gateway.md#exposure). Pure logic.

The rules live in a table of the toolkit's own (``table inet llamahost``), hooked on input
with policy accept: they only drop new connections to the toolkit's ports from elsewhere,
never open anything, and leave every other table (a cloud image's own firewall, Docker's)
alone. The file replaces the table in one transaction, so there is no moment without it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

from llamahost import layout, render
from llamahost.checks import PREFIX, ConfigError, FieldError
from llamahost.spec import HostSpec


@dataclass(frozen=True)
class Allow:
    """New TCP connections to ``ports`` only from these addresses (and loopback)."""

    what: str
    ports: tuple[int, ...]
    v4: tuple[str, ...]
    v6: tuple[str, ...]
    clients: tuple[str, ...]  # the hosts they belong to, for the file's comments


def _sources(
    group: str, clients: Sequence[HostSpec]
) -> tuple[list[str], list[str], list[FieldError]]:
    v4: list[str] = []
    v6: list[str] = []
    errors = []
    for c in clients:
        try:
            ip = ipaddress.ip_address(c.address)
        except ValueError:
            errors.append(
                FieldError(
                    PREFIX + "firewall",
                    True,
                    f"the {group} host {c.name!r} is known by the name {c.address!r}; the "
                    f"firewall needs its IP address: set llama_monitoring_address of {c.name!r} "
                    "(or its ssh_hostname) to the address its connections come from",
                )
            )
            continue
        (v4 if ip.version == 4 else v6).append(str(ip))
    return v4, v6, errors


def allows(
    spec: HostSpec, gateways: Sequence[HostSpec], monitors: Sequence[HostSpec]
) -> list[Allow]:
    """What the firewall of served host ``spec`` lets in; ConfigError naming ``spec``'s host
    when it cannot be said. The llama port is opened to the gateways and, when the inventory
    has a `monitoring` group, to its hosts too: Prometheus scrapes llama-server's /metrics on
    that port. The exporter ports only to the monitoring hosts."""
    if not gateways:
        raise ConfigError(
            spec.name,
            [
                FieldError(
                    PREFIX + "firewall",
                    True,
                    "needs a `gateway` group: the llama port is opened to the gateway hosts "
                    "(and the `monitoring` hosts) only, and with no gateway no client could "
                    "reach llama-server",
                )
            ],
        )
    scrapers = monitors if spec.monitored else []
    gv4, gv6, errors = _sources("gateway", gateways)
    mv4, mv6, mon_errors = _sources("monitoring", scrapers)
    if errors or mon_errors:
        raise ConfigError(spec.name, errors + mon_errors)
    names = tuple(dict.fromkeys([*(g.name for g in gateways), *(m.name for m in scrapers)]))
    llama = Allow(
        "llama-server",
        tuple(x.port for x in spec.instances),
        tuple(sorted(set(gv4 + mv4))),
        tuple(sorted(set(gv6 + mv6))),
        names,
    )
    out = [llama]
    if spec.monitored:
        mon = spec.monitoring
        ports = [mon.monitoring_node_exporter_port]
        if spec.uses_gpu:
            ports.append(mon.monitoring_gpu_exporter_port)
        out.append(
            Allow(
                "exporters",
                tuple(ports),
                tuple(sorted(set(mv4))),
                tuple(sorted(set(mv6))),
                tuple(m.name for m in scrapers),
            )
        )
    return out


def rules(host: str, allowed: Sequence[Allow]) -> str:
    """The nftables file (``nft -f``) of served host ``host``."""
    return render.template(
        "firewall/llamahost.nft.j2", host=host, allows=allowed, table=layout.FIREWALL_TABLE
    )


def unit() -> str:
    """The unit that loads the file at boot, before the network and llama-server."""
    return render.template(
        "firewall/llamahost-firewall.service.j2",
        rules=layout.FIREWALL_RULES,
        table=layout.FIREWALL_TABLE,
        server_unit=layout.UNIT,
    )


# What a rule does, as the compliance check compares it: (ports, sources, verdict); the
# loopback rule aside. Sources are normalised addresses, empty for a drop.
Rule = tuple[tuple[int, ...], tuple[str, ...], str]


def expected(allowed: Sequence[Allow]) -> set[Rule]:
    out: set[Rule] = set()
    for a in allowed:
        ports = tuple(sorted(a.ports))
        for sources in (a.v4, a.v6):
            if sources:
                out.add((ports, tuple(sorted(sources)), "accept"))
        out.add((ports, (), "drop"))
    return out


def loaded(nft_json: str) -> set[Rule]:
    """``nft -j list table inet llamahost`` → its rules, as ``expected`` says them."""
    out: set[Rule] = set()
    for item in json.loads(nft_json).get("nftables", []):
        rule = item.get("rule")
        if rule is None:
            continue
        ports: tuple[int, ...] = ()
        sources: tuple[str, ...] = ()
        verdict, loopback = "", False
        for e in rule.get("expr", []):
            m = e.get("match")
            if m:
                right = m.get("right")
                values = right["set"] if isinstance(right, dict) and "set" in right else [right]
                field = m.get("left", {}).get("payload", {}).get("field")
                if field == "dport":
                    ports = tuple(sorted(int(v) for v in values))
                elif field == "saddr":
                    sources = tuple(sorted(str(ipaddress.ip_address(v)) for v in values))
                elif "meta" in m.get("left", {}):
                    loopback = True
            verdict = next((v for v in ("accept", "drop", "reject") if v in e), verdict)
        if not loopback:
            out.add((ports, sources, verdict))
    return out
