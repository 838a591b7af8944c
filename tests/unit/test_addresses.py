"""How one host reaches another's service (gateway → llama-server, Prometheus → exporters)."""

from __future__ import annotations

import pytest

from llamahost.addresses import hostport, reach
from llamahost.checks import ConfigError

EVERY = "0.0.0.0"  # noqa: S104  (what a listen setting may say; nothing binds here)


def r(listen: str, address: str = "203.0.113.7", client: str = "gw") -> str:
    return reach(client, "a", address, listen, "llama-server", "llama_host")


def test_a_service_on_every_address_is_reached_at_the_hosts_address() -> None:
    assert r(EVERY) == "203.0.113.7"
    assert r("::", address="a.example") == "a.example"


def test_a_service_on_one_address_is_reached_there_only() -> None:
    # A private NIC beside the public SSH address: the server answers on 10.0.0.5 only.
    assert r("10.0.0.5") == "10.0.0.5"
    assert hostport(r("fd00::5"), 8080) == "[fd00::5]:8080"


def test_on_the_same_host_loopback() -> None:
    assert r(EVERY, client="a") == "127.0.0.1"
    assert r("::", client="a") == "::1"
    assert r("127.0.0.1", client="a") == "127.0.0.1"


def test_loopback_from_another_host_only_on_one_machine() -> None:
    # Test hosts sharing this machine's network: each at its own loopback address.
    assert r("127.77.1.2", address="127.0.0.1") == "127.77.1.2"
    with pytest.raises(ConfigError) as e:
        r("127.0.0.1", address="203.0.113.7")
    assert e.value.host == "a"
    (err,) = e.value.errors
    assert err.key == "llama_host" and "'gw' cannot reach it" in err.allowed
