"""The served hosts' firewall: who may open which port, the nftables file, and that file
loaded by a real nft in network namespaces of the test's own (root only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamahost import firewall as fw
from llamahost.checks import ConfigError
from llamahost.fleet import inventory_specs
from llamahost.spec import HostSpec, resolve_host

FIXTURES = Path(__file__).parent / "fixtures"


def spec(name: str, address: str, monitored: bool = False, **data: Any) -> HostSpec:
    return resolve_host(
        name,
        {"ssh_hostname": address, "llama_profile": "cpu-demo", **data},
        monitored=monitored,
    )


def test_off_without_a_gateway_group() -> None:
    assert spec("a", "10.0.0.2").gateway.firewall is False


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("gw") / "clients"
    keys.write_text("alice alice-key-0123456789abcdef0123456789\n")
    keys.chmod(0o600)
    return keys


def _inventory(clients: Path, served: dict[str, Any], with_gateway: bool = True) -> list[HostSpec]:
    gw = {"ssh_hostname": "10.0.0.1", "llama_serve": False,
          "llama_gateway_client_keys_file": str(clients)}  # fmt: skip
    hosts: list[tuple[str, dict[str, Any], list[str]]] = [
        ("a", {"ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo", **served}, []),
    ]
    if with_gateway:
        hosts.append(("gw", gw, ["gateway"]))
    specs, errors = inventory_specs(hosts)
    assert errors == []
    return specs


def test_on_by_default_behind_a_gateway(clients: Path) -> None:
    """`auto` (the default): an inventory with a `gateway` group closes its served hosts'
    llama port to everyone but the gateways; the gateway-only host has none."""
    a, gw = _inventory(clients, {})
    assert a.gateway.firewall is True and not a.firewall_declined
    assert gw.gateway.firewall is False and not gw.firewall_declined
    (llama,) = fw.allows(a, [gw], [])
    assert llama.ports == (8080,) and llama.v4 == ("10.0.0.1",)
    # Turned off by the host: off, and the run will warn (tasks/firewall.py).
    a, _ = _inventory(clients, {"llama_firewall": False})
    assert a.gateway.firewall is False and a.firewall_declined
    # Without a gateway group, `auto` and false are the same: off, nothing to warn about.
    (a,) = _inventory(clients, {}, with_gateway=False)
    assert a.gateway.firewall is False and not a.firewall_declined
    (a,) = _inventory(clients, {"llama_firewall": False}, with_gateway=False)
    assert not a.firewall_declined


def test_every_instance_port_is_opened(clients: Path) -> None:
    """A host with several llama-servers: each instance's port (llama_port + N) let in from
    the gateways, and only those ports."""
    a, gw = _inventory(clients, {"llama_instances": 3})
    (llama,) = fw.allows(a, [gw], [])
    assert llama.ports == (8080, 8081, 8082) and llama.v4 == ("10.0.0.1",)
    assert "8080, 8081, 8082" in fw.rules("a", [llama])


@pytest.mark.parametrize("value", ["on", 1, "Auto", None])
def test_other_values_are_refused(value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        spec("a", "10.0.0.2", llama_firewall=value)
    assert str(e.value.errors[0]) == f"llama_firewall = {value!r}: must be true, false or auto"


def test_the_llama_port_from_gateways_and_monitoring_the_exporters_from_monitoring() -> None:
    """Prometheus on the monitoring hosts scrapes llama-server's /metrics on the llama port:
    the firewall lets it, or the scrape and the alerts on it would fail."""
    a = spec("a", "10.0.0.2", monitored=True, llama_firewall=True, llama_port=8081)
    gws = [spec("gw", "10.0.0.1"), spec("gw6", "fd00::1")]
    allowed = fw.allows(a, gws, [spec("mon", "10.0.0.9")])
    assert allowed == [
        fw.Allow(
            "llama-server", (8081,), ("10.0.0.1", "10.0.0.9"), ("fd00::1",), ("gw", "gw6", "mon")
        ),
        fw.Allow("exporters", (9100,), ("10.0.0.9",), (), ("mon",)),
    ]
    text = fw.rules("a", allowed)
    assert "# llama-server: from gw, gw6, mon" in text
    assert "tcp dport { 8081 } ip saddr { 10.0.0.1, 10.0.0.9 } accept" in text
    assert "tcp dport { 8081 } ip6 saddr { fd00::1 } accept" in text
    assert "tcp dport { 9100 } ip saddr { 10.0.0.9 } accept" in text
    assert "tcp dport { 9100 } counter drop" in text
    assert "dport { 22 }" not in text and "policy accept" in text
    # A host both gateway and monitoring is listed once; without a `monitoring` group the
    # llama port is the gateways' alone.
    both = fw.allows(a, [spec("gm", "10.0.0.1")], [spec("gm", "10.0.0.1")])
    assert both[0] == fw.Allow("llama-server", (8081,), ("10.0.0.1",), (), ("gm",))
    alone = spec("a", "10.0.0.2", llama_firewall=True)
    assert fw.allows(alone, [spec("gw", "10.0.0.1")], []) == [
        fw.Allow("llama-server", (8080,), ("10.0.0.1",), (), ("gw",))
    ]


def test_no_gateway_or_a_gateway_known_by_name_is_refused() -> None:
    a = spec("a", "10.0.0.2", llama_firewall=True)
    with pytest.raises(ConfigError) as e:
        fw.allows(a, [], [])
    assert e.value.host == "a" and e.value.errors[0].key == "llama_firewall"
    assert "needs a `gateway` group" in e.value.errors[0].allowed
    with pytest.raises(ConfigError) as e:
        fw.allows(a, [spec("gw", "gw.example")], [])
    assert "'gw' is known by the name 'gw.example'" in e.value.errors[0].allowed
    # Both groups' names are reported at once.
    watched = spec("a", "10.0.0.2", monitored=True, llama_firewall=True)
    with pytest.raises(ConfigError) as e:
        fw.allows(watched, [spec("gw", "gw.example")], [spec("mon", "mon.example")])
    assert [err.allowed.split(";")[0] for err in e.value.errors] == [
        "the gateway host 'gw' is known by the name 'gw.example'",
        "the monitoring host 'mon' is known by the name 'mon.example'",
    ]


def test_the_loaded_rules_read_back_from_nft() -> None:
    """Recorded: tests/unit/fixtures/nft-list-table.source.nft loaded by nft 1.0.6 (Debian
    12) in a network namespace, then `nft -j list table inet llamahost`."""
    a = spec("a", "10.0.0.2", monitored=True, llama_firewall=True)
    allowed = fw.allows(a, [spec("gw", "10.0.0.1"), a], [spec("mon", "fd00::9")])
    assert fw.rules("a", allowed).startswith(
        (FIXTURES / "nft-list-table.source.nft").read_text().split("\n", 1)[0]
    )
    have = fw.loaded((FIXTURES / "nft-list-table.json").read_text())
    assert have == fw.expected(allowed)
    assert have != fw.expected(fw.allows(a, [spec("gw", "10.0.0.1")], []))


# ---------------------------------------------------------------- a real nft
REAL = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("nft") and shutil.which("ip")),
    reason="needs root, nft and ip (make sysdeps installs nftables) for network namespaces",
)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """Namespaces of the test's own: `srv` (the served host) joined by a veth pair each to
    `gw` (10.231.1.2 → 10.231.1.1), `out` (10.231.2.2 → 10.231.2.1) and `mon`
    (10.231.3.2 → 10.231.3.1); this machine's own network is never touched."""
    tag = uuid.uuid4().hex[:6]
    ns = {n: f"llh-{n}-{tag}" for n in ("srv", "gw", "out", "mon")}
    try:
        for n in ns.values():
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        for i, peer in ((1, "gw"), (2, "out"), (3, "mon")):
            a, b = f"v{i}s{tag}", f"v{i}p{tag}"
            sh("ip", "link", "add", a, "netns", ns["srv"], "type", "veth", "peer", b,
               "netns", ns[peer])  # fmt: skip
            sh("ip", "-n", ns["srv"], "addr", "add", f"10.231.{i}.1/24", "dev", a)
            sh("ip", "-n", ns[peer], "addr", "add", f"10.231.{i}.2/24", "dev", b)
            sh("ip", "-n", ns["srv"], "link", "set", a, "up")
            sh("ip", "-n", ns[peer], "link", "set", b, "up")
        yield ns
    finally:
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def connects(ns: str, address: str, port: int) -> bool:
    code = (
        "import socket,sys\n"
        "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
        "except OSError: sys.exit(1)\n"
    )
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", code, address, str(port)]
    return subprocess.run(argv, capture_output=True).returncode == 0


