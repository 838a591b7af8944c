"""Plan tasks/gpu.py against pyinfra's @fake connector, fed with recorded command output.

A ``FakeHost`` describes a host the way its commands would (distribution, GPU, nouveau,
driver state, persistence mode). ``plan()`` puts it in a real pyinfra Inventory and State
(API mode), runs the real ``tasks.gpu.install`` as a deploy, so every fact is read through
the fake connector, then walks the operations in order the way execution would: ``_if``
conditions are evaluated against the operations before them, assuming each command
succeeds. What remains is exactly what a run would change.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

from pyinfra.api.command import FileUploadCommand
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State
from pyinfra.connectors.fake import FakeConnector
from pyinfra.connectors.util import CommandOutput
from pyinfra.context import ctx_host, ctx_state

from llamahost import gpu, layout
from llamahost.spec import HostSpec
from tasks import gpu as gpu_tasks
from tasks import preflight
from tasks.instances import resolved

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONTROLLER_ID = "c0ffee00c0ffee00c0ffee00c0ffee00"
TARGET_ID = "5eed5eed5eed5eed5eed5eed5eed5eed"

KERNELS = {
    "ubuntu-22.04": "5.15.0-161-generic",
    "ubuntu-24.04": "6.14.0-1015-aws",
    "debian-12": "6.1.0-27-cloud-amd64",
    "debian-11": "5.10.0-32-cloud-amd64",
}


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# Canonical's precompiled module packages that apt's lists offer (modelled: the names
# follow Canonical's linux-restricted-modules scheme, ABI and flavour packages per branch).
LRM_BRANCHES = ("535", "550", "570", "580", "590")


def lrm_names(kernel: str, meta: str, abi: bool = True) -> list[str]:
    """``apt-cache pkgnames linux-modules-nvidia-`` for a kernel: the flavour metapackages,
    and the running kernel's ABI packages unless ``abi`` is False (a kernel Canonical
    builds no NVIDIA modules for)."""
    names = []
    for branch in LRM_BRANCHES:
        for variant in ("-server", "-server-open"):
            names.append(f"linux-modules-nvidia-{branch}{variant}-{meta}")
            if abi:
                names.append(f"linux-modules-nvidia-{branch}{variant}-{kernel}")
    return names


KERNEL_META = {"ubuntu-22.04": "generic", "ubuntu-24.04": "aws"}


@dataclass(frozen=True)
class FakeHost:
    distro: str  # a KERNELS key
    gpu: bool = True
    nouveau: bool = False
    driver: str = "none"  # none | current | mismatch | foreign (a driver not ours: no
    # keyring, pin, blacklist or drop-in; the packaged persistenced)
    persistence: bool = True  # with a current driver: persistence mode Enabled
    dropin: bool | None = None  # our drop-in installed (default: with a current driver
    # in persistence mode; a current driver without it is the packaged unit's state)
    machine_id: str = TARGET_ID
    stack: str | None = None  # dpkg -l lines of the driver, instead of the gpu-stack fixture
    loaded: str | None = None  # /proc/driver/nvidia/version, instead of the 580 open fixture
    module_kind: str = "precompiled"  # where modinfo finds the nvidia module: or dkms
    secure_boot: bool = False
    abi_modules: bool = True  # apt's lists have precompiled modules for the running ABI
    canonical_pin: bool = True  # with a current driver on Ubuntu: our pin against NVIDIA's
    lspci: str = "lspci-nn-a100.txt"  # the GPUs lspci lists
    topology: str = "sysfs-gpu-topology-a100.txt"  # their NUMA nodes and CPUs (sysfs)

    @property
    def dropin_present(self) -> bool:
        if self.dropin is not None:
            return self.dropin
        return self.driver == "current" and self.persistence


def _stat(path: str, mode: str) -> str:
    return f"user=root group=root mode={mode} atime=1 mtime=1 ctime=1 size=1 '{path}'"


def _present_dir(path: str) -> dict[Any, Any]:
    return {re.compile(r"^! \(test -e " + re.escape(path) + r" \|\|"): _stat(path, "drwxr-xr-x")}


def _present_file(path: str, local: str) -> dict[Any, Any]:
    sha1 = hashlib.sha1((REPO / local).read_bytes()).hexdigest()  # noqa: S324 (pyinfra's sum)
    return {
        re.compile(r"^! \(test -e " + re.escape(path) + r" \|\|"): _stat(path, "-rw-r--r--"),
        f"sha1sum {path} ": f"{sha1}  {path}",
        **_present_dir(path.rsplit("/", 1)[0]),
    }


def _hold_states(dpkg_lines: str) -> list[str]:
    """dpkg-query's view of the driver packages, from the same dpkg -l lines."""
    out = []
    for line in dpkg_lines.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("ii", "hi"):
            name = words[1].split(":")[0]
            if any(re.fullmatch(p.replace("*", ".*"), name) for p in gpu.HOLD_PATTERNS):
                out.append(f"{words[0]}  {name}")
    return out


