"""The GPU checks' parsers against recorded real output (fixtures/SOURCES.md says whose).

No host and no GPU: these run with the unit tests. What they prove is that the GPU checks
read persistence, driver versions and offload the way the real tools print them, and
refuse what they do not recognise instead of passing on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compliance import gpu_parse

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ------------------------------------------------------------------ persistence, memory
def test_persistence_enabled_is_read_per_gpu() -> None:
    report = gpu_parse.parse_smi_xml(fixture("smi-rtx4090-persistence-enabled.xml"))
    assert report.driver_version == "535.86.05"
    assert [g.persistence_mode for g in report.gpus] == ["Enabled"]
    (gpu,) = report.gpus
    assert (gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib) == (24564, 2, 24214)


def test_persistence_disabled_on_an_a100_is_read() -> None:
    report = gpu_parse.parse_smi_xml(fixture("smi-a100-sxm4-40gb-persistence-disabled.xml"))
    assert report.driver_version == "510.47.03"
    (gpu,) = report.gpus
    assert gpu.name == "NVIDIA A100-SXM4-40GB"
    assert gpu.persistence_mode == "Disabled"


def test_memory_is_the_whole_gpus_not_a_mig_slices() -> None:
    # The recording has two MIG slices of 19968 MiB, each with its own <fb_memory_usage>.
    (gpu,) = gpu_parse.parse_smi_xml(fixture("smi-a100-sxm4-40gb-persistence-disabled.xml")).gpus
    assert (gpu.memory_total_mib, gpu.memory_free_mib) == (40960, 40315)


def test_processes_and_their_gpu_memory_are_read() -> None:
    (gpu,) = gpu_parse.parse_smi_xml(fixture("smi-rtx3060-with-process.xml")).gpus
    assert gpu.processes == (
        gpu_parse.GpuProcess(pid=28543, name="/usr/libexec/Xorg", type="G", used_memory_mib=4),
    )


@pytest.mark.parametrize(
    "text",
    [
        fixture("smi-nvml-mismatch-580.178.txt"),  # nvidia-smi failed: no XML at all
        fixture("smi-summary-580.95.05.txt"),  # the human table, not -q -x
        "<nvidia_smi_log><driver_version>1.0</driver_version></nvidia_smi_log>",  # no GPU
    ],
    ids=["nvml-error", "summary-table", "no-gpu"],
)
def test_output_that_is_not_a_gpu_report_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        gpu_parse.parse_smi_xml(text)


# ------------------------------------------------------------------ driver versions
def test_open_module_and_userspace_of_one_machine_match() -> None:
    module = fixture("proc-version-580.95.05-open.txt")
    userspace = fixture("smi-summary-580.95.05.txt")
    assert gpu_parse.kernel_module_version(module) == "580.95.05"
    assert gpu_parse.is_open_module(module)
    assert gpu_parse.userspace_driver_version(userspace) == "580.95.05"
    assert not gpu_parse.nvml_mismatch(userspace)
    assert gpu_parse.branch("580.95.05") == "580"


def test_mismatched_module_and_userspace_are_told_apart() -> None:
    module = fixture("proc-version-580.173.02-proprietary.txt")
    userspace = fixture("smi-nvml-mismatch-580.178.txt")
    assert gpu_parse.kernel_module_version(module) == "580.173.02"
    assert not gpu_parse.is_open_module(module)
    assert gpu_parse.nvml_mismatch(userspace)
    assert gpu_parse.userspace_driver_version(userspace) == "580.178"
    assert gpu_parse.kernel_module_version(module) != gpu_parse.userspace_driver_version(userspace)
    # Same branch, different builds: a branch check alone would not catch this.
    assert gpu_parse.branch("580.173.02") == gpu_parse.branch("580.178")


def test_userspace_version_from_the_xml_report() -> None:
    xml = fixture("smi-rtx4090-persistence-enabled.xml")
    assert gpu_parse.userspace_driver_version(xml) == "535.86.05"


@pytest.mark.parametrize("text", ["", "nvidia: module not loaded\n", "GCC version: 12\n"])
def test_a_missing_driver_is_not_a_version(text: str) -> None:
    with pytest.raises(ValueError):
        gpu_parse.kernel_module_version(text)
    with pytest.raises(ValueError):
        gpu_parse.userspace_driver_version(text)


# ------------------------------------------------------------------ offload
def test_partly_offloaded_model_is_incomplete() -> None:
    got = gpu_parse.offload(fixture("offload-partial-30of81.log"))
    assert got == gpu_parse.Offload(offloaded=30, total=81)
    assert not got.complete


def test_fully_offloaded_model_is_complete() -> None:
    got = gpu_parse.offload(fixture("offload-full-81of81.log"))
    assert got == gpu_parse.Offload(offloaded=81, total=81)
    assert got.complete


def test_the_last_load_in_a_log_counts() -> None:
    log = fixture("offload-full-81of81.log") + fixture("offload-partial-30of81.log")
    assert gpu_parse.offload(log) == gpu_parse.Offload(30, 81)


def test_a_log_without_the_offload_line_says_nothing() -> None:
    # llama-server's journal at the default verbosity (3): no load_tensors lines.
    journal = (
        "0.00.004.694 I srv    load_model: loading model '/var/lib/llama-models/m.gguf'\n"
        "0.00.009.721 I srv  llama_server: model loaded\n"
    )
    assert gpu_parse.offload(journal) is None


# ------------------------------------------------------------------ the CUDA build
def test_cuda_devices_are_listed() -> None:
    devices = gpu_parse.list_devices(fixture("list-devices-cuda.txt"))
    assert [d.name for d in devices] == ["CUDA0", "CUDA1", "RPC[IP1:PORT1]", "RPC[IP2:PORT2]"]
    assert devices[0].description == "NVIDIA GeForce RTX XXXX"


def test_a_cpu_build_lists_no_device() -> None:
    assert gpu_parse.list_devices(fixture("list-devices-cpu-build.txt")) == []


def test_output_without_a_device_list_is_refused() -> None:
    # What a CUDA build prints without a usable driver (docs/facts.md, "llama.cpp at the
    # pinned commit").
    with pytest.raises(ValueError):
        gpu_parse.list_devices("CUDA driver version is insufficient for CUDA runtime version\n")


def test_cuda_architectures_from_the_configure_log() -> None:
    # The line llama.cpp's ggml-cuda CMakeLists prints at the pin (read from source: no
    # CUDA build has been configured where this runs).
    log = (
        "-- CUDA Toolkit found\n"
        "-- Using CMAKE_CUDA_ARCHITECTURES=80;86-real;90-virtual "
        "CMAKE_CUDA_ARCHITECTURES_NATIVE=\n"
        "-- Including CUDA backend\n"
    )
    assert gpu_parse.cuda_architectures(log) == ["80", "86", "90"]
    assert gpu_parse.compute_capability_arch("8.0") == "80"
    with pytest.raises(ValueError):
        gpu_parse.cuda_architectures("-- Including CPU backend\n")
