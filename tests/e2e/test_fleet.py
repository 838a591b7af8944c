"""Fleet bring-up (issue 13): three fresh Debian 12 hosts with the same build id, one
inventory, one real `pyinfra ... deploy.py` run. Exactly one host compiles llama.cpp; the
controller caches its tree and the other two receive it, without a compiler; all three
serve; a rerun changes nothing anywhere. Then bad archives pushed to a serving host are
refused with `current` and the server untouched. Last, one host deployed with other CMake
arguments (another build id) compiles its own, the cache then holds both builds, and a
rerun with the original arguments moves it back to the first build without compiling (the
rollback), after which the whole fleet reruns quietly.

The hosts are the session's shared fleet (tests/e2e/fleet.py, also used by
tests/e2e/test_gateway.py); every test here leaves each host serving its original build and
configuration. The second compile uses arguments chosen to be cheap (-O0: no optimisation,
see OTHER_CMAKE_ARGS); its cost is in reports/fleet-timings.json.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import requests

from llamahost import build as builds
from llamahost.spec import resolve_host
from tests.e2e.conftest import Run
from tests.e2e.fleet import Fleet
from tests.support import testhost

pytestmark = pytest.mark.e2e

REPO = testhost.REPO
REPORTS = REPO / "reports"
COMPILE_OP = "Build llama-server ("
PLATFORM = builds.platform("debian", "12", "amd64")  # the test hosts'


def current(fleet: Fleet, name: str) -> str:
    return fleet.sh(name, "readlink /opt/llama.cpp/current").strip()


def served(fleet: Fleet, name: str) -> str:
    return fleet.sh(
        name, "systemctl show llama-server -p MainPID,ActiveEnterTimestampMonotonic,NRestarts"
    )


def test_one_host_compiles_the_others_receive(fleet: Fleet, first: Run) -> None:
    names = list(fleet.hosts)
    built_by = {n: fleet.sh(n, "cat /opt/llama.cpp/current/logs/built-by").strip() for n in names}
    received = [n for n in names if _has_received(fleet, n)]
    # One host compiled (whichever pyinfra planned first); every host's tree says which.
    (builder,) = set(built_by.values())
    assert builder in names
    assert received == [n for n in names if n != builder]
    assert [op for op in first.changed_operations() if op.startswith(COMPILE_OP)] != []
    assert first.stderr.count("compiles it and the controller caches it") == 1
    assert first.stderr.count("receives it from the controller's cache") == 2
    # One build id, one archive in the cache, the same tree everywhere.
    (entry,) = builds.cache_entries(fleet.cache)
    assert {current(fleet, n) for n in names} == {f"/opt/llama.cpp/builds/{entry.build_id}"}
    assert entry.info()["built_by"] == builder
    # No compiler where none is needed: only the builder installed one.
    for n in names:
        has_cc = fleet.sh(n, "command -v cc cmake", check=False).strip() != ""
        assert has_cc == (n == builder), n
    # No archive left behind on any host.
    for n in names:
        assert fleet.sh(n, "ls -A /opt/llama.cpp/incoming").strip() == ""


def _has_received(fleet: Fleet, name: str) -> bool:
    out = fleet.sh(name, "cat /opt/llama.cpp/current/logs/received", check=False)
    return out.startswith("received ")


def test_every_host_serves(fleet: Fleet, first: Run) -> None:
    for n in fleet.hosts:
        assert fleet.health(n) == 200, n
        key = fleet.sh(n, "cat /etc/llama-server/api-key").strip()
        r = requests.post(
            f"{fleet.url(n)}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 200, (n, r.text)


def test_rerun_changes_nothing_on_any_host(fleet: Fleet, first: Run) -> None:
    before = {n: served(fleet, n) for n in fleet.hosts}
    run = fleet.deploy()
    assert run.rc == 0, run.output[-6000:]
    assert run.changed_operations() == []
    assert {n: served(fleet, n) for n in fleet.hosts} == before
    fleet.timings["rerun_3_hosts_s"] = round(run.seconds, 1)
    assert run.stderr.count("llama.cpp build") == len(fleet.hosts)
    assert "compiles it" not in run.stderr and "receives it" not in run.stderr


def _bad_entry(fleet: Fleet, bid: str, data: bytes, recorded: str) -> None:
    entry = builds.CacheEntry(fleet.cache, bid)
    entry.archive.write_bytes(data)
    entry.sha256_file.write_text(builds.sha256_line(recorded, entry.archive.name))


@pytest.mark.parametrize("damage", ["truncated", "wrong-sha256", "truncated-consistent"])
def test_a_bad_archive_is_refused_and_nothing_moves(fleet: Fleet, first: Run, damage: str) -> None:
    """The cache holds a damaged archive for another build id (other CMake arguments) of
    the last host: the push is refused on the host, `current` and the server stay."""
    name = list(fleet.hosts)[-1]
    cmake = '["-DLLAMAHOST_FLEET_TEST=1"]'
    cfg = resolve_host(name, {"llama_cpp_cmake_args": ["-DLLAMAHOST_FLEET_TEST=1"]}).cfg
    bid = builds.build_id(cfg.cpp_commit, builds.cmake_args(cfg), PLATFORM)
    # The host's own build's entry (the cache may hold more once the test below ran).
    good = builds.CacheEntry(fleet.cache, current(fleet, name).rsplit("/", 1)[1])
    assert good.complete()
    full = good.archive.read_bytes()
    half = full[: len(full) // 2]
    if damage == "truncated":
        _bad_entry(fleet, bid, half, good.expected_sha256())
    elif damage == "wrong-sha256":
        _bad_entry(fleet, bid, full, "0" * 64)
    else:  # the record matches, the bytes are still not a whole archive
        _bad_entry(fleet, bid, half, hashlib.sha256(half).hexdigest())
    before, link = served(fleet, name), current(fleet, name)
    try:
        run = fleet.deploy("--limit", name, "--data", f"llama_cpp_cmake_args={cmake}")
    finally:
        for f in builds.CacheEntry(fleet.cache, bid).files():
            f.unlink(missing_ok=True)
    assert run.rc != 0
    assert run.stopped_at().startswith("Receive llama.cpp build")
    assert f"build {bid} refused, `current` left alone: archive refused" in run.stderr
    assert COMPILE_OP not in run.stderr
    assert current(fleet, name) == link
    assert served(fleet, name) == before
    assert fleet.health(name) == 200
    leftovers = fleet.sh(name, f"ls -d /opt/llama.cpp/builds/{bid}* /opt/llama.cpp/incoming/*",
                         check=False)  # fmt: skip
    assert leftovers.strip() == ""


# Another build id that compiles as cheaply as this build can: the same targets without
# optimisation (CMake puts the *_FLAGS_RELEASE after the toolkit's Release type; values may
# not contain spaces, so NDEBUG goes too: ggml's asserts stay on, which is harmless). Any
# argument would make another id; this one also halves the compile on 2 cores.
OTHER_CMAKE_ARGS = ["-DCMAKE_C_FLAGS_RELEASE=-O0", "-DCMAKE_CXX_FLAGS_RELEASE=-O0"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def role_lines(run: Run, name: str) -> list[str]:
    """The deploy's per-host "llama.cpp build <id> (<platform>): <part>" lines for a host."""
    lines = ANSI.sub("", run.stderr).splitlines()
    return [ln for ln in lines if f"{name}]" in ln and "llama.cpp build " in ln]


