"""promtool, from Debian's `prometheus` package (the one the deploy installs): the rendered
configuration and the rules pass its checks, and its rule unit tests fire every alert."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llamahost import layout
from llamahost.monitoring import scrape
from llamahost.spec import resolve_host
from tests.monitoring.names import yaml

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def promtool() -> str:
    # PROMTOOL names one outside PATH (e.g. unpacked from the package without its server).
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if path is None:
        why = "needs promtool (Debian package `prometheus`; make sysdeps installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120)


def render(tmp: Path, data: dict[str, dict[str, object]], monitoring_host: str) -> Path:
    """The configuration a monitoring host gets, with its credentials files under tmp."""
    mon = resolve_host(monitoring_host, data[monitoring_host]).monitoring
    targets = []
    for t in scrape.targets(
        monitoring_host, [scrape.served_host(resolve_host(n, d)) for n, d in data.items()]
    ):
        key = tmp / "keys" / Path(t.key_file).name
        key.parent.mkdir(exist_ok=True)
        key.write_text("a-key-for-the-check-only\n")
        targets.append(dataclasses.replace(t, key_file=str(key)))
    (tmp / "rules").mkdir(exist_ok=True)
    shutil.copy(layout.RULES_FILE, tmp / layout.RULES_REF)
    config = tmp / "prometheus.yml"
    config.write_text(scrape.prometheus_yml(monitoring_host, mon, targets))
    return config


FLEET: dict[str, dict[str, object]] = {
    "mon-01": {"llama_profile": "cpu-demo", "llama_port": 18081, "ssh_hostname": "127.0.0.1"},
    "a100-01.example.internal": {"llama_profile": "balanced"},
    "a100-02.example.internal": {
        "llama_profile": "low-latency",
        "llama_monitoring_address": "10.0.0.12",
        "llama_monitoring_node_exporter_port": 9101,
    },
}


def test_rendered_configuration_passes_promtool(promtool: str, tmp_path: Path) -> None:
    config = render(tmp_path, FLEET, "mon-01")
    r = run(promtool, "check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 19 rules found" in r.stdout


def test_promtool_refuses_a_missing_credentials_file(promtool: str, tmp_path: Path) -> None:
    """Why the deploy creates every credentials file before it checks the configuration."""
    config = render(tmp_path, FLEET, "mon-01")
    next((tmp_path / "keys").iterdir()).unlink()
    r = run(promtool, "check", "config", str(config))
    assert r.returncode != 0
    assert "credentials" in r.stdout + r.stderr


def test_rules_pass_promtool(promtool: str) -> None:
    r = run(promtool, "check", "rules", str(layout.RULES_FILE))
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_broken_rule_fails_promtool(promtool: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.rules.yml"
    broken.write_text(layout.RULES_FILE.read_text().replace("== 0\n", "=== 0\n", 1))
    assert run(promtool, "check", "rules", str(broken)).returncode != 0


def test_rule_unit_tests_fire_every_alert(promtool: str, tmp_path: Path) -> None:
    """tests/monitoring/rules_test.yml against the rules without their annotations: the
    expected alerts then list labels only (the wording is checked below)."""
    doc = yaml.safe_load(layout.RULES_FILE.read_text())
    alerts = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
            alerts.add(rule["alert"])
    (tmp_path / layout.RULES_NAME).write_text(yaml.safe_dump(doc, sort_keys=False))
    test_file = HERE / "rules_test.yml"
    shutil.copy(test_file, tmp_path / test_file.name)
    r = run(promtool, "test", "rules", test_file.name, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    fired = set(re.findall(r"alertname: (\w+)", test_file.read_text()))
    assert fired == alerts


def test_every_alert_says_what_to_do() -> None:
    doc = yaml.safe_load(layout.RULES_FILE.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            notes = rule["annotations"]
            assert {"summary", "description", "runbook"} <= set(notes), rule["alert"]
            assert notes["runbook"] == f"README.md#monitoring, alert {rule['alert']}"
            assert rule["labels"]["severity"] in ("critical", "warning", "info")


def test_memory_and_throughput_alerts_point_at_the_guides_ladder() -> None:
    doc = yaml.safe_load(layout.RULES_FILE.read_text())
    text = {r["alert"]: r["annotations"]["description"] for g in doc["groups"] for r in g["rules"]}
    assert "OOM ladder" in text["GpuMemoryNearFull"]
    assert "throughput ladder" in text["LlamaServerRequestsDeferred"]
    assert "throughput ladder" in text["LlamaServerThroughputCollapse"]
