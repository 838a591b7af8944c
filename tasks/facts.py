"""The facts the deploy reads from a host, beyond pyinfra's own.

Most return raw lines, parsed by the pure functions in llamahost (so unit tests cover the
parsing with recorded output).
"""

from __future__ import annotations

import shlex

from pyinfra.api.facts import FactBase

from llamahost import gpu, instances
from llamahost.render import ONLINE_CPUS


class OnlineCpus(FactBase[int | None]):
    """The host's online CPUs (``--threads auto``, the build's jobs); the compliance checks
    run the same command."""

    def command(self) -> str:
        return ONLINE_CPUS

    def process(self, output: list[str]) -> int | None:
        try:
            return int(output[0].strip())
        except (IndexError, ValueError):
            return None


class _Lines(FactBase[list[str]]):
    """Raw output lines, parsed by llamahost.gpu (so unit tests cover the parsing)."""

    abstract = True

    @staticmethod
    def default() -> list[str]:
        return []

    def process(self, output: list[str]) -> list[str]:
        return list(output)


class OsRelease(_Lines):
    def command(self) -> str:
        return "cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release"


class NvidiaPci(_Lines):
    """NVIDIA PCI devices. Without pciutils (minimal images) the same ``lspci -n`` shape is
    printed from sysfs, so a GPU is never missed for want of a package."""

    def command(self) -> str:
        return (
            "if command -v lspci >/dev/null 2>&1; then lspci -nn -d 10de:; else "
            "for d in /sys/bus/pci/devices/*; do "
            '[ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] && '
            'echo "${d##*/} $(cut -c3-6 "$d/class"): 10de:$(cut -c3-6 "$d/device")"; '
            "done; true; fi"
        )


class GpuTopology(_Lines):
    """The NVIDIA GPUs in PCI bus order with their NUMA node and CPU list, and the number of
    NUMA nodes, from sysfs (llamahost.instances.parse_topology)."""

    def command(self) -> str:
        return instances.TOPOLOGY_COMMAND


class LlamaUnitFiles(_Lines):
    """The llama-server unit files and instance drop-in directories installed."""

    def command(self) -> str:
        return (
            "cd /etc/systemd/system 2>/dev/null && "
            "ls -d llama-server.service llama-server@*.service llama-server@*.service.d "
            "2>/dev/null; true"
        )


class NvidiaSmi(_Lines):
    """The query's CSV, or nvidia-smi's error (a version mismatch, no driver loaded)."""

    def requires_command(self) -> str:
        return "nvidia-smi"

    def command(self) -> str:
        return f"{gpu.SMI_QUERY} 2>&1 || true"


class LoadedKernelModules(_Lines):
    def command(self) -> str:
        return "cat /proc/modules 2>/dev/null || true"


class NvidiaModuleVersion(_Lines):
    def command(self) -> str:
        return "cat /proc/driver/nvidia/version 2>/dev/null || true"


class NvidiaDeviceNodes(_Lines):
    def command(self) -> str:
        return "ls -1d /dev/nvidia* 2>/dev/null || true"


HOLD_QUERY = "dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n'"


class DriverPackageStates(_Lines):
    """Installed driver packages and whether each is held (``hi``) or not (``ii``)."""

    def command(self) -> str:
        patterns = " ".join(f"'{p}'" for p in gpu.HOLD_PATTERNS)
        return f"{HOLD_QUERY} {patterns} 2>/dev/null || true"


class SecureBoot(FactBase[bool]):
    """Whether Secure Boot is on: ``mokutil --sb-state``, else the EFI variable (its fifth
    byte; the first four are the variable's attributes). Neither: legacy BIOS, off."""

    def command(self) -> str:
        return (
            "mokutil --sb-state 2>/dev/null; "
            f"f={gpu.SECURE_BOOT_EFIVAR}; "
            '[ -r "$f" ] && echo "efivar $(od -An -tu1 -j4 -N1 "$f" | tr -d \' \')"; true'
        )

    def process(self, output: list[str]) -> bool:
        return gpu.parse_secure_boot(output)


class NvidiaModuleFile(_Lines):
    """The nvidia module modprobe would load for the running kernel (DKMS's or a
    package's), from ``modinfo``."""

    def command(self) -> str:
        return "modinfo nvidia 2>/dev/null | grep -E '^(filename|version):' || true"


class NvidiaModulePackages(_Lines):
    """Canonical's precompiled module packages in apt's lists (and installed ones)."""

    def command(self) -> str:
        return "apt-cache pkgnames linux-modules-nvidia- 2>/dev/null || true"


class MachineId(_Lines):
    def command(self) -> str:
        return "cat /etc/machine-id 2>/dev/null || true"


class UnitActiveState(FactBase[str]):
    """A unit's ActiveState: active, activating, failed, inactive..."""

    def command(self, unit: str) -> str:
        return f"systemctl show -p ActiveState --value {unit}"

    def process(self, output: list[str]) -> str:
        return "".join(output).strip()


class MountPoint(FactBase[str]):
    """The mount point of the filesystem that holds a path (or its nearest existing parent:
    on a first run the model directory is created later)."""

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f'p={p}; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; stat -c %m -- "$p"'

    def process(self, output: list[str]) -> str:
        return output[0].strip() if output else "/"


class KeyDigest(FactBase[str | None]):
    """sha256 of a key file's content without whitespace; None when there is no file.

    Compares keys on two hosts without reading them, whatever line ending each file has."""

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f"if [ -f {p} ]; then tr -d ' \\t\\r\\n' <{p} | sha256sum; fi"

    def process(self, output: list[str]) -> str | None:
        return output[0].split()[0] if output else None


class NftTable(FactBase[str | None]):
    """``nft -j list table inet TABLE``: the table as JSON; None when it is not loaded (or
    nft is not installed)."""

    def command(self, table: str) -> str:
        return f"nft -j list table inet {table} 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        text = "\n".join(output).strip()
        return text or None
