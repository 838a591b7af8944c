"""Fleet bring-up (issue 13): three fresh Debian 12 hosts with the same build id, one
inventory, one real `pyinfra ... deploy.py` run. The controller's cache already holds the
default build (the site host compiled it this session): every host receives it, without a
compiler; all three serve; a rerun changes nothing anywhere. Then bad archives pushed to a
serving host are refused with `current` and the server untouched. Last, the fleet deployed
with other CMake arguments (another build id, in no cache): exactly one host compiles, the
controller caches its tree and the other two receive it, without a compiler; the cache then
holds both builds, and a rerun with the original arguments moves every host back to the
first build without compiling (the rollback), after which the fleet reruns quietly.

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


def test_every_host_receives_the_cached_build_without_a_compiler(fleet: Fleet, first: Run) -> None:
    """The site host's first deploy compiled the default build into the controller's cache
    shared with the fleet: every fleet host receives it, none compiles or installs a
    compiler. (The fleet's own one-compile run is the other build id below.)"""
    names = list(fleet.hosts)
    (entry,) = builds.cache_entries(fleet.cache)
    builder = entry.info()["built_by"]
    assert builder not in names  # the site host
    assert not any(op.startswith(COMPILE_OP) for op in first.changed_operations())
    assert "compiles it" not in first.stderr
    for n in names:
        (line,) = role_lines(first, n)
        assert f"llama.cpp build {entry.build_id} ({PLATFORM}): receives it" in line, line
        assert _has_received(fleet, n), n
        assert fleet.sh(n, "cat /opt/llama.cpp/current/logs/built-by").strip() == builder
    assert first.stderr.count("receives it from the controller's cache") == len(names)
    assert {current(fleet, n) for n in names} == {f"/opt/llama.cpp/builds/{entry.build_id}"}
    # No compiler where none is needed.
    for n in names:
        assert fleet.sh(n, "command -v cc cmake", check=False).strip() == "", n
    # No archive left behind on any host.
    for n in names:
        assert fleet.sh(n, "ls -A /opt/llama.cpp/incoming").strip() == ""
    fleet.timings["first_run_3_hosts_received_s"] = round(first.seconds, 1)


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


def test_other_cmake_arguments_compile_once_for_the_fleet_and_a_rerun_rolls_back(
    fleet: Fleet, first: Run
) -> None:
    names = list(fleet.hosts)
    original = current(fleet, names[0])
    assert {current(fleet, n) for n in names} == {original}
    first_id = original.rsplit("/", 1)[1]
    units = {n: fleet.sh(n, "cat /etc/systemd/system/llama-server.service") for n in names}
    cfg = resolve_host(names[0], {"llama_cpp_cmake_args": OTHER_CMAKE_ARGS}).cfg
    other_id = builds.build_id(cfg.cpp_commit, builds.cmake_args(cfg), PLATFORM)
    assert other_id != first_id
    assert [e.build_id for e in builds.cache_entries(fleet.cache)] == [first_id]
    before = {n: served(fleet, n) for n in names}
    moved = False
    try:
        # 1. Other CMake arguments for the whole fleet: another build id, which nobody has.
        # One host (whichever pyinfra planned first) compiles it and the controller caches
        # it; the other two receive it, without a compiler.
        run = fleet.deploy("--data", f"llama_cpp_cmake_args={json.dumps(OTHER_CMAKE_ARGS)}")
        moved = True
        assert run.rc == 0, run.output[-6000:]
        fleet.timings["other_cmake_args_deploy_3_hosts_s"] = round(run.seconds, 1)
        parts = {n: role_lines(run, n) for n in names}
        assert all(len(lines) == 1 for lines in parts.values()), parts
        builders = [n for n in names if f"{other_id} ({PLATFORM}): compiles it" in parts[n][0]]
        (builder,) = builders
        for n in names:
            if n != builder:
                assert f"{other_id} ({PLATFORM}): receives it" in parts[n][0], parts[n]
        assert run.stderr.count("compiles it and the controller caches it") == 1
        assert run.stderr.count("receives it from the controller's cache") == 2
        assert len([op for op in run.changed_operations() if op.startswith(COMPILE_OP)]) == 1
        took = fleet.sh(builder, "cat /opt/llama.cpp/current/logs/build-seconds").strip()
        fleet.timings["other_cmake_args_build_s"] = float(took)
        for n in names:
            assert current(fleet, n) == f"/opt/llama.cpp/builds/{other_id}", n
            assert fleet.sh(n, "cat /opt/llama.cpp/current/logs/built-by").strip() == builder
            # The build it replaced is kept as `previous`, for the rollback below.
            assert fleet.sh(n, "readlink /opt/llama.cpp/previous").strip() == original
            # A compiler only where one compiled.
            has_cc = fleet.sh(n, "command -v cc cmake", check=False).strip() != ""
            assert has_cc == (n == builder), n
            assert fleet.sh(n, "ls -A /opt/llama.cpp/incoming").strip() == ""
        # The cache holds both builds, the new one recorded with its arguments and builder.
        assert {e.build_id for e in builds.cache_entries(fleet.cache)} == {first_id, other_id}
        info = builds.CacheEntry(fleet.cache, other_id).info()
        assert info["built_by"] == builder
        assert info["cmake_args"][-2:] == OTHER_CMAKE_ARGS
        # The new binary serves everywhere (each server restarted once).
        for n in names:
            assert served(fleet, n) != before[n], n
            assert fleet.health(n) == 200 and chat(fleet, n) == 200
        after_move = {n: served(fleet, n) for n in names}

        # 2. Rollback: a rerun with the original arguments. The first build is still on every
        # host (kept as `previous`): `current` moves back, no compile, no transfer.
        back = fleet.deploy()
        assert back.rc == 0, back.output[-6000:]
        moved = False
        fleet.timings["rollback_rerun_3_hosts_s"] = round(back.seconds, 1)
        for n in names:
            (line,) = role_lines(back, n)
            assert f"llama.cpp build {first_id} ({PLATFORM}): has it" in line, line
        assert "compiles it" not in back.stderr and "receives it" not in back.stderr
        changed = back.changed_operations()
        assert not any(
            op.startswith((COMPILE_OP, "Receive llama.cpp", "Fetch llama.cpp")) for op in changed
        )
        assert "Point llama.cpp `current` at the build" in changed
        for n in names:
            assert current(fleet, n) == original, n
            assert fleet.sh(n, "readlink /opt/llama.cpp/previous").strip() == (
                f"/opt/llama.cpp/builds/{other_id}"
            )
            assert served(fleet, n) != after_move[n]  # restarted once, on the first build
            assert fleet.health(n) == 200 and chat(fleet, n) == 200
            assert fleet.sh(n, "cat /etc/systemd/system/llama-server.service") == units[n]
        assert {e.build_id for e in builds.cache_entries(fleet.cache)} == {first_id, other_id}
    finally:
        if moved:  # a failure between the two runs: put the hosts back for the other tests
            fleet.deploy()

    # 3. The fleet as the session fixture made it: a rerun of every host changes nothing.
    quiet = fleet.deploy()
    assert quiet.rc == 0, quiet.output[-6000:]
    assert quiet.changed_operations() == []
    assert {current(fleet, n) for n in names} == {original}
