"""Step 4 planned for a fleet against pyinfra's @fake connector (no host has a build, the
cache is empty): one host compiles per build id, the others receive, and pyinfra's
operation order puts every push after the fetch (the join operation). On GPU hosts, per
distribution: the CUDA toolkit only where the build compiles, the CUDA runtime and cuBLAS
alone where it is received."""

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

from llamahost import gpu
from llamahost.distro import SUPPORTED, Distribution
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
    hosts: dict[str, dict[str, Any]],
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    dist: Distribution = DEBIAN_12,
    cuda: str | None = None,
    commands: dict[str, dict[str, list[str]]] | None = None,
) -> list[tuple[str, set[str]]]:
    """The run's operations in execution order, each with the hosts it runs on. `cuda`: the
    hosts take the GPU path with that CUDA version (architecture 80). `commands`, when
    given, gets per host the commands of each operation it runs (by the operation's first
    name), as execution would generate them with nothing installed."""
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
        cfg = resolve_host(host.name, data).cfg
        gpu_args = gpu.cuda_cmake_args("80", cuda) if cuda else ()
        llama_cpp.build(cfg, dist, jobs=2, gpu_cmake_args=gpu_args, cuda_version=cuda)

    for h in inventory:  # as the CLI loads deploy.py for each host
        with ctx_state.use(state), ctx_host.use(h):
            deploy()
    order = []
    for op_hash in state.get_op_order():  # type: ignore[no-untyped-call]
        name = sorted(state.op_meta[op_hash].names)[0]  # one per build id where it names it
        on = {h.name.removeprefix("@fake/") for h in inventory if op_hash in h.op_hash_order}
        order.append((name, on))
        if commands is not None:
            for h in inventory:
                if op_hash in h.op_hash_order:
                    with ctx_state.use(state), ctx_host.use(h):
                        op_data = state.get_op_data_for_host(h, op_hash)
                        generated = [str(c) for c in op_data.command_generator()]
                    commands.setdefault(h.name.removeprefix("@fake/"), {})[name] = generated
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


CUDA_OP = "CUDA 13.0 "


@pytest.mark.parametrize("dist", SUPPORTED, ids=lambda d: f"{d.id}-{d.version_id}")
def test_gpu_fleet_toolkit_only_where_it_compiles(
    dist: Distribution, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: dict[str, dict[str, list[str]]] = {}
    order = plan_fleet(
        {"a": {}, "b": {}, "c": {}}, tmp_path, monkeypatch, dist, cuda="13.0", commands=commands
    )
    ((compile_at,),) = [position(order, COMPILE)]
    (builder,) = order[compile_at][1]
    (cuda_at,) = position(order, CUDA_OP)
    assert order[cuda_at][1] == {"a", "b", "c"}  # one operation, its packages per host
    assert cuda_at < compile_at < min(position(order, RECEIVE))

    def installs(h: str) -> list[str]:
        (op,) = [cmds for name, cmds in commands[h].items() if name.startswith(CUDA_OP)]
        (command,) = op
        return command.rsplit(" install ", 1)[1].split()

    assert installs(builder) == ["cuda-toolkit-13-0"]
    for h in {"a", "b", "c"} - {builder}:
        assert installs(h) == ["cuda-cudart-13-0", "libcublas-13-0"], h
        words = " ".join(c for cmds in commands[h].values() for c in cmds).split()
        for word in ("cuda-toolkit-13-0", "build-essential", "cmake"):
            assert word not in words, (h, word)
        assert not [w for w in words if "nvcc" in w], h
    # The compile is the CUDA build, with the toolkit's nvcc.
    (build,) = commands[builder][order[compile_at][0]]
    assert "-DGGML_CUDA=ON" in build and "/usr/local/cuda-13.0/bin/nvcc" in build
