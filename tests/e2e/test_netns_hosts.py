"""Test hosts with a network namespace of their own (testhost.create(netns=True)).

Two hosts on the testhost bridge: each its own address, they reach each other and this
machine reaches both over SSH; a host firewall (nftables, installed with extra_packages)
in one of them blocks its peer and leaves this machine's own ruleset as it was.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import require_prerequisites
from tests.support import testhost

pytestmark = pytest.mark.e2e

HTTP_PORT = 8000


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[testhost.TestHost, testhost.TestHost]]:
    require_prerequisites("netns test hosts", "ip")
    testhost.base_rootfs()  # built once, before the two copies are made side by side
    names = (f"nsa{os.getpid()}", f"nsb{os.getpid()}")
    try:
        with ThreadPoolExecutor(2) as pool:
            fa = pool.submit(
                testhost.create, names[0], 22, netns=True, extra_packages=("nftables",)
            )
            fb = pool.submit(testhost.create, names[1], 2222, netns=True)
            a, b = fa.result(), fb.result()
        yield a, b
    finally:
        for name in names:
            testhost.destroy(name)


def machine_ruleset(rootfs: Path) -> str:
    """This machine's nftables ruleset: its own nft, or the host's binary run in a chroot
    (a chroot keeps this machine's network namespace)."""
    argv = ["nft", "list", "ruleset"]
    if shutil.which("nft") is None:
        argv = ["chroot", str(rootfs), *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def fetch(th: testhost.TestHost, url: str) -> subprocess.CompletedProcess[str]:
    code = (
        f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=3).read().decode())"
    )
    return th.run(f"python3 -c {shlex.quote(code)}", check=False, timeout=30)


def test_own_addresses_peers_and_a_host_firewall(
    hosts: tuple[testhost.TestHost, testhost.TestHost],
) -> None:
    a, b = hosts
    prefix = testhost.NET_PREFIX + "."
    assert a.address.startswith(prefix) and b.address.startswith(prefix)
    assert a.address != b.address and a.netns != b.netns
    # SSH from this machine reaches each at its own address; each sees only that address.
    for th in (a, b):
        assert th.run("hostname -I").stdout.split() == [th.address]
        assert th.ssh_argv("true")[-2] == f"root@{th.address}"
        assert th.run("cat /etc/hostname").stdout.strip() == th.name

    # A serves HTTP on its address; B and this machine get it.
    a.run("mkdir -p /srv && echo hello-from-a >/srv/marker.txt")
    a.run(
        f"systemd-run --unit=web python3 -m http.server {HTTP_PORT}"
        f" --bind {a.address} --directory /srv"
    )
    url = f"http://{a.address}:{HTTP_PORT}/marker.txt"
    for _ in range(20):
        r = fetch(b, url)
        if r.returncode == 0:
            break
        subprocess.run(["sleep", "0.5"], check=True)
    assert "hello-from-a" in r.stdout, r.stderr
    assert (
        "hello-from-a"
        in subprocess.run(
            ["curl", "-sf", "-m", "5", url], capture_output=True, text=True, check=True
        ).stdout
    )

    # A's firewall drops B on the HTTP port; this machine's ruleset is untouched.
    rootfs = a.dir / "rootfs"
    before = machine_ruleset(rootfs)
    a.run("nft list ruleset")
    a.run(
        "nft add table inet hostfw"
        " && nft add chain inet hostfw input '{ type filter hook input priority 0; }'"
        f" && nft add rule inet hostfw input ip saddr {b.address} tcp dport {HTTP_PORT} drop"
    )
    assert "hostfw" in a.run("nft list ruleset").stdout
    blocked = fetch(b, url)
    assert blocked.returncode != 0, blocked.stdout
    assert "hostfw" not in machine_ruleset(rootfs)
    assert machine_ruleset(rootfs) == before
    # This machine still gets A's page and both hosts' SSH; B still reaches A's sshd.
    assert (
        "hello-from-a"
        in subprocess.run(
            ["curl", "-sf", "-m", "5", url], capture_output=True, text=True, check=True
        ).stdout
    )
    assert a.run("true").returncode == 0 and b.run("true").returncode == 0
    probe = f"import socket; socket.create_connection(({a.address!r}, {a.ssh_port}), 3).close()"
    assert b.run(f"python3 -c {shlex.quote(probe)}", check=False).returncode == 0


def test_destroy_removes_namespace_and_veth(
    hosts: tuple[testhost.TestHost, testhost.TestHost],
) -> None:
    a, b = hosts
    for th in (a, b):
        veth = testhost.VETH_PREFIX + th.netns.removeprefix(testhost.NETNS_PREFIX)
        assert (testhost.NETNS_DIR / th.netns).exists() and Path("/sys/class/net", veth).exists()
        testhost.destroy(th.name)
        assert not (testhost.NETNS_DIR / th.netns).exists()
        assert not Path("/sys/class/net", veth).exists()
        assert not th.dir.exists()
