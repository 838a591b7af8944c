"""llamahost/gpu.py: parsing recorded output, the driver packages per distribution, the
reboot decision, the CUDA build's flags, and bad input named with host and field."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from llamahost import distro, gpu, layout, render
from llamahost.checks import ConfigError
from llamahost.config import SETTINGS
from llamahost.spec import resolve_host, setting_keys

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "plan" / "fixtures"


def lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def settings(**data: Any) -> gpu.GpuSettings:
    return resolve_host("gpu-7", {f"llama_{k}": v for k, v in data.items()}).gpu


UBUNTU_2204, UBUNTU_2404, DEBIAN_12 = distro.SUPPORTED


# ---------------------------------------------------------------- os-release
@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("os-release-ubuntu-22.04.txt", UBUNTU_2204),
        ("os-release-ubuntu-24.04.txt", UBUNTU_2404),
        ("os-release-debian-12.txt", DEBIAN_12),
    ],
)
def test_supported_distributions_from_recorded_os_release(
    fixture: str, expected: distro.Distribution
) -> None:
    found = distro.distribution("h", distro.parse_os_release((FIXTURES / fixture).read_text()))
    assert found == expected


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ((FIXTURES / "os-release-debian-11.txt").read_text(), "ID=debian VERSION_ID=11"),
        ('ID=ubuntu\nVERSION_ID="20.04"\n', "ID=ubuntu VERSION_ID=20.04"),
        ("ID=rocky\nVERSION_ID=9.4\n", "ID=rocky VERSION_ID=9.4"),
        ("", "ID=? VERSION_ID=?"),
    ],
)
def test_unsupported_distribution_is_refused_naming_host_and_file(text: str, shown: str) -> None:
    with pytest.raises(distro.Unsupported) as exc:
        distro.distribution("gpu-7", distro.parse_os_release(text))
    message = str(exc.value)
    assert message.startswith("host 'gpu-7': unsupported distribution in /etc/os-release: ")
    assert shown in message
    assert "supported: Ubuntu 22.04, Ubuntu 24.04, Debian 12" in message


def test_os_release_quoting_and_comments() -> None:
    parsed = distro.parse_os_release('# c\nNAME=\'A B\'\nID=debian\nX="q \\" z"\nbroken\n')
    assert parsed == {"NAME": "A B", "ID": "debian", "X": 'q " z'}


def test_only_amd64_has_a_cuda_repository_here() -> None:
    assert distro.cuda_repo_arch("h", "amd64") == "x86_64"
    with pytest.raises(distro.Unsupported, match="host 'gpu-7': architecture 'arm64'"):
        distro.cuda_repo_arch("gpu-7", "arm64")


# ---------------------------------------------------------------- the GPUs
def test_lspci_nn_recorded_a100() -> None:
    (g,) = gpu.parse_lspci(lines("lspci-nn-a100.txt"))
    assert (g.address, g.pci_class, g.device_id) == ("07:00.0", "0302", "20b0")
    assert g.name == "NVIDIA Corporation GA100 [A100 SXM4 40GB]"


def test_lspci_numeric_and_sysfs_forms_and_other_devices() -> None:
    found = gpu.parse_lspci(
        [
            "0000:07:00.0 0302: 10de:20b0 (rev a1)",  # lspci -n, or the sysfs fallback
            "08:00.0 0302: 10de:20F1",
            "01:00.1 Audio device [0403]: NVIDIA Corporation GP106 [10de:10f1] (rev a1)",
            "05:00.0 VGA compatible controller [0300]: Advanced Micro Devices [1002:164e]",
            "09:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:20b5] (rev a1)",
            "garbage",
        ]
    )
    assert [(g.address, g.device_id) for g in found] == [
        ("0000:07:00.0", "20b0"),
        ("08:00.0", "20f1"),
        ("09:00.0", "20b5"),
    ]


def test_nvidia_smi_recorded_query() -> None:
    smi = gpu.parse_nvidia_smi(lines("nvidia-smi-a100-persistence-on.txt"))
    assert smi.state == "ok"
    assert smi.gpus == (
        gpu.SmiGpu(0, "NVIDIA A100-SXM4-40GB", "00000000:07:00.0", "580.95.05", True, "8.0", 40960),
    )
    off = gpu.parse_nvidia_smi(lines("nvidia-smi-a100-persistence-off.txt"))
    assert not off.gpus[0].persistence_mode


@pytest.mark.parametrize(
    ("output", "state"),
    [
        (None, "absent"),
        ([], "absent"),
        (lines("nvidia-smi-mismatch.txt"), "mismatch"),
        (lines("nvidia-smi-no-driver.txt"), "no-driver"),
        (["No devices were found"], "no-driver"),
        (["0, A100, 00000000:07:00.0, 580.95.05, Enabled, [N/A], 40960 MiB"], "error"),
        (["something else entirely"], "error"),
    ],
)
def test_nvidia_smi_states(output: list[str] | None, state: str) -> None:
    assert gpu.parse_nvidia_smi(output).state == state


def test_modules_from_proc_modules_and_lsmod() -> None:
    assert "nouveau" in gpu.parse_modules(lines("proc-modules-nouveau.txt"))
    assert "nouveau" not in gpu.parse_modules(lines("proc-modules-nvidia.txt"))
    lsmod = ["Module                  Size  Used by", "nouveau      3096576  0"]
    assert gpu.parse_modules(lsmod) == {"nouveau"}


def test_loaded_driver_version_and_flavour() -> None:
    assert gpu.parse_driver_version(
        lines("proc-driver-nvidia-version-580-open.txt")
    ) == gpu.LoadedDriver("580.95.05", True)
    proprietary = ["NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.216.03  Thu Apr  3 2025"]
    assert gpu.parse_driver_version(proprietary) == gpu.LoadedDriver("535.216.03", False)
    assert gpu.parse_driver_version(["NVRM version: garbage"]) is None
    assert gpu.parse_driver_version(None) is None


# ---------------------------------------------------------------- CUDA build
def probe(**kw: Any) -> gpu.Probe:
    args: dict[str, Any] = {"lspci": [], "smi": None, "modules": [], "driver_version": []}
    args.update(kw)
    return gpu.probe(**args)


A100_PCI = lines("lspci-nn-a100.txt")


def test_architecture_from_nvidia_smi_then_pci_id_then_setting() -> None:
    smi = lines("nvidia-smi-a100-persistence-on.txt")
    assert gpu.architectures("h", settings(), probe(lspci=A100_PCI, smi=smi)) == "80"
    # A fresh host has no driver: the A100's PCI id says 8.0.
    assert gpu.architectures("h", settings(), probe(lspci=A100_PCI)) == "80"
    h100 = "0, NVIDIA H100 80GB HBM3, 00000000:08:00.0, 580.95.05, Enabled, 9.0, 81559 MiB"
    both = probe(smi=[*smi, h100])
    assert gpu.architectures("h", settings(), both) == "80;90"
    assert gpu.architectures("h", settings(cuda_architectures="86"), both) == "86"


def test_unknown_gpu_without_a_driver_asks_for_the_setting() -> None:
    unknown = ["07:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:ffff]"]
    with pytest.raises(gpu.GpuError) as exc:
        gpu.architectures("gpu-7", settings(), probe(lspci=unknown))
    assert "host 'gpu-7'" in str(exc.value) and "10de:ffff" in str(exc.value)
    assert "llama_cuda_architectures" in str(exc.value)


def test_cuda_cmake_args_and_toolkit() -> None:
    assert gpu.cuda_cmake_args("80", "13.0") == (
        "-DGGML_CUDA=ON",
        "-DCMAKE_CUDA_ARCHITECTURES=80",
        "-DCMAKE_CUDA_COMPILER=/usr/local/cuda-13.0/bin/nvcc",
    )
    assert gpu.toolkit_package("13.0") == "cuda-toolkit-13-0"
    assert gpu.toolkit_package("12.8") == "cuda-toolkit-12-8"


# ---------------------------------------------------------------- settings
def test_defaults() -> None:
    s = settings()
    assert (s.gpu_stack, s.driver_branch, s.driver_flavour, s.driver_source) == (
        "auto",
        "580",
        "open",
        "auto",
    )
    assert (s.cuda_version, s.cuda_architectures, s.gpu_reboot, s.gpu_required) == (
        "13.0",
        None,
        True,
        False,
    )


def test_numbers_written_as_numbers_are_accepted() -> None:
    s = settings(driver_branch=580, cuda_architectures=80)
    assert (s.driver_branch, s.cuda_architectures) == ("580", "80")


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"driver_branch": "580-server"}, "llama_driver_branch", "driver branch in digits"),
    ({"driver_branch": "r580"}, "llama_driver_branch", "driver branch in digits"),
    ({"driver_branch": "580.95.05"}, "llama_driver_branch", "driver branch in digits"),
    ({"driver_branch": "58"}, "llama_driver_branch", "driver branch in digits"),
    ({"driver_branch": True}, "llama_driver_branch", "driver branch in digits"),
    ({"driver_branch": "580\n"}, "llama_driver_branch", "driver branch in digits"),
    ({"cuda_architectures": "sm80"}, "llama_cuda_architectures", "as numbers"),
    ({"cuda_architectures": "eighty"}, "llama_cuda_architectures", "as numbers"),
    ({"cuda_architectures": "80,90"}, "llama_cuda_architectures", "as numbers"),
    ({"cuda_architectures": "80-real"}, "llama_cuda_architectures", "as numbers"),
    ({"cuda_architectures": ""}, "llama_cuda_architectures", "as numbers"),
    ({"cuda_version": "13"}, "llama_cuda_version", "major.minor"),
    ({"cuda_version": 13.0}, "llama_cuda_version", "major.minor"),
    ({"driver_flavour": "closed"}, "llama_driver_flavour", "one of: open, proprietary"),
    ({"driver_source": "ppa"}, "llama_driver_source", "one of: auto, canonical, nvidia"),
    ({"gpu_reboot": "yes"}, "llama_gpu_reboot", "true or false"),
    ({"gpu_stack": "force"}, "llama_gpu_stack", "one of: auto, on, off"),
    ({"gpu_required": True, "gpu_stack": "off"}, "llama_gpu_required", "llama_gpu_stack 'off'"),
    (
        {"driver_kernel_modules": "precompiled", "driver_source": "nvidia"},
        "llama_driver_kernel_modules",
        "precompiled modules come from Canonical",
    ),
    ({"driver_branch": "535"}, "llama_driver_branch", "CUDA 13.0 needs driver branch 580"),
]


@pytest.mark.parametrize(("data", "field", "allowed"), BAD, ids=[f"{b[1]}={b[0]}" for b in BAD])
def test_bad_value_names_host_field_and_what_is_allowed(
    data: dict[str, Any], field: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        settings(**data)
    message = str(exc.value)
    assert message.startswith("host 'gpu-7': invalid inventory data (nothing was changed)")
    line = next(ln for ln in message.splitlines() if ln.strip().startswith(field + " ="))
    assert allowed in line


def test_gpu_settings_are_documented_and_apart_from_the_others() -> None:
    keys = setting_keys()  # every concern's, as the spec checks them
    assert len(keys) == len(set(keys))
    assert not {s.key for s in gpu.GPU_SETTINGS} & {s.key for s in SETTINGS}
    for s in gpu.GPU_SETTINGS:
        assert s.doc and "\n" not in s.doc and s.doc.endswith("."), s.key
        assert s.check(s.default) == s.default, s.key


# ---------------------------------------------------------------- driver packages
def plan_for(
    dist: distro.Distribution, kernel: str, installed: list[str], **data: Any
) -> gpu.DriverPlan:
    return gpu.driver_plan("gpu-7", dist, settings(**data), kernel, installed)


def test_ubuntu_precompiled_follows_the_kernel_metapackage() -> None:
    p = plan_for(UBUNTU_2204, "5.15.0-161-generic", ["linux-image-generic"])
    assert (p.source, p.kernel_modules, p.pinning) == ("canonical", "precompiled", None)
    assert p.packages == (
        "linux-modules-nvidia-580-server-open-generic",
        "nvidia-headless-no-dkms-580-server-open",
        "nvidia-utils-580-server",
    )


@pytest.mark.parametrize(
    ("release", "kernel", "installed", "meta"),
    [
        ("22.04", "5.15.0-161-generic", ["linux-image-virtual"], "generic"),
        ("22.04", "6.8.0-60-generic", ["linux-image-generic-hwe-22.04"], "generic-hwe-22.04"),
        (
            "22.04",
            "6.8.0-60-generic",
            ["linux-image-generic", "linux-image-generic-hwe-22.04"],
            "generic-hwe-22.04",
        ),
        (
            "22.04",
            "5.15.0-161-generic",
            ["linux-image-generic", "linux-image-generic-hwe-22.04"],
            "generic",
        ),
        ("22.04", "6.8.0-1017-azure", ["linux-image-azure"], "azure"),
        ("24.04", "6.14.0-1015-aws", ["linux-image-aws", "linux-image-6.14.0-1015-aws"], "aws"),
        ("24.04", "6.17.0-1003-gcp", ["linux-image-gcp-6.17"], "gcp-6.17"),
        ("24.04", "6.8.0-45-generic", ["linux-image-aws"], None),
        ("24.04", "6.8.0-45-custom", [], None),
    ],
)
def test_ubuntu_kernel_metapackage(
    release: str, kernel: str, installed: list[str], meta: str | None
) -> None:
    assert gpu.ubuntu_kernel_meta(release, kernel, installed) == meta


def test_ubuntu_without_a_kernel_metapackage_builds_with_dkms() -> None:
    p = plan_for(UBUNTU_2404, "6.8.0-45-custom", [])
    assert p.kernel_modules == "dkms"
    assert p.packages == (
        "nvidia-headless-580-server-open",
        "nvidia-utils-580-server",
        "linux-headers-6.8.0-45-custom",
    )
    # Asked for precompiled anyway: the running kernel's own ABI package.
    p = plan_for(UBUNTU_2404, "6.8.0-45-generic", [], driver_kernel_modules="precompiled")
    assert p.packages[0] == "linux-modules-nvidia-580-server-open-6.8.0-45-generic"


def test_ubuntu_dkms_and_proprietary_names() -> None:
    p = plan_for(
        UBUNTU_2204,
        "5.15.0-161-generic",
        ["linux-image-generic"],
        driver_kernel_modules="dkms",
        driver_flavour="proprietary",
    )
    assert p.packages == (
        "nvidia-headless-580-server",
        "nvidia-utils-580-server",
        "linux-headers-5.15.0-161-generic",
        "linux-headers-generic",
    )


def test_ubuntu_from_nvidias_repository_pins_the_branch() -> None:
    p = plan_for(UBUNTU_2404, "6.8.0-45-generic", ["linux-image-generic"], driver_source="nvidia")
    assert (p.source, p.pinning) == ("nvidia", "nvidia-driver-pinning-580")
    assert p.packages == (
        "libnvidia-compute-580",
        "nvidia-dkms-580-open",
        "nvidia-utils-580",
        "nvidia-compute-utils-580",
        "libnvidia-cfg1-580",
        "linux-headers-6.8.0-45-generic",
        "linux-headers-generic",
    )
    # From 590 on the names carry no branch; the pinning package holds it.
    p = plan_for(UBUNTU_2404, "6.8.0-45-generic", [], driver_source="nvidia", driver_branch="590")
    assert p.pinning == "nvidia-driver-pinning-590"
    assert p.packages[:2] == ("libnvidia-compute", "nvidia-dkms-open")


@pytest.mark.parametrize(
    ("flavour", "kernel_package"),
    [("open", "nvidia-kernel-open-dkms"), ("proprietary", "nvidia-kernel-dkms")],
)
def test_debian_from_nvidias_repository(flavour: str, kernel_package: str) -> None:
    p = plan_for(DEBIAN_12, "6.1.0-27-amd64", [], driver_flavour=flavour)
    assert (p.source, p.kernel_modules, p.pinning) == (
        "nvidia",
        "dkms",
        "nvidia-driver-pinning-580",
    )
    assert p.packages == (
        "nvidia-driver-cuda",
        kernel_package,
        "nvidia-persistenced",
        "linux-headers-6.1.0-27-amd64",
        "linux-headers-amd64",
    )


def test_canonical_packages_on_debian_are_refused_naming_host_and_field() -> None:
    with pytest.raises(ConfigError) as exc:
        plan_for(DEBIAN_12, "6.1.0-27-amd64", [], driver_source="canonical")
    assert str(exc.value).startswith("host 'gpu-7': invalid inventory data")
    assert "llama_driver_source = 'canonical': Canonical's packages are for Ubuntu" in str(
        exc.value
    )


def test_keyring_url() -> None:
    assert gpu.keyring_url(UBUNTU_2404, "x86_64") == (
        "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64/"
        "cuda-keyring_1.1-1_all.deb"
    )


# ---------------------------------------------------------------- holds
def test_hold_needed_until_every_driver_package_is_held() -> None:
    p = plan_for(UBUNTU_2204, "5.15.0-161-generic", ["linux-image-generic"])
    held = {"nvidia-headless-no-dkms-580-server-open": True, "nvidia-utils-580-server": True}
    assert not gpu.hold_needed(held, p)
    assert gpu.hold_needed({**held, "libnvidia-compute-580-server": False}, p)
    assert gpu.hold_needed({"nvidia-utils-580-server": True}, p)  # one not installed yet
    states = gpu.parse_package_states(["hi  nvidia-utils-580-server", "ii  libcuda1", "un  x"])
    assert states == {"nvidia-utils-580-server": True, "libcuda1": False}


def test_the_pinning_package_is_held_too_so_a_branch_move_holds_the_new_one() -> None:
    p = plan_for(DEBIAN_12, "6.1.0-27-cloud-amd64", [], driver_branch="590")
    # The driver's packages kept their names and holds from 580; the new pin is not held.
    held = {name: True for name in ("nvidia-driver-cuda", "nvidia-kernel-open-dkms")}
    held |= {"nvidia-persistenced": True, "nvidia-driver-pinning-580": True}
    assert gpu.hold_needed(held, p)
    assert not gpu.hold_needed({**held, "nvidia-driver-pinning-590": True}, p)


def test_other_branches_pinning_packages_are_replaced() -> None:
    p = plan_for(DEBIAN_12, "6.1.0-27-cloud-amd64", [], driver_branch="590")
    installed = ["nvidia-driver-pinning-580", "nvidia-driver-pinning-590", "nvidia-driver-cuda"]
    assert gpu.other_pinning(p, installed) == ("nvidia-driver-pinning-580",)
    assert gpu.other_pinning(p, ["nvidia-driver-pinning-590"]) == ()
    canonical = plan_for(UBUNTU_2204, "5.15.0-161-generic", ["linux-image-generic"])
    assert gpu.other_pinning(canonical, installed) == ()  # no pin of its own to replace


# ---------------------------------------------------------------- reboot
DEB = ["nvidia-driver-cuda", "nvidia-kernel-open-dkms", "nvidia-persistenced"]


def decide(
    found: gpu.Probe, installed: list[str], controller: bool = False, **data: Any
) -> gpu.Reboot:
    versions = {name: ["580.95.05-1"] for name in installed}
    p = plan_for(DEBIAN_12, "6.1.0-27-amd64", installed, **data)
    return gpu.reboot_decision(found, p, versions, settings(**data), controller)


CURRENT = {
    "lspci": A100_PCI,
    "smi": lines("nvidia-smi-a100-persistence-on.txt"),
    "modules": lines("proc-modules-nvidia.txt"),
    "driver_version": lines("proc-driver-nvidia-version-580-open.txt"),
}


def test_reboot_for_a_new_driver_or_nouveau_only() -> None:
    fresh = decide(probe(lspci=A100_PCI, modules=lines("proc-modules-plain.txt")), [])
    assert fresh.will and fresh.reasons == (
        "the driver is installed or changed (nvidia-driver-cuda, nvidia-kernel-open-dkms, "
        "nvidia-persistenced)",
    )
    nouveau = decide(probe(**{**CURRENT, "modules": lines("proc-modules-nouveau.txt")}), DEB)
    assert nouveau.will and nouveau.reasons == ("nouveau is loaded",)
    current = decide(probe(**CURRENT), DEB)
    assert not current.needed and current.reasons == ()
    # A new kernel's headers do not change the loaded driver.
    assert not decide(probe(**CURRENT), DEB[:3]).needed


def test_reboot_for_a_driver_that_is_not_the_loaded_one() -> None:
    mismatch = decide(probe(lspci=A100_PCI, smi=lines("nvidia-smi-mismatch.txt")), DEB)
    assert mismatch.reasons == ("the loaded kernel module and the driver's user space differ",)
    unloaded = decide(probe(lspci=A100_PCI, smi=lines("nvidia-smi-no-driver.txt")), DEB)
    assert unloaded.reasons == ("the driver is installed but its kernel module is not loaded",)
    proprietary = ["NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Release Build"]
    flavour = decide(probe(**{**CURRENT, "driver_version": proprietary}), DEB)
    assert flavour.reasons == ("the loaded kernel module is not the chosen flavour",)


def test_same_names_on_another_branch_are_a_driver_change() -> None:
    p = plan_for(DEBIAN_12, "6.1.0-27-amd64", [], driver_branch="590")
    installed = {
        "nvidia-driver-cuda": ["580.95.05-1"],
        "nvidia-kernel-open-dkms": ["590.44.01-1"],
        "nvidia-persistenced": ["1:580.95.05-1"],  # an epoch is not the branch
        "linux-headers-6.1.0-27-amd64": ["6.1.115-1"],
    }
    assert gpu.off_branch(p, installed) == ("nvidia-driver-cuda", "nvidia-persistenced")
    moved = decide(probe(**CURRENT), DEB, driver_branch="590")
    assert moved.will and moved.reasons == (
        "the driver moves to branch 590 (nvidia-driver-cuda, nvidia-kernel-open-dkms, "
        "nvidia-persistenced)",
    )


def test_reboot_never_on_the_controller_nor_when_disallowed_nor_without_a_gpu() -> None:
    fresh = probe(lspci=A100_PCI)
    on_controller = decide(fresh, [], controller=True)
    assert on_controller.needed and not on_controller.will and on_controller.pending
    assert on_controller.blocked_by == "the target is the machine running pyinfra"
    disallowed = decide(fresh, [], gpu_reboot=False)
    assert disallowed.pending and disallowed.blocked_by == "llama_gpu_reboot is false"
    assert not decide(probe(), [], gpu_stack="on").needed


def test_same_machine_compares_machine_ids() -> None:
    assert gpu.same_machine("abc\n", "abc")
    assert not gpu.same_machine("abc", "abd")
    assert not gpu.same_machine("", "")
    assert not gpu.same_machine(None, "abc")


# ---------------------------------------------------------------- the path and readiness
def test_gpu_path() -> None:
    none = probe()
    assert not gpu.gpu_path("h", settings(), none)
    assert gpu.gpu_path("h", settings(gpu_stack="on"), none)
    assert not gpu.gpu_path("h", settings(gpu_stack="off"), probe(**CURRENT))
    assert gpu.gpu_path("h", settings(), probe(lspci=A100_PCI))
    with pytest.raises(gpu.GpuError, match="host 'gpu-7': no NVIDIA GPU found"):
        gpu.gpu_path("gpu-7", settings(gpu_required=True), none)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        # A driver that answers 6 of the 7 fields (no memory.total).
        (
            "0, NVIDIA A100-SXM4-40GB, 00000000:07:00.0, 580.95.05, Enabled, 8.0",
            "nvidia-smi answered 6 of the 7 fields asked (index, name, pci.bus_id, "
            "driver_version, persistence_mode, compute_cap, memory.total) in '0, NVIDIA "
            "A100-SXM4-40GB, 00000000:07:00.0, 580.95.05, Enabled, 8.0': no memory.total",
        ),
        (
            "0, A100, 00000000:07:00.0, 580.95.05, Enabled, 8.0, 40960 MiB, extra",
            "nvidia-smi answered 8 fields, not the 7 asked",
        ),
        (
            "0, A100, 00000000:07:00.0, 580.95.05, Enabled, [N/A], 40960 MiB",
            "nvidia-smi: compute_cap unreadable in",
        ),
    ],
)
def test_a_short_or_garbled_nvidia_smi_answer_is_refused_not_parsed_around(
    answer: str, says: str
) -> None:
    """Not read around: its GPUs' memory and architecture would be guessed from lspci."""
    found = probe(lspci=A100_PCI, smi=[answer])
    assert found.smi.state == "error" and says in found.smi.message
    with pytest.raises(gpu.GpuError) as e:
        gpu.gpu_path("gpu-3", settings(), found)
    assert str(e.value).startswith(f"host 'gpu-3': {says}")
    assert str(e.value).endswith("Nothing was changed.")
    # The CPU path (llama_gpu_stack off) never reads nvidia-smi's answer.
    assert not gpu.gpu_path("gpu-3", settings(gpu_stack="off"), found)


