"""The GPU stack run for real on a Debian 12 host without a GPU (`llama_gpu_stack=on`).

tasks/gpu.py executes over SSH, unchanged, against a host of its own (dummy NVIDIA
packages never reach the main end-to-end host) whose name resolution sends
developer.download.nvidia.com to tests/support/fakenvidia.py: repository and keyring,
pinning, driver packages and their holds, the nouveau blacklist and the initramfs step, the
persistenced drop-in, and llama-server's unit ordered after nvidia-persistenced; then a
rerun that changes nothing, a hold taken away that the next run puts back, a move to
branch 590 and a change to the proprietary flavour, each with the holds in place and
followed by a quiet rerun. Steps past the GPU stack are left out
(tests/e2e/gpu_stage.py says why).
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from llamahost import distro, gpu, layout, render
from tests.e2e.conftest import REPO, Run, Site, free_port, require_prerequisites, tiny_hub_root
from tests.support import fakenvidia, testhost
from tests.support.hubserver import HubServer

DRIVER = ("nvidia-driver-cuda", "nvidia-kernel-open-dkms", "nvidia-persistenced")
HELD = {fakenvidia.PINNING_PACKAGE, *DRIVER}
HOLD_OP = "Hold the driver packages"
NO_GPU = "llama_gpu_stack is 'on' and no GPU was found"


@dataclass
class GpuSite:
    site: Site
    fake: fakenvidia.FakeNvidia
    kernel: str
    boot_id: str

    def run(self, *data: str) -> Run:
        """tests/e2e/gpu_stage.py with the GPU stack forced on and a GPU profile (its unit
        is rendered, never started); -vvv: commands' output."""
        # No GPU to read the architecture from.
        extra = ["--data", "llama_gpu_stack=on", "--data", "llama_cuda_architectures=80"]
        extra += ["--data", "llama_profile=balanced"]
        for d in data:
            extra += ["--data", d]
        return self.site.deploy("-vvv", *extra, deploy_file="tests/e2e/gpu_stage.py")

    def sh(self, command: str) -> str:
        return self.site.sh(command)

    def versions(self) -> dict[str, str]:
        out = self.sh("dpkg-query -W -f '${Package} ${Version}\\n'")
        return dict(line.split(" ", 1) for line in out.splitlines())

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} -p {','.join(props)}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuSite]:
    require_prerequisites("the GPU stack's end-to-end test", "gpg", "openssl", "dpkg-deb")
    # The configuration step reads the model's header from the Hub endpoint, as in
    # tests/e2e/conftest.py; nothing is downloaded to the host.
    hub_root = tiny_hub_root(tmp_path_factory)
    name = f"gpustack-{os.getpid()}"
    with HubServer(hub_root) as hub:
        host = testhost.create(name, free_port())
        try:
            # The host runs this machine's kernel: its headers are what the plan asks for.
            kernel = host.run("uname -r").stdout.strip()
            with fakenvidia.FakeNvidia(kernel) as fake:
                fake.trust_on(host)
                boot_id = host.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
                yield GpuSite(Site(host=host, hub=hub, port=free_port()), fake, kernel, boot_id)
        finally:
            testhost.destroy(name)


@pytest.fixture(scope="module")
def first(stack: GpuSite) -> Run:
    run = stack.run()
    assert run.rc == 0, run.output[-6000:]
    print(f"\nfirst run of the GPU stage: {run.seconds:.0f} s", file=sys.stderr)
    return run


def test_the_repository_comes_from_the_keyring_package_over_https(
    stack: GpuSite, first: Run
) -> None:
    # Fetched from the real URLs, which the host resolved to the stand-in.
    debian_12 = next(d for d in distro.SUPPORTED if d.cuda_repo == "debian12")
    keyring_url = gpu.keyring_url(debian_12, "x86_64")
    assert keyring_url == fakenvidia.REPO_URL + "cuda-keyring_1.1-1_all.deb"
    got = stack.fake.requests
    assert f"GET {fakenvidia.REPO_PATH}cuda-keyring_1.1-1_all.deb 200" in got
    assert f"GET {fakenvidia.REPO_PATH}InRelease 200" in got

    assert stack.sh(f"cat {fakenvidia.SOURCES_LIST}").strip() == fakenvidia.SOURCES_LINE
    assert stack.sh(f"dpkg-query -S {fakenvidia.KEYRING}").strip() == (
        f"cuda-keyring: {fakenvidia.KEYRING}"
    )
    keyring = stack.sh(f"base64 -w0 {fakenvidia.KEYRING}")
    assert keyring == base64.b64encode(stack.fake.keyring).decode()
    assert stack.sh("dpkg-query -W -f '${Version}' cuda-keyring") == gpu.CUDA_KEYRING_VERSION
    # apt reads the repository, signature checked against that keyring.
    policy = stack.sh("apt-cache policy")
    assert f"{fakenvidia.REPO_URL.rstrip('/')}  Packages" in policy


def test_driver_on_the_pinned_branch_held_with_headers_and_toolkit(
    stack: GpuSite, first: Run
) -> None:
    installed = stack.versions()
    for name in DRIVER:
        # 590 is the newer version in the repository: only the pinning package, installed
        # before the driver, keeps apt on 580.
        assert installed.get(name) == fakenvidia.BRANCH_VERSION, name
        offered = stack.sh(f"apt-cache madison {name}")
        assert fakenvidia.NEWER_BRANCH_VERSION in offered, offered
    assert fakenvidia.PINNING_PACKAGE in installed
    assert "nvidia-kernel-dkms" not in installed  # the proprietary flavour's modules
    assert f"linux-headers-{stack.kernel}" in installed
    assert installed.get(fakenvidia.TOOLKIT[0]) == fakenvidia.TOOLKIT[1]
    assert set(stack.sh("apt-mark showhold").split()) == HELD


