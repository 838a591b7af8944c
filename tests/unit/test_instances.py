"""llamahost/instances.py: how many llama-servers a host runs, and each one's port, GPU,
CPUs and threads. Pure."""

from __future__ import annotations

import dataclasses

import pytest

from llamahost import instances as inst
from llamahost import render
from llamahost.checks import ConfigError
from llamahost.spec import resolve_host


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3", (0, 1, 2, 3)), ("0-1,48-49", (0, 1, 48, 49)), ("7", (7,)), ("", ())],
)
def test_cpulists_read_and_written_as_the_kernel_does(text: str, cpus: tuple[int, ...]) -> None:
    assert inst.parse_cpulist(text) == cpus
    assert inst.format_cpulist(cpus) == text


def test_topology_keeps_gpus_in_bus_order_and_drops_nvswitches() -> None:
    lines = [
        "gpu 0000:90:1c.0 0302 20b0 1 24-47",
        "gpu 0000:10:1c.0 0302 20b0 0 0-23",
        "gpu 0000:c1:00.0 0680 1af1 1 24-47",  # an NVSwitch: a bridge, not a GPU
        "gpu 0000:07:00.0 0300 2204 -1 ",  # no node known
        "nodes 2",
    ]
    topo = inst.parse_topology(lines)
    assert [g.address for g in topo.gpus] == ["0000:07:00.0", "0000:10:1c.0", "0000:90:1c.0"]
    assert [g.numa_node for g in topo.gpus] == [None, 0, 1]
    assert topo.numa_nodes == 2 and topo.pinned


@pytest.mark.parametrize(
    ("setting", "uses_gpu", "device", "gpus", "n"),
    [
        ("per-gpu", True, "CUDA0", 8, 8),
        ("per-gpu", True, "CUDA0", 1, 1),
        ("per-gpu", True, "CUDA0", None, 1),  # not read yet: the plan without the host
        ("per-gpu", False, None, 8, 1),  # a CPU profile on a GPU host
        ("per-gpu", True, "CUDA0,CUDA1", 2, 1),  # one server over both GPUs
        (3, False, None, 0, 3),
    ],
)
def test_count(setting: int | str, uses_gpu: bool, device: str | None, gpus: int | None,
               n: int) -> None:  # fmt: skip
    assert inst.count(setting, uses_gpu=uses_gpu, device=device, gpus=gpus) == n


def test_one_instance_is_the_single_server_layout() -> None:
    """A one-GPU host renders byte for byte what it rendered before instances existed."""
    one = inst.Topology((inst.GpuTopo("0000:07:00.0", "20b0", None, (0, 1)),), 1)
    spec = resolve_host("a100", {"llama_profile": "balanced"})
    resolved = dataclasses.replace(spec, topology=one)
    (x,) = resolved.instances
    assert (x.index, x.unit, x.port, x.gpu, x.cpus) == (None, "llama-server.service", 8080,
                                                        None, ())  # fmt: skip
    assert render.unit(resolved, 8) == render.unit(spec, 8)
    assert "ExecStart=" in render.unit(resolved, 8) and "%i" not in render.unit(resolved, 8)
    assert x.server("a100") == "a100"


def test_cpu_instances_share_the_hosts_cpus_unpinned() -> None:
    spec = resolve_host("c", {"llama_profile": "cpu-demo", "llama_instances": 2})
    xs = spec.instances
    assert [(x.unit, x.port, x.share, x.numa_node) for x in xs] == [
        ("llama-server@0.service", 8080, 2, None),
        ("llama-server@1.service", 8081, 2, None),
    ]
    assert [x.server("c") for x in xs] == ["c:0", "c:1"]
    dropin = render.instance_dropin(spec, xs[1], 8)
    assert "--port 8081" in dropin and "--threads 4" in dropin
    assert "CPUAffinity" not in dropin and "CUDA_VISIBLE_DEVICES" not in dropin


def test_one_numa_node_gets_no_pinning() -> None:
    gpus = tuple(inst.GpuTopo(f"0000:0{i}:00.0", "20b0", 0, (0, 1, 2, 3)) for i in range(2))
    spec = resolve_host("g", {"llama_profile": "balanced"})
    xs = dataclasses.replace(spec, topology=inst.Topology(gpus, 1)).instances
    assert [(x.gpu, x.numa_node, x.cpus) for x in xs] == [(0, None, ()), (1, None, ())]


def test_a_device_list_with_several_instances_is_refused() -> None:
    with pytest.raises(ConfigError, match="llama_instances = 2: llama_device 'CUDA0,CUDA1'"):
        resolve_host("g", {"llama_profile": "balanced", "llama_device": "CUDA0,CUDA1",
                           "llama_instances": 2})  # fmt: skip


def test_instance_ports_past_65535_are_refused() -> None:
    with pytest.raises(ConfigError, match="past 65535"):
        resolve_host("c", {"llama_profile": "cpu-demo", "llama_instances": 4,
                           "llama_port": 65534})  # fmt: skip


def test_bench_targets_each_instance_and_combines_them_into_the_host() -> None:
    from llamahost.bench import report, run
    from llamahost.bench.cli import instance_targets

    spec = resolve_host("c", {"llama_profile": "cpu-demo", "llama_instances": 2,
                              "ssh_hostname": "10.0.0.9"})  # fmt: skip
    target = run.Target("c", "http://10.0.0.9:8080", "tiny", spec.cfg, "k")
    ts = instance_targets(spec, {}, target)
    assert [(t.host, t.url) for t in ts] == [("c:0", "http://10.0.0.9:8080"),
                                             ("c:1", "http://10.0.0.9:8081")]  # fmt: skip
    single = resolve_host("s", {"llama_profile": "cpu-demo"})
    assert instance_targets(single, {}, target) == []

    def rep(host: str, ttft: float, tps: float, errors: int) -> dict[str, object]:
        level = {"concurrency": 2, "isl": 64, "osl": 32, "requests": 10, "errors": errors,
                 "ttft_p95_ms": ttft, "tps_total": tps, "tps_user_p50": tps / 2,
                 "req_s": 1.0, "error_kinds": {"HTTP 503": errors} if errors else {}}  # fmt: skip
        return {"host": host, "profile": {"name": "cpu-demo"}, "levels": [level]}

    host = report.combine("c", [rep("c:0", 40.0, 100.0, 0), rep("c:1", 90.0, 80.0, 1)])
    (lv,) = host["levels"]
    assert host["host"] == "c" and host["instances"] == ["c:0", "c:1"]
    assert (lv["concurrency"], lv["requests"], lv["errors"]) == (4, 20, 1)
    assert (lv["tps_total"], lv["req_s"], lv["ttft_p95_ms"], lv["tps_user_p50"]) == (
        180.0, 2.0, 90.0, 40.0,
    )  # fmt: skip
    assert lv["error_kinds"] == {"HTTP 503": 1}


def test_the_runtime_api_takes_instance_server_names_and_nothing_looser() -> None:
    from llamahost.gateway import haproxy as hx

    assert hx.set_state("gpu-1:3", "drain") == "set server llama/gpu-1:3 state drain"
    assert hx.set_maxconn("gpu-1:3", 8) == "set maxconn server llama/gpu-1:3 8"
    for bad in ("gpu-1:x", "gpu 1", "gpu-1:0:1", "gpu-1:"):
        with pytest.raises(ValueError):
            hx.set_state(bad, "ready")
