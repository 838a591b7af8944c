"""Step 4 planned for a fleet against pyinfra's @fake connector (no host has a build, the
cache is empty): one host compiles per build id, the others receive, and pyinfra's
operation order puts every push after the fetch (the join operation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyinfra
import pytest
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State, StateStage
from pyinfra.context import ctx_host, ctx_state, host

from llamahost.distro import SUPPORTED
from llamahost.spec import resolve_host
from tasks import llama_cpp

REPO = Path(__file__).resolve().parents[2]
DEBIAN_12 = next(d for d in SUPPORTED if d.id == "debian")
FETCH = "Fetch llama.cpp build"
JOIN = "llama.cpp incoming directory (after the fetch, before any push)"
RECEIVE = "Receive llama.cpp build"
COMPILE = "Build llama-server ("
ARCH = {"dpkg --print-architecture": "amd64"}


def plan_fleet(
    hosts: dict[str, dict[str, Any]], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, set[str]]]:
    """The run's operations in execution order, each with the hosts it runs on."""
    # As the CLI does: operations are matched across hosts by the line that called them,
    # not by their position in each host's list (pyinfra's API mode).
    monkeypatch.setattr(pyinfra, "is_cli", True)
    inventory = Inventory(  # type: ignore[no-untyped-call]
        (
            [
                (f"@fake/{n}", {"fake_responses": ARCH, "fake_delay": 0, "fake_delay_jitter": 0})
                for n in hosts
            ],
            {},
        )
    )
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    state.cwd = str(REPO)
    connect_all(state)
    state.set_stage(StateStage.Prepare)

    def deploy() -> None:
        data = {**hosts[host.name.removeprefix("@fake/")], "llama_cpp_build_cache": str(cache)}
        llama_cpp.build(resolve_host(host.name, data).cfg, DEBIAN_12, jobs=2)

    for h in inventory:  # as the CLI loads deploy.py for each host
        with ctx_state.use(state), ctx_host.use(h):
            deploy()
    order = []
    for op_hash in state.get_op_order():  # type: ignore[no-untyped-call]
        name = sorted(state.op_meta[op_hash].names)[0]  # one per build id where it names it
        on = {h.name.removeprefix("@fake/") for h in inventory if op_hash in h.op_hash_order}
        order.append((name, on))
    return order


def position(order: list[tuple[str, set[str]]], prefix: str) -> list[int]:
    return [i for i, (name, _) in enumerate(order) if name.startswith(prefix)]


def test_one_compiles_and_the_pushes_wait_for_its_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = plan_fleet({"a": {}, "b": {}, "c": {}}, tmp_path, monkeypatch)
    ((compile_at,),) = [position(order, COMPILE)]
    ((fetch_at,), (join_at,), (receive_at,)) = (
        position(order, FETCH),
        position(order, JOIN),
        position(order, RECEIVE),
    )
    (builder,) = order[compile_at][1]
    assert order[fetch_at][1] == {builder}
    assert order[receive_at][1] == {"a", "b", "c"} - {builder}
    assert order[join_at][1] == {"a", "b", "c"}
    assert compile_at < fetch_at < join_at < receive_at
    # Build tools only where it compiles.
    (tools_at,) = position(order, "Install build dependencies")
    assert order[tools_at][1] == {builder}


def test_other_cmake_arguments_compile_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = {"llama_cpp_cmake_args": ["-DGGML_AVX512=OFF"]}
    order = plan_fleet({"a": {}, "b": {}, "c": other, "d": other}, tmp_path, monkeypatch)
    compiled = [on for name, on in order if name.startswith(COMPILE)]
    assert len(compiled) == 1 and len(compiled[0]) == 2  # one operation, one host per id
    (builders,) = compiled
    assert len(builders & {"a", "b"}) == 1 and len(builders & {"c", "d"}) == 1
    received = set().union(*(on for name, on in order if name.startswith(RECEIVE)))
    assert received == {"a", "b", "c", "d"} - builders
    assert max(position(order, FETCH)) < min(position(order, RECEIVE))
