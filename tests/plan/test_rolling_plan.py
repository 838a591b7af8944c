"""A driver branch change on a fleet of 3 GPU hosts behind a gateway, planned against
pyinfra's @fake connector fed with recorded output (tests/plan/fakehost.py: Ubuntu 24.04,
Canonical's 580 stack, one A100 40GB each): every host plans one reboot, and that reboot
goes through the rolling gate (tasks/rolling.drained: drained on every gateway first, back
in rotation after) one host at a time (``_parallel`` = llama_rolling_max_unavailable),
never pyinfra's plain server.reboot. The gate's decisions themselves are tested in
tests/unit/test_rolling.py; the real drained reboot of a fleet host is an e2e test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State

from tasks import gpu as gpu_tasks
from tasks import preflight, rolling
from tests.plan.fakehost import REPO, FakeHost, responses

U = "ubuntu-24.04"
GPU_HOSTS = ["gpu-1", "gpu-2", "gpu-3"]
DRAINED_REBOOT = "Reboot into the NVIDIA driver, drained on the gateways"
PLAIN_REBOOT = "Reboot into the NVIDIA driver: "


def plan_fleet(tmp_path: Path, gateway: bool, **data: Any) -> dict[str, dict[str, Any]]:
    """Each operation's name → the hosts it runs on and its global arguments."""
    keys = tmp_path / "clients"
    keys.write_text("app client-key-0123456789abcdef0123456789\n")
    keys.chmod(0o600)
    fake = {"fake_responses": responses(FakeHost(U, driver="current")), "fake_delay": 0,
            "fake_delay_jitter": 0}  # fmt: skip
    hosts = [
        (f"@fake/{n}", {**fake, "ssh_hostname": f"10.0.0.{i + 2}", **data})
        for i, n in enumerate(GPU_HOSTS)
    ]
    groups: dict[str, Any] = {}
    if gateway:
        gw = {**fake, "ssh_hostname": "10.0.0.1", "llama_serve": False,
              "llama_gateway_client_keys_file": str(keys)}  # fmt: skip
        hosts.append(("@fake/gw", gw))
        groups["gateway"] = (["@fake/gw"], {})
    inventory = Inventory((hosts, {}), **groups)  # type: ignore[no-untyped-call]
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    state.cwd = str(REPO)
    connect_all(state)

    def deploy() -> None:
        spec = preflight.validated_spec()
        if spec.serves:
            gpu_tasks.install(spec, preflight.distribution(), "c0ffee00" * 4)

    add_deploy(state, deploy)
    out: dict[str, dict[str, Any]] = {}
    for op_hash in state.get_op_order():  # type: ignore[no-untyped-call]
        (name,) = state.op_meta[op_hash].names
        on = [h for h in inventory if op_hash in h.op_hash_order]
        # What pyinfra's executor reads to batch the hosts (api/operations._run_single_op).
        parallel = state.get_op_meta(op_hash).global_arguments["_parallel"]
        out[name] = {"hosts": sorted(h.name.removeprefix("@fake/") for h in on),
                     "parallel": parallel}  # fmt: skip
    return out


def test_a_branch_change_behind_a_gateway_is_one_drained_reboot_at_a_time(
    tmp_path: Path,
) -> None:
    ops = plan_fleet(tmp_path, gateway=True, llama_driver_branch="590")
    (reboot,) = [v for n, v in ops.items() if n.startswith(DRAINED_REBOOT)]
    assert reboot["hosts"] == GPU_HOSTS
    assert reboot["parallel"] == 1
    assert not [n for n in ops if n.startswith(PLAIN_REBOOT)]


def test_the_bound_sets_how_many_reboot_together(tmp_path: Path) -> None:
    ops = plan_fleet(
        tmp_path, gateway=True, llama_driver_branch="590", llama_rolling_max_unavailable=2
    )
    (reboot,) = [v for n, v in ops.items() if n.startswith(DRAINED_REBOOT)]
    assert reboot["parallel"] == 2


def test_without_a_gateway_the_reboot_is_pyinfras_own(tmp_path: Path) -> None:
    ops = plan_fleet(tmp_path, gateway=False, llama_driver_branch="590")
    (reboot,) = [v for n, v in ops.items() if n.startswith(PLAIN_REBOOT)]
    assert reboot["hosts"] == GPU_HOSTS
    assert not [n for n in ops if n.startswith(DRAINED_REBOOT)]


def test_a_converged_fleet_behind_a_gateway_plans_no_reboot(tmp_path: Path) -> None:
    ops = plan_fleet(tmp_path, gateway=True)
    assert not [n for n in ops if "Reboot" in n]


@pytest.fixture(autouse=True)
def _fresh_rollout() -> None:
    rolling._stopped.clear()
