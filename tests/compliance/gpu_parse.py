"""Parsing of what a GPU host reports: nvidia-smi, the loaded driver, llama.cpp's logs.

Pure functions on text, no host access: the checks in test_gpu.py feed them what the host
printed, and test_gpu_parse.py feeds them recorded real output (fixtures/SOURCES.md).
Every parser raises ValueError on text it does not recognise, so a check can never pass
on output it did not understand.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

# `nvidia-smi -q -x` is the machine-readable form; its element names are stable across
# driver branches (nvsmi_device_v11 .. v12 DTDs in the recordings), the human table is not.
SMI_XML_COMMAND = "nvidia-smi -q -x"


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    type: str  # C compute, G graphics, C+G both
    used_memory_mib: int | None  # None where the driver cannot tell (N/A)


@dataclass(frozen=True)
class Gpu:
    bus_id: str
    name: str
    persistence_mode: str  # Enabled, Disabled, or N/A where the platform has none
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    processes: tuple[GpuProcess, ...]


@dataclass(frozen=True)
class SmiReport:
    driver_version: str
    gpus: tuple[Gpu, ...]


def _mib(text: str | None, what: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*MiB\s*", text or "")
    if not m:
        raise ValueError(f"{what}: expected '<n> MiB', got {text!r}")
    return int(m.group(1))


def _text(el: ET.Element, path: str) -> str:
    found = el.find(path)
    if found is None or found.text is None:
        raise ValueError(f"nvidia-smi XML has no <{path}>")
    return found.text.strip()


def parse_smi_xml(text: str) -> SmiReport:
    """`nvidia-smi -q -x` → driver version and, per GPU, persistence, memory, processes.

    Only the GPU's own <fb_memory_usage> is read: with MIG on, each <mig_device> has one
    too, and those are slices of the same memory.
    """
    try:
        root = ET.fromstring(text)  # noqa: S314  (nvidia-smi output from our own host)
    except ET.ParseError as e:
        raise ValueError(f"not nvidia-smi XML ({e}): {text[:200]!r}") from None
    if root.tag != "nvidia_smi_log":
        raise ValueError(f"not nvidia-smi XML: root element <{root.tag}>")
    gpus = []
    for g in root.findall("gpu"):
        mem = g.find("fb_memory_usage")
        if mem is None:
            raise ValueError(f"GPU {g.get('id')}: no <fb_memory_usage>")
        procs = []
        for p in g.findall("processes/process_info"):
            used = _text(p, "used_memory")
            procs.append(
                GpuProcess(
                    pid=int(_text(p, "pid")),
                    name=_text(p, "process_name"),
                    type=_text(p, "type"),
                    used_memory_mib=None if used == "N/A" else _mib(used, "used_memory"),
                )
            )
        gpus.append(
            Gpu(
                bus_id=g.get("id", ""),
                name=_text(g, "product_name"),
                persistence_mode=_text(g, "persistence_mode"),
                memory_total_mib=_mib(mem.findtext("total"), "fb_memory_usage/total"),
                memory_used_mib=_mib(mem.findtext("used"), "fb_memory_usage/used"),
                memory_free_mib=_mib(mem.findtext("free"), "fb_memory_usage/free"),
                processes=tuple(procs),
            )
        )
    if not gpus:
        raise ValueError("nvidia-smi XML lists no GPU")
    return SmiReport(driver_version=_text(root, "driver_version"), gpus=tuple(gpus))


# The loaded module's first line, proprietary and open flavours (docs/facts.md, "NVIDIA packaging"):
#   NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.173.02  Tue Jun 23 ...
#   NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build ...
_NVRM = re.compile(r"^NVRM version: .*?Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)\s")


def kernel_module_version(proc_version: str) -> str:
    """/proc/driver/nvidia/version → the version of the kernel module that is loaded."""
    m = _NVRM.match(proc_version)
    if not m:
        raise ValueError(f"not /proc/driver/nvidia/version: {proc_version[:200]!r}")
    return m.group(1)


def is_open_module(proc_version: str) -> bool:
    kernel_module_version(proc_version)  # recognise it first
    return "Open Kernel Module" in proc_version.splitlines()[0]


_USERSPACE = (
    re.compile(r"<driver_version>\s*([0-9.]+)\s*</driver_version>"),  # nvidia-smi -q -x
    re.compile(r"Driver Version:\s*([0-9.]+)"),  # nvidia-smi's summary table
    # When userspace and the loaded module differ, NVML refuses to start and names its
    # own version instead (major.minor only).
    re.compile(r"NVML library version:\s*([0-9.]+)"),
)


def userspace_driver_version(smi_output: str) -> str:
    """What nvidia-smi printed (XML, summary, or the NVML mismatch error) → its driver version."""
    for pattern in _USERSPACE:
        m = pattern.search(smi_output)
        if m:
            return m.group(1)
    raise ValueError(f"no driver version in nvidia-smi output: {smi_output[:200]!r}")


def nvml_mismatch(smi_output: str) -> bool:
    return "Driver/library version mismatch" in smi_output


def branch(version: str) -> str:
    """580.95.05 → 580: NVIDIA's driver branch, what a pin names."""
    if not re.fullmatch(r"\d+(?:\.\d+){0,2}", version):
        raise ValueError(f"not a driver version: {version!r}")
    return version.split(".", 1)[0]