def chat(fleet: Fleet, name: str) -> int:
    key = fleet.sh(name, "cat /etc/llama-server/api-key").strip()
    r = requests.post(
        f"{fleet.url(name)}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    return r.status_code


def test_other_cmake_arguments_build_their_own_and_a_rerun_rolls_back(
    fleet: Fleet, first: Run
) -> None:
    names = list(fleet.hosts)
    # The host that compiled the fleet's build: it has the compiler already, so the shared
    # hosts keep the packages they had (the receivers stay without cc and cmake).
    name = fleet.sh(names[0], "cat /opt/llama.cpp/current/logs/built-by").strip()
    assert name in names
    original = current(fleet, name)
    first_id = original.rsplit("/", 1)[1]
    unit = fleet.sh(name, "cat /etc/systemd/system/llama-server.service")
    others = {n: (current(fleet, n), served(fleet, n)) for n in names if n != name}
    cfg = resolve_host(name, {"llama_cpp_cmake_args": OTHER_CMAKE_ARGS}).cfg
    other_id = builds.build_id(cfg.cpp_commit, builds.cmake_args(cfg), PLATFORM)
    assert other_id != first_id
    assert [e.build_id for e in builds.cache_entries(fleet.cache)] == [first_id]
    before = served(fleet, name)

    moved = False
    try:
        # 1. Other CMake arguments: another build id, which nobody has: this host compiles.
        run = fleet.deploy(
            "--limit", name, "--data", f"llama_cpp_cmake_args={json.dumps(OTHER_CMAKE_ARGS)}"
        )
        moved = True
        assert run.rc == 0, run.output[-6000:]
        fleet.timings["other_cmake_args_deploy_1_host_s"] = round(run.seconds, 1)
        (line,) = role_lines(run, name)
        assert f"llama.cpp build {other_id} ({PLATFORM}): compiles it" in line, line
        assert "receives it" not in run.stderr
        assert any(op.startswith(COMPILE_OP) for op in run.changed_operations())
        assert current(fleet, name) == f"/opt/llama.cpp/builds/{other_id}"
        assert fleet.sh(name, "cat /opt/llama.cpp/current/logs/built-by").strip() == name
        took = fleet.sh(name, "cat /opt/llama.cpp/current/logs/build-seconds").strip()
        fleet.timings["other_cmake_args_build_s"] = float(took)
        # The build it replaced is kept as `previous`, for the rollback below.
        assert fleet.sh(name, "readlink /opt/llama.cpp/previous").strip() == original
        # The cache holds both builds, the new one recorded with its arguments and builder.
        assert {e.build_id for e in builds.cache_entries(fleet.cache)} == {first_id, other_id}
        info = builds.CacheEntry(fleet.cache, other_id).info()
        assert info["built_by"] == name
        assert info["cmake_args"][-2:] == OTHER_CMAKE_ARGS
        # The new binary serves (restarted once); nothing moved on the other hosts.
        assert served(fleet, name) != before
        assert fleet.health(name) == 200 and chat(fleet, name) == 200
        assert {n: (current(fleet, n), served(fleet, n)) for n in others} == others
        after_move = served(fleet, name)

        # 2. Rollback: a rerun with the original arguments. The first build is still on the
        # host (kept as `previous`): `current` moves back, no compile, no transfer.
        back = fleet.deploy("--limit", name)
        assert back.rc == 0, back.output[-6000:]
        moved = False
        fleet.timings["rollback_rerun_1_host_s"] = round(back.seconds, 1)
        (line,) = role_lines(back, name)
        assert f"llama.cpp build {first_id} ({PLATFORM}): has it" in line, line
        assert "compiles it" not in back.stderr and "receives it" not in back.stderr
        changed = back.changed_operations()
        assert not any(
            op.startswith((COMPILE_OP, "Receive llama.cpp", "Fetch llama.cpp")) for op in changed
        )
        assert "Point llama.cpp `current` at the build" in changed
        assert current(fleet, name) == original
        assert fleet.sh(name, "readlink /opt/llama.cpp/previous").strip() == (
            f"/opt/llama.cpp/builds/{other_id}"
        )
        assert served(fleet, name) != after_move  # restarted once, on the first build
        assert fleet.health(name) == 200 and chat(fleet, name) == 200
        assert fleet.sh(name, "cat /etc/systemd/system/llama-server.service") == unit
        assert {e.build_id for e in builds.cache_entries(fleet.cache)} == {first_id, other_id}
    finally:
        if moved:  # a failure between the two runs: put the host back for the other tests
            fleet.deploy("--limit", name)

    # 3. The fleet as the session fixture made it: a rerun of every host changes nothing.
    quiet = fleet.deploy()
    assert quiet.rc == 0, quiet.output[-6000:]
    assert quiet.changed_operations() == []
    assert {current(fleet, n) for n in names} == {original}
