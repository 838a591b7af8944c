"""The deploy's preflight against recorded host output (pyinfra's @fake connector): a path
setting never takes over a directory or key the toolkit did not create."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State

from tasks import preflight
from tests.plan.fakehost import REPO


def _stat(path: str, kind: str, user: str, group: str) -> str:
    mode = "drwxr-x---" if kind == "d" else "-rw-r-----"
    return f"user={user} group={group} mode={mode} atime=1 mtime=1 ctime=1 size=1 '{path}'"


def _present(path: str, kind: str, user: str, group: str) -> dict[Any, Any]:
    return {
        re.compile(r"^! \(test -e " + re.escape(path) + r" \|\|"): _stat(path, kind, user, group)
    }


def _run(responses: dict[Any, Any], data: dict[str, Any] | None = None) -> State:
    host_data = {"fake_responses": responses, "fake_delay": 0, "fake_delay_jitter": 0}
    host_data |= {"llama_profile": "cpu-demo", **(data or {})}
    inventory = Inventory(([("@fake/h", host_data)], {}))  # type: ignore[no-untyped-call]
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    state.cwd = str(REPO)
    connect_all(state)
    add_deploy(state, lambda: preflight.paths_are_ours(preflight.validated_spec()))
    return state


def test_fresh_paths_and_the_toolkits_own_pass() -> None:
    _run({})
    _run(
        {
            **_present("/etc/llama-server", "d", "root", "llama"),
            **_present("/etc/llama-server/api-key", "f", "root", "llama"),
            **_present("/var/lib/llama-models", "d", "root", "llama"),
        }
    )


@pytest.mark.parametrize(
    ("data", "responses", "field"),
    [
        ({}, _present("/var/lib/llama-models", "d", "alice", "alice"), "llama_model_dir"),
        (
            {"llama_api_key_file": "/srv/secrets/key"},
            _present("/srv/secrets", "d", "root", "root"),
            "llama_api_key_file",
        ),
        ({}, _present("/etc/llama-server/api-key", "f", "alice", "llama"), "llama_api_key_file"),
    ],
)
def test_someone_elses_directory_or_key_is_refused_before_any_change(
    data: dict[str, Any], responses: dict[Any, Any], field: str
) -> None:
    with pytest.raises(PyinfraError) as exc:
        _run(responses, data)
    message = str(exc.value)
    assert f"REFUSED host '@fake/h': {field}: " in message and "nothing was changed" in message