@pytest.mark.parametrize(
    ("device", "cap"),
    [("2335", "90"), ("233b", "90"), ("2342", "90"), ("2901", "100"), ("20b0", "80")],
)
def test_current_data_centre_gpus_map_by_pci_id_before_any_driver(device: str, cap: str) -> None:
    """H200 SXM (10de:2335), H200 NVL, GH200, B200 and the A100 on a host without a driver:
    the architecture comes from the PCI id table (llamahost/gpu/cuda.py)."""
    pci = [f"07:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:{device}] (rev a1)"]
    assert gpu.architectures("h", settings(), probe(lspci=pci)) == cap


NODES = lines("dev-nvidia.txt")


def test_check_ready() -> None:
    on = gpu.parse_nvidia_smi(lines("nvidia-smi-a100-persistence-on.txt"))
    assert gpu.check_ready(on, NODES, "580", 1) == []
    off = gpu.parse_nvidia_smi(lines("nvidia-smi-a100-persistence-off.txt"))
    assert gpu.check_ready(off, NODES, "580", 1) == ["GPU 0: persistence mode is Disabled"]
    assert gpu.check_ready(on, NODES, "590", 1) == ["GPU 0: driver 580.95.05, not branch 590"]
    assert gpu.check_ready(on, ["/dev/nvidia0"], "580", 2) == [
        "nvidia-smi lists 1 GPU(s), lspci 2",
        "/dev/nvidiactl is missing",
        "/dev/nvidia-uvm is missing",
    ]
    mismatch = gpu.parse_nvidia_smi(lines("nvidia-smi-mismatch.txt"))
    assert gpu.check_ready(mismatch, NODES, "580", 1) == [
        "nvidia-smi: Failed to initialize NVML: Driver/library version mismatch"
    ]


