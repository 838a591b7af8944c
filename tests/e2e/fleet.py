"""The multi-host test fleet, shared by the fleet bring-up (test_fleet.py) and the gateway
(test_gateway.py) tests: three fresh Debian 12 hosts in one inventory file, brought up once
per test session, removed at the end. They share the session's build cache with the site host
(tests/e2e/conftest.py), whose first deploy compiled the default build: the fleet's first
run receives it on every host; test_fleet.py's other build id is the fleet's own compile.

Every host's llama-server listens on the same port at an address of its own: the hosts share
this machine's network, so each gets a loopback address of this session's (127.77.X.Y);
their SSH servers stay on 127.0.0.1, each on its own port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import MODEL_FILE, MODEL_REPO, Run, free_port, require_prerequisites
from tests.support import testhost
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive
from tests.support.tinygguf import write as write_tiny

REPO = testhost.REPO
REPORTS = REPO / "reports"


@dataclass
class Fleet:
    """Test hosts in one inventory file, with the session's build cache."""

    hosts: dict[str, testhost.TestHost]
    addresses: dict[str, str]  # where each host's llama-server listens
    port: int  # the llama port, the same on every host
    inventory: Path
    cache: Path
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(cls, names: list[str], hub_url: str, workdir: Path, cache: Path) -> Fleet:
        hosts = {}
        addresses, port = own_addresses(len(names))
        try:
            for n in names:
                hosts[n] = testhost.create(n, free_port())
        except BaseException:
            for n in hosts:
                testhost.destroy(n)
            raise
        inventory = workdir / "fleet_inventory.py"
        by_name = dict(zip(names, addresses, strict=True))
        data = [(n, host_data(hosts[n], by_name[n], port, hub_url, cache)) for n in names]
        inventory.write_text(f"hosts = {data!r}\n")
        return cls(hosts, by_name, port, inventory, cache)

    def destroy(self) -> None:
        for n in self.hosts:
            testhost.destroy(n)

    def deploy(
        self, *extra: str, inventory: Path | None = None, deploy_file: str = "deploy.py"
    ) -> Run:
        """A real run of deploy.py (or another deploy file) over the fleet's inventory (or
        another one of its hosts)."""
        inv = inventory or self.inventory
        argv = [sys.executable, "-m", "pyinfra", "-y", "--json", str(inv)]
        argv += [deploy_file, *extra]
        t0 = time.monotonic()
        p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3000)
        return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)

    def sh(self, name: str, command: str, check: bool = True) -> str:
        return self.hosts[name].run(command, check=check).stdout

    def url(self, name: str) -> str:
        """The llama-server of host ``name``, directly."""
        return f"http://{self.addresses[name]}:{self.port}"

    def health(self, name: str) -> int:
        return requests.get(f"{self.url(name)}/health", timeout=30).status_code


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def own_addresses(n: int) -> tuple[list[str], int]:
    """``n`` loopback addresses of this session's own, and a port free on all of them."""
    net = 1 + os.getpid() % 250
    addresses = [f"127.77.{net}.{i + 2}" for i in range(n)]
    for _ in range(100):
        port = free_port()
        if all(_bindable(a, port) for a in addresses):
            return addresses, port
    raise RuntimeError(f"no port free on all of {addresses}")


def host_data(
    host: testhost.TestHost, address: str, port: int, hub_url: str, cache: Path
) -> dict[str, Any]:
    """inventory/local.py's data for one test host, with the fleet's shared cache."""
    return {
        "ssh_hostname": "127.0.0.1",
        "ssh_port": host.ssh_port,
        "ssh_user": "root",
        "ssh_key": host.key,
        "ssh_known_hosts_file": host.known_hosts,
        "ssh_strict_host_key_checking": "yes",
        "llama_profile": "cpu-demo",
        # The fleet's hosts share this machine's 2 cores; each would take `--threads auto`
        # = 2, and 6 compute threads on 2 cores spin at ggml's barriers waiting for a
        # descheduled peer. Measured directly (3 servers, no gateway, 3 streams running): a
        # new request's TTFT p95 3.85x its idle value at 2 threads, 1.65x at 1. One thread
        # each keeps the hosts' compute about as independent as separate machines', which
        # the fairness and TTFT measurements assume (docs/testing.md).
        "llama_threads": 1,
        "llama_host": address,
        "llama_port": port,
        "llama_model_repo": MODEL_REPO,
        "llama_model_file": MODEL_FILE,
        "llama_hf_endpoint": hub_url,
        "llama_cpp_source": "archive",
        "llama_cpp_archive": str(archive()),
        "llama_cpp_build_cache": str(cache),
    }


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, build_cache: Path) -> Iterator[Fleet]:
    require_prerequisites("fleet tests")
    archive()
    root = tmp_path_factory.mktemp("fleet-hub")
    (root / MODEL_REPO).mkdir(parents=True)
    write_tiny(str(root / MODEL_REPO / MODEL_FILE))
    names = [f"fleet{os.getpid()}-{x}" for x in "abc"]
    with HubServer(root) as hub:
        f = Fleet.create(names, hub.url, tmp_path_factory.mktemp("fleet"), build_cache)
        try:
            yield f
        finally:
            f.destroy()
            REPORTS.mkdir(exist_ok=True)
            (REPORTS / "fleet-timings.json").write_text(json.dumps(f.timings, indent=2) + "\n")


@pytest.fixture(scope="session")
def first(fleet: Fleet, deployed: Run) -> Run:
    """The fleet's first run, after the site host's first deploy (`deployed`) compiled the
    default build into the shared cache: every fleet host receives it."""
    run = fleet.deploy()
    assert run.rc == 0, run.output[-6000:]
    fleet.timings["first_run_3_hosts_s"] = round(run.seconds, 1)
    return run
