"""Gateways that serve nothing are scraped for their node exporter (the certificate's end
date, alert GatewayCertificateExpiresSoon); a gateway that serves is a target already."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamahost.monitoring import scrape
from llamahost.spec import resolve_host
from tests.monitoring.names import yaml
from tests.monitoring.test_promtool import promtool, render, run  # noqa: F401 (fixture)


def _specs(tmp_path: Path) -> list[Any]:
    keys = tmp_path / "clients"
    keys.write_text("app client-key-0123456789abcdef0123456789\n")
    keys.chmod(0o600)
    gw = {"ssh_hostname": "10.0.0.1", "llama_serve": False,
          "llama_gateway_client_keys_file": str(keys),
          "llama_monitoring_node_exporter_port": 9111}  # fmt: skip
    served_gw = {"ssh_hostname": "10.0.0.4", "llama_profile": "cpu-demo",
                 "llama_gateway_client_keys_file": str(keys)}  # fmt: skip
    return [
        resolve_host("gw-1", gw, is_gateway=True),
        resolve_host("gw-2", served_gw, is_gateway=True),
        resolve_host("a", {"ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo"}),
    ]


def test_gateways_that_serve_nothing_are_node_targets(tmp_path: Path) -> None:
    nodes = scrape.gateway_node_targets("mon", _specs(tmp_path))
    assert nodes == [scrape.NodeTarget(host="gw-1", node="10.0.0.1:9111")]


def test_the_node_job_lists_them(promtool: str, tmp_path: Path) -> None:  # noqa: F811
    specs = _specs(tmp_path)
    served = [scrape.served_host(s) for s in specs if s.serves]
    config = render(tmp_path, {"mon": {"llama_profile": "cpu-demo", "ssh_hostname": "127.0.0.1"},
                               "a": {"ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo"}},
                    "mon")  # fmt: skip
    text = config.read_text()
    targets = scrape.targets("mon", served)
    mon = resolve_host("mon", {"llama_profile": "cpu-demo"}).monitoring
    with_gw = scrape.prometheus_yml("mon", mon, targets, scrape.gateway_node_targets("mon", specs))
    # The same configuration, plus the gateway in job node.
    doc = yaml.safe_load(with_gw)
    (node,) = [j for j in doc["scrape_configs"] if j["job_name"] == "node"]
    assert {"targets": ["10.0.0.1:9111"], "labels": {"host": "gw-1"}} in node["static_configs"]
    assert len(node["static_configs"]) == len(served) + 1
    assert "10.0.0.1:9111" not in text
    # promtool accepts it (credentials files as render() makes them).
    keys_dir = tmp_path / "keys"
    with_gw_local = with_gw
    for t in targets:
        with_gw_local = with_gw_local.replace(t.key_file, str(keys_dir / Path(t.key_file).name))
        (keys_dir / Path(t.key_file).name).write_text("k\n")
    config.write_text(with_gw_local)
    r = run(promtool, "check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
