"""The GPU stack's decisions, from recorded command output. Pure: no pyinfra here.

What the host says (``/etc/os-release``, ``lspci``, ``nvidia-smi``, ``/proc/modules``,
``/proc/driver/nvidia/version``, ``dpkg``) goes in as text; out come the distribution, the
GPUs, the exact driver packages for the distribution, the reboot decision and the CMake
arguments of the CUDA build. ``tasks/gpu.py`` turns them into operations.

Sources of the package names and file contents (FACTS.md, "NVIDIA"):

* Ubuntu, Canonical's archive: the ``-server`` packages of a pinned branch, open kernel
  modules by default, precompiled and Canonical-signed (Secure Boot) where a
  ``linux-modules-nvidia-<branch>-server[-open]-<kernel flavour>`` package follows the
  host's kernel metapackage (the way ``ubuntu-drivers`` picks it), DKMS otherwise.
* Debian 12 (and Ubuntu on request): NVIDIA's CUDA repository through ``cuda-keyring``
  1.1-1, with the branch's ``nvidia-driver-pinning-<branch>`` package installed first so
  that unversioned packages cannot move to a newer branch.
* The CUDA toolkit always comes from NVIDIA's repository (the distributions ship older
  ones); it is for the build only.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llamahost.config import (
    PREFIX,
    ConfigError,
    FieldError,
    Invalid,
    Setting,
    boolean,
    check_rows,
    choice,
)

NVIDIA_VENDOR = "10de"
# PCI classes of a GPU: 0300 VGA controller, 0302 3D controller (A100, H100: no display).
GPU_PCI_CLASSES = frozenset({"0300", "0302"})

CUDA_KEYRING_VERSION = "1.1-1"
PINNING_PREFIX = "nvidia-driver-pinning-"  # NVIDIA's repository: one package per branch
CUDA_REPO_HOST = "developer.download.nvidia.com"

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

PERSISTENCED_UNIT = "nvidia-persistenced.service"
PERSISTENCED_DROPIN = "/etc/systemd/system/nvidia-persistenced.service.d/llamahost.conf"
NOUVEAU_BLACKLIST = "/etc/modprobe.d/blacklist-nouveau.conf"
# Rebuilt when the blacklist changes, with the tool the host boots with: initramfs-tools
# (Debian, Ubuntu) or dracut. Some hosts have neither (a container, an image that boots
# without an initramfs): nothing loads nouveau early there, so the blacklist alone is enough,
# and the run says so instead of failing on a missing command.
INITRAMFS_REBUILD = (
    "if command -v update-initramfs >/dev/null 2>&1; then update-initramfs -u; "
    "elif command -v dracut >/dev/null 2>&1; then dracut -f; "
    "else echo 'no initramfs tool (update-initramfs, dracut) on this host: "
    "no initramfs to rebuild, the blacklist applies from the next boot'; fi"
)
# Files whose names sort first so that they win over the CUDA repository's pin file.
CANONICAL_DRIVER_PIN = "/etc/apt/preferences.d/00-llamahost-nvidia-driver-from-canonical"

# The packages a hold covers, as dpkg-query patterns: the driver's user space and its DKMS
# source. The precompiled kernel-module packages (linux-modules-nvidia-*) are left free so
# that they follow kernel updates; a held userspace keeps them on the same driver version.
HOLD_PATTERNS = ("nvidia-*", "libnvidia-*", "libcuda*", "firmware-nvidia-*")

# Minimum driver branch per CUDA major version (CUDA release notes: 12.x needs >= 525,
# 13.0 shipped with 580.65.06 and needs the 580 branch or newer).
CUDA_MIN_BRANCH = {"12": 525, "13": 580}


class GpuError(Exception):
    """A host that the GPU stack cannot handle; the message names the host."""


# ---------------------------------------------------------------- settings
def driver_branch(v: Any) -> str:
    # An int is what a YAML-minded inventory writes; the packages want the digits.
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not re.fullmatch(r"[1-9][0-9]{2,3}", v):
        raise Invalid('must be a driver branch in digits, e.g. "580" (not "580-server" or "r580")')
    return v


def cuda_version(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[1-9][0-9]?\.[0-9]{1,2}", v):
        raise Invalid('must be a CUDA major.minor version, e.g. "13.0"')
    return v


def cuda_architectures(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not re.fullmatch(r"[1-9][0-9]{1,2}(?:;[1-9][0-9]{1,2})*", v):
        raise Invalid(
            'must be CUDA architectures as numbers, e.g. "80" (A100) or "80;90"; '
            "unset: from the GPU's compute capability"
        )
    return v


GPU_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "gpu_stack",
        "auto",
        choice("auto", "on", "off"),
        "`auto`: driver, persistence mode, CUDA and a CUDA build when an NVIDIA GPU is found; "
        "`on`: also when none is found (staging, tests); `off`: never (CPU build).",
    ),
    Setting(
        "gpu_required",
        False,
        boolean,
        "Stop the run, before any change, when no NVIDIA GPU is found.",
    ),
    Setting(
        "driver_branch",
        "580",
        driver_branch,
        "NVIDIA driver branch, digits only (580: the long-term data-centre branch).",
    ),
    Setting(
        "driver_flavour",
        "open",
        choice("open", "proprietary"),
        "Kernel modules: `open` (NVIDIA's recommendation from Turing on) or `proprietary`.",
    ),
    Setting(
        "driver_source",
        "auto",
        choice("auto", "canonical", "nvidia"),
        "`auto`: Canonical's archive on Ubuntu, NVIDIA's CUDA repository on Debian; "
        "`canonical` (Ubuntu only) or `nvidia` to choose.",
    ),
    Setting(
        "driver_kernel_modules",
        "auto",
        choice("auto", "precompiled", "dkms"),
        "`auto`: Canonical's precompiled signed modules where the kernel has them, else DKMS; "
        "`precompiled` (Canonical only) or `dkms` to choose.",
    ),
    Setting(
        "cuda_version",
        "13.0",
        cuda_version,
        "CUDA toolkit for the build (`cuda-toolkit-13-0`, nvcc in /usr/local/cuda-13.0).",
    ),
    Setting(
        "cuda_architectures",
        None,
        cuda_architectures,
        "`CMAKE_CUDA_ARCHITECTURES`, e.g. `80`; unset: from the GPU's compute capability.",
    ),
    Setting(
        "gpu_reboot",
        True,
        boolean,
        "Allow the reboot a new driver or a loaded nouveau needs (never the controller).",
    ),
)

GPU_BY_KEY = {s.key: s for s in GPU_SETTINGS}
GPU_KEYS = tuple(PREFIX + s.key for s in GPU_SETTINGS)


@dataclass(frozen=True)
class GpuSettings:
    gpu_stack: str
    gpu_required: bool
    driver_branch: str
    driver_flavour: str
    driver_source: str
    driver_kernel_modules: str
    cuda_version: str
    cuda_architectures: str | None
    gpu_reboot: bool


def resolve_gpu(host_name: str, data: Mapping[str, Any]) -> GpuSettings:
    """Validate the GPU keys of a host's data; raise ConfigError listing every bad one.

    Unknown ``llama_*`` keys are reported by ``llamahost.config.resolve``, which must know
    ``GPU_KEYS``.
    """
    errors: list[FieldError] = []
    values = check_rows(GPU_SETTINGS, data, errors)
    if not errors:
        if values["gpu_required"] and values["gpu_stack"] == "off":
            errors.append(
                FieldError(
                    PREFIX + "gpu_required", True, "cannot be true with llama_gpu_stack 'off'"
                )
            )
        if values["driver_kernel_modules"] == "precompiled" and values["driver_source"] == "nvidia":
            errors.append(
                FieldError(
                    PREFIX + "driver_kernel_modules",
                    "precompiled",
                    "precompiled modules come from Canonical: use 'dkms' or 'auto' with "
                    "llama_driver_source 'nvidia'",
                )
            )
        need = CUDA_MIN_BRANCH.get(values["cuda_version"].split(".")[0])
        if need is not None and int(values["driver_branch"]) < need:
            errors.append(
                FieldError(
                    PREFIX + "driver_branch",
                    values["driver_branch"],
                    f"CUDA {values['cuda_version']} needs driver branch {need} or newer",
                )
            )
    if errors:
        raise ConfigError(host_name, errors)
    return GpuSettings(**values)


# ---------------------------------------------------------------- the distribution
@dataclass(frozen=True)
class Distribution:
    id: str  # os-release ID
    version_id: str
    codename: str
    cuda_repo: str  # directory of NVIDIA's CUDA repository

    @property
    def label(self) -> str:
        return f"{self.id.capitalize()} {self.version_id}"

    @property
    def ubuntu(self) -> bool:
        return self.id == "ubuntu"


SUPPORTED = (
    Distribution("ubuntu", "22.04", "jammy", "ubuntu2204"),
    Distribution("ubuntu", "24.04", "noble", "ubuntu2404"),
    Distribution("debian", "12", "bookworm", "debian12"),
)
# The kernel series each Ubuntu release ships (GA); a newer one is the HWE kernel.
UBUNTU_GA_KERNEL = {"22.04": "5.15", "24.04": "6.8"}
# dpkg --print-architecture → the CUDA repository's directory.
CUDA_REPO_ARCH = {"amd64": "x86_64"}


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): KEY=value lines, values optionally quoted in shell style."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        out[key] = words[0] if words else ""
    return out


def distribution(host: str, os_release: Mapping[str, str]) -> Distribution:
    for d in SUPPORTED:
        if os_release.get("ID") == d.id and os_release.get("VERSION_ID") == d.version_id:
            return d
    found = " ".join(f"{k}={os_release.get(k, '?')}" for k in ("ID", "VERSION_ID"))
    pretty = os_release.get("PRETTY_NAME")
    supported = ", ".join(d.label for d in SUPPORTED)
    raise GpuError(
        f"host {host!r}: unsupported distribution in /etc/os-release: {found}"
        f"{f' ({pretty})' if pretty else ''}; supported: {supported}. Nothing was changed."
    )


def cuda_repo_arch(host: str, arch: str) -> str:
    """The CUDA repository's directory for ``dpkg --print-architecture``."""
    if arch not in CUDA_REPO_ARCH:
        raise GpuError(
            f"host {host!r}: architecture {arch or '?'!r} (dpkg --print-architecture) has no "
            f"GPU stack here; supported: {', '.join(CUDA_REPO_ARCH)}. Nothing was changed."
        )
    return CUDA_REPO_ARCH[arch]


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
    for line in lines:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(SMI_FIELDS):
            return Smi("error", message=line)
        index, name, bus_id, version, persistence, cap, memory = cells
        mem = re.fullmatch(r"([0-9]+) MiB", memory)
        if not index.isdigit() or not re.fullmatch(r"[0-9]+\.[0-9]+", cap) or not mem:
            return Smi("error", message=line)
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
    if settings.gpu_required and not found.has_gpu:
        raise GpuError(
            f"host {host!r}: no NVIDIA GPU found (lspci, nvidia-smi) and llama_gpu_required "
            "is true. Nothing was changed."
        )
    return found.has_gpu or settings.gpu_stack == "on"


