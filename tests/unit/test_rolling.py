"""The rolling gate's words and decisions (tasks/rolling.py): pure, and the runtime API
commands a gateway follows a host with, sent to a real HAProxy."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from llamahost.gateway import haproxy as hx
from tests.unit.test_gateway import (
    ALICE,
    BOB,
    HAPROXY,
    _free_port,
    events,
    gateway_data,
    keys_file,
    local_config,
    spec,
    sse_server,
)

__all__ = ["keys_file"]  # the fixture, shared with the gateway's tests

UP = hx.ServerStat("UP", 0, 0)
DOWN = hx.ServerStat("DOWN", 0, 0)
DRAIN = hx.ServerStat("DRAIN", 0, 0)
MAINT = hx.ServerStat("MAINT", 0, 0)


def test_the_bound_counts_servers_already_out_on_any_gateway() -> None:
    views = {"gw1": {"a": UP, "b": DOWN, "c": UP}, "gw2": {"a": UP, "b": UP, "c": UP}}
    # b is down on gw1 (killed): with a bound of 1, a may not go out too.
    assert hx.may_go_out("a", views, set(), 1) == (False, ["b"])
    assert hx.may_go_out("a", views, set(), 2) == (True, ["b"])
    # b itself may go out (it is already out: restarting it takes nothing more out).
    assert hx.may_go_out("b", views, set(), 1) == (True, [])
    # MAINT and DRAIN count; so does what this run has out, seen or not yet.
    views["gw2"]["c"] = MAINT
    assert hx.may_go_out("a", views, set(), 2) == (False, ["b", "c"])
    all_up = {"gw1": {"a": UP, "b": UP, "c": DRAIN}}
    assert hx.may_go_out("a", all_up, {"b"}, 2) == (False, ["b", "c"])
    assert hx.may_go_out("a", {"gw1": {"a": UP, "b": UP}}, {"b"}, 2) == (True, ["b"])


def test_a_host_follows_by_address_for_an_ip_and_by_name_for_a_name() -> None:
    assert hx.set_address("h1", "10.0.0.5:8081") == (
        "set server llamahost-h1/h1 addr 10.0.0.5 port 8081"
    )
    assert hx.set_address("h1", "[fd00::5]:8081") == (
        "set server llamahost-h1/h1 addr fd00::5 port 8081"
    )
    assert hx.set_address("h1", "gpu-1.example:8080") == (
        "set server llamahost-h1/h1 fqdn gpu-1.example"
    )
    with pytest.raises(ValueError):
        hx.set_address("h1", "10.0.0.5;shutdown:8080")
    with pytest.raises(ValueError):
        hx.set_key("h1", "a key with spaces")
    assert hx.set_maxconn("h1", 4) == "set maxconn server llama/h1 4"


def test_refusals_and_acknowledgements_of_the_runtime_api_are_told_apart() -> None:
    assert not hx.api_refused("")
    assert not hx.api_refused("\n")
    assert not hx.api_refused(
        "IP changed from '127.0.0.1' to '127.0.0.2', port changed from '1' to '2' by 'stats "
        "socket command'"
    )
    assert not hx.api_refused("no need to change the addr, port changed from '1' to '2'")
    assert hx.api_refused("entry not found.")
    assert hx.api_refused("No such server.")


def test_the_keys_map_round_trips() -> None:
    entries = {"h1": "k1" * 20, "h2": "k2" * 20}
    assert hx.parse_backend_keys(hx.backend_keys_text(entries)) == entries


def _admin(sock: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


@HAPROXY
def test_a_real_haproxy_follows_a_host_to_its_new_port_key_and_slots(
    keys_file: Path, tmp_path: Path
) -> None:
    """The commands a drained restart sends (tasks/rolling.py) as HAProxy 2.6 takes them:
    after them, requests reach the host at its new port with its new key, its old port
    gone, and the backend's maxconn is the host's new --parallel."""
    old, new = sse_server(), sse_server()
    for server in (old, new):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    port = _free_port()
    served = spec("a", {"ssh_hostname": "127.0.0.1", "llama_profile": "cpu-demo",
                        "llama_host": "127.0.0.1", "llama_port": old.server_port})  # fmt: skip
    gw = spec("gw", gateway_data(keys_file, llama_gateway_listen="127.0.0.1",
                                 llama_gateway_port=port), gateway=True)  # fmt: skip
    path = local_config(hx.haproxy_cfg("gw", gw.gateway, hx.servers("gw", [served])), tmp_path)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url, ca, sock = f"https://127.0.0.1:{port}", str(tmp_path / "c"), tmp_path / "admin.sock"
    try:
        for _ in range(100):
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/health", verify=ca, timeout=2).ok:
                    break
            time.sleep(0.1)
        assert events(url, ca)[1] == {f"Bearer {BOB}"}
        rotated = "rotated-" + "k" * 40
        moved = hx.Server("a", "a", f"127.0.0.1:{new.server_port}", 3)
        for command in hx.follow(moved, rotated, keys_map=str(tmp_path / "backend-keys.map")):
            answer = _admin(sock, command)
            assert not hx.api_refused(answer), (command.split()[:3], answer)
        old.shutdown()
        old.server_close()
        arrivals, auth = events(url, ca)
        assert len(arrivals) == 40 and auth == {f"Bearer {rotated}"}
        # Its health checks follow it too (2 s apart, 2 failures mark it down).
        time.sleep(5)
        stats = _admin(sock, hx.SHOW_STAT)
        assert hx.server_stats(stats)["a"].status == "UP", stats
        head = stats.splitlines()[0][2:].split(",")
        row = next(r.split(",") for r in stats.splitlines() if r.startswith("llama,a,"))
        assert row[head.index("slim")] == "3"
        # A refusal is seen as one: an unknown server.
        assert hx.api_refused(_admin(sock, hx.set_maxconn("nosuch", 2)))
        assert ALICE not in stats
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        new.shutdown()
