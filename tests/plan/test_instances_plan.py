"""A host with several GPUs, planned through the real tasks under pyinfra's @fake connector:
one llama-server per GPU, pinned to its NUMA node, each planned against its own GPU.

The machine is an AWS p4d.24xlarge (8x A100-SXM4-40GB, two sockets), **modelled** from
public recordings of lspci, nvidia-smi and nvidia-smi topo -m (tests/plan/fixtures/README.md
says where each was read): no such machine runs here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from llamahost import instances as inst
from llamahost import layout, render
from llamahost.checks import ConfigError
from llamahost.gateway import haproxy as hx
from llamahost.gpu import parse_nvidia_smi
from llamahost.memory import MIB, REFERENCE_SHAPES
from llamahost.monitoring import scrape
from llamahost.plan import check_gpu_memory, plan_host
from llamahost.plan import render as render_plan
from llamahost.spec import port_errors, resolve_host
from tasks import service
from tests.compliance import test_service
from tests.compliance.inventory import Target
from tests.compliance.live import Server
from tests.compliance.test_gpu_checks import FakeHost as RecordedHost
from tests.compliance.test_gpu_checks import Result
from tests.plan.fakehost import FIXTURES, FakeHost, plan

P4D = FakeHost("ubuntu-24.04", lspci="lspci-nn-p4d-8xa100.txt",
               topology="sysfs-gpu-topology-p4d-8xa100.txt")  # fmt: skip
CPUS = 96
ANY = "0.0.0.0"  # noqa: S104  (an address compared, never bound)
NODE0, NODE1 = "0-23,48-71", "24-47,72-95"
SEED = REFERENCE_SHAPES["unsloth/Seed-OSS-36B-Instruct-GGUF"]


def _topology() -> inst.Topology:
    return inst.parse_topology(
        (FIXTURES / "sysfs-gpu-topology-p4d-8xa100.txt").read_text().splitlines()
    )


def _p4d_spec(**data: Any) -> Any:
    spec = resolve_host("p4d", {"llama_profile": "balanced", **data})
    return dataclasses.replace(spec, topology=_topology())


def test_eight_instances_each_on_its_gpu_and_numa_node() -> None:
    """per-gpu (the default) on the 8-GPU two-socket host: the template and eight drop-ins,
    instance i on GPU i (PCI bus order) and port 8080 + i, pinned to its GPU's node with
    that node's CPUs shared by its four instances; no llama-server.service."""
    p = plan(P4D, {"llama_profile": "balanced"}, then=lambda spec, _: service.unit(spec, CPUS))
    template = p.uploaded(layout.TEMPLATE_UNIT_PATH)
    assert "ExecStart=" not in template and "Description=llama.cpp server instance %i" in template
    assert not any(d == layout.UNIT_PATH for op in p.ops for d, _ in op.uploads)
    for i in range(8):
        unit = inst.instance_unit(i)
        dropin = p.uploaded(layout.instance_dropin(unit))
        node, cpus = (0, NODE0) if i < 4 else (1, NODE1)
        assert f"Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES={i}\n" in dropin
        assert f"CPUAffinity={cpus}\nNUMAPolicy=preferred\nNUMAMask={node}\n" in dropin
        start = re.search(r"^ExecStart=(.*)$", dropin, re.M)
        assert start is not None
        argv = start[1].split()
        assert argv[argv.index("--port") + 1] == str(8080 + i)
        assert argv[argv.index("--device") + 1] == "CUDA0"  # the only GPU it sees
        assert argv[argv.index("--threads") + 1] == "12"  # 48 CPUs of its node / 4
        assert f"llama-wait-healthy http://127.0.0.1:{8080 + i}/health" in dropin


def test_eight_instances_are_planned_against_each_gpus_40_gb() -> None:
    """Each GPU's memory.total from the recorded nvidia-smi answer: the balanced plan fits
    every one of the eight; sixteen instances (two per GPU) do not, named per GPU."""
    smi = parse_nvidia_smi((FIXTURES / "nvidia-smi-p4d-8xa100.txt").read_text().splitlines())
    memory = tuple(g.memory_total_mib for g in smi.gpus)
    assert memory == (40960,) * 8
    spec = _p4d_spec()
    hp = plan_host(spec, SEED)
    assert hp.fits and hp.est is not None
    total = hp.est.total_gpu // MIB
    assert check_gpu_memory(spec.cfg, memory, spec.instances, total) == []
    rows = render_plan(hp)
    for i in range(8):
        cpus = NODE0 if i < 4 else NODE1
        row = (
            rf"llama-server@{i}\.service +port {8080 + i}  GPU {i}, NUMA node {i // 4}, "
            rf"CPUs {cpus}, 12 threads, {total} MiB"
        )
        assert re.search(row, rows), rows
    doubled = _p4d_spec(llama_instances=16)
    assert [x.gpu for x in doubled.instances] == [*range(8), *range(8)]
    problems = check_gpu_memory(doubled.cfg, memory, doubled.instances, total)
    assert len(problems) == 8
    assert problems[0].startswith(
        f"GPU 0 has 40960 MiB (nvidia-smi memory.total) and 2 instances (llama-server@0.service, "
        f"llama-server@8.service) of {total} MiB each"
    )