# ---------------------------------------------------------------- CUDA build
# Compute capability by PCI device id, for hosts without a driver yet (pci.ids and NVIDIA's
# CUDA GPU list). Only what this toolkit is likely to meet; others need the setting.
COMPUTE_CAPABILITY_BY_DEVICE = {
    "20b0": "8.0",  # A100 SXM4 40GB
    "20b2": "8.0",  # A100 SXM4 80GB
    "20b5": "8.0",  # A100 PCIe 80GB
    "20f1": "8.0",  # A100 PCIe 40GB
    "20b7": "8.0",  # A30
    "2236": "8.6",  # A10
    "27b8": "8.9",  # L4
    "26b9": "8.9",  # L40S
    "2330": "9.0",  # H100 SXM5 80GB
    "2331": "9.0",  # H100 PCIe
    "1eb8": "7.5",  # T4
}


def architectures(host: str, settings: GpuSettings, found: Probe) -> str:
    """``CMAKE_CUDA_ARCHITECTURES``: the setting, else every GPU's compute capability.

    Always explicit: the build may run before the new driver is loaded, when CMake's
    ``native`` would see no GPU.
    """
    if settings.cuda_architectures:
        return settings.cuda_architectures
    caps = {g.compute_cap for g in found.smi.gpus}
    if not caps:
        unknown = sorted({g.device_id for g in found.pci} - set(COMPUTE_CAPABILITY_BY_DEVICE))
        if unknown or not found.pci:
            what = f"PCI device {', '.join('10de:' + d for d in unknown)}" if unknown else "no GPU"
            raise GpuError(
                f"host {host!r}: cannot tell the CUDA architecture ({what}, no driver yet): "
                'set llama_cuda_architectures, e.g. "80" for A100. Nothing was changed.'
            )
        caps = {COMPUTE_CAPABILITY_BY_DEVICE[g.device_id] for g in found.pci}
    return ";".join(sorted((c.replace(".", "") for c in caps), key=int))


