"""The driver a host already has: what runs (the loaded module, the module file modprobe
would load), which source and flavour its packages come from, which are held, and which
installed packages a move to another branch, flavour, module kind or source must replace.

Decisions are made from what runs, not from missing package names: a host whose running
driver already is the pinned branch and flavour from an acceptable source is kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llamahost.gpu.host import LoadedDriver

# NVIDIA-only package names on Ubuntu (NVIDIA's CUDA repository): Canonical's archive has no
# cuda-drivers, nvidia-open or pinning packages.
_NVIDIA_ONLY = re.compile(r"(cuda-drivers|nvidia-open|nvidia-driver-pinning)(-[0-9]+)?")
# Canonical's driver versions carry the release they were built for ("580.95.05-0ubuntu0
# .24.04.2"); NVIDIA's Ubuntu repository's do not ("580.105.08-0ubuntu1").
_CANONICAL_VERSION = re.compile(r"-[0-9]+ubuntu[0-9]+\.[0-9]{2}\.[0-9]{2}")
# Driver packages: what a move may replace. Container tools, fabric manager, settings and
# the distributions' CUDA toolkits share the prefix but are no part of the driver.
_DRIVER = re.compile(
    r"(nvidia-|libnvidia-|linux-(modules|objects|signatures)-nvidia-|cuda-drivers|libcuda)"
)
_NOT_DRIVER = re.compile(
    r"(nvidia-container|libnvidia-container|nvidia-fabricmanager|libnvidia-nscq|"
    r"nvidia-settings|nvidia-prime|nvidia-modprobe|nvidia-cuda-|nvidia-driver-pinning-)"
)
# Packages of one flavour or one kind of kernel module (Canonical's and NVIDIA's names).
# Not linux-signatures-nvidia-<ABI>: one package per kernel ABI, shared by every branch
# and flavour built for it (each linux-modules-nvidia-<b>-server[-open]-<ABI> depends on
# it `(= version)`, with its own linux-objects-nvidia-<b>-server[-open]-<ABI>: recorded
# `apt-cache show` output, docs/gpu-stack.md#package-relations); it carries no "open".
_KERNEL_KIND = re.compile(
    r"(linux-(modules|objects)-nvidia-|nvidia-headless-|nvidia-dkms-|"
    r"nvidia-kernel-source-|nvidia-driver-[0-9]|nvidia-kernel-(open-)?dkms)"
)
# Which packages belong to one kind of kernel module, from the relations of Canonical's
# control data (canonical/nvidia-graphics-drivers, branch 580-server, debian/control, read
# at a65eb85; the same in 580-server-noble and 535-server-noble): nvidia-dkms-* and the
# metapackages that depend on it (nvidia-headless-<b>-server*, the full
# nvidia-driver-<b>-server*) are DKMS's; linux-{modules,objects,signatures}-nvidia-* (from
# linux-restricted-modules) are the precompiled path's. Shared by both, never purged for a
# change of kind: nvidia-headless-no-dkms-* (DKMS's nvidia-headless-* depends on it) and
# nvidia-kernel-source-* (nvidia-headless-no-dkms-* depends on it, `(= version)`), with
# nvidia-kernel-common and the user space.
# tests/plan/test_gpu_relations_plan.py checks these rules against the Depends closures of
# both kinds' packages, for every modelled branch and flavour.
_PRECOMPILED_ONLY = re.compile(r"linux-(modules|objects|signatures)-nvidia-")
_DKMS_ONLY = re.compile(r"(nvidia-dkms-|nvidia-headless-[0-9]+|nvidia-driver-[0-9]+)")


def branch_in_name(name: str) -> str | None:
    """``libnvidia-compute-550-server`` → ``550``; NVIDIA's Debian names carry none, nor
    does ``linux-signatures-nvidia-<ABI>`` (shared by every branch: its ``161`` in
    ``5.15.0-161-generic`` is the kernel's)."""
    if name.startswith("linux-signatures-nvidia-"):
        return None
    m = re.search(r"(?<![0-9.])([0-9]{3})(?=-|$)", name)
    return m[1] if m else None


def is_driver_package(name: str) -> bool:
    return bool(_DRIVER.match(name)) and not _NOT_DRIVER.match(name)


@dataclass(frozen=True)
class HostDriver:
    """The driver found on the host. ``source`` is None when no driver package is installed."""

    source: str | None  # canonical | nvidia
    branch: str | None  # of the loaded module, else of the installed user space
    flavour: str | None  # open | proprietary: of the loaded module, else from the names
    kernel_modules: str | None  # precompiled | dkms
    loaded: LoadedDriver | None
    packages: tuple[str, ...]  # installed driver packages
    held: tuple[str, ...]  # those held

    @property
    def running(self) -> bool:
        return self.loaded is not None


SECURE_BOOT_EFIVAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def parse_secure_boot(lines: Iterable[str] | None) -> bool:
    """``mokutil --sb-state`` ("SecureBoot enabled"/"SecureBoot disabled") or the EFI
    variable's value byte (``efivar 1``); mokutil's word wins where both answer."""
    efivar = False
    for line in lines or []:
        words = line.split()
        if line.strip().lower() == "secureboot enabled":
            return True
        if line.strip().lower() == "secureboot disabled":
            return False
        if words[:1] == ["efivar"] and words[1:] == ["1"]:
            efivar = True
    return efivar


def parse_modinfo(lines: Iterable[str] | None) -> str | None:
    """``modinfo nvidia``'s filename line → the module's kind: ``dkms`` (built by DKMS,
    under updates/dkms) or ``precompiled`` (a package's file under kernel/)."""
    for line in lines or []:
        key, _, value = line.partition(":")
        if key.strip() == "filename" and value.strip().startswith("/"):
            return "dkms" if "/updates/dkms/" in value else "precompiled"
    return None


def host_driver(
    ubuntu: bool,
    kernel_release: str,
    installed: Mapping[str, Iterable[str]],
    holds: Mapping[str, bool],
    loaded: LoadedDriver | None,
    module_kind: str | None,
) -> HostDriver:
    """Classify the installed driver (see the module's docstring)."""
    names = sorted(n for n in installed if is_driver_package(n))
    if not names:
        return HostDriver(None, None, None, None, loaded, (), ())
    versions = {n: [re.sub(r"^[0-9]+:", "", v) for v in installed[n]] for n in names}
    canonical = ubuntu and not any(_NVIDIA_ONLY.fullmatch(n) for n in installed)
    canonical = canonical and any(
        n.endswith("-server") or _CANONICAL_VERSION.search(v) for n in names for v in versions[n]
    )
    source = "canonical" if canonical else "nvidia"
    branch = loaded.version.split(".")[0] if loaded else None
    if branch is None:
        userspace = [
            v.split(".")[0]
            for n in names
            for v in versions[n]
            if n.startswith(("libnvidia-compute", "libcuda", "nvidia-utils", "nvidia-smi"))
        ]
        branch = userspace[0] if userspace else None
    if loaded is not None:
        flavour: str | None = "open" if loaded.open else "proprietary"
    else:
        kinds = [n for n in names if _KERNEL_KIND.match(n)]
        flavour = ("open" if any("open" in n for n in kinds) else "proprietary") if kinds else None
    kind = module_kind
    if kind is None:
        abi = [n for n in names if n.startswith("linux-modules-nvidia-")]
        if any(n.endswith("-" + kernel_release) for n in abi):
            kind = "precompiled"
        elif any(_DKMS_ONLY.match(n) or n.endswith("-dkms") for n in names):
            kind = "dkms"
    return HostDriver(
        source,
        branch,
        flavour,
        kind,
        loaded,
        tuple(names),
        tuple(n for n in names if holds.get(n)),
    )


def stale_packages(
    ubuntu: bool,
    source: str,
    branch: str,
    flavour: str,
    kernel_modules: str,
    found: HostDriver,
    keep: Iterable[str],
) -> tuple[str, ...]:
    """Installed driver packages that the target driver replaces: another branch (by name,
    or by version where NVIDIA's names carry none), another flavour, the other kind of
    kernel module, or the other source. Purged in the same transaction that installs the
    target: apt does not remove held packages to resolve a conflict, and a package left
    behind (a DKMS module) would load again after the reboot."""
    keep = set(keep)
    return tuple(
        name
        for name in found.packages
        if name not in keep
        and _replaced(name, ubuntu, source, branch, flavour == "open", kernel_modules)
    )


def _replaced(
    name: str, ubuntu: bool, source: str, branch: str, open_: bool, kernel_modules: str
) -> bool:
    named = branch_in_name(name)
    # Branch-less names (NVIDIA's Debian packages, libcuda1) follow the target's
    # dependencies to the new branch: upgraded in the transaction, not removed.
    rules = (
        named is not None and named != branch,
        bool(_KERNEL_KIND.match(name)) and ("open" in name) != open_,
        kernel_modules == "precompiled" and bool(_DKMS_ONLY.match(name)),
        kernel_modules == "dkms" and bool(_PRECOMPILED_ONLY.match(name)),
        ubuntu
        and source == "canonical"
        and bool(_NVIDIA_ONLY.fullmatch(name) or (named is not None and "-server" not in name)),
        ubuntu and source == "nvidia" and "-server" in name,
    )
    return any(rules)
