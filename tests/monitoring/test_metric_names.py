"""Every metric name the alert rules and the dashboard use exists, and a wrong one fails.

llama-server names are checked against a scrape of the pinned build
(fixtures/llama-server-metrics.txt; tests/e2e/test_monitoring.py checks a live one too),
exporter names against the exporters' own lists (fixtures/SOURCES.md says where from).
"""

from __future__ import annotations

import pytest

from llamahost.layout import DASHBOARD_FILE, RULES_FILE
from tests.monitoring.names import (
    dashboard_exprs,
    known_names,
    llama_server_names,
    metric_names,
    rules_exprs,
    unknown_names,
)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="llama-server"} == 0', {"up"}),
        (
            "rate(llamacpp:tokens_predicted_total[10m] offset 1h) / avg_over_time("
            'llamacpp:requests_processing{job="x"}[10m])',
            {"llamacpp:tokens_predicted_total", "llamacpp:requests_processing"},
        ),
        (
            'sum by (host) (rate(node_cpu_seconds_total{mode="idle"}[$__rate_interval]))',
            {"node_cpu_seconds_total"},
        ),
        (
            "a / b * on(instance, mountpoint) group_left(model_dir) c < 0.10",
            {"a", "b", "c"},
        ),
        ('time() - x{xid=~"48|62"} < 900 and bool 1e3', {"x"}),
        ('ALERTS{alertstate="firing", host=~"$host"}', {"ALERTS"}),
    ],
)
def test_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_fixtures_hold_the_families() -> None:
    known = known_names()
    # docs/facts.md's list of names at the pinned commit, from the recorded scrape.
    assert {
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        "llamacpp:tokens_predicted_total",
        "llamacpp:n_decode_total",
    } <= known["llamacpp:"]
    assert not any(n.startswith("llamacpp:kv_cache") for n in known["llamacpp:"])
    assert "nvidia_smi_xid_last_timestamp_seconds" in known["nvidia_smi_"]
    assert "node_filesystem_avail_bytes" in known["node_"]


def test_every_name_in_the_rules_exists() -> None:
    exprs = rules_exprs(RULES_FILE.read_text())
    assert len(exprs) >= 15
    assert unknown_names(exprs) == set()


def test_every_name_in_the_dashboard_exists() -> None:
    exprs = dashboard_exprs(DASHBOARD_FILE.read_text())
    used = set().union(*(metric_names(e) for e in exprs))
    # The panels: tokens/s, requests, slots, GPU utilisation, memory, temperature, power.
    assert {
        "llamacpp:prompt_tokens_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        "llamacpp:n_busy_slots_per_decode",
        "nvidia_smi_utilization_gpu_ratio",
        "nvidia_smi_memory_used_bytes",
        "nvidia_smi_temperature_gpu",
        "nvidia_smi_power_draw_watts",
    } <= used
    assert unknown_names(exprs) == set()


@pytest.mark.parametrize(
    ("right", "wrong"),
    [
        ("llamacpp:requests_deferred", "llamacpp:requests_deferred_total"),
        ("llamacpp:n_decode_total", "llamacpp:kv_cache_usage_ratio"),
        ("nvidia_smi_persistence_mode", "nvidia_smi_persistence_mode_enabled"),
        ("node_filesystem_avail_bytes", "node_filesystem_free"),
        ("llamahost_model_filesystem_info", "llamahost_model_fs_info"),
    ],
)
def test_a_wrong_name_in_the_rules_fails(right: str, wrong: str) -> None:
    text = RULES_FILE.read_text()
    assert right in text
    assert unknown_names(rules_exprs(text.replace(right, wrong))) == {wrong}


@pytest.mark.parametrize(
    ("right", "wrong"),
    [
        ("llamacpp:n_busy_slots_per_decode", "llamacpp:n_busy_slots"),
        ("nvidia_smi_utilization_gpu_ratio", "nvidia_smi_utilization_gpu_percent"),
        ("nvidia_smi_temperature_gpu", "DCGM_FI_DEV_GPU_TEMP"),
    ],
)
def test_a_wrong_name_in_the_dashboard_fails(right: str, wrong: str) -> None:
    text = DASHBOARD_FILE.read_text()
    assert right in text
    assert unknown_names(dashboard_exprs(text.replace(right, wrong))) == {wrong}


def test_llama_server_names_are_read_from_an_exposition() -> None:
    text = (
        "# HELP llamacpp:requests_deferred Number of requests deferred\n"
        "# TYPE llamacpp:requests_deferred gauge\n"
        "llamacpp:requests_deferred 0\n"
        'llamacpp:other{a="b"} 1\n'
    )
    assert llama_server_names(text) == {"llamacpp:requests_deferred", "llamacpp:other"}
