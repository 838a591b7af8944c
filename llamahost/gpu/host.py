"""What a host says about its GPUs, parsed: lspci, nvidia-smi, /proc/modules and
/proc/driver/nvidia/version in, a ``Probe`` out, and whether the host takes the GPU path."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from llamahost.gpu.settings import GpuSettings

NVIDIA_VENDOR = "10de"
# PCI classes of a GPU: 0300 VGA controller, 0302 3D controller (A100, H100: no display).
GPU_PCI_CLASSES = frozenset({"0300", "0302"})

# nvidia-smi's query; the order is the parser's.
SMI_FIELDS = (
    "index",
    "name",
    "pci.bus_id",
    "driver_version",
    "persistence_mode",
    "compute_cap",
    "memory.total",
)
SMI_QUERY = f"nvidia-smi --query-gpu={','.join(SMI_FIELDS)} --format=csv,noheader"


class GpuError(Exception):
    """A host that the GPU stack cannot handle; the message names the host."""


# ---------------------------------------------------------------- the GPUs
@dataclass(frozen=True)
class PciGpu:
    address: str  # [domain:]bus:device.function, as lspci prints it
    pci_class: str  # 4 hex digits
    device_id: str  # 4 hex digits
    name: str | None  # lspci's name, when the pci.ids database knows it


_LSPCI_NN = re.compile(
    r"^(?P<addr>[0-9a-fA-F:.]+) (?P<label>.*?) \[(?P<cls>[0-9a-fA-F]{4})\]: "
    r"(?P<name>.*) \[(?P<ven>[0-9a-fA-F]{4}):(?P<dev>[0-9a-fA-F]{4})\]"
)
# `lspci -n` and the sysfs fallback print the same shape: "07:00.0 0302: 10de:20b0 (rev a1)".
_LSPCI_N = re.compile(
    r"^(?P<addr>[0-9a-fA-F:.]+) (?P<cls>[0-9a-fA-F]{4}): "
    r"(?P<ven>[0-9a-fA-F]{4}):(?P<dev>[0-9a-fA-F]{4})"
)


def parse_lspci(lines: Iterable[str]) -> tuple[PciGpu, ...]:
    """NVIDIA GPUs in ``lspci -nn`` or ``lspci -n`` output; other devices are dropped."""
    gpus = []
    for line in lines:
        line = line.strip()
        m = _LSPCI_NN.match(line) or _LSPCI_N.match(line)
        if not m:
            continue
        vendor, cls = m["ven"].lower(), m["cls"].lower()
        if vendor != NVIDIA_VENDOR or cls not in GPU_PCI_CLASSES:
            continue
        name = m.groupdict().get("name")
        gpus.append(PciGpu(m["addr"], cls, m["dev"].lower(), name.strip() if name else None))
    return tuple(gpus)


@dataclass(frozen=True)
class SmiGpu:
    index: int
    name: str
    bus_id: str
    driver_version: str
    persistence_mode: bool
    compute_cap: str  # "8.0"
    memory_total_mib: int


@dataclass(frozen=True)
class Smi:
    """What ``nvidia-smi`` says: ``state`` is one of

    absent      no nvidia-smi (no driver installed)
    ok          the query answered; ``gpus`` lists every GPU
    mismatch    the loaded kernel module and the user space differ (a reboot fixes it)
    no-driver   nvidia-smi is installed but no NVIDIA kernel module answers
    error       anything else; ``message`` says what
    """

    state: str
    gpus: tuple[SmiGpu, ...] = ()
    message: str = ""


def parse_nvidia_smi(lines: Iterable[str] | None) -> Smi:
    lines = [ln.strip() for ln in (lines or []) if ln.strip()]
    if not lines:
        return Smi("absent")
    text = "\n".join(lines)
    if "Driver/library version mismatch" in text:
        return Smi("mismatch", message=lines[0])
    if "couldn't communicate with the NVIDIA driver" in text or "No devices were found" in text:
        return Smi("no-driver", message=lines[0])
    gpus = []
    asked = ", ".join(SMI_FIELDS)
    for line in lines:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < len(SMI_FIELDS):
            missing = ", ".join(SMI_FIELDS[len(cells) :])
            return Smi(
                "error",
                message=f"nvidia-smi answered {len(cells)} of the {len(SMI_FIELDS)} fields asked "
                f"({asked}) in {line!r}: no {missing}",
            )
        if len(cells) > len(SMI_FIELDS):
            return Smi(
                "error",
                message=f"nvidia-smi answered {len(cells)} fields, not the {len(SMI_FIELDS)} "
                f"asked ({asked}), in {line!r}",
            )
        index, name, bus_id, version, persistence, cap, memory = cells
        mem = re.fullmatch(r"([0-9]+) MiB", memory)
        bad = [
            field
            for field, ok in (
                ("index", index.isdigit()),
                ("compute_cap", re.fullmatch(r"[0-9]+\.[0-9]+", cap)),
                ("memory.total", mem),
            )
            if not ok
        ]
        if bad or not mem:
            return Smi("error", message=f"nvidia-smi: {', '.join(bad)} unreadable in {line!r}")
        gpus.append(
            SmiGpu(int(index), name, bus_id, version, persistence == "Enabled", cap, int(mem[1]))
        )
    return Smi("ok", tuple(gpus))


def parse_modules(lines: Iterable[str] | None) -> frozenset[str]:
    """Module names from ``/proc/modules`` (or ``lsmod``, whose header is skipped)."""
    names = set()
    for line in lines or []:
        words = line.split()
        if words and words[0] != "Module":
            names.add(words[0])
    return frozenset(names)


@dataclass(frozen=True)
class LoadedDriver:
    version: str
    open: bool


_NVRM = re.compile(r"NVRM version: NVIDIA UNIX (.*?)Kernel Module(?: for \S+)?\s+([0-9.]+)(?:\s|$)")


def parse_driver_version(lines: Iterable[str] | None) -> LoadedDriver | None:
    """The loaded kernel module, from ``/proc/driver/nvidia/version``."""
    for line in lines or []:
        m = _NVRM.match(line)
        if m:
            return LoadedDriver(m[2], "Open" in m[1])
    return None


@dataclass(frozen=True)
class Probe:
    pci: tuple[PciGpu, ...]
    smi: Smi
    modules: frozenset[str]
    loaded: LoadedDriver | None

    @property
    def has_gpu(self) -> bool:
        return bool(self.pci or self.smi.gpus)

    @property
    def nouveau_loaded(self) -> bool:
        return "nouveau" in self.modules


def probe(
    lspci: Iterable[str] | None,
    smi: Iterable[str] | None,
    modules: Iterable[str] | None,
    driver_version: Iterable[str] | None,
) -> Probe:
    return Probe(
        parse_lspci(lspci or []),
        parse_nvidia_smi(smi),
        parse_modules(modules),
        parse_driver_version(driver_version),
    )


def gpu_path(host: str, settings: GpuSettings, found: Probe) -> bool:
    """Whether this host takes the GPU path; raises when a required GPU is missing."""
    if settings.gpu_stack == "off":
        return False
    if found.smi.state == "error":
        # Read exactly or not at all: a short or garbled answer is not parsed around (its
        # GPUs' memory and architecture would be guessed).
        raise GpuError(f"host {host!r}: {found.smi.message}. Nothing was changed.")
    if settings.gpu_required and not found.has_gpu:
        raise GpuError(
            f"host {host!r}: no NVIDIA GPU found (lspci, nvidia-smi) and llama_gpu_required "
            "is true. Nothing was changed."
        )
    return found.has_gpu or settings.gpu_stack == "on"
