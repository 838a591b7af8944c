"""The driver's packages for a distribution: source (Canonical's archive or NVIDIA's
repository), flavour, precompiled modules or DKMS, NVIDIA's pinning package, and holds."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llamahost.checks import PREFIX, ConfigError, FieldError
from llamahost.distro import UBUNTU_GA_KERNEL, Distribution
from llamahost.gpu.current import HostDriver, is_driver_package, stale_packages
from llamahost.gpu.host import GpuError
from llamahost.gpu.settings import GpuSettings

CUDA_KEYRING_VERSION = "1.1-1"
PINNING_PREFIX = "nvidia-driver-pinning-"  # NVIDIA's repository: one package per branch
CUDA_REPO_HOST = "developer.download.nvidia.com"

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

# The packages a hold covers, as dpkg-query patterns: the driver's user space and its DKMS
# source. The precompiled kernel-module packages (linux-modules-nvidia-*) are left free so
# that they follow kernel updates; a held userspace keeps them on the same driver version.
HOLD_PATTERNS = ("nvidia-*", "libnvidia-*", "libcuda*", "firmware-nvidia-*")


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
    # A move (another branch, flavour, kind of module or source): the installed packages
    # purged in the transaction that installs ``packages``, and the holds released for it.
    remove: tuple[str, ...] = ()
    unhold: tuple[str, ...] = ()
    kept: str | None = None  # why the driver that runs is kept as it is
    # A kept driver: what the plan adds to it (headers for DKMS's next build, user space
    # such as nvidia-smi), user space pinned ``name=version`` to the running driver's.
    adds: tuple[str, ...] = ()


def package_name(entry: str) -> str:
    """``nvidia-utils-580-server=580.95.05-0ubuntu0.24.04.2`` → ``nvidia-utils-580-server``."""
    return entry.split("=", 1)[0]


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


SECURE_BOOT_HELP = (
    "Under Secure Boot the kernel loads only signed modules, and a module DKMS builds is "
    "signed with a key the firmware does not know. Nothing was changed. Either run a kernel "
    "flavour for which Canonical publishes signed precompiled modules "
    "(linux-modules-nvidia-{branch}-server[-open]-<ABI>: generic, aws, azure, gcp, ...; "
    "apt-get update if the lists are old; the archive drops superseded kernels' modules, so "
    "boot the newest kernel first), or disable Secure Boot in the firmware, or enroll "
    "a machine-owner key by hand (mokutil --import /var/lib/shim-signed/mok/MOK.der, then a "
    "reboot at the console) and install the driver once by hand: a DKMS driver that loads "
    "is kept."
)


def driver_plan(
    host: str,
    dist: Distribution,
    settings: GpuSettings,
    kernel_release: str,
    installed: Iterable[str] | Mapping[str, Iterable[str]],
    *,
    found: HostDriver | None = None,
    secure_boot: bool = False,
    available: Iterable[str] | None = None,
) -> DriverPlan:
    """The exact packages of the driver for this host.

    ``found``: the driver the host has (what runs decides: a running driver of the pinned
    branch and flavour from the chosen source is kept with its kind of module).
    ``secure_boot``: DKMS is refused unless its module already runs. ``available``: the
    ``linux-modules-nvidia-*`` names in apt's lists; precompiled modules need the running
    kernel's exact ABI there (None: not known, the kernel metapackage decides).
    ``installed``: names, or names with their versions (``DebPackages``): with versions, a
    kept driver's added user space is pinned to the version that runs.
    """
    versions = dict(installed) if isinstance(installed, Mapping) else {}
    installed = list(installed)
    branch, flavour = settings.driver_branch, settings.driver_flavour
    source = settings.driver_source
    if source == "auto":
        # A host on NVIDIA's repository stays there: Canonical's package of the same branch
        # is usually older, and a switch is a downgrade and a reboot nobody asked for.
        stays = dist.ubuntu and found is not None and found.source == "nvidia"
        source = "canonical" if dist.ubuntu and not stays else "nvidia"
    runs = (
        found is not None
        and found.running
        and (found.source, found.branch, found.flavour) == (source, branch, flavour)
    )
    running_kind = found.kernel_modules if runs and found is not None else None
    plan = _packages(
        host, dist, settings, kernel_release, installed, source, running_kind, available
    )
    plan = _full_driver_for_headless(plan, installed)
    if secure_boot and plan.kernel_modules == "dkms" and running_kind != "dkms":
        raise GpuError(
            f"host {host!r}: Secure Boot is on and the driver would be built by DKMS "
            f"({plan.why}). " + SECURE_BOOT_HELP.format(branch=branch)
        )
    if found is None or not found.packages:
        return plan
    remove = stale_packages(
        dist.ubuntu, source, branch, flavour, plan.kernel_modules, found, plan.packages
    )
    if runs and not remove and running_kind == plan.kernel_modules and found.loaded:
        return _keep(plan, found.loaded.version, installed, versions)
    return dataclasses.replace(plan, remove=remove, unhold=found.held if remove else ())


def _keep(
    plan: DriverPlan, running: str, installed: list[str], versions: Mapping[str, Iterable[str]]
) -> DriverPlan:
    """The running driver kept: what the plan would add changes no loaded module. Kernel
    packages (headers, a modules metapackage) follow the kernel; user space (nvidia-smi's
    package, say) is pinned to the package version of the driver that runs, so that apt
    cannot bring a newer library that no longer matches the loaded module (NVML's
    "Driver/library version mismatch"). That version is the one the installed driver
    packages share (``580.95.05-0ubuntu0.24.04.2`` for a running 580.95.05)."""
    ours = Counter(
        v
        for name, vs in versions.items()
        if is_driver_package(name) and not name.startswith("linux-")
        for v in vs
        if v.split(":")[-1].startswith(running + "-")
    )
    pin = ours.most_common(1)[0][0] if ours else None
    packages, adds = [], []
    for p in plan.packages:
        if p in installed:
            packages.append(p)
            continue
        entry = f"{p}={pin}" if pin and not p.startswith("linux-") else p
        packages.append(entry)
        adds.append(entry)
    kept = (
        f"the running driver {running} is branch {plan.branch} {plan.flavour} from "
        f"{plan.source} ({plan.kernel_modules}): kept"
        + (f"; added without a reboot: {', '.join(adds)}" if adds else "")
    )
    return dataclasses.replace(plan, packages=tuple(packages), kept=kept, adds=tuple(adds))


def _full_driver_for_headless(plan: DriverPlan, installed: list[str]) -> DriverPlan:
    """Canonical's DKMS set is ``nvidia-headless-<b>-server[-open]``; a host installed with
    the full ``nvidia-driver-<b>-server[-open]`` (as several clouds' GPU images ship it)
    has every package of it without the headless metapackage itself: the full one depends
    on nvidia-dkms, nvidia-kernel-source, nvidia-kernel-common and the same user space
    directly (canonical/nvidia-graphics-drivers, 580-server, debian/control). It stands for
    the headless one, so that a running, correct driver installs nothing and never reboots."""
    if plan.source != "canonical" or plan.kernel_modules != "dkms":
        return plan
    suffix = "-server-open" if plan.flavour == "open" else "-server"
    headless, full = (
        f"nvidia-headless-{plan.branch}{suffix}",
        f"nvidia-driver-{plan.branch}{suffix}",
    )
    if headless in installed or full not in installed:
        return plan
    packages = tuple(full if p == headless else p for p in plan.packages)
    return dataclasses.replace(plan, packages=packages)


def _packages(
    host: str,
    dist: Distribution,
    settings: GpuSettings,
    kernel_release: str,
    installed: list[str],
    source: str,
    running_kind: str | None,
    available: Iterable[str] | None,
) -> DriverPlan:
    branch, flavour = settings.driver_branch, settings.driver_flavour
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
        suffix = "-server-open" if open_ else "-server"
        abi = f"linux-modules-nvidia-{branch}{suffix}-{kernel_release}"
        # Precompiled modules load only on the kernel ABI they were built for: the running
        # kernel's own package must be in apt's lists, whatever the metapackage says.
        # (Lists not read: the metapackage decides, as ubuntu-drivers does.)
        known = None if available is None else abi in set(available)
        if modules == "auto":
            # The kind that runs is kept; otherwise precompiled where they exist.
            has = bool(meta) if known is None else known
            modules = running_kind or ("precompiled" if has else "dkms")
        elif modules == "precompiled" and known is False:
            raise GpuError(
                f"host {host!r}: llama_driver_kernel_modules is 'precompiled' but apt's lists "
                f"have no {abi} for the running kernel {kernel_release}. Nothing was "
                "changed. Run a kernel flavour Canonical builds NVIDIA modules for, or "
                "apt-get update if the lists are old, or choose 'dkms' (not under Secure Boot)."
            )
        utils = f"nvidia-utils-{branch}-server"  # nvidia-smi; no -open variant exists
        if modules == "precompiled":
            # The metapackage follows kernel updates; without one, the modules of the
            # running kernel's ABI (a rerun is needed after a kernel change).
            target = meta or kernel_release
            # With the metapackage, the running ABI's own package too: the metapackage
            # follows the archive's newest kernel, which may not be the one that boots.
            own = (abi,) if meta and known else ()
            return DriverPlan(
                source,
                flavour,
                branch,
                modules,
                None,
                (
                    f"linux-modules-nvidia-{branch}{suffix}-{target}",
                    *own,
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
    for name in map(package_name, plan.packages):
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
    names = (*map(package_name, plan.packages), plan.pinning)
    wanted = {p for p in names if p and _held_kind(p)}
    return bool(wanted - set(states)) or not all(states.values())


def _held_kind(package: str) -> bool:
    return any(re.fullmatch(p.replace("*", ".*"), package) for p in HOLD_PATTERNS)