@dataclass(frozen=True)
class Offload:
    offloaded: int
    total: int

    @property
    def complete(self) -> bool:
        return self.offloaded == self.total


# llama.cpp's llama-model.cpp: "%s: offloaded %d/%d layers to GPU" from load_tensors
# (llm_load_tensors before early 2025). Logged only at -lv 4 by llama-server at the pin.
_OFFLOADED = re.compile(r"\b(?:llm_)?load_tensors: offloaded (\d+)/(\d+) layers to GPU")


def offload(log: str) -> Offload | None:
    """The last model load's `offloaded N/M layers to GPU` in a log, or None if it has none."""
    found = _OFFLOADED.findall(log)
    if not found:
        return None
    n, m = found[-1]
    return Offload(int(n), int(m))


@dataclass(frozen=True)
class Device:
    name: str  # CUDA0, Vulkan0, RPC[...]
    description: str


# common/arg.cpp at the pin: "Available devices:" then "  %s: %s (%zu MiB, %zu MiB free)",
# or "  (none)".
_DEVICE = re.compile(r"^  (\S+): (.*?)(?: \([^()]*MiB[^()]*\))?$")


def list_devices(output: str) -> list[Device]:
    """`llama-server --list-devices` → the backend devices it can use (backend logs skipped)."""
    lines = output.splitlines()
    try:
        start = lines.index("Available devices:")
    except ValueError:
        raise ValueError(f"not --list-devices output: {output[-300:]!r}") from None
    devices = []
    for line in lines[start + 1 :]:
        if line.strip() == "(none)":
            break
        m = _DEVICE.match(line)
        if not m:
            break
        devices.append(Device(m.group(1), m.group(2)))
    return devices


# ggml/src/ggml-cuda/CMakeLists.txt at the pin prints this at configure time [read].
_ARCHS = re.compile(r"Using CMAKE_CUDA_ARCHITECTURES=(\S*)")


def cuda_architectures(configure_log: str) -> list[str]:
    """A CUDA build's configure log → the architectures it compiled, e.g. ['80'].

    '-real' and '-virtual' suffixes are dropped: either kind runs on that architecture.
    """
    m = _ARCHS.search(configure_log)
    if not m:
        raise ValueError("the configure log names no CUDA architectures (not a CUDA build?)")
    return [re.sub(r"-(real|virtual)$", "", a) for a in m.group(1).split(";") if a]


def compute_capability_arch(compute_cap: str) -> str:
    """nvidia-smi's compute_cap (8.0) → CMake's architecture number (80)."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", compute_cap)
    if not m:
        raise ValueError(f"not a compute capability: {compute_cap!r}")
    return m.group(1) + m.group(2)
