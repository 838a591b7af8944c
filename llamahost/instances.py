"""How many llama-servers a host runs, and each one's unit, port, GPU, CPUs and threads.

``llama_instances`` is ``per-gpu`` (the default) or a number from 1 to 16:

- **One instance** (a CPU host, a one-GPU host, ``llama_instances: 1``, or a profile whose
  ``llama_device`` lists several GPUs for one server): exactly the single-server layout,
  unit ``llama-server.service``, the profile's port and device, the gateway server and the
  Prometheus target named after the host. Nothing about such a host changes with this
  module: a host deployed before it has nothing to migrate.
- **Several instances**: instances of the templated unit ``llama-server@.service``, one
  drop-in each (``llama-server@N.service.d/instance.conf``) with what differs: the port
  (``llama_port + N``), the GPU, the CPUs and memory policy, the threads. Instance N
  serves on GPU ``N mod G`` of the host's G GPUs in PCI bus order, as the only GPU it sees
  (``CUDA_VISIBLE_DEVICES``, with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so the number means the
  same GPU as in ``nvidia-smi``): llama.cpp then creates no CUDA context on the other GPUs,
  and the profile's ``--device CUDA0`` is that GPU. Its gateway server and Prometheus
  target are ``<host>:N``.

Pinning, on a host with more than one NUMA node: an instance's ``CPUAffinity=`` is its
GPU's ``local_cpulist`` from sysfs, ``NUMAPolicy=preferred`` with ``NUMAMask=`` the GPU's
``numa_node`` (preferred, not bind: the model's page cache is shared by the instances of
both sockets, and a node short of memory falls back rather than failing), and
``--threads auto`` is that CPU list's size divided among the instances on it. A host with
one NUMA node, or a GPU whose node sysfs does not know (-1), gets no pinning lines.

Pure: no pyinfra. The facts come from ``tasks/instances.py``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_INSTANCES = 16
PER_GPU = "per-gpu"
SINGLE_UNIT = "llama-server.service"
TEMPLATE_UNIT = "llama-server@.service"


def instance_unit(index: int) -> str:
    return f"llama-server@{index}.service"


# ---------------------------------------------------------------- the host's topology
@dataclass(frozen=True)
class GpuTopo:
    """One NVIDIA GPU as sysfs shows it, in PCI bus order."""

    address: str  # 0000:07:00.0
    device_id: str  # 4 hex digits (20b0: A100-SXM4-40GB)
    numa_node: int | None  # None where sysfs says -1 (one node, or not known)
    cpus: tuple[int, ...]  # local_cpulist


@dataclass(frozen=True)
class Topology:
    gpus: tuple[GpuTopo, ...] = ()
    numa_nodes: int = 1

    @property
    def pinned(self) -> bool:
        """Whether instances are pinned: more than one NUMA node."""
        return self.numa_nodes > 1


def parse_cpulist(text: str) -> tuple[int, ...]:
    """A kernel CPU list (``0-23,48-71``) as CPU numbers; empty for an empty list."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return tuple(sorted(set(out)))