def test_nouveau_blacklisted_and_no_initramfs_to_rebuild(stack: GpuSite, first: Run) -> None:
    assert (
        stack.sh(f"cat {layout.NOUVEAU_BLACKLIST}")
        == (REPO / "files/gpu/blacklist-nouveau.conf").read_text()
    )
    # The minimal host has neither initramfs-tools nor dracut: the step says so and passes.
    assert "Rebuild the initramfs without nouveau" in first.changed_operations()
    assert "no initramfs to rebuild" in first.stderr


def test_persistenced_runs_in_persistence_mode_through_the_dropin(
    stack: GpuSite, first: Run
) -> None:
    assert (
        stack.sh(f"cat {layout.PERSISTENCED_DROPIN}")
        == (REPO / "files/gpu/nvidia-persistenced.conf").read_text()
    )
    unit = stack.show(layout.PERSISTENCED_UNIT, "ExecStart", "DropInPaths", "ActiveState")
    assert layout.PERSISTENCED_DROPIN in unit["DropInPaths"].split()
    # The drop-in's command replaces the package's --no-persistence-mode one.
    assert "argv[]=/usr/bin/nvidia-persistenced --user root --persistence-mode" in unit["ExecStart"]
    assert "--no-persistence-mode" not in unit["ExecStart"]
    # No GPU: the daemon is not started, the check is skipped, and the run says so.
    assert unit["ActiveState"] == "inactive"
    assert NO_GPU in first.stderr
    assert not [op for op in first.results()["results"]["operations"] if "Verify" in op["name"]]


def test_llama_server_unit_is_ordered_after_persistenced(stack: GpuSite, first: Run) -> None:
    text = stack.sh("cat /etc/systemd/system/llama-server.service").splitlines()
    for line in render.gpu_ordering(True):
        assert line in text
    unit = stack.show("llama-server.service", "After", "Wants", "ActiveState")
    assert layout.PERSISTENCED_UNIT in unit["After"].split()
    assert layout.PERSISTENCED_UNIT in unit["Wants"].split()
    assert unit["ActiveState"] == "inactive"  # rendered, not started


def test_no_reboot_without_a_gpu(stack: GpuSite, first: Run) -> None:
    names = [op["name"] for op in first.results()["results"]["operations"]]
    assert not [n for n in names if n.startswith("Reboot")]
    assert stack.sh("cat /proc/sys/kernel/random/boot_id").strip() == stack.boot_id


def test_a_rerun_changes_nothing(stack: GpuSite, first: Run) -> None:
    run = stack.run()
    assert run.rc == 0, run.output[-6000:]
    assert run.changed_operations() == []
    print(f"\nrerun of the GPU stage: {run.seconds:.0f} s", file=sys.stderr)


def test_a_hold_taken_away_is_put_back(stack: GpuSite, first: Run) -> None:
    stack.sh("apt-mark unhold nvidia-driver-cuda")
    assert "nvidia-driver-cuda" not in stack.sh("apt-mark showhold").split()
    run = stack.run()
    assert run.rc == 0, run.output[-6000:]
    (changed,) = run.changed_operations()
    assert changed.startswith(HOLD_OP)
    assert set(stack.sh("apt-mark showhold").split()) == HELD


def test_moving_the_branch_replaces_the_held_packages_then_rests(
    stack: GpuSite, first: Run
) -> None:
    # NVIDIA's Debian packages keep their names from branch to branch: only the pinning
    # package changes, and the held driver packages are moved explicitly.
    run = stack.run("llama_driver_branch=590")
    assert run.rc == 0, run.output[-6000:]
    changed = run.changed_operations()
    assert "Pin the driver to branch 590" in changed
    assert any(op.startswith("Move the driver to branch 590") for op in changed)
    installed = stack.versions()
    for name in DRIVER:
        assert installed.get(name) == fakenvidia.NEWER_BRANCH_VERSION, name
    # Purged, not only removed: its preference (a conffile) would keep apt on 580.
    assert "nvidia-driver-pinning-580" not in installed
    assert stack.sh("ls /etc/apt/preferences.d").split() == ["nvidia-driver-pinning-590"]
    assert set(stack.sh("apt-mark showhold").split()) == {"nvidia-driver-pinning-590", *DRIVER}
    again = stack.run("llama_driver_branch=590")
    assert again.rc == 0, again.output[-6000:]
    assert again.changed_operations() == []


def test_a_flavour_change_replaces_the_held_kernel_package_then_rests(
    stack: GpuSite, first: Run
) -> None:
    # After the move to 590 (the test above), with every driver package held: the open
    # kernel package is purged and the proprietary one installed in one transaction, and
    # the holds are taken again.
    data = ("llama_driver_branch=590", "llama_driver_flavour=proprietary")
    run = stack.run(*data)
    assert run.rc == 0, run.output[-6000:]
    assert any(
        op.startswith("Move the driver to branch 590 (proprietary")
        for op in run.changed_operations()
    )
    installed = stack.versions()
    assert "nvidia-kernel-open-dkms" not in installed
    assert installed.get("nvidia-kernel-dkms") == fakenvidia.NEWER_BRANCH_VERSION
    proprietary = {"nvidia-driver-cuda", "nvidia-kernel-dkms", "nvidia-persistenced"}
    assert set(stack.sh("apt-mark showhold").split()) == {
        "nvidia-driver-pinning-590",
        *proprietary,
    }
    again = stack.run(*data)
    assert again.rc == 0, again.output[-6000:]
    assert again.changed_operations() == []
