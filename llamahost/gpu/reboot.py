"""Whether the GPU stack reboots the host (only when the driver changed or nouveau holds
the GPU, never the controller), and whether a host is ready to serve from its GPUs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llamahost.gpu.driver import DriverPlan, off_branch, package_name
from llamahost.gpu.host import Probe, Smi
from llamahost.gpu.settings import GpuSettings


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
    # Neither does what a kept driver gains (its user space pinned to the running version).
    driver = [p for p in plan.packages if not p.startswith("linux-headers-")]
    missing = [package_name(p) for p in driver if p not in plan.adds]
    missing = [p for p in missing if p not in installed]
    if missing:
        reasons.append("the driver is installed or changed (" + ", ".join(missing) + ")")
    if plan.remove:
        # Another branch, flavour, kind of module or source replaces the installed one.
        reasons.append("the driver is replaced (" + ", ".join(plan.remove) + " removed)")
    stale = off_branch(plan, installed)
    if stale:
        reasons.append(f"the driver moves to branch {plan.branch} (" + ", ".join(stale) + ")")
    if found.nouveau_loaded:
        reasons.append("nouveau is loaded")
    if not missing and not stale and not plan.remove:
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