# ---------------------------------------------------------------- files and unit lines
def test_persistenced_dropin_runs_the_daemon_in_persistence_mode() -> None:
    text = (REPO / "files/gpu/nvidia-persistenced.conf").read_text()
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert body == [
        "[Service]",
        "ExecStart=",
        "ExecStart=/usr/bin/nvidia-persistenced --user root --persistence-mode --verbose",
        "ExecStartPost=-/sbin/modprobe nvidia-uvm",
        "ExecStartPost=-/usr/bin/nvidia-modprobe -c 0 -u",
        "[Install]",
        "WantedBy=multi-user.target",
    ]


def test_nouveau_blacklist_and_canonical_pin() -> None:
    blacklist = (REPO / "files/gpu/blacklist-nouveau.conf").read_text().splitlines()
    assert {"blacklist nouveau", "options nouveau modeset=0"} <= set(blacklist)
    pin = [
        ln
        for ln in (REPO / "files/gpu/apt-preferences-driver-from-canonical")
        .read_text()
        .splitlines()
        if ln and not ln.startswith("#")
    ]
    assert pin == [
        "Package: nvidia-* libnvidia-* libcuda* firmware-nvidia-*",
        "Pin: origin developer.download.nvidia.com",
        "Pin-Priority: -1",
    ]
    # apt reads preferences.d in order and ignores names with other characters.
    name = layout.CANONICAL_DRIVER_PIN.rsplit("/", 1)[1]
    assert name < "cuda-repository-pin-600" and name.replace("-", "").isalnum()


