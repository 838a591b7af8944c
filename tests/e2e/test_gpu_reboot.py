"""The GPU stack's reboot, for real: driver installed, host rebooted, run reconnects and ends.

The GPU stack reboots only a host where it finds a GPU, so this host of its own (no
llama.cpp build: tests/e2e/gpu_stage.py, against the stand-in NVIDIA repository of
tests/support/fakenvidia.py, as tests/e2e/test_gpu_stack.py) is given stand-ins for what a
GPU shows: an `lspci` that lists one A100 40GB, an `nvidia-smi` that fails as without a
driver until the driver has been "loaded", and a boot-time unit that "loads" it (a flag
and the /dev/nvidia* nodes) once the driver package is installed, i.e. at the first boot
after the install. The deploy logs in as the unprivileged sudo user, as on a cloud image.

Proves: a driver package change (the first install) makes the run reboot the host
(pyinfra's server.reboot; the harness starts the host again), reconnect, and finish:
nvidia-persistenced enabled and running, the final nvidia-smi verification passed; a rerun
does not reboot.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Run, Site, free_port, require_prerequisites, tiny_hub_root
from tests.support import fakenvidia, testhost
from tests.support.hubserver import HubServer

pytestmark = pytest.mark.e2e

REBOOT_OP = "Reboot into the NVIDIA driver"
VERIFY_OP = "Verify: nvidia-smi on the driver branch, persistence mode Enabled on every GPU"

LSPCI = """#!/bin/sh
# llamahost test stand-in: one A100 40GB, as `lspci -nn -d 10de:` prints it.
echo '00:05.0 3D controller [0302]: NVIDIA Corporation GA100 [A100 PCIe 40GB] [10de:20f1] (rev a1)'
"""
NVIDIA_SMI = """#!/bin/sh
# llamahost test stand-in: no driver until one is installed and the host booted with it.
if [ ! -e /run/fake-nvidia/loaded ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
  exit 9
fi
v=$(dpkg-query -W -f '${Version}' nvidia-driver-cuda | cut -d- -f1)
p=Disabled
pid=$(systemctl show -p MainPID --value nvidia-persistenced)
if [ "${pid:-0}" != 0 ] && ! tr '\\0' ' ' </proc/$pid/cmdline | grep -q -- --no-persistence-mode
then p=Enabled; fi
echo "0, NVIDIA A100-PCIE-40GB, 00000000:00:05.0, $v, $p, 8.0, 40960 MiB"
"""
LOADER = """[Unit]
Description=llamahost test stand-in: the NVIDIA module loads at boot once installed
ConditionPathExists=/usr/bin/nvidia-persistenced
Before=nvidia-persistenced.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mkdir -p /run/fake-nvidia
ExecStart=/bin/touch /run/fake-nvidia/loaded /dev/nvidiactl /dev/nvidia-uvm /dev/nvidia0

[Install]
WantedBy=multi-user.target
"""


def put(site: Site, path: str, text: str, mode: str) -> None:
    site.sh(f"printf '%s' {shlex.quote(text)} >{path} && chmod {mode} {path}")


@pytest.fixture(scope="module")
def gpu_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_prerequisites("the GPU stack's reboot test", "gpg", "openssl", "dpkg-deb")
    hub_root = tiny_hub_root(tmp_path_factory)
    name = f"gpureboot-{os.getpid()}"
    with HubServer(hub_root) as hub:
        host = testhost.create(name, free_port())
        try:
            kernel = host.run("uname -r").stdout.strip()
            with fakenvidia.FakeNvidia(kernel) as fake:
                fake.trust_on(host)
                site = Site(host=host, hub=hub, port=free_port(), ssh_user=host.user)
                put(site, "/usr/local/bin/lspci", LSPCI, "0755")
                put(site, "/usr/local/bin/nvidia-smi", NVIDIA_SMI, "0755")
                put(site, "/etc/systemd/system/fake-nvidia-load.service", LOADER, "0644")
                site.sh("systemctl daemon-reload && systemctl enable -q fake-nvidia-load")
                yield site
        finally:
            testhost.destroy(name)


def stage(site: Site) -> Run:
    extra = ["--data", "llama_gpu_stack=on", "--data", "llama_cuda_architectures=80"]
    extra += ["--data", "llama_profile=balanced"]
    return site.deploy("-v", *extra, deploy_file="tests/e2e/gpu_stage.py")


def test_a_driver_change_reboots_reconnects_and_finishes(gpu_host: Site) -> None:
    site = gpu_host
    boot = site.host.boot_id()
    assert "couldn't communicate" in site.sh("nvidia-smi || true")
    run = stage(site)
    assert run.rc == 0, run.output[-6000:]
    changed = run.changed_operations()
    reboots = [op for op in changed if op.startswith(REBOOT_OP)]
    assert len(reboots) == 1, changed
    assert "the driver is installed or changed" in reboots[0]
    assert site.host.boot_id() != boot, "the host did not reboot"
    # After the reboot the run went on to the end: persistence daemon and the check.
    assert "nvidia-persistenced enabled and running" in changed or (
        site.sh("systemctl is-active nvidia-persistenced").strip() == "active"
    )
    assert VERIFY_OP in changed, changed
    smi = site.sh("nvidia-smi").strip()
    assert smi.endswith("8.0, 40960 MiB") and ", 580." in smi and "Enabled" in smi, smi
    print(
        f"\nGPU stage with the driver install and the reboot: {run.seconds:.0f} s", file=sys.stderr
    )

    # The driver now "loaded": a rerun reboots nothing.
    boot = site.host.boot_id()
    again = stage(site)
    assert again.rc == 0, again.output[-6000:]
    assert not [op for op in again.changed_operations() if op.startswith(REBOOT_OP)]
    assert site.host.boot_id() == boot
