"""`llama_firewall` for real on a served test host with a network namespace of its own
(10.203.0.0/24 on a bridge of the test's, this machine at 10.203.0.1): the llama port
from the gateway and monitoring hosts only, on by default since the inventory has a
`gateway` group (here one host holds both roles; a separate
monitoring host is proved with real nft in network namespaces in
tests/unit/test_firewall.py), the exporter port from the monitoring host only, SSH as
before; a rerun changes nothing; the rules come back after a reboot; compliance passes,
fails on a host whose table was deleted, and a rerun repairs it; turned off, it is gone.

The served host runs stand-ins on the llama and exporter ports (python's http.server):
the host has no internet to install llama-server from, and the rule set does not depend
on what listens. The deploy runs deploy.py's firewall step alone
(tests/e2e/firewall_deploy.py: the same spec and task).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llamahost import layout
from tests.e2e.conftest import Run, require_prerequisites, run_compliance
from tests.support import testhost

REPO = testhost.REPO
LLAMA, NODE = 8080, 9100
BRIDGE_SIDE = "10.203.0.1"  # this machine, on the test hosts' bridge: an outsider


@dataclass
class Net:
    served: testhost.TestHost
    gateway: testhost.TestHost  # also the monitoring host
    inventory: Path
    timings: dict[str, float]

    def write(self, **served_data: Any) -> None:
        def data(th: testhost.TestHost) -> dict[str, Any]:
            return {
                "ssh_hostname": th.address,
                "ssh_port": th.ssh_port,
                "ssh_user": "root",
                "ssh_key": th.key,
                "ssh_known_hosts_file": th.known_hosts,
                "ssh_strict_host_key_checking": "yes",
                "llama_profile": "cpu-demo",
                "llama_host": "0.0.0.0",  # noqa: S104  (the firewall decides who reaches it)
                "llama_port": LLAMA,
                "llama_gateway_client_keys_file": str(self.inventory.parent / "clients"),
            }

        served = [(self.served.name, data(self.served) | served_data)]
        gw = [(self.gateway.name, data(self.gateway))]
        self.inventory.write_text(f"hosts = {served!r}\ngateway = {gw!r}\nmonitoring = {gw!r}\n")

    def deploy(self) -> Run:
        argv = [sys.executable, "-m", "pyinfra", "-y", "--json", str(self.inventory),
                "tests/e2e/firewall_deploy.py", "--limit", self.served.name]  # fmt: skip
        t0 = time.monotonic()
        p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
        return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def reaches(port: int, src: testhost.TestHost | None, dst: str) -> bool:
    """A TCP connection from ``src`` (None: this machine) to ``dst``:``port`` in 2 s."""
    code = (
        "import socket,sys\n"
        "try: socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n"
        "except OSError: sys.exit(1)\n"
    )
    if src is None:
        argv = [sys.executable, "-c", code, dst, str(port)]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    quoted = code.replace("'", "'\\''")
    return src.run(f"python3 -c '{quoted}' {dst} {port}", check=False).returncode == 0


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    require_prerequisites("firewall tests", "ip")
    testhost.base_rootfs()
    names = (f"fws{os.getpid()}", f"fwg{os.getpid()}")
    tmp = tmp_path_factory.mktemp("firewall")
    (tmp / "clients").write_text("ops ops-key-0123456789abcdefghijklmnopqrstuv\n")
    (tmp / "clients").chmod(0o600)
    try:
        with ThreadPoolExecutor(2) as pool:
            fs = pool.submit(testhost.create, names[0], 22, netns=True,
                             extra_packages=("nftables",))  # fmt: skip
            fg = pool.submit(testhost.create, names[1], 22, netns=True)
            served, gateway = fs.result(), fg.result()
        # Stand-ins for llama-server and the node exporter, started again at boot.
        for unit, port in (("standin-llama", LLAMA), ("standin-node", NODE)):
            served.run(
                f"printf '[Service]\\nExecStart=/usr/bin/python3 -m http.server {port}\\n"
                f"[Install]\\nWantedBy=multi-user.target\\n' > /etc/systemd/system/{unit}.service"
                f" && systemctl daemon-reload && systemctl enable --now {unit}"
            )
        yield Net(served, gateway, tmp / "inventory.py", {})
    finally:
        for n in names:
            testhost.destroy(n)


def wait_reaches(port: int, src: testhost.TestHost | None, dst: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reaches(port, src, dst):
            return True
        time.sleep(0.5)
    return False


def assert_filtered(n: Net) -> None:
    s = n.served.address
    assert reaches(LLAMA, n.gateway, s), "the gateway cannot reach llama-server"
    assert reaches(NODE, n.gateway, s), "the monitoring host cannot reach the exporter"
    assert not reaches(LLAMA, None, s), "an outsider reaches llama-server"
    assert not reaches(NODE, None, s), "an outsider reaches the exporter"
    assert reaches(n.served.ssh_port, None, s), "SSH is no longer reachable"
    assert n.served.run(f"python3 -c 'import urllib.request as u; u.urlopen(\"http://127.0.0.1:{LLAMA}\")'",
                        check=False).returncode == 0, "loopback is filtered"  # fmt: skip


def compliance(n: Net, tmp: Path) -> dict[str, str]:
    """The firewall checks of the served host (the gateway host's skip: its firewall is off)."""
    junit = tmp / f"fw-compliance-{time.monotonic_ns()}.xml"
    results = run_compliance(n.inventory, ["test_firewall.py"], junit)
    return {k.split("[")[0]: v[0] for k, v in results.items() if n.served.name in k}


def test_firewall_lets_only_the_gateway_and_monitoring_in(net: Net, tmp_path: Path) -> None:
    s = net.served.address
    assert wait_reaches(LLAMA, None, s), "the stand-in never listened"
    assert reaches(NODE, None, s)  # before: everyone reaches both ports
    # No llama_firewall setting: the inventory has a `gateway` group, so it is on (`auto`).
    net.write()
    run = net.deploy()
    assert run.rc == 0, run.output[-6000:]
    net.timings["firewall_first_run_s"] = round(run.seconds, 1)
    assert_filtered(net)
    # A rerun changes nothing.
    again = net.deploy()
    assert again.rc == 0 and again.changed_operations() == [], again.output[-4000:]


def test_compliance_passes_fails_without_the_table_and_a_rerun_repairs(
    net: Net, tmp_path: Path
) -> None:
    ok = compliance(net, tmp_path)
    assert ok and set(ok.values()) == {"passed"}, ok
    net.served.run(f"nft delete table inet {layout.FIREWALL_TABLE}")
    assert reaches(LLAMA, None, net.served.address)  # the breakage is real
    broken = compliance(net, tmp_path)
    assert broken["test_firewall_rules_are_the_inventorys_and_loaded"] == "failure", broken
    # The unit still says active (a oneshot); the deploy sees the table gone and loads it.
    run = net.deploy()
    assert run.rc == 0, run.output[-6000:]
    assert set(compliance(net, tmp_path).values()) == {"passed"}
    assert_filtered(net)


def test_the_rules_are_back_after_a_reboot(net: Net) -> None:
    boot = net.served.boot_id()
    net.served.run("systemctl reboot", check=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if net.served.boot_id() != boot:
                break
        except subprocess.SubprocessError:
            pass
        time.sleep(1)
    net.served.wait_up()
    assert wait_reaches(LLAMA, net.gateway, net.served.address, timeout=60)
    assert_filtered(net)


def test_turned_off_the_table_and_its_files_are_gone(net: Net) -> None:
    net.write(llama_firewall=False)
    run = net.deploy()
    assert run.rc == 0, run.output[-6000:]
    # Off behind a gateway, by the host's choice: the run says what that leaves open.
    assert f"{net.served.name}: llama_firewall is false in an inventory with a `gateway`" in (
        run.stderr
    )
    assert reaches(LLAMA, None, net.served.address)
    listed = net.served.run(f"nft list table inet {layout.FIREWALL_TABLE}", check=False)
    assert listed.returncode != 0
    files = net.served.run(f"ls {layout.FIREWALL_RULES} /etc/systemd/system/{layout.FIREWALL_UNIT}",
                           check=False)  # fmt: skip
    assert files.returncode != 0, files.stdout
    again = net.deploy()
    assert again.rc == 0 and again.changed_operations() == [], again.output[-4000:]