def toolkit_package(cuda: str) -> str:
    return "cuda-toolkit-" + cuda.replace(".", "-")


def nvcc_path(cuda: str) -> str:
    return f"/usr/local/cuda-{cuda}/bin/nvcc"


def cuda_cmake_args(archs: str, cuda: str) -> tuple[str, ...]:
    # nvcc is named because the toolkit does not put itself on PATH.
    return (
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
        f"-DCMAKE_CUDA_COMPILER={nvcc_path(cuda)}",
    )


# ---------------------------------------------------------------- driver packages
@dataclass(frozen=True)
class DriverPlan:
    source: str  # canonical | nvidia
    flavour: str  # open | proprietary
    branch: str
    kernel_modules: str  # precompiled | dkms
    pinning: str | None  # installed first, alone (NVIDIA's repository)
    packages: tuple[str, ...]  # the driver, with kernel headers where DKMS builds
    why: str  # one line for the output: where the modules come from


def kernel_flavour(kernel_release: str) -> str:
    """``6.8.0-45-generic`` → ``generic``; ``6.1.0-27-cloud-amd64`` → ``cloud-amd64``."""
    m = re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+-[0-9]+(?:\.[0-9]+)?-(.+)", kernel_release)
    return m[1] if m else ""


def ubuntu_kernel_meta(release: str, kernel_release: str, installed: Iterable[str]) -> str | None:
    """The suffix of the kernel metapackage that the running kernel follows, as
    ubuntu-drivers finds it (``linux-image-<suffix>``; ``virtual`` is ``generic``).

    None when no installed metapackage fits the running kernel (a custom kernel) or two
    fit and the kernel series does not tell them apart.
    """
    flavour = kernel_flavour(kernel_release)
    if not flavour:
        return None
    metas = set()
    for name in installed:
        m = re.fullmatch(r"linux-image-((?![0-9])(?!unsigned-)(?!extra-)[a-z0-9.+-]+)", name)
        if m:
            metas.add(re.sub(r"^virtual", "generic", m[1]))
    fits = sorted(m for m in metas if m == flavour or m.startswith(flavour + "-"))
    if len(fits) <= 1:
        return fits[0] if fits else None
    series = ".".join(kernel_release.split(".")[:2])
    hwe = f"{flavour}-hwe-{release}"
    wanted = flavour if series == UBUNTU_GA_KERNEL.get(release) else hwe
    return wanted if wanted in fits else None


