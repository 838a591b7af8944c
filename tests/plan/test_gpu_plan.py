"""What tasks/gpu.py plans on Ubuntu 22.04, Ubuntu 24.04 and Debian 12, for each state of a
host, through pyinfra's @fake connector fed with recorded output (tests/plan/fixtures).

Each case asserts the exact driver packages, the reboot decision, the persistenced drop-in
and the CUDA architecture handed to CMake; a current host must plan nothing. With step 4
(tasks/llama_cpp.py) planned after the stack: the CUDA toolkit only on the host that
compiles llama.cpp, only the CUDA runtime and cuBLAS on a host that receives the build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pyinfra.api.exceptions import PyinfraError

from llamahost import build as builds
from llamahost import gpu, layout
from llamahost.spec import HostSpec
from tasks import llama_cpp, preflight
from tasks.gpu import GpuResult
from tests.plan.fakehost import CONTROLLER_ID, KERNELS, REPO, FakeHost, Plan, fixture, plan

DISTROS = ["ubuntu-22.04", "ubuntu-24.04", "debian-12"]

# Ubuntu: Canonical's -server packages, open modules, precompiled for the kernel's
# metapackage (generic on the 22.04 fixture, aws on the 24.04 one) and for the running ABI.
# Debian 12: NVIDIA's repository, compute-only, DKMS with the running kernel's headers and
# their metapackage.
DRIVER = {
    "ubuntu-22.04": [
        "linux-modules-nvidia-580-server-open-generic",
        f"linux-modules-nvidia-580-server-open-{KERNELS['ubuntu-22.04']}",
        "nvidia-headless-no-dkms-580-server-open",
        "nvidia-utils-580-server",
    ],
    "ubuntu-24.04": [
        "linux-modules-nvidia-580-server-open-aws",
        f"linux-modules-nvidia-580-server-open-{KERNELS['ubuntu-24.04']}",
        "nvidia-headless-no-dkms-580-server-open",
        "nvidia-utils-580-server",
    ],
    "debian-12": [
        "nvidia-driver-cuda",
        "nvidia-kernel-open-dkms",
        "nvidia-persistenced",
        f"linux-headers-{KERNELS['debian-12']}",
        "linux-headers-cloud-amd64",
    ],
}
INSTALL = "install --allow-change-held-packages "
DRIVER_OP = "NVIDIA driver 580"
REBOOT_OP = "Reboot into the NVIDIA driver"
DROPIN_OP = "nvidia-persistenced in persistence mode (drop-in)"
RESTART_OP = "Restart nvidia-persistenced"
VERIFY_OP = "Verify: nvidia-smi"
ARCH_80 = "-DCMAKE_CUDA_ARCHITECTURES=80"


def driver_packages(p: Plan) -> list[str]:
    (command,) = p.commands(DRIVER_OP)
    assert INSTALL in command
    return command.split(INSTALL, 1)[1].split()


def planned_anywhere(p: Plan, *words: str) -> list[str]:
    """The planned commands that name any of the words."""
    return [c for op in p.ops for c in op.commands if any(w in c for w in words)]


def index(p: Plan, prefix: str) -> int:
    return next(i for i, op in enumerate(p.ops) if op.name.startswith(prefix))


def assert_dropin_uploaded(p: Plan) -> None:
    src = REPO / "files/gpu/nvidia-persistenced.conf"
    assert f"FileUploadCommand({src}, {layout.PERSISTENCED_DROPIN})" in p.commands(DROPIN_OP)
    assert p.commands("Reload systemd units") == ("systemctl daemon-reload",)


# ---------------------------------------------------------------- no GPU
@pytest.mark.parametrize("distro", DISTROS)
def test_no_gpu_takes_the_cpu_path_and_plans_nothing(distro: str) -> None:
    p = plan(FakeHost(distro, gpu=False))
    assert not p.result.gpu and p.result.cmake_args == () and p.result.reboot is None
    assert p.ops == []


@pytest.mark.parametrize("distro", DISTROS)
def test_no_gpu_when_one_is_required_stops_before_any_change(distro: str) -> None:
    with pytest.raises(PyinfraError) as exc:
        plan(FakeHost(distro, gpu=False), {"llama_gpu_required": True})
    assert f"host '@fake/{distro}'" in str(exc.value)
    assert "llama_gpu_required" in str(exc.value) and "Nothing was changed" in str(exc.value)


# ---------------------------------------------------------------- fresh hosts
@pytest.mark.parametrize("nouveau", [True, False], ids=["nouveau-loaded", "no-nouveau"])
@pytest.mark.parametrize("distro", DISTROS)
def test_fresh_gpu_host_installs_the_stack_and_reboots(distro: str, nouveau: bool) -> None:
    p = plan(FakeHost(distro, nouveau=nouveau))
    assert driver_packages(p) == DRIVER[distro]
    assert p.result.gpu and ARCH_80 in p.result.cmake_args
    assert "-DCMAKE_CUDA_COMPILER=/usr/local/cuda-13.0/bin/nvcc" in p.result.cmake_args
    # No CUDA package from the GPU stack: step 4 installs what the host's build role needs.
    assert not p.has("CUDA") and not planned_anywhere(p, "cuda-toolkit", "cudart", "cublas")

    decision = p.result.reboot
    assert decision is not None and decision.will
    assert decision.reasons[0].startswith("the driver is installed or changed")
    assert ("nouveau is loaded" in decision.reasons) == nouveau
    assert any(name.startswith(REBOOT_OP) for name in p.changes)
    # Persistence mode and the check come after the reboot, on the new driver.
    assert index(p, REBOOT_OP) < index(p, "nvidia-persistenced enabled") < index(p, VERIFY_OP)

    assert_dropin_uploaded(p)
    assert index(p, DROPIN_OP) < index(p, DRIVER_OP)  # the packaged start reads it
    assert p.commands("Rebuild the initramfs") == (gpu.INITRAMFS_REBUILD,)
    assert "apt-mark hold" in p.commands("Hold the driver packages")[0]
    assert "cuda-keyring_1.1-1_all.deb" in p.commands("NVIDIA's CUDA repository")[0]


@pytest.mark.parametrize("distro", DISTROS)
def test_nouveau_loaded_with_the_blacklist_in_place_rebuilds_the_initramfs(distro: str) -> None:
    """The driver packages and the blacklist are in place (a run that stopped before its
    reboot, or an image that ships the same blacklist), yet nouveau is loaded from an
    initramfs made before the blacklist: the reboot comes with a rebuilt initramfs, or
    nouveau would load again at the next boot. A converged host rebuilds nothing."""
    p = plan(FakeHost(distro, driver="mismatch", nouveau=True))
    decision = p.result.reboot
    assert decision is not None and decision.will and "nouveau is loaded" in decision.reasons
    assert p.commands("Blacklist nouveau") == ()  # the file is already ours
    assert p.commands("Rebuild the initramfs") == (gpu.INITRAMFS_REBUILD,)
    assert index(p, "Rebuild the initramfs") < index(p, REBOOT_OP)
    quiet = plan(FakeHost(distro, driver="current"))
    assert quiet.commands("Rebuild the initramfs") == ()


@pytest.mark.parametrize("distro", DISTROS)
def test_driver_source_per_distribution(distro: str) -> None:
    p = plan(FakeHost(distro))
    ubuntu = distro.startswith("ubuntu")
    # Canonical's driver: NVIDIA's repository (for the toolkit) may not replace it.
    assert p.has("Keep the driver on Canonical's packages") == ubuntu
    # NVIDIA's repository: the branch's pinning package first, alone.
    assert p.has("Pin the driver to branch 580") == (not ubuntu)
    if not ubuntu:
        (pin,) = p.commands("Pin the driver")
        assert pin.endswith("install --allow-change-held-packages nvidia-driver-pinning-580")
        assert index(p, "Pin the driver") < index(p, DRIVER_OP)


# ---------------------------------------------------------------- current hosts
@pytest.mark.parametrize("distro", DISTROS)
def test_current_host_in_persistence_mode_plans_nothing(distro: str) -> None:
    p = plan(FakeHost(distro, driver="current", persistence=True))
    assert p.changes == []
    assert p.result.reboot is not None and not p.result.reboot.needed
    assert p.result.ready and ARCH_80 in p.result.cmake_args  # from nvidia-smi's 8.0


@pytest.mark.parametrize("distro", DISTROS)
def test_current_host_without_the_dropin_turns_persistence_on(distro: str) -> None:
    # The packaged unit's state: daemon running, persistence mode Disabled.
    p = plan(FakeHost(distro, driver="current", persistence=False))
    assert_dropin_uploaded(p)
    assert p.commands(RESTART_OP) == ("systemctl restart nvidia-persistenced.service",)
    assert p.has(VERIFY_OP) and VERIFY_OP in p.changes[-1]
    assert not p.has(REBOOT_OP) and not p.has("Hold the driver packages")
    assert p.commands(DRIVER_OP) == ()
    # Ubuntu's unit is "static" (no [Install]) until the drop-in: pyinfra reads that as
    # enabled at plan time; the execution's fresh read enables it after the reload.
    enable = [] if distro.startswith("ubuntu") else ["nvidia-persistenced enabled and running"]
    assert p.changes == [
        DROPIN_OP,
        "Reload systemd units (persistenced drop-in)",
        *enable,
        p.ops[index(p, RESTART_OP)].name,
        p.ops[index(p, VERIFY_OP)].name,
    ]


@pytest.mark.parametrize("distro", DISTROS)
def test_persistence_off_with_the_dropin_in_place_restarts_the_daemon(distro: str) -> None:
    p = plan(FakeHost(distro, driver="current", persistence=False, dropin=True))
    assert p.changes == [p.ops[index(p, RESTART_OP)].name, p.ops[index(p, VERIFY_OP)].name]


def test_module_and_user_space_mismatch_reboots_without_package_changes() -> None:
    p = plan(FakeHost("ubuntu-24.04", driver="mismatch", dropin=True))
    assert p.commands(DRIVER_OP) == ()
    assert p.result.reboot is not None
    assert p.result.reboot.reasons == (
        "the loaded kernel module and the driver's user space differ",
    )
    assert p.changes == [p.ops[index(p, REBOOT_OP)].name, p.ops[index(p, VERIFY_OP)].name]


def test_moving_debian_to_another_branch_replaces_the_held_packages_and_reboots() -> None:
    # NVIDIA's Debian packages keep their names: only the pinning package names the branch.
    p = plan(FakeHost("debian-12", driver="current"), {"llama_driver_branch": "590"})
    # The held pinning package of 580 is purged in the same transaction (apt will not
    # remove a held package to resolve a conflict; a removal would keep its preference).
    assert p.commands("Pin the driver")[0].endswith(
        "install --purge --allow-change-held-packages "
        "nvidia-driver-pinning-590 nvidia-driver-pinning-580-"
    )
    (move,) = p.commands("Move the driver to branch 590")
    # Holds released, the same names moved to 590, the holds taken again, in one command.
    assert move.startswith("apt-mark unhold libcuda1 libnvidia-ml1 nvidia-driver-cuda ")
    assert (
        "install --purge --allow-change-held-packages --allow-downgrades "
        "nvidia-driver-cuda nvidia-kernel-open-dkms nvidia-persistenced; rc=$?; "
    ) in move
    assert move.endswith("xargs -r apt-mark hold; exit $rc; }")
    assert index(p, "Pin the driver") < index(p, "Move the driver") < index(p, REBOOT_OP)
    assert not p.has("Hold the driver packages")  # the move's command holds again
    assert p.result.reboot is not None and p.result.reboot.reasons[0].startswith(
        "the driver moves to branch 590"
    )


# ---------------------------------------------------------------- no reboot allowed
@pytest.mark.parametrize(
    ("data", "controller", "why"),
    [
        ({"llama_gpu_reboot": False}, CONTROLLER_ID, "llama_gpu_reboot is false"),
        ({}, "same-machine-id", "the target is the machine running pyinfra"),
    ],
    ids=["reboot-disallowed", "target-is-controller"],
)
def test_a_needed_reboot_that_may_not_happen_is_reported_and_nothing_waits_on_it(
    data: dict[str, bool], controller: str, why: str
) -> None:
    h = FakeHost("ubuntu-22.04", nouveau=True, machine_id="same-machine-id")
    p = plan(h, data, controller_machine_id=controller)
    decision = p.result.reboot
    assert decision is not None and decision.needed and not decision.will
    assert decision.blocked_by == why
    assert not p.has(REBOOT_OP) and not p.has(VERIFY_OP)
    assert not p.has("nvidia-persistenced enabled")
    assert not p.result.ready
    assert driver_packages(p) == DRIVER["ubuntu-22.04"]  # installed, active after a reboot


# ---------------------------------------------------------------- settings and refusals
def test_gpu_stack_off_keeps_a_gpu_host_on_the_cpu_path() -> None:
    p = plan(FakeHost("debian-12"), {"llama_gpu_stack": "off"})
    assert not p.result.gpu and p.ops == []


def test_gpu_stack_on_without_a_gpu_installs_but_never_reboots_or_verifies() -> None:
    p = plan(
        FakeHost("debian-12", gpu=False),
        {"llama_gpu_stack": "on", "llama_cuda_architectures": "80"},
    )
    assert driver_packages(p) == DRIVER["debian-12"]
    assert p.result.gpu and not p.result.ready and ARCH_80 in p.result.cmake_args
    assert not p.has(REBOOT_OP) and not p.has(VERIFY_OP)


def test_proprietary_flavour_and_other_architectures_reach_the_plan() -> None:
    p = plan(
        FakeHost("ubuntu-22.04"),
        {"llama_driver_flavour": "proprietary", "llama_cuda_architectures": "80;90"},
    )
    assert driver_packages(p) == [
        "linux-modules-nvidia-580-server-generic",
        "linux-modules-nvidia-580-server-5.15.0-161-generic",
        "nvidia-headless-no-dkms-580-server",
        "nvidia-utils-580-server",
    ]
    assert "-DCMAKE_CUDA_ARCHITECTURES=80;90" in p.result.cmake_args


def test_unsupported_distribution_stops_before_any_change() -> None:
    with pytest.raises(PyinfraError) as exc:
        plan(FakeHost("debian-11"))
    message = str(exc.value)
    assert "REFUSED host '@fake/debian-11': unsupported distribution" in message
    assert "ID=debian VERSION_ID=11" in message and "Debian 12" in message


@pytest.mark.parametrize(
    ("data", "field", "allowed"),
    [
        ({"llama_driver_branch": "580-server"}, "llama_driver_branch", "driver branch in digits"),
        ({"llama_cuda_architectures": "sm80"}, "llama_cuda_architectures", "as numbers"),
        ({"llama_driver_source": "canonical"}, "llama_driver_source", "Canonical's packages"),
    ],
)
def test_bad_gpu_settings_stop_before_any_change(
    data: dict[str, str], field: str, allowed: str
) -> None:
    with pytest.raises(PyinfraError) as exc:
        plan(FakeHost("debian-12"), data)
    line = next(ln for ln in str(exc.value).splitlines() if ln.strip().startswith(field))
    assert "host '@fake/debian-12'" in str(exc.value) and allowed in line


# ---------------------------------------------------------------- CUDA packages by build role
TOOLKIT = "cuda-toolkit-13-0"
RUNTIME = ("cuda-cudart-13-0", "libcublas-13-0")
CUDA_OP = "CUDA 13.0 "
BUILD_TOOLS_OP = "Install build dependencies"
COMPILE_OP = "Build llama-server ("
RECEIVE_OP = "Receive llama.cpp build"


def with_build(cache: Path, cached: bool) -> Callable[[HostSpec, GpuResult], object]:
    """Step 4 after the stack, as deploy.py calls it. `cached`: the controller's cache
    already has this host's build id (complete: archive and sha256 record), so the host
    receives it; otherwise it is the first host of its id and compiles."""

    def then(spec: HostSpec, result: GpuResult) -> object:
        dist = preflight.distribution()
        if cached:
            cache.mkdir(parents=True, exist_ok=True)
            cmake = builds.cmake_args(spec.cfg, result.cmake_args)
            where = builds.platform(dist.id, dist.version_id, "amd64")
            entry = builds.CacheEntry(cache, builds.build_id(spec.cfg.cpp_commit, cmake, where))
            entry.archive.write_bytes(b"an archive")
            entry.sha256_file.write_text(builds.sha256_line("0" * 64, entry.archive.name))
        return llama_cpp.build(
            spec.cfg,
            dist,
            jobs=2,
            gpu_cmake_args=result.cmake_args,
            check_devices=result.gpu and result.ready,
            cuda_version=spec.gpu.cuda_version if result.gpu else None,
        )

    return then


def gpu_host(distro: str, driver: str) -> FakeHost:
    """A fresh GPU host, or one whose driver runs (held, in persistence mode) and that has
    no CUDA package yet: the driver fixture without its cuda-toolkit line."""
    if driver == "none":
        return FakeHost(distro)
    lines = fixture(f"dpkg-l-{distro}-gpu-stack.txt").splitlines(True)
    stack = "".join(ln for ln in lines if " cuda-toolkit-" not in ln)
    assert len(stack) < sum(map(len, lines))
    return FakeHost(distro, driver="current", persistence=True, stack=stack)


def cuda_install(p: Plan) -> list[str]:
    """The packages of step 4's CUDA operation."""
    (command,) = p.commands(CUDA_OP)
    assert " install " in command, command
    return command.rsplit(" install ", 1)[1].split()


