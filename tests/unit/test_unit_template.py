"""templates/llama-server.service.j2 rendered as pyinfra renders it (jinja2, the same context)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest

from llamahost.config import resolve
from llamahost.render import unit_context

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "llama-server.service.j2"


def render(data: dict[str, Any], unit_lines: tuple[str, ...] = ()) -> dict[str, list[str]]:
    cfg = resolve("h", data)
    # A unit file, not HTML: no autoescape, as pyinfra renders it.
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)  # noqa: S701
    text = env.from_string(TEMPLATE.read_text()).render(
        gpu_unit_lines=unit_lines,
        **unit_context(cfg, "/opt/llama.cpp/current/bin/llama-server", "/opt/wait", 16, "/opt/f"),
    )
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            keys.setdefault(k, []).append(v)
    return keys


def test_gpu_profile_allows_the_nvidia_devices_instead_of_hiding_devices() -> None:
    unit = render({"llama_profile": "balanced"})
    assert "PrivateDevices" not in unit
    assert unit["DevicePolicy"] == ["closed"]
    assert "char-nvidia-uvm rw" in unit["DeviceAllow"]
    assert unit["ProcSubset"] == ["all"]


def test_gpu_unit_is_ordered_after_nvidia_persistenced() -> None:
    lines = ("After=nvidia-persistenced.service", "Wants=nvidia-persistenced.service")
    unit = render({"llama_profile": "balanced"}, lines)
    assert unit["After"] == ["network-online.target", "nvidia-persistenced.service"]
    assert unit["Wants"] == ["network-online.target", "nvidia-persistenced.service"]
    assert render({"llama_profile": "cpu-demo"})["After"] == ["network-online.target"]


def test_cpu_profile_hides_devices() -> None:
    unit = render({"llama_profile": "cpu-demo"})
    assert unit["PrivateDevices"] == ["yes"] and "DeviceAllow" not in unit
    assert unit["MemoryDenyWriteExecute"] == ["yes"]


@pytest.mark.parametrize("profile", ["balanced", "cpu-demo"])
def test_unit_runs_sandboxed_as_the_service_user(profile: str) -> None:
    unit = render({"llama_profile": profile})
    assert unit["User"] == ["llama"] and unit["Group"] == ["llama"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit[key] == [value], key
    assert len(unit["ExecStart"]) == 1
    assert unit["ExecStartPost"] == ["/usr/bin/python3 /opt/wait http://127.0.0.1:8080/health"]
    assert int(unit["TimeoutStartSec"][0]) >= 1800


def test_the_key_is_passed_by_file_never_in_the_unit() -> None:
    key = "k" * 40
    unit = render({"llama_api_key": key})
    assert "--api-key-file /etc/llama-server/api-key" in unit["ExecStart"][0]
    assert key not in repr(unit)


def test_health_check_follows_the_listen_address() -> None:
    unit = render({"llama_host": "::", "llama_port": 9000})
    assert unit["ExecStartPost"][0].endswith("http://[::1]:9000/health")
    unit = render({"llama_host": "10.1.2.3"})
    assert unit["ExecStartPost"][0].endswith("http://10.1.2.3:8080/health")
