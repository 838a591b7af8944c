"""The GPU stack: NVIDIA driver, persistence mode, and the CUDA build's flags.

Every decision is made in ``llamahost/gpu.py`` from facts read before the run; this module
only turns them into operations, in the order a fresh host needs them:

  repository   cuda-keyring (CUDA is NVIDIA's everywhere); on Ubuntu with Canonical's
               driver an apt pin keeps NVIDIA's driver packages out
  persistence  the nvidia-persistenced drop-in, before the driver, so that the daemon the
               packages start already runs in persistence mode
  nouveau      blacklisted; the initramfs rebuilt when the blacklist changed, or before a
               reboot with nouveau loaded
  driver       NVIDIA's pinning package first (NVIDIA's repository), then the driver, held;
               a driver that runs on the pinned branch and flavour is kept, another one
               replaced in one apt transaction (unhold, install and purge, hold again);
               DKMS under Secure Boot is refused before any change
  reboot       only when the driver changed or nouveau is loaded, never on the controller
  verify       nvidia-smi answers on the branch, persistence mode Enabled on every GPU

A host already current plans no change at all.

The CUDA packages are not installed here: what a host needs depends on its part in the
fleet's build (tasks/llama_cpp.py, llamahost.build.cuda_packages): the toolkit only where
llama.cpp is compiled, the CUDA runtime and cuBLAS where a built tree is received.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinfra import logger
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import State
from pyinfra.connectors.local import LocalConnector
from pyinfra.context import host
from pyinfra.facts.apt import noninteractive_apt
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.server import KernelVersion
from pyinfra.operations import apt, files, python, server, systemd
from pyinfra.operations.util import any_changed

from llamahost import gpu, layout
from llamahost.checks import ConfigError
from llamahost.distro import Distribution, Unsupported, cuda_repo_arch
from llamahost.gpu import Reboot
from llamahost.spec import HostSpec
from tasks import facts, rolling
from tasks.facts import (
    DriverPackageStates,
    LoadedKernelModules,
    MachineId,
    NvidiaDeviceNodes,
    NvidiaModuleFile,
    NvidiaModulePackages,
    NvidiaModuleVersion,
    NvidiaPci,
    NvidiaSmi,
    SecureBoot,
)
from tasks.preflight import refuse

REBOOT_TIMEOUT = 900  # seconds: an 8-GPU host with much memory boots slowly


# Shell because apt-mark has no pyinfra operation, and the dependencies to hold are only
# known once the driver is installed. Planned only when something is unheld (a rerun of a
# held host runs nothing).
HOLD_COMMAND = (
    facts.HOLD_QUERY
    + " "
    + " ".join(f"'{p}'" for p in gpu.HOLD_PATTERNS)
    + " 2>/dev/null | awk '$1 == \"ii\" {print $2}' | xargs -r apt-mark hold"
)


# ---------------------------------------------------------------- the result
@dataclass(frozen=True)
class GpuResult:
    gpu: bool  # the GPU path is taken: driver, persistence, CUDA build
    cmake_args: tuple[str, ...]  # for llama_cpp.build(gpu_cmake_args=...)
    reboot: Reboot | None  # the decision; None on the CPU path
    ready: bool  # the GPUs serve by the end of this run (False: CPU path or reboot pending)
    memory_mib: tuple[int, ...] = ()  # each GPU's memory.total, where a driver answers now


def install(
    spec: HostSpec, dist: Distribution, controller_machine_id: str | None = None
) -> GpuResult:
    """Plan the GPU stack for this host; on the CPU path plan nothing and say why."""
    name = host.name
    conf = spec.gpu
    try:
        found = gpu.probe(
            host.get_fact(NvidiaPci),
            host.get_fact(NvidiaSmi),
            host.get_fact(LoadedKernelModules),
            host.get_fact(NvidiaModuleVersion),
        )
        if not gpu.gpu_path(name, conf, found):
            _say_cpu_path(spec)
            return GpuResult(gpu=False, cmake_args=(), reboot=None, ready=False)
        repo_arch = cuda_repo_arch(name, host.get_fact(DebArch) or "")
        archs = gpu.architectures(name, conf, found)
        installed = host.get_fact(DebPackages)
        kernel = host.get_fact(KernelVersion) or ""
        # What runs decides: the loaded module, its kind, the packages' source and holds.
        has = gpu.host_driver(
            dist.ubuntu,
            kernel,
            installed,
            gpu.parse_package_states(host.get_fact(DriverPackageStates)),
            found.loaded,
            gpu.parse_modinfo(host.get_fact(NvidiaModuleFile)),
        )
        plan = gpu.driver_plan(
            name,
            dist,
            conf,
            kernel,
            installed,
            found=has,
            secure_boot=host.get_fact(SecureBoot),
            available=host.get_fact(NvidiaModulePackages) if dist.ubuntu else None,
        )
        decision = gpu.reboot_decision(
            found, plan, installed, conf, _target_is_controller(controller_machine_id)
        )
    except (gpu.GpuError, Unsupported, ConfigError) as e:
        raise refuse(str(e)) from None

    logger.info(
        f"{host.print_prefix}GPU path: {len(found.pci)} NVIDIA GPU(s); driver {plan.branch} "
        f"{plan.flavour} from {plan.source} ({plan.kept or plan.why}); CUDA "
        f"{conf.cuda_version} for architectures {archs}"
    )
    if plan.remove:
        logger.info(
            f"{host.print_prefix}the installed driver is replaced: {', '.join(plan.remove)}"
        )
    repository(dist, repo_arch, plan)
    dropin, blacklist = configuration(rebuild=decision.needed and found.nouveau_loaded)
    driver = driver_packages(plan)
    # No CUDA toolkit here: step 4 installs it only where llama.cpp is compiled, and only
    # the CUDA runtime and cuBLAS where a built tree is received.
    ready = persistence_and_verify(spec, found, plan, decision, driver, dropin, blacklist)
    return GpuResult(
        gpu=True,
        cmake_args=gpu.cuda_cmake_args(archs, conf.cuda_version),
        reboot=decision,
        ready=ready,
        memory_mib=tuple(g.memory_total_mib for g in found.smi.gpus),
    )


# ---------------------------------------------------------------- the steps
def repository(dist: Distribution, repo_arch: str, plan: gpu.DriverPlan) -> None:
    """NVIDIA's CUDA repository through its keyring package; the apt pin on Canonical."""
    changed: list[OperationMeta] = []
    if dist.ubuntu:
        pin_src = "files/gpu/apt-preferences-driver-from-canonical"
        if plan.source == "canonical":
            changed.append(
                files.put(
                    name="Keep the driver on Canonical's packages (apt pin)",
                    src=pin_src,
                    dest=layout.CANONICAL_DRIVER_PIN,
                    mode="0644",
                )
            )
        else:
            changed.append(
                files.file(
                    name="No apt pin against NVIDIA's driver packages",
                    path=layout.CANONICAL_DRIVER_PIN,
                    present=False,
                )
            )
    files.directory(name="llamahost download cache", path=layout.CACHE_DIR, mode="0755")
    deb = f"{layout.CACHE_DIR}/{gpu.keyring_file()}"
    files.download(
        name=f"Download NVIDIA's cuda-keyring {gpu.CUDA_KEYRING_VERSION}",
        src=gpu.keyring_url(dist, repo_arch),
        dest=deb,
        mode="0644",
    )
    changed.append(
        apt.deb(name=f"NVIDIA's CUDA repository ({dist.cuda_repo}, cuda-keyring)", src=deb)
    )
    apt.update(name="Update apt lists (repository or pin changed)", _if=any_changed(*changed))


