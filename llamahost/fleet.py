"""The whole inventory, validated: every host's spec (llamahost.spec), then the checks that
read several hosts at once. ``python -m llamahost plan|lock`` and the deploy's preflight
call ``inventory_specs`` here, so they refuse the same inventories with the same words
(host, field, what is allowed). Pure logic, no pyinfra."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llamahost import firewall, spec
from llamahost.checks import PREFIX, ConfigError, FieldError
from llamahost.gateway import settings as gateway_settings
from llamahost.monitoring.settings import GROUP as MONITORING
from llamahost.spec import HostSpec


def drain_covers_server_timeout(host: HostSpec, gateways: Sequence[HostSpec]) -> list[FieldError]:
    """A drained host is restarted after ``llama_rolling_drain_timeout`` whatever it still
    answers: shorter than a gateway's server timeout (the longest answer it waits for), the
    restart cuts answers that gateway would still have delivered."""
    if not gateways:
        return []
    timeout = {g.name: gateway_settings.seconds(g.gateway.gateway_server_timeout) for g in gateways}
    longest = max(gateways, key=lambda g: timeout[g.name])
    need = timeout[longest.name]
    if host.gateway.rolling_drain_timeout >= need:
        return []
    return [
        FieldError(
            PREFIX + "rolling_drain_timeout",
            host.gateway.rolling_drain_timeout,
            f"must be at least {need:g} seconds, from 1 to 86400: the gateway {longest.name!r} "
            f"waits up to llama_gateway_server_timeout = "
            f"{longest.gateway.gateway_server_timeout} for an answer, and a shorter drain "
            "restarts the host under answers still in flight; raise it, or lower that timeout",
        )
    ]


def fleet_checks(specs: Sequence[HostSpec]) -> list[ConfigError]:
    """Each served host against the inventory's gateways and monitoring hosts: its firewall
    (what ``firewall.allows`` cannot say) and its drain."""
    gateways = [s for s in specs if s.is_gateway]
    monitors = [s for s in specs if s.is_monitoring]
    out = []
    for s in specs:
        if not s.serves:
            continue
        errors = drain_covers_server_timeout(s, gateways)
        if s.gateway.firewall:
            try:
                firewall.allows(s, gateways, monitors)
            except ConfigError as e:
                errors += e.errors
        if errors:
            out.append(ConfigError(s.name, errors))
    return out


def inventory_specs(
    hosts: Sequence[tuple[str, Mapping[str, Any], Sequence[str]]], *, use_lock: bool = True
) -> tuple[list[HostSpec], list[ConfigError]]:
    """Every host of the whole inventory, as (name, data, groups) from pyinfra: the specs of
    the valid ones and the errors of the others, the checks across hosts included. Those
    run once every `gateway` and `monitoring` host is valid (else their own errors are
    reported first); a host they refuse is among the errors, not the specs."""
    specs, errors = spec.inventory_specs(hosts, use_lock=use_lock)
    roles = {gateway_settings.GROUP, MONITORING}
    invalid = {e.host for e in errors}
    if any(name in invalid and roles & set(groups) for name, _, groups in hosts):
        return specs, errors
    fleet = fleet_checks(specs)
    refused = {e.host for e in fleet}
    return [s for s in specs if s.name not in refused], errors + fleet
