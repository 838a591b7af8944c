"""The served host's firewall, where `llama_firewall` is on: the rules the inventory
renders, loaded, and kept loaded at boot."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llamahost import firewall as fw
from llamahost import layout
from tests.compliance.conftest import TARGETS
from tests.compliance.inventory import Target


@pytest.fixture
def firewalled(target: Target) -> Target:
    if not target.spec.gateway.firewall:
        pytest.skip(f"llama_firewall is off on {target.name}")
    return target


def test_firewall_rules_are_the_inventorys_and_loaded(
    firewalled: Target, host: Any, request: pytest.FixtureRequest
) -> None:
    """The llama port only from the gateway hosts, the exporter ports only from the
    monitoring hosts: the rules file is what the inventory renders, and the table that is
    loaded (`nft -j list table inet llamahost`) holds exactly those rules.

    docs/gateway.md#exposure-and-the-firewall.
    """
    targets: list[Target] = request.config.stash[TARGETS]
    gateways = [t.spec for t in targets if t.spec.is_gateway]
    monitors = [t.spec for t in targets if t.spec.is_monitoring]
    allowed = fw.allows(firewalled.spec, gateways, monitors)
    have = host.file(layout.FIREWALL_RULES).content_string
    assert have == fw.rules(firewalled.name, allowed), (
        f"{layout.FIREWALL_RULES} differs from what the inventory renders"
    )
    listed = host.run(f"nft -j list table inet {layout.FIREWALL_TABLE}")
    assert listed.rc == 0, f"table inet {layout.FIREWALL_TABLE} is not loaded: {listed.stderr}"
    assert fw.loaded(listed.stdout) == fw.expected(allowed), json.loads(listed.stdout)


def test_firewall_unit_loads_the_rules_at_boot(firewalled: Target, host: Any) -> None:
    """llamahost-firewall.service is enabled (it loads the rules before the network and
    llama-server come up) and active."""
    svc = host.service(layout.FIREWALL_UNIT)
    assert svc.is_enabled, f"{layout.FIREWALL_UNIT} is not enabled: no rules after a reboot"
    assert svc.is_running, f"{layout.FIREWALL_UNIT} is not active"