@pytest.mark.parametrize("driver", ["none", "current"], ids=["fresh", "driver-current"])
@pytest.mark.parametrize("distro", DISTROS)
def test_the_gpu_host_that_compiles_installs_the_toolkit(
    distro: str, driver: str, tmp_path: Path
) -> None:
    h = gpu_host(distro, driver)
    p = plan(h, {"llama_cpp_build_cache": str(tmp_path)}, then=with_build(tmp_path, False))
    assert p.result.gpu
    assert cuda_install(p) == [TOOLKIT]
    assert p.has(BUILD_TOOLS_OP) and p.has(COMPILE_OP) and not p.has(RECEIVE_OP)
    assert not planned_anywhere(p, *RUNTIME)
    # The toolkit before the compile that needs its nvcc, which CMake is told about.
    assert index(p, CUDA_OP) < index(p, COMPILE_OP)
    (build,) = p.commands(COMPILE_OP)
    assert "-DCMAKE_CUDA_COMPILER=/usr/local/cuda-13.0/bin/nvcc" in build and ARCH_80 in build


@pytest.mark.parametrize("driver", ["none", "current"], ids=["fresh", "driver-current"])
@pytest.mark.parametrize("distro", DISTROS)
def test_a_gpu_host_that_receives_installs_only_the_cuda_runtime_and_cublas(
    distro: str, driver: str, tmp_path: Path
) -> None:
    h = gpu_host(distro, driver)
    p = plan(h, {"llama_cpp_build_cache": str(tmp_path)}, then=with_build(tmp_path, True))
    assert p.result.gpu
    assert cuda_install(p) == list(RUNTIME)
    assert p.has(RECEIVE_OP)
    # No toolkit, no compiler, no CMake, no source: nothing of the build anywhere in the plan.
    assert planned_anywhere(p, "cuda-toolkit", "nvcc", "build-essential") == []
    assert not [c for c in planned_anywhere(p, "cmake") if "cmake" in c.split()]
    assert not p.has(BUILD_TOOLS_OP) and not p.has(COMPILE_OP)
    assert not p.has("Download the llama.cpp source") and not p.has("Upload the llama.cpp source")
    # The runtime is there before the received binary is run (--version, --list-devices).
    assert index(p, CUDA_OP) < index(p, RECEIVE_OP)


def test_the_cpu_path_installs_no_cuda_package_whatever_the_role(tmp_path: Path) -> None:
    for cached in (False, True):
        p = plan(
            FakeHost("debian-12", gpu=False),
            {"llama_cpp_build_cache": str(tmp_path / str(cached))},
            then=with_build(tmp_path / str(cached), cached),
        )
        assert not p.result.gpu and not p.has(CUDA_OP), cached
        assert planned_anywhere(p, "cuda-toolkit", *RUNTIME) == []
