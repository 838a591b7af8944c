"""One port plan per host (issue 22 item 6): every listener the toolkit puts on a host has a
port of its own on its address, and the unprivileged daemons get no port below 1024.
Refused by `python -m llamahost plan` and by the deploy's preflight alike, before any
operation, naming the host, the field and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State

from llamahost.checks import ConfigError
from llamahost.ports import overlap
from llamahost.spec import resolve_host
from tasks import preflight

REPO = Path(__file__).resolve().parents[2]
KEY = "alice-key-0123456789abcdef0123456789"
ANY = "0.0.0.0"  # noqa: S104  (an address compared, never bound)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "clients"
    p.write_text(f"alice {KEY}\n")
    p.chmod(0o600)
    return p


def refused(data: dict[str, Any], **flags: bool) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        resolve_host("h1", {"llama_profile": "cpu-demo", **data}, **flags)
    assert e.value.host == "h1"
    assert "nothing was changed" in str(e.value)
    return {err.key: f"{err.value!r}: {err.allowed}" for err in e.value.errors}


def accepted(data: dict[str, Any], **flags: bool) -> None:
    resolve_host("h1", {"llama_profile": "cpu-demo", **data}, **flags)


@pytest.mark.parametrize(
    ("a", "b", "clash"),
    [
        (ANY, "127.0.0.1", True),
        ("127.0.0.1", ANY, True),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "10.0.0.1", False),
        ("::", "127.0.0.1", True),  # dual-stack: the IPv6 wildcard takes IPv4 too
        (ANY, "::1", False),  # the IPv4 wildcard leaves IPv6 alone
        ("::1", "::1", True),
        ("::1", "127.0.0.1", False),
    ],
)
def test_addresses_overlap_when_equal_or_a_wildcard_covers_them(
    a: str, b: str, clash: bool
) -> None:
    assert overlap(a, b) is clash


def test_the_gateway_on_the_llama_port_of_the_same_address_is_refused(keys_file: Path) -> None:
    gw = {"llama_gateway_client_keys_file": str(keys_file), "llama_gateway_port": 8080}
    why = refused(gw, is_gateway=True)
    assert why["llama_gateway_port"] == (
        "8080: the gateway on 0.0.0.0 would share port 8080 with llama-server (llama_port) on "
        "0.0.0.0: every listener on a host needs a port of its own on its address"
    )
    # Apart by address: allowed.
    accepted({**gw, "llama_host": "127.0.0.1", "llama_gateway_listen": "10.0.0.1"}, is_gateway=True)
    # Not a gateway: the setting plans no listener, nothing clashes.
    accepted({"llama_gateway_port": 8080})


def test_prometheus_and_the_exporters_on_a_served_port_are_refused() -> None:
    why = refused({"llama_monitoring_prometheus_port": 8080}, is_monitoring=True)
    assert why["llama_monitoring_prometheus_port"].startswith(
        "8080: Prometheus on 127.0.0.1 would share port 8080 with llama-server (llama_port) "
        "on 0.0.0.0"
    )
    why = refused({"llama_port": 9100}, monitored=True)
    assert why["llama_monitoring_node_exporter_port"].startswith(
        "9100: the node exporter on 0.0.0.0 would share port 9100 with llama-server"
    )
    # The node exporter is there only when a `monitoring` group scrapes the host.
    accepted({"llama_port": 9100})
    # Prometheus and the exporter of the same host, on the same port.
    why = refused({"llama_monitoring_prometheus_port": 9100}, monitored=True, is_monitoring=True)
    assert (
        "Prometheus (llama_monitoring_prometheus_port)"
        in why["llama_monitoring_node_exporter_port"]
    )


@pytest.mark.parametrize(
    ("key", "who"),
    [
        ("llama_port", "llama-server"),
        ("llama_monitoring_prometheus_port", "Prometheus"),
        ("llama_monitoring_node_exporter_port", "the node exporter"),
        ("llama_monitoring_gpu_exporter_port", "the GPU exporter"),
    ],
)
def test_a_privileged_port_is_refused_for_an_unprivileged_daemon(key: str, who: str) -> None:
    why = refused({key: 80})
    assert why[key].startswith(f"80: must be from 1024 to 65535: {who} runs as an unprivileged")
    assert "cannot bind a port below 1024" in why[key]


def test_the_gateway_may_take_443(keys_file: Path) -> None:
    # HAProxy binds as root before it drops to its user.
    accepted({"llama_gateway_client_keys_file": str(keys_file)}, is_gateway=True)


def test_plan_and_preflight_refuse_a_clash_before_any_operation(
    keys_file: Path, tmp_path: Path
) -> None:
    data = {
        "ssh_hostname": "10.0.0.1",
        "llama_profile": "cpu-demo",
        "llama_gateway_client_keys_file": str(keys_file),
        "llama_gateway_port": 8080,
    }
    inv = tmp_path / "clash.py"
    inv.write_text(f"gateway = [('gw-clash', {data!r})]\n")
    p = subprocess.run([sys.executable, "-m", "llamahost", "plan", str(inv)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "REFUSED host 'gw-clash': invalid inventory data" in p.stdout
    line = "llama_gateway_port = 8080: the gateway on 0.0.0.0 would share port 8080"
    assert line in p.stdout

    inventory = Inventory(  # type: ignore[no-untyped-call]
        ([("@fake/gw-clash", data)], {}), gateway=(["@fake/gw-clash"], {})
    )
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    state.cwd = str(REPO)
    connect_all(state)
    with pytest.raises(PyinfraError) as exc:
        add_deploy(state, preflight.host_spec)
    assert "REFUSED host '@fake/gw-clash': invalid inventory data" in str(exc.value)
    assert line in str(exc.value)
    assert not state.get_op_order(), "an operation was planned before the refusal"  # type: ignore[no-untyped-call]
