"""Every setting of every concern: one bad value each is refused by `python -m llamahost
plan` and by the deploy's preflight, with the same message (host, field, what is
allowed), before any operation is planned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State

from llamahost.checks import PREFIX, Invalid
from llamahost.spec import CONCERNS
from tasks import preflight

REPO = Path(__file__).resolve().parents[2]
CANDIDATES: tuple[Any, ...] = ("bad value\n", "x", -1)
# Values users have written, each refused by name (the examples).
EXTRA = [("driver_branch", "r580"), ("monitoring_retention", "15 days"), ("temperature", 0.6)]


def _bad_value(check: Any) -> Any:
    for value in CANDIDATES:
        try:
            check(value)
        except Invalid:
            return value
    raise AssertionError(f"no candidate is refused by {check}")


CASES = [(s.key, _bad_value(s.check)) for _, rows in CONCERNS for s in rows] + EXTRA
NAMES = {case: f"bad-{i}-{case[0].replace('_', '-')}" for i, case in enumerate(CASES)}


def _name(key: str, value: Any) -> str:
    return NAMES[(key, value)]


def _field_lines(message: str, key: str) -> list[str]:
    return [ln.strip() for ln in message.splitlines() if ln.strip().startswith(PREFIX + key)]


@pytest.fixture(scope="module")
def plan_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`python -m llamahost plan` once over an inventory of one host per bad value (no
    `monitoring` group in it)."""
    inv = tmp_path_factory.mktemp("inv") / "bad.py"
    rows = ",\n".join(
        f"    ({_name(k, v)!r}, {{{(PREFIX + k)!r}: {v!r}, 'llama_profile': 'cpu-demo'}})"
        if k != "profile"
        else f"    ({_name(k, v)!r}, {{{(PREFIX + k)!r}: {v!r}}})"
        for k, v in CASES
    )
    inv.write_text(f"hosts = [\n{rows},\n]\n")
    p = subprocess.run(
        [sys.executable, "-m", "llamahost", "plan", str(inv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.rstrip().endswith("plan: REFUSED: some hosts do not fit or are invalid")
    return p.stdout


def _preflight(name: str, data: dict[str, Any]) -> tuple[str, State]:
    inventory = Inventory(([(f"@fake/{name}", data)], {}))  # type: ignore[no-untyped-call]
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    state.cwd = str(REPO)
    connect_all(state)
    with pytest.raises(PyinfraError) as exc:
        add_deploy(state, preflight.host_spec)
    return str(exc.value), state


@pytest.mark.parametrize(("key", "value"), CASES, ids=[k for k, _ in CASES])
def test_plan_and_preflight_refuse_with_the_same_message(
    key: str, value: Any, plan_output: str
) -> None:
    data = {PREFIX + key: value} | ({} if key == "profile" else {"llama_profile": "cpu-demo"})
    deploy_message, state = _preflight(_name(key, value), data)
    assert (
        "REFUSED host '@fake/" + _name(key, value) + "': invalid inventory data" in deploy_message
    )
    assert "nothing was changed" in deploy_message
    assert not state.get_op_order(), "an operation was planned before the refusal"  # type: ignore[no-untyped-call]

    block = plan_output.split(f"REFUSED host {_name(key, value)!r}: invalid inventory data", 1)
    assert len(block) == 2, f"plan did not refuse {_name(key, value)}"
    plan_lines = _field_lines(block[1].split("\n\n", 1)[0], key)
    deploy_lines = _field_lines(deploy_message, key)
    assert plan_lines and plan_lines == deploy_lines
    (line,) = plan_lines
    assert line.startswith(f"{PREFIX}{key} = {value!r}: ")


def test_unknown_keys_suggest_only_close_matches() -> None:
    data = {"llama_prot": 1, "llama_temperature": 0.6, "llama_distribution": 1, "llama_colour": 1}
    message, _ = _preflight("typos", data)
    (prot,) = _field_lines(message, "prot")
    assert "did you mean llama_port?" in prot
    (temperature,) = _field_lines(message, "temperature")
    assert "did you mean llama_temp?" in temperature  # llama.cpp's long name for it
    for key in ("distribution", "colour"):
        (line,) = _field_lines(message, key)
        assert "did you mean" not in line
        assert "is not a known setting" in line and "README.md, section Variables" in line


# ---------------------------------------------------------------- checks across hosts
FIREWALL_NO_GATEWAY = {"ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo",
                       "llama_firewall": True}  # fmt: skip


def test_a_firewall_without_gateways_is_refused_by_plan_and_deploy_alike(tmp_path: Path) -> None:
    """The check reads several hosts (is there a `gateway` group?): `plan` refuses it as the
    deploy does, at its first step, naming the host, the field and what is allowed."""
    inv = tmp_path / "fw.py"
    inv.write_text(f"hosts = [('fw-no-gw', {FIREWALL_NO_GATEWAY!r})]\n")
    p = subprocess.run([sys.executable, "-m", "llamahost", "plan", str(inv)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "REFUSED host 'fw-no-gw': invalid inventory data" in p.stdout
    plan_lines = _field_lines(p.stdout, "firewall")
    assert plan_lines == [
        "llama_firewall = True: needs a `gateway` group: the llama port is opened to the "
        "gateway hosts (and the `monitoring` hosts) only, and with no gateway no client could "
        "reach llama-server"
    ]
    deploy_message, state = _preflight("fw-no-gw", FIREWALL_NO_GATEWAY)
    assert "REFUSED host '@fake/fw-no-gw': invalid inventory data" in deploy_message
    assert _field_lines(deploy_message, "firewall") == plan_lines
    assert not state.get_op_order()  # type: ignore[no-untyped-call]