def configuration(rebuild: bool) -> tuple[OperationMeta, OperationMeta]:
    """The persistenced drop-in and the nouveau blacklist, with the reload and the
    initramfs rebuild each needs when it changed. ``rebuild``: a reboot is due with nouveau
    loaded, so the initramfs is rebuilt even where the blacklist was already in place (an
    initramfs made before it would load nouveau again at the next boot)."""
    dropin = files.put(
        name="nvidia-persistenced in persistence mode (drop-in)",
        src="files/gpu/nvidia-persistenced.conf",
        dest=layout.PERSISTENCED_DROPIN,
        mode="0644",
    )
    systemd.daemon_reload(name="Reload systemd units (persistenced drop-in)", _if=dropin.did_change)
    blacklist = files.put(
        name="Blacklist nouveau",
        src="files/gpu/blacklist-nouveau.conf",
        dest=layout.NOUVEAU_BLACKLIST,
        mode="0644",
    )
    server.shell(
        name="Rebuild the initramfs without nouveau",
        # Shell: no operation rebuilds an initramfs. Only when the blacklist changed, or
        # before a reboot with nouveau loaded.
        commands=[gpu.INITRAMFS_REBUILD],
        _if=lambda: rebuild or blacklist.did_change(),
    )
    return dropin, blacklist


