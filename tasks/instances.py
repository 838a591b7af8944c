"""A served host's llama-server instances as its GPUs make them (llamahost/instances.py).

``llama_instances: per-gpu`` on a GPU profile needs the host's GPUs, and several instances
on GPUs need their NUMA nodes: both are read from sysfs (a fact, read before any change),
on the host itself or, for the gateways and monitoring hosts that list every instance of
the inventory, on the served host they describe. A CPU profile reads nothing: its count is
the setting's (``per-gpu`` is one).
"""

from __future__ import annotations

import dataclasses

from pyinfra.context import host

from llamahost import instances as inst
from llamahost.spec import HostSpec
from tasks.facts import GpuTopology


def resolved(spec: HostSpec) -> HostSpec:
    """``spec`` with the topology its instances follow."""
    if spec.topology is not None or not spec.serves:
        return spec
    if not spec.uses_gpu:
        return dataclasses.replace(spec, topology=inst.Topology())
    target = host if spec.name == host.name else host.inventory.get_host(spec.name)
    lines: list[str] = target.get_fact(GpuTopology)
    topology = inst.parse_topology(lines)
    return dataclasses.replace(spec, topology=topology)
