"""The Grafana dashboard is importable as is: every query goes to the chosen Prometheus."""

from __future__ import annotations

import json
from typing import Any

from llamahost.layout import DASHBOARD_FILE, REPO
from tests.monitoring.names import yaml


def _panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in items:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def test_dashboard_queries_use_the_datasource_variable() -> None:
    dash = json.loads(DASHBOARD_FILE.read_text())
    assert dash["uid"] == "llamahost-llama-server"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dash["panels"])
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'host=~"$host"' in t["expr"], p["title"]


def test_grafana_provisioning_files_parse() -> None:
    grafana = REPO / "files" / "monitoring" / "grafana"
    ds = yaml.safe_load((grafana / "datasource.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    boards = yaml.safe_load((grafana / "dashboards.yml").read_text())
    assert boards["providers"][0]["type"] == "file"