def driver_packages(plan: gpu.DriverPlan) -> OperationMeta:
    installed = host.get_fact(DebPackages)
    if plan.pinning:
        # First and alone: otherwise unversioned packages can resolve to a newer branch.
        pin = f"Pin the driver to branch {plan.branch}"
        others = gpu.other_pinning(plan, installed)
        if others:
            # Shell: a deliberate move replaces the other branch's held pinning package in
            # one transaction ("name-" removes), which apt.packages cannot express. Purged:
            # its apt preference is a conffile, which a removal would leave in force.
            server.shell(
                name=pin,
                commands=[
                    noninteractive_apt(
                        "install --purge --allow-change-held-packages "
                        + " ".join([plan.pinning, *(o + "-" for o in others)])
                    )
                ],
            )
        else:
            apt.packages(
                name=pin, packages=[plan.pinning], extra_install_args="--allow-change-held-packages"
            )
    stale = gpu.off_branch(plan, installed)
    if stale or plan.remove:
        # One transaction for a move: holds released, the target installed (names that
        # apt.packages would see as installed are on another branch: NVIDIA's carry
        # none), the replaced packages purged ("name-"; a DKMS module left behind would
        # load again), and the holds taken again whether or not apt succeeded.
        # Pinning packages are left to the pin step (purged there with their hold).
        holds = {p for p, h in _states().items() if h and not p.startswith(gpu.PINNING_PREFIX)}
        held = sorted(holds | set(plan.unhold))
        unhold = f"apt-mark unhold {' '.join(held)} && " if held else ""
        names = list(plan.packages) if plan.remove else stale
        apt_cmd = noninteractive_apt(
            "install --purge --allow-change-held-packages --allow-downgrades "
            + " ".join([*names, *(p + "-" for p in plan.remove)])
        )
        return server.shell(
            name=f"Move the driver to branch {plan.branch} ({plan.flavour}, "
            f"{plan.kernel_modules}, {plan.source})",
            commands=[f"{unhold}{{ {apt_cmd}; rc=$?; {HOLD_COMMAND}; exit $rc; }}"],
        )
    driver = apt.packages(
        name=f"NVIDIA driver {plan.branch} ({plan.flavour}, {plan.kernel_modules})",
        packages=list(plan.packages),
        # A deliberate change of branch or flavour replaces held packages; unattended
        # upgrades still cannot.
        extra_install_args="--allow-change-held-packages",
    )
    if gpu.hold_needed(_states(), plan):
        server.shell(
            name="Hold the driver packages (no unattended driver/library mismatch)",
            commands=[HOLD_COMMAND],
        )
    return driver


