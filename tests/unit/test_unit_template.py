"""The llama-server unit, rendered by llamahost.render.unit: the text the deploy uploads
and the compliance checks compare with the host's file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llamahost import render as r
from llamahost.layout import HEALTH_SCRIPT
from llamahost.monitoring import scrape
from llamahost.profiles import PROFILES
from llamahost.spec import resolve_host

RENDERED = Path(__file__).resolve().parent / "fixtures" / "rendered"


def render(data: dict[str, Any]) -> dict[str, list[str]]:
    text = r.unit(resolve_host("h", data), 16)
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            keys.setdefault(k, []).append(v)
    return keys


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_unit_is_the_recorded_text(profile: str) -> None:
    """The recorded unit of each profile (cpu count 8). A change of the rendered unit
    restarts every host at its next deploy, so it must show in review as a diff of these
    files. First recorded with pyinfra's template renderer, before the one environment
    replaced it (byte for byte the same), then with the sampling and thinking flags."""
    expected = (RENDERED / f"unit-{profile}.service").read_text()
    assert r.unit(resolve_host("h1", {"llama_profile": profile}), 8) == expected


def test_prometheus_yml_is_byte_for_byte_what_the_previous_renderer_wrote() -> None:
    served = [
        resolve_host("mon", {"llama_profile": "cpu-demo", "llama_host": "0.0.0.0"}),  # noqa: S104
        resolve_host("gpu1", {"ssh_hostname": "10.0.0.5"}),
    ]
    mon = served[0].monitoring
    text = scrape.prometheus_yml(
        "mon", mon, scrape.targets("mon", [scrape.served_host(s) for s in served])
    )
    assert text == (RENDERED / "prometheus.yml").read_text()


def test_cpu_profile_on_a_gpu_host_has_no_gpu_ordering() -> None:
    """The GPU lines follow the profile (the spec), not the hardware the deploy finds, so
    the deploy and the compliance checks render the same unit on any host."""
    spec = resolve_host("h", {"llama_profile": "cpu-demo", "llama_gpu_stack": "on"})
    assert "nvidia-persistenced" not in r.unit(spec, 8)


def test_gpu_profile_allows_the_nvidia_devices_instead_of_hiding_devices() -> None:
    unit = render({"llama_profile": "balanced"})
    assert "PrivateDevices" not in unit
    assert unit["DevicePolicy"] == ["closed"]
    assert "char-nvidia-uvm rw" in unit["DeviceAllow"]
    assert unit["ProcSubset"] == ["all"]


def test_gpu_unit_is_ordered_after_nvidia_persistenced() -> None:
    unit = render({"llama_profile": "balanced"})
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
    assert unit["ExecStartPost"] == [
        f"/usr/bin/python3 {HEALTH_SCRIPT} http://127.0.0.1:8080/health"
    ]
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
