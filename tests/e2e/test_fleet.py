"""Fleet bring-up (issue 13): three fresh Debian 12 hosts with the same build id, one
inventory, one real `pyinfra ... deploy.py` run. Exactly one host compiles llama.cpp; the
controller caches its tree and the other two receive it, without a compiler; all three
serve; a rerun changes nothing anywhere. Then bad archives pushed to a serving host are
refused with `current` and the server untouched.

The hosts get their own inventory file and build cache (tmp); they are removed at the end.
A host whose build id differs compiling its own is covered by tests/unit/test_build.py
(role assignment) rather than here: a second compile would add 5 minutes of CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from llamahost import build as builds
from llamahost.spec import resolve_host
from tests.e2e.conftest import MODEL_FILE, MODEL_REPO, Run, free_port, require_prerequisites
from tests.support import testhost
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive
from tests.support.tinygguf import write as write_tiny

pytestmark = pytest.mark.e2e

REPO = testhost.REPO
REPORTS = REPO / "reports"
COMPILE_OP = "Build llama-server ("
PLATFORM = builds.platform("debian", "12", "amd64")  # the test hosts'


@dataclass
class Fleet:
    """Test hosts in one inventory file, with a build cache of their own."""

    hosts: dict[str, testhost.TestHost]
    ports: dict[str, int]
    inventory: Path
    cache: Path
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(cls, names: list[str], hub_url: str, workdir: Path) -> Fleet:
        hosts, ports = {}, {}
        try:
            for n in names:
                hosts[n] = testhost.create(n, free_port())
                ports[n] = free_port()
        except BaseException:
            for n in hosts:
                testhost.destroy(n)
            raise
        cache = workdir / "build-cache"
        inventory = workdir / "fleet_inventory.py"
        data = [(n, host_data(hosts[n], ports[n], hub_url, cache)) for n in names]
        inventory.write_text(f"hosts = {data!r}\n")
        return cls(hosts, ports, inventory, cache)

    def destroy(self) -> None:
        for n in self.hosts:
            testhost.destroy(n)

    def deploy(self, *extra: str) -> Run:
        argv = [sys.executable, "-m", "pyinfra", "-y", "--json", str(self.inventory)]
        argv += ["deploy.py", *extra]
        t0 = time.monotonic()
        p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3000)
        return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)

    def sh(self, name: str, command: str, check: bool = True) -> str:
        return self.hosts[name].run(command, check=check).stdout

    def health(self, name: str) -> int:
        r = requests.get(f"http://127.0.0.1:{self.ports[name]}/health", timeout=30)
        return r.status_code


def host_data(host: testhost.TestHost, port: int, hub_url: str, cache: Path) -> dict[str, Any]:
    """inventory/local.py's data for one test host, with the fleet's shared cache."""
    return {
        "ssh_hostname": "127.0.0.1",
        "ssh_port": host.ssh_port,
        "ssh_user": "root",
        "ssh_key": host.key,
        "ssh_known_hosts_file": host.known_hosts,
        "ssh_strict_host_key_checking": "yes",
        "llama_profile": "cpu-demo",
        "llama_port": port,
        "llama_model_repo": MODEL_REPO,
        "llama_model_file": MODEL_FILE,
        "llama_hf_endpoint": hub_url,
        "llama_cpp_source": "archive",
        "llama_cpp_archive": str(archive()),
        "llama_cpp_build_cache": str(cache),
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_prerequisites("fleet tests")
    archive()
    root = tmp_path_factory.mktemp("fleet-hub")
    (root / MODEL_REPO).mkdir(parents=True)
    write_tiny(str(root / MODEL_REPO / MODEL_FILE))
    names = [f"fleet{os.getpid()}-{x}" for x in "abc"]
    with HubServer(root) as hub:
        f = Fleet.create(names, hub.url, tmp_path_factory.mktemp("fleet"))
        try:
            yield f
        finally:
            f.destroy()
            REPORTS.mkdir(exist_ok=True)
            (REPORTS / "fleet-timings.json").write_text(json.dumps(f.timings, indent=2) + "\n")


@pytest.fixture(scope="module")
def first(fleet: Fleet) -> Run:
    run = fleet.deploy()
    assert run.rc == 0, run.output[-6000:]
    fleet.timings["first_run_3_hosts_s"] = round(run.seconds, 1)
    for n in fleet.hosts:
        took = fleet.sh(n, "cat /opt/llama.cpp/current/logs/build-seconds", check=False).strip()
        fleet.timings["llama_cpp_build_s"] = float(took)
    return run


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
            f"http://127.0.0.1:{fleet.ports[n]}/v1/chat/completions",
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
    (good,) = [e for e in builds.cache_entries(fleet.cache) if e.build_id != bid]
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