def test_a_mixed_gpu_host_is_planned_per_gpu_and_a_smaller_one_refused() -> None:
    """Decided: every instance runs the host's profile, checked against its own GPU. An
    80 GB GPU beside 40 GB ones holds its plan; a 24 GB one is refused, named."""
    spec = _p4d_spec()
    hp = plan_host(spec, SEED)
    assert hp.est is not None
    total = hp.est.total_gpu // MIB
    mixed = (81920, 40960, 40960, 40960, 40960, 40960, 40960, 40960)
    assert check_gpu_memory(spec.cfg, mixed, spec.instances, total) == []
    small = (*mixed[:7], 24576)
    (problem,) = check_gpu_memory(spec.cfg, small, spec.instances, total)
    assert "GPU 7 (llama-server@7.service) has 24576 MiB" in problem
    assert "llama_gpu_memory_mib" in problem


def test_gateway_and_prometheus_list_every_instance() -> None:
    """One gateway server per instance (its slots as maxconn), one Prometheus target per
    instance with its instance and GPU labels."""
    spec = _p4d_spec(ssh_hostname="10.0.0.8")
    servers = hx.servers("gw", [spec])
    assert [(s.name, s.address, s.maxconn) for s in servers] == [
        (f"p4d:{i}", f"10.0.0.8:{8080 + i}", spec.profile.parallel) for i in range(8)
    ]
    (target,) = scrape.targets("mon", [scrape.served_host(spec)])
    assert [(x.llama, x.index, x.gpu) for x in target.instances] == [
        (f"10.0.0.8:{8080 + i}", i, i) for i in range(8)
    ]
    mon = resolve_host("mon", {"llama_profile": "cpu-demo"}).monitoring
    yml = scrape.prometheus_yml("mon", mon, [target])
    assert 'llama_instance: "7"\n          gpu: "7"' in yml


def _recorded(spec: Any, files: dict[str, str]) -> tuple[Server, RecordedHost]:
    answers = {
        rf"^systemctl show llama-server@{i}\.service -p DropInPaths$": Result(
            0, f"DropInPaths={layout.instance_dropin(inst.instance_unit(i))}\n"
        )
        for i in range(8)
    }
    listing = "\n".join([layout.TEMPLATE_UNIT, *(f"{inst.instance_unit(i)}.d" for i in range(8))])
    answers[r"^cd /etc/systemd/system && ls -d llama-server\*"] = Result(0, listing + "\n")
    host = RecordedHost(answers, files=files)
    server = Server(Target("p4d", {}, spec), host)
    server.__dict__.update(spec=spec, cpu_count=CPUS)
    return server, host


def test_compliance_checks_each_instance_and_fails_on_a_broken_one() -> None:
    """The compliance check of the units passes on what the deploy renders for the eight
    instances, and fails when one drop-in lost its pinning or a stale unit is left."""
    spec = _p4d_spec()
    files = {layout.TEMPLATE_UNIT_PATH: render.unit(spec, CPUS)}
    for x in spec.instances:
        files[layout.instance_dropin(x.unit)] = render.instance_dropin(spec, x, CPUS)
    server, host = _recorded(spec, files)
    test_service.test_unit_file_is_the_one_the_deploy_renders(server, host)

    broken = dict(files)
    five = layout.instance_dropin(inst.instance_unit(5))
    broken[five] = broken[five].replace(f"CPUAffinity={NODE1}\n", "")
    server, host = _recorded(spec, broken)
    with pytest.raises(AssertionError, match=r"llama-server@5\.service\.d/instance\.conf differs"):
        test_service.test_unit_file_is_the_one_the_deploy_renders(server, host)

    server, host = _recorded(spec, files)
    stale = host.answers[r"^cd /etc/systemd/system && ls -d llama-server\*"]
    host.answers[r"^cd /etc/systemd/system && ls -d llama-server\*"] = Result(
        0, stale.stdout + "llama-server.service\n"
    )
    with pytest.raises(AssertionError, match="llama-server units in /etc/systemd/system"):
        test_service.test_unit_file_is_the_one_the_deploy_renders(server, host)


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        # Instance 1 of two on 8443, the gateway's port, same wildcard address.
        ({"llama_instances": 2, "llama_port": 8442,
          "llama_gateway_port": 8443}, "llama_gateway_port",
         "would share port 8443 with llama-server instance 1"),
        # Instance 2 of three on Prometheus's 9090.
        ({"llama_instances": 3, "llama_port": 9088, "llama_monitoring_prometheus_host": ANY},
         "llama_monitoring_prometheus_port", "would share port 9090 with llama-server instance 2"),
        # The range 9095..9102 of eight per-GPU instances over the node exporter's 9100.
        ({"llama_port": 9095}, "llama_monitoring_node_exporter_port",
         "would share port 9100 with llama-server instance 5"),
    ],
    ids=["instance-vs-gateway", "instance-vs-prometheus", "range-vs-exporter"],
)  # fmt: skip
def test_two_listeners_on_one_port_are_refused_naming_both(
    data: dict[str, Any], field: str, words: str, tmp_path: Path
) -> None:
    """Before any change: with a number the spec refuses it; with per-gpu, the count comes
    from the host's GPUs and the deploy's preflight refuses it (``port_errors``)."""
    keys = tmp_path / "clients"
    keys.write_text("alice alice-key-0123456789abcdef0123456789\n")
    keys.chmod(0o600)
    full = {
        "llama_profile": "balanced",
        "llama_gateway_client_keys_file": str(keys),
        "llama_monitoring_gpu_exporter_sha256": "0" * 64,
        **data,
    }
    kwargs = {"monitored": True, "is_gateway": True, "is_monitoring": True}
    try:
        spec = resolve_host("p4d", full, **kwargs)
    except ConfigError as e:
        assert "per-gpu" not in str(full.get("llama_instances", "per-gpu")), e
        message = str(e)
    else:
        errors = port_errors(dataclasses.replace(spec, topology=_topology()))
        message = str(ConfigError("p4d", errors))
    assert "host 'p4d'" in message and field in message and words in message, message