def responses(h: FakeHost) -> dict[Any, Any]:
    """The fake connector's answers: matchers in order, the first match wins."""
    ubuntu = h.distro.startswith("ubuntu")
    installed_stack = h.driver in ("current", "mismatch")
    foreign = h.driver == "foreign"
    # An unsupported distribution is refused on its os-release alone.
    dpkg = "" if h.distro == "debian-11" else fixture(f"dpkg-l-{h.distro}-base.txt")
    if installed_stack or foreign:
        dpkg += h.stack if h.stack is not None else fixture(f"dpkg-l-{h.distro}-gpu-stack.txt")
    if foreign:
        # A driver installed by someone else: the cuda-keyring and toolkit are ours.
        dpkg = "".join(
            ln
            for ln in dpkg.splitlines(True)
            if " cuda-keyring " not in ln and " cuda-toolkit" not in ln
        )
    r: dict[Any, Any] = {
        "os-release": fixture(f"os-release-{h.distro}.txt"),
        "lspci": fixture(h.lspci) if h.gpu else "",
        # tasks.facts.GpuTopology (sysfs): the GPUs' NUMA nodes and CPU lists.
        "numa_node": fixture(h.topology) if h.gpu else "nodes 1\n",
        "dpkg --print-architecture": "amd64",
        "uname -r": KERNELS[h.distro],
        "dpkg -l": dpkg,
        "dpkg-query -W": _hold_states(dpkg),
        "/etc/machine-id": h.machine_id,
    }
    modules = "proc-modules-nouveau.txt" if h.nouveau else "proc-modules-plain.txt"
    loaded = h.loaded or fixture("proc-driver-nvidia-version-580-open.txt")
    version = re.search(r"  ([0-9.]+)  ", loaded)
    assert version is not None
    if h.gpu and h.driver in ("current", "foreign"):
        modules = "proc-modules-nvidia.txt"
        r["/proc/driver/nvidia/version"] = loaded
        r["ls -1d /dev/nvidia"] = fixture("dev-nvidia.txt")
        # modinfo's view (modelled paths): DKMS installs under updates/dkms, Canonical's
        # precompiled packages under kernel/.
        kernel = KERNELS[h.distro]
        where = "updates/dkms" if h.module_kind == "dkms" else "kernel/nvidia-srv"
        r["modinfo nvidia"] = [
            f"filename:       /lib/modules/{kernel}/{where}/nvidia.ko",
            f"version:        {version[1]}",
        ]
    r["/proc/modules"] = fixture(modules)
    r["mokutil --sb-state"] = "SecureBoot enabled" if h.secure_boot else "SecureBoot disabled"
    if ubuntu:
        r["apt-cache pkgnames linux-modules-nvidia-"] = lrm_names(
            KERNELS[h.distro], KERNEL_META[h.distro], h.abi_modules
        )
    if installed_stack or foreign:
        smi = {
            "current": (
                "nvidia-smi-a100-persistence-on.txt"
                if h.persistence
                else "nvidia-smi-a100-persistence-off.txt"
            ),
            "foreign": (
                "nvidia-smi-a100-persistence-on.txt"
                if h.persistence
                else "nvidia-smi-a100-persistence-off.txt"
            ),
            "mismatch": "nvidia-smi-mismatch.txt",
        }[h.driver]
        text = fixture(smi).replace("580.95.05", version[1])
        r["nvidia-smi --query-gpu"] = text if h.gpu else fixture("nvidia-smi-no-driver.txt")
    if installed_stack:
        keyring = f"{layout.CACHE_DIR}/{gpu.keyring_file()}"
        r[f"case {keyring} in"] = [" Package: cuda-keyring", " Version: 1.1-1"]
        r.update(_present_dir(layout.CACHE_DIR))
        r.update(
            {re.compile(r"^! \(test -e " + re.escape(keyring) + " "): _stat(keyring, "-rw-r--r--")}
        )
        r.update(_present_file(layout.NOUVEAU_BLACKLIST, "files/gpu/blacklist-nouveau.conf"))
        if ubuntu and h.canonical_pin:
            r.update(
                _present_file(
                    layout.CANONICAL_DRIVER_PIN, "files/gpu/apt-preferences-driver-from-canonical"
                )
            )
    if installed_stack or foreign:
        running = "running" if h.gpu else "dead"
        r["--property SubState nvidia-persistenced.service"] = [
            "Id=nvidia-persistenced.service",
            f"SubState={running}",
        ]
    if h.dropin_present:
        r.update(_present_file(layout.PERSISTENCED_DROPIN, "files/gpu/nvidia-persistenced.conf"))
        enabled = "enabled"
    else:
        # Ubuntu's packaged unit has no [Install] section: "static" until the drop-in.
        enabled = "static" if (installed_stack or foreign) and ubuntu else "disabled"
    r["--property UnitFileState nvidia-persistenced.service"] = [
        "Id=nvidia-persistenced.service",
        f"UnitFileState={enabled}",
    ]
    return r