@pytest.mark.parametrize(
    ("tools", "ran"),
    [
        (["update-initramfs", "dracut"], "update-initramfs -u"),
        (["dracut"], "dracut -f"),
        ([], None),
    ],
    ids=["initramfs-tools", "dracut", "neither"],
)
def test_initramfs_rebuild_uses_the_hosts_tool_or_says_there_is_none(
    tmp_path: Path, tools: list[str], ran: str | None
) -> None:
    # The real shell command, with stand-ins for the tools on an otherwise empty PATH.
    log = tmp_path / "ran"
    for tool in tools:
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        stub.chmod(0o755)
    out = subprocess.run(
        ["/bin/sh", "-c", gpu.INITRAMFS_REBUILD],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    if ran is None:
        assert not log.exists()
        assert "no initramfs to rebuild" in out.stdout
    else:
        assert log.read_text() == ran + "\n" and out.stdout == ""


def test_unit_lines() -> None:
    assert render.gpu_ordering(False) == ()
    assert render.gpu_ordering(True) == (
        "After=nvidia-persistenced.service",
        "Wants=nvidia-persistenced.service",
    )


# ---------------------------------------------------------------- the driver a host has
@pytest.mark.parametrize(
    ("output", "on"),
    [
        (["SecureBoot enabled"], True),
        (["SecureBoot disabled"], False),
        (["SecureBoot disabled", "efivar 1"], False),  # mokutil's word wins
        (["efivar 1"], True),
        (["efivar 0"], False),
        ([], False),  # neither: legacy BIOS
    ],
)
def test_secure_boot_from_mokutil_or_the_efi_variable(output: list[str], on: bool) -> None:
    assert gpu.parse_secure_boot(output) is on


def test_module_kind_from_modinfo() -> None:
    dkms = ["filename:       /lib/modules/6.8.0-45-generic/updates/dkms/nvidia.ko.zst"]
    assert gpu.parse_modinfo(dkms) == "dkms"
    lrm = ["filename:       /lib/modules/6.8.0-45-generic/kernel/nvidia-580srv/nvidia.ko"]
    assert gpu.parse_modinfo([*lrm, "version:        580.95.05"]) == "precompiled"
    assert gpu.parse_modinfo([]) is None


def test_branch_in_name() -> None:
    assert gpu.branch_in_name("libnvidia-compute-550-server") == "550"
    assert gpu.branch_in_name("nvidia-firmware-580-server-580.95.05") == "580"
    assert gpu.branch_in_name("linux-modules-nvidia-580-server-open-6.8.0-45-generic") == "580"
    assert gpu.branch_in_name("libnvidia-cfg1-580") == "580"
    assert gpu.branch_in_name("nvidia-driver-cuda") is None
    assert not gpu.is_driver_package("nvidia-container-toolkit")
    assert not gpu.is_driver_package("nvidia-driver-pinning-580")  # handled apart


OPEN_580 = gpu.LoadedDriver("580.95.05", True)


def test_installed_driver_source_kind_and_holds() -> None:
    canonical = {
        "libnvidia-compute-580-server": ["580.95.05-0ubuntu0.24.04.2"],
        "nvidia-dkms-580-server-open": ["580.95.05-0ubuntu0.24.04.2"],
        "linux-headers-6.8.0-45-generic": ["6.8.0-45.45"],
    }
    found = gpu.host_driver(
        True, "6.8.0-45-generic", canonical, {"nvidia-dkms-580-server-open": True}, OPEN_580, None
    )
    assert (found.source, found.branch, found.flavour, found.kernel_modules) == (
        "canonical",
        "580",
        "open",
        "dkms",
    )
    assert found.packages == ("libnvidia-compute-580-server", "nvidia-dkms-580-server-open")
    assert found.held == ("nvidia-dkms-580-server-open",)
    nvidia = {
        "cuda-drivers": ["580.105.08-0ubuntu1"],
        "libnvidia-compute-580": ["580.105.08-0ubuntu1"],
    }
    assert gpu.host_driver(True, "6.8.0-45-generic", nvidia, {}, None, None).source == "nvidia"
    # Same names, NVIDIA's version scheme and no NVIDIA-only name: still NVIDIA's.
    bare = {"libnvidia-compute-580": ["580.105.08-0ubuntu1"]}
    assert gpu.host_driver(True, "6.8.0-45-generic", bare, {}, None, None).branch == "580"
    assert gpu.host_driver(True, "6.8.0-45-generic", bare, {}, None, None).source == "nvidia"
    none = gpu.host_driver(True, "6.8.0-45-generic", {"cmake": ["3"]}, {}, None, None)
    assert none.source is None and none.packages == ()


def test_stale_packages_per_move() -> None:
    installed = [
        "libnvidia-compute-580-server",
        "linux-modules-nvidia-580-server-open-generic",
        "nvidia-dkms-580-server-open",
        "nvidia-headless-580-server-open",
        "nvidia-headless-no-dkms-580-server-open",
    ]
    found = gpu.HostDriver("canonical", "580", "open", "dkms", OPEN_580, tuple(installed), ())
    # DKMS → precompiled: the DKMS packages only (headless-no-dkms is shared).
    assert gpu.stale_packages(True, "canonical", "580", "open", "precompiled", found, []) == (
        "nvidia-dkms-580-server-open",
        "nvidia-headless-580-server-open",
    )
    # Open → proprietary: the open kernel-module packages.
    assert gpu.stale_packages(True, "canonical", "580", "proprietary", "dkms", found, []) == (
        "linux-modules-nvidia-580-server-open-generic",
        "nvidia-dkms-580-server-open",
        "nvidia-headless-580-server-open",
        "nvidia-headless-no-dkms-580-server-open",
    )
    # Another branch: everything; another source: every -server package.
    assert len(gpu.stale_packages(True, "canonical", "590", "open", "dkms", found, [])) == 5
    assert len(gpu.stale_packages(True, "nvidia", "580", "open", "dkms", found, [])) == 5


def test_a_running_driver_of_the_pinned_branch_is_kept_with_its_kind() -> None:
    installed = ["linux-image-generic", "nvidia-headless-580-server-open"]
    found = gpu.HostDriver(
        "canonical", "580", "open", "dkms", OPEN_580, ("nvidia-headless-580-server-open",), ()
    )
    avail = ["linux-modules-nvidia-580-server-open-6.8.0-45-generic"]
    p = gpu.driver_plan(
        "gpu-7", UBUNTU_2404, settings(), "6.8.0-45-generic", installed, found=found,
        available=avail,
    )  # fmt: skip
    assert p.kernel_modules == "dkms" and p.remove == () and p.kept
    # Under Secure Boot too: the module loads, so its key is enrolled.
    p = gpu.driver_plan(
        "gpu-7", UBUNTU_2404, settings(), "6.8.0-45-generic", installed, found=found,
        available=avail, secure_boot=True,
    )  # fmt: skip
    assert p.kept


def test_secure_boot_refuses_a_dkms_plan_naming_what_to_do() -> None:
    with pytest.raises(gpu.GpuError) as exc:
        gpu.driver_plan(
            "gpu-7", UBUNTU_2404, settings(), "6.8.0-45-generic", ["linux-image-generic"],
            secure_boot=True, available=[],
        )  # fmt: skip
    message = str(exc.value)
    assert message.startswith("host 'gpu-7': Secure Boot is on")
    assert "Nothing was changed" in message and "mokutil --import" in message