def _refuse(host: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(host, [FieldError(PREFIX + key, value, allowed)])


def driver_plan(
    host: str,
    dist: Distribution,
    settings: GpuSettings,
    kernel_release: str,
    installed: Iterable[str],
) -> DriverPlan:
    """The exact packages of the driver for this host."""
    installed = list(installed)
    branch, flavour = settings.driver_branch, settings.driver_flavour
    source = settings.driver_source
    if source == "auto":
        source = "canonical" if dist.ubuntu else "nvidia"
    if source == "canonical" and not dist.ubuntu:
        raise _refuse(
            host,
            "driver_source",
            "canonical",
            f"Canonical's packages are for Ubuntu; {dist.label} takes 'nvidia' or 'auto'",
        )
    headers = [f"linux-headers-{kernel_release}"]
    open_ = flavour == "open"

    if source == "canonical":
        meta = ubuntu_kernel_meta(dist.version_id, kernel_release, installed)
        modules = settings.driver_kernel_modules
        if modules == "auto":
            modules = "precompiled" if meta else "dkms"
        suffix = "-server-open" if open_ else "-server"
        utils = f"nvidia-utils-{branch}-server"  # nvidia-smi; no -open variant exists
        if modules == "precompiled":
            # The metapackage follows kernel updates; without one, the modules of the
            # running kernel's ABI (a rerun is needed after a kernel change).
            target = meta or kernel_release
            return DriverPlan(
                source,
                flavour,
                branch,
                modules,
                None,
                (
                    f"linux-modules-nvidia-{branch}{suffix}-{target}",
                    f"nvidia-headless-no-dkms-{branch}{suffix}",
                    utils,
                ),
                f"Canonical's precompiled signed modules for linux-image-{target}",
            )
        header_meta = [f"linux-headers-{meta}"] if meta else []
        return DriverPlan(
            source,
            flavour,
            branch,
            modules,
            None,
            (f"nvidia-headless-{branch}{suffix}", utils, *headers, *header_meta),
            f"DKMS builds the modules for {kernel_release}"
            + ("" if meta else " (no Canonical kernel metapackage matches it)"),
        )

    # NVIDIA's repository: DKMS only, the branch held by the pinning package.
    pinning = PINNING_PREFIX + branch
    if dist.ubuntu:
        # From 590 on, NVIDIA's Ubuntu packages drop the branch from their names [read:
        # NVIDIA driver installation guide, "Ubuntu 590 and later packages"].
        b = "" if int(branch) >= 590 else f"-{branch}"
        dkms = f"nvidia-dkms{b}-open" if open_ else f"nvidia-dkms{b}"
        driver: tuple[str, ...] = (
            f"libnvidia-compute{b}",
            dkms,
            f"nvidia-utils{b}",
            f"nvidia-compute-utils{b}",
            f"libnvidia-cfg1{b}",
        )
        meta = ubuntu_kernel_meta(dist.version_id, kernel_release, installed)
        header_meta = [f"linux-headers-{meta}"] if meta else []
    else:
        # Compute-only set [3P]; Debian's own archive calls its kernel package
        # nvidia-open-kernel-dkms, NVIDIA's repository nvidia-kernel-open-dkms.
        kernel = "nvidia-kernel-open-dkms" if open_ else "nvidia-kernel-dkms"
        driver = ("nvidia-driver-cuda", kernel, "nvidia-persistenced")
        flav = kernel_flavour(kernel_release)
        header_meta = [f"linux-headers-{flav}"] if flav else []
    return DriverPlan(
        "nvidia",
        flavour,
        branch,
        "dkms",
        pinning,
        (*driver, *headers, *header_meta),
        f"DKMS builds the modules for {kernel_release} (NVIDIA's repository)",
    )


def keyring_url(dist: Distribution, repo_arch: str) -> str:
    return (
        f"https://{CUDA_REPO_HOST}/compute/cuda/repos/{dist.cuda_repo}/{repo_arch}/{keyring_file()}"
    )


def keyring_file() -> str:
    return f"cuda-keyring_{CUDA_KEYRING_VERSION}_all.deb"


def other_pinning(plan: DriverPlan, installed: Iterable[str]) -> tuple[str, ...]:
    """Installed pinning packages of other branches, which the plan's must replace.

    Purged in the same apt transaction that installs the plan's: two branches' pins must
    not both stay, and they are held, and apt's resolver does not remove a held package to
    resolve a conflict even with --allow-change-held-packages (seen on the test host, whose
    stand-in pinning packages conflict with each other). A plain removal would leave the
    preference in place (a conffile).
    """
    if plan.pinning is None:
        return ()
    return tuple(
        sorted(
            name
            for name in installed
            if re.fullmatch(re.escape(PINNING_PREFIX) + "[0-9]+", name) and name != plan.pinning
        )
    )


def off_branch(plan: DriverPlan, installed: Mapping[str, Iterable[str]]) -> tuple[str, ...]:
    """Driver packages installed at a version of another branch.

    NVIDIA's Debian packages keep their names from branch to branch (the pinning package
    chooses the branch), so a package being installed does not mean it is on the branch.
    Kernel packages (linux-*) carry kernel versions and are left out.
    """
    stale = []
    for name in plan.packages:
        versions = list(installed.get(name, ()))
        if name.startswith("linux-") or not versions:
            continue
        if not any(re.sub(r"^[0-9]+:", "", v).startswith(plan.branch + ".") for v in versions):
            stale.append(name)
    return tuple(stale)


# ---------------------------------------------------------------- holds
def parse_package_states(lines: Iterable[str] | None) -> dict[str, bool]:
    """``dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n'`` → installed package: held."""
    out = {}
    for line in lines or []:
        words = line.split()
        if len(words) == 2 and words[0] in ("ii", "hi"):
            out[words[1]] = words[0] == "hi"
    return out


def hold_needed(states: Mapping[str, bool], plan: DriverPlan) -> bool:
    """Whether a hold must run: a driver package or the pinning package is not installed
    yet, or one is not held. The pinning package counts: after a branch move it is the one
    package new to the host while every driver package is still held."""
    wanted = {p for p in (*plan.packages, plan.pinning) if p and _held_kind(p)}
    return bool(wanted - set(states)) or not all(states.values())


def _held_kind(package: str) -> bool:
    return any(re.fullmatch(p.replace("*", ".*"), package) for p in HOLD_PATTERNS)


# ---------------------------------------------------------------- reboot
@dataclass(frozen=True)
class Reboot:
    needed: bool
    will: bool  # needed and allowed
    reasons: tuple[str, ...]
    blocked_by: str | None  # why a needed reboot does not happen

    @property
    def pending(self) -> bool:
        return self.needed and not self.will


def reboot_decision(
    found: Probe,
    plan: DriverPlan,
    installed: Mapping[str, Iterable[str]],
    settings: GpuSettings,
    target_is_controller: bool,
) -> Reboot:
    """A reboot only when the driver changes or nouveau holds the GPU; never the controller.

    "The driver changes": a package of the plan is not installed (a fresh host or a new
    branch or flavour) or is installed on another branch, or the loaded module is not the
    installed one (a mismatch, or a driver installed in an earlier run that never rebooted).
    """
    if not found.has_gpu:
        # llama_gpu_stack "on" without a GPU: no module to load, nothing to reboot for.
        return Reboot(False, False, (), None)
    reasons = []
    # Headers are for DKMS's next build; a new header package changes no loaded driver.
    driver = [p for p in plan.packages if not p.startswith("linux-headers-")]
    missing = [p for p in driver if p not in installed]
    if missing:
        reasons.append("the driver is installed or changed (" + ", ".join(missing) + ")")
    stale = off_branch(plan, installed)
    if stale:
        reasons.append(f"the driver moves to branch {plan.branch} (" + ", ".join(stale) + ")")
    if found.nouveau_loaded:
        reasons.append("nouveau is loaded")
    if not missing and not stale:
        if found.smi.state == "mismatch":
            reasons.append("the loaded kernel module and the driver's user space differ")
        elif found.smi.state in ("no-driver", "absent") and found.has_gpu:
            reasons.append("the driver is installed but its kernel module is not loaded")
        elif found.loaded and found.loaded.open != (plan.flavour == "open"):
            reasons.append("the loaded kernel module is not the chosen flavour")
    needed = bool(reasons)
    blocked = None
    if needed and target_is_controller:
        blocked = "the target is the machine running pyinfra"
    elif needed and not settings.gpu_reboot:
        blocked = "llama_gpu_reboot is false"
    return Reboot(needed, needed and blocked is None, tuple(reasons), blocked)


def same_machine(target_machine_id: str | None, controller_machine_id: str | None) -> bool:
    """Whether the target is the controller: both /etc/machine-id files say the same."""
    a, b = (target_machine_id or "").strip(), (controller_machine_id or "").strip()
    return bool(a) and a == b


# ---------------------------------------------------------------- verification
def check_ready(
    smi: Smi, device_nodes: Iterable[str], branch: str, expected_gpus: int
) -> list[str]:
    """What is wrong with a host that should serve from its GPUs now (empty: ready)."""
    if smi.state != "ok":
        return [f"nvidia-smi: {smi.message or smi.state}"]
    problems = []
    if len(smi.gpus) < max(expected_gpus, 1):
        problems.append(f"nvidia-smi lists {len(smi.gpus)} GPU(s), lspci {expected_gpus}")
    nodes = set(device_nodes)
    for node in ("/dev/nvidiactl", "/dev/nvidia-uvm"):
        if node not in nodes:
            problems.append(f"{node} is missing")
    for g in smi.gpus:
        if not g.driver_version.startswith(branch + "."):
            problems.append(f"GPU {g.index}: driver {g.driver_version}, not branch {branch}")
        if not g.persistence_mode:
            problems.append(f"GPU {g.index}: persistence mode is Disabled")
        if f"/dev/nvidia{g.index}" not in nodes:
            problems.append(f"/dev/nvidia{g.index} is missing")
    return problems


def unit_lines(gpu: bool) -> tuple[str, ...]:
    """The [Unit] lines llama-server's unit needs on the GPU path.

    The server starts after the persistence daemon, which holds the GPUs initialised and,
    through the drop-in, has made every device node the sandboxed server needs
    (``/dev/nvidiactl``, ``/dev/nvidia<N>``, ``/dev/nvidia-uvm``). ``Wants=`` starts the
    daemon at boot even where its unit is not enabled.
    """
    if not gpu:
        return ()
    return (f"After={PERSISTENCED_UNIT}", f"Wants={PERSISTENCED_UNIT}")