@dataclass(frozen=True)
class PlannedOp:
    name: str
    commands: tuple[str, ...]  # what would run; empty: no change
    conditional: bool  # carried an _if
    uploads: tuple[tuple[str, str], ...] = ()  # (dest, text) of uploads of rendered text


@dataclass
class Plan:
    ops: list[PlannedOp]
    result: gpu_tasks.GpuResult
    facts_read: list[str] = field(default_factory=list)

    def uploaded(self, dest: str) -> str:
        """The text an operation of the plan uploads to dest."""
        (text,) = [t for op in self.ops for d, t in op.uploads if d == dest]
        return text

    @property
    def changes(self) -> list[str]:
        return [op.name for op in self.ops if op.commands]

    def commands(self, name_prefix: str) -> tuple[str, ...]:
        (op,) = [op for op in self.ops if op.name.startswith(name_prefix)]
        return op.commands

    def has(self, name_prefix: str) -> bool:
        return any(op.name.startswith(name_prefix) for op in self.ops)


def plan(
    h: FakeHost,
    data: dict[str, Any] | None = None,
    controller_machine_id: str = CONTROLLER_ID,
    then: Callable[[HostSpec, gpu_tasks.GpuResult], object] | None = None,
) -> Plan:
    name = f"@fake/{h.distro}"
    host_data = {
        "fake_responses": responses(h),
        "fake_delay": 0,
        "fake_delay_jitter": 0,
        **(data or {}),
    }
    inventory = Inventory(([(name, host_data)], {}))  # type: ignore[no-untyped-call]
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    state.cwd = str(REPO)  # files/gpu/... are relative to the repository, as for the CLI
    connect_all(state)
    fake = inventory.get_host(name)
    results: list[gpu_tasks.GpuResult] = []

    def deploy() -> None:
        # As deploy.py: the spec (without the memory plan, which reads the Hub) and the
        # distribution from the preflight, then the stack.
        spec = resolved(preflight.validated_spec())
        results.append(gpu_tasks.install(spec, preflight.distribution(), controller_machine_id))
        if then is not None:  # later steps of deploy.py, e.g. the unit
            then(spec, results[-1])

    add_deploy(state, deploy)
    ops = []
    with ctx_state.use(state), ctx_host.use(fake):
        for op_hash in state.get_op_order():  # type: ignore[no-untyped-call]
            data_ = state.get_op_data_for_host(fake, op_hash)
            (op_name,) = state.op_meta[op_hash].names
            ifs = data_.global_arguments.get("_if")
            conditions = ifs if isinstance(ifs, list) else [ifs] if ifs else []
            # As execution does: an _if false means the operation yields nothing.
            run = all(c() for c in conditions)
            commands = list(data_.command_generator()) if run else []
            data_.operation_meta.set_complete(True, commands, CommandOutput([]))
            uploads = tuple(
                (c.dest, c.src.getvalue())
                for c in commands
                if isinstance(c, FileUploadCommand) and isinstance(c.src, StringIO)
            )
            ops.append(
                PlannedOp(op_name, tuple(str(c) for c in commands), bool(conditions), uploads)
            )
    assert isinstance(fake.connector, FakeConnector)
    return Plan(ops, results[0], list(fake.connector.executed_commands))