def persistence_and_verify(
    spec: HostSpec,
    found: gpu.Probe,
    plan: gpu.DriverPlan,
    decision: gpu.Reboot,
    driver: OperationMeta,
    dropin: OperationMeta,
    blacklist: OperationMeta,
) -> bool:
    """Reboot when decided, then persistence mode on and checked. Returns whether the GPUs
    serve by the end of the run."""
    if decision.will and rolling.gateways():
        # Behind gateways, the reboot is drained first, a few hosts at a time.
        rolling.reboot(
            spec,
            "; ".join(decision.reasons),
            reboot_timeout=REBOOT_TIMEOUT,
            max_unavailable=rolling.max_unavailable(),
        )
    elif decision.will:
        server.reboot(
            name="Reboot into the NVIDIA driver: " + "; ".join(decision.reasons),
            reboot_timeout=REBOOT_TIMEOUT,
        )
    elif decision.pending:
        logger.warning(
            f"{host.print_prefix}a reboot is needed ({'; '.join(decision.reasons)}) but "
            f"{decision.blocked_by}: persistence mode and the GPU check wait. Reboot the "
            "host, then run the deploy again."
        )
        return False
    if not found.has_gpu:
        logger.warning(
            f"{host.print_prefix}llama_gpu_stack is 'on' and no GPU was found: driver "
            "installed, persistence mode and the GPU check skipped."
        )
        return False

    started = systemd.service(
        name="nvidia-persistenced enabled and running",
        service=layout.PERSISTENCED_UNIT,
        running=True,
        enabled=True,
    )
    changes = [driver, dropin, blacklist, started]
    if not decision.will:
        persistence_off = found.smi.state == "ok" and not all(
            g.persistence_mode for g in found.smi.gpus
        )
        restart_kwargs: dict[str, Any] = {}
        if not persistence_off:
            # A fresh start already reads the drop-in.
            restart_kwargs["_if"] = lambda: dropin.did_change() and not started.did_change()
        changes.append(
            systemd.service(
                name="Restart nvidia-persistenced (drop-in changed or persistence mode off)",
                service=layout.PERSISTENCED_UNIT,
                running=True,
                restarted=True,
                **restart_kwargs,
            )
        )
    verify_kwargs: dict[str, Any] = {}
    nodes: list[str] = host.get_fact(NvidiaDeviceNodes)
    if not decision.will and not gpu.check_ready(found.smi, nodes, plan.branch, len(found.pci)):
        # Facts already show a ready host: check again only if this run changes it.
        verify_kwargs["_if"] = any_changed(*changes)
    python.call(
        name="Verify: nvidia-smi on the driver branch, persistence mode Enabled on every GPU",
        function=_verify,
        branch=plan.branch,
        expected=len(found.pci),
        **verify_kwargs,
    )
    return True


def _verify(state: State, host: Host, branch: str, expected: int) -> None:
    # Runs on the host at execution time, after any reboot: facts read live.
    smi = gpu.parse_nvidia_smi(host.get_fact(NvidiaSmi))
    nodes: list[str] = host.get_fact(NvidiaDeviceNodes)
    problems = gpu.check_ready(smi, nodes, branch, expected)
    if problems:
        raise PyinfraError(f"host {host.name!r}: GPU not ready: " + "; ".join(problems))


# ---------------------------------------------------------------- helpers
def _states() -> dict[str, bool]:
    return gpu.parse_package_states(host.get_fact(DriverPackageStates))


def _target_is_controller(controller_machine_id: str | None) -> bool:
    if issubclass(host.connector_cls, LocalConnector):
        return True
    if controller_machine_id is None:
        path = Path("/etc/machine-id")
        controller_machine_id = path.read_text() if path.exists() else ""
    target: list[str] = host.get_fact(MachineId)
    return gpu.same_machine("".join(target), controller_machine_id)


def _say_cpu_path(spec: HostSpec) -> None:
    cfg = spec.cfg
    if spec.gpu.gpu_stack == "off":
        logger.info(f"{host.print_prefix}llama_gpu_stack is 'off': CPU path (CPU build).")
        return
    extra = (
        f"; profile {cfg.profile.name!r} expects a GPU (--device {cfg.profile.device})"
        if cfg.profile.uses_gpu
        else ""
    )
    logger.warning(
        f"{host.print_prefix}no NVIDIA GPU found (lspci, nvidia-smi): CPU path, no driver, "
        f"CPU build{extra}."
    )