@REAL
def test_the_rules_loaded_by_nft_let_only_gateway_and_monitoring_in(
    namespaces: dict[str, str],
) -> None:
    srv, gw, out, mon = (namespaces[n] for n in ("srv", "gw", "out", "mon"))
    llama, exporter, other = 8080, 9100, 2222  # `other` stands for SSH: not the toolkit's port
    a = spec("a", "10.231.1.1", monitored=True, llama_firewall=True, llama_port=llama)
    allowed = fw.allows(a, [spec("gw", "10.231.1.2")], [spec("mon", "10.231.3.2")])
    text = fw.rules("a", allowed)
    serve = ["ip", "netns", "exec", srv, sys.executable, "-m", "http.server", "--bind", "::"]
    listeners = [
        subprocess.Popen([*serve, str(p)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in (llama, exporter, other)
    ]
    try:
        for _ in range(50):
            if all(connects(gw, "10.231.1.1", p) for p in (llama, exporter, other)):
                break
            time.sleep(0.1)
        # Without the rules, everyone reaches every port: the probe can see a difference.
        assert connects(out, "10.231.2.1", llama) and connects(gw, "10.231.1.1", exporter)
        subprocess.run(["ip", "netns", "exec", srv, "nft", "-f", "-"], input=text, text=True,
                       check=True)  # fmt: skip
        assert connects(gw, "10.231.1.1", llama)
        assert connects(mon, "10.231.3.1", llama)  # Prometheus scrapes llama-server there
        assert not connects(out, "10.231.2.1", llama)
        assert connects(mon, "10.231.3.1", exporter)
        assert not connects(gw, "10.231.1.1", exporter)
        assert not connects(out, "10.231.2.1", exporter)
        assert connects(out, "10.231.2.1", other)  # left alone
        # Loading it again replaces the table (one transaction), it does not add to it.
        subprocess.run(["ip", "netns", "exec", srv, "nft", "-f", "-"], input=text, text=True,
                       check=True)  # fmt: skip
        listed = json.loads(sh("ip", "netns", "exec", srv, "nft", "-j", "list", "ruleset"))
        rules = [x["rule"] for x in listed["nftables"] if "rule" in x]
        assert len(rules) == 5 and {r["table"] for r in rules} == {"llamahost"}, rules
        assert fw.loaded(json.dumps(listed)) == fw.expected(allowed)
    finally:
        for p in listeners:
            p.kill()
    # This machine's own ruleset has no such table.
    assert "llamahost" not in sh("nft", "list", "tables")