def format_cpulist(cpus: Iterable[int]) -> str:
    """CPU numbers as the kernel writes a list: ranges, comma-separated (``0-23,48-71``)."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


NVIDIA_GPU_CLASSES = ("0300", "0302")  # VGA, 3D controller (NVSwitches are bridges: 0680)
_GPU_LINE = re.compile(
    r"^gpu (?P<addr>[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]) (?P<cls>[0-9a-f]{4}) "
    r"(?P<dev>[0-9a-f]{4}) (?P<node>-?[0-9]+) ?(?P<cpus>[0-9,-]*)$"
)


# What tasks.facts.GpuTopology prints: one "gpu ADDRESS CLASS DEVICE NUMA_NODE CPULIST" line
# per NVIDIA PCI function (sysfs, sorted by address: the PCI bus order), then "nodes N".
TOPOLOGY_COMMAND = (
    "for d in /sys/bus/pci/devices/*; do "
    '[ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] || continue; '
    'c=$(cut -c3-6 "$d/class"); '
    'echo "gpu ${d##*/} $c $(cut -c3-6 "$d/device") $(cat "$d/numa_node" 2>/dev/null || '
    'echo -1) $(cat "$d/local_cpulist" 2>/dev/null)"; done; '
    'echo "nodes $(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l)"'
)


def parse_topology(lines: Iterable[str]) -> Topology:
    """``TOPOLOGY_COMMAND``'s output: the GPUs (display and 3D controllers only) in PCI
    bus order, and the number of NUMA nodes (at least 1)."""
    gpus, nodes = [], 1
    for line in lines:
        line = line.strip().lower()
        if line.startswith("nodes "):
            nodes = max(1, int(line.split()[1]))
            continue
        m = _GPU_LINE.match(line)
        if not m or m["cls"] not in NVIDIA_GPU_CLASSES:
            continue
        node = int(m["node"])
        gpus.append(
            GpuTopo(m["addr"], m["dev"], node if node >= 0 else None, parse_cpulist(m["cpus"]))
        )
    return Topology(tuple(sorted(gpus, key=lambda g: g.address)), nodes)


# ---------------------------------------------------------------- the instances
@dataclass(frozen=True)
class Instance:
    """One llama-server of a host."""

    index: int | None  # None: the single-server layout
    port: int
    gpu: int | None  # its GPU, in PCI bus order (several instances on a GPU host only)
    numa_node: int | None  # NUMAMask=, when pinned
    cpus: tuple[int, ...]  # CPUAffinity=, when pinned (else empty)
    share: int  # instances sharing its CPUs (all the host's when not pinned)

    @property
    def unit(self) -> str:
        return SINGLE_UNIT if self.index is None else instance_unit(self.index)

    def server(self, host_server: str) -> str:
        """Its name as a gateway server and Prometheus target: the host's, or ``host:N``
        (``:`` is valid in HAProxy names and in no name the toolkit derives from a host,
        so no instance can take another host's name)."""
        return host_server if self.index is None else f"{host_server}:{self.index}"

    def threads(self, auto: bool, setting: int, cpu_count: int) -> int:
        """``--threads``: the setting, or with ``auto`` its CPUs divided among the
        instances that share them (the host's online CPUs for a single instance)."""
        if not auto:
            return setting
        return max(1, (len(self.cpus) or cpu_count) // self.share)


def count(setting: int | str, *, uses_gpu: bool, device: str | None, gpus: int | None) -> int:
    """How many instances: the number set, or with ``per-gpu`` one per GPU (one on a CPU
    profile, a profile with a device list for one server, or GPUs not counted yet)."""
    if isinstance(setting, int):
        return setting
    if not uses_gpu or not gpus or (device is not None and "," in device):
        return 1
    return gpus


def layout(
    setting: int | str,
    *,
    port: int,
    uses_gpu: bool,
    device: str | None,
    topology: Topology | None,
) -> tuple[Instance, ...]:
    """Every instance of a host. ``topology`` None: not read (the plan without the host);
    ``per-gpu`` then counts one instance, and nothing is pinned."""
    gpus = topology.gpus if topology is not None and uses_gpu else ()
    n = count(setting, uses_gpu=uses_gpu, device=device, gpus=len(gpus) if topology else None)
    if n == 1:
        return (Instance(None, port, None, None, (), 1),)
    pinned = topology is not None and topology.pinned
    out = []
    for i in range(n):
        g = i % len(gpus) if gpus else None
        topo = gpus[g] if g is not None else None
        node = topo.numa_node if topo is not None and pinned and topo.cpus else None
        cpus = topo.cpus if node is not None and topo is not None else ()
        out.append(Instance(i, port + i, g, node, cpus, 0))
    # The instances that share each CPU set (all of them when not pinned).
    shares = {x.index: sum(1 for y in out if y.cpus == x.cpus) for x in out}
    return tuple(dataclasses.replace(x, share=shares[x.index]) for x in out)


def per_gpu(instances: Iterable[Instance]) -> dict[int, list[Instance]]:
    """The instances of each GPU (several instances on a GPU host)."""
    out: dict[int, list[Instance]] = {}
    for x in instances:
        if x.gpu is not None:
            out.setdefault(x.gpu, []).append(x)
    return out
