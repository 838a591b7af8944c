"""Monitoring on the local test host (issue 7): the real deploy with the host in the inventory
group `monitoring` (LLAMAHOST_LOCAL_MONITORING=1) installs Prometheus, which scrapes the
tiny-model llama-server with its key; asked through Prometheus's HTTP API from here.

Runs after test_bringup.py on the same host. Prometheus and the node exporter get free
ports of their own, on loopback (the host shares this machine's network).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from llamahost.layout import DASHBOARD_FILE, KEYS_DIR, RULES_FILE
from llamahost.monitoring.scrape import key_file
from tests.e2e.conftest import Run, Site, free_port
from tests.monitoring.names import (
    dashboard_exprs,
    llama_server_names,
    metric_names,
    rules_exprs,
    yaml,
)

pytestmark = pytest.mark.e2e

GHOST = "ghost-e2e"  # a host that is in the inventory but never deployed (--limit)
GATEWAY_ONLY = {"llamahost_tls_cert_not_after_seconds"}  # exported by gateway hosts only
INSTALL_OP = "Check the Prometheus configuration with promtool and put it in place"
RELOAD_OP = "Reload prometheus.service (its configuration changed)"


@dataclass
class Monitoring:
    site: Site
    prometheus_port: int
    node_port: int

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **self.site.env(),
            "LLAMAHOST_LOCAL_MONITORING": "1",
            "LLAMAHOST_LOCAL_PROMETHEUS_PORT": str(self.prometheus_port),
            "LLAMAHOST_LOCAL_NODE_EXPORTER_PORT": str(self.node_port),
            **extra,
        }

    def deploy(self, *args: str, **extra: str) -> Run:
        run = self.site.deploy(*args, env=self.env(**extra))
        assert run.rc == 0, run.output[-4000:]
        return run

    def api(self, path: str, **params: str) -> Any:
        r = requests.get(
            f"http://127.0.0.1:{self.prometheus_port}/api/v1/{path}", params=params, timeout=10
        )
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def targets(self) -> dict[str, dict[str, Any]]:
        """Active targets by (job label, host label)."""
        return {
            f"{t['labels']['job']}/{t['labels']['host']}": t
            for t in self.api("targets", state="active")["activeTargets"]
        }

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=promql)["result"]
        return result


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
    """Scrapes are every 5 s on the test host; a reload or a restart takes a few more."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(1)


@pytest.fixture(scope="module")
def mon(site: Site, deployed: Run) -> Monitoring:
    return Monitoring(site, prometheus_port=free_port(), node_port=free_port())


@pytest.fixture(scope="module")
def monitored(mon: Monitoring) -> Run:
    """The first deploy with monitoring on."""
    run = mon.deploy()
    mon.site.timings["monitoring_first_run_s"] = round(run.seconds, 1)
    return run


def _up(mon: Monitoring, target: str) -> bool:
    t = mon.targets().get(target)
    return t is not None and t["health"] == "up"


def test_prometheus_scrapes_the_server_with_its_key(mon: Monitoring, monitored: Run) -> None:
    host = mon.site.host.name
    changed = monitored.changed_operations()
    assert "Install Prometheus" in changed
    assert f"Copy the API key of {host} to Prometheus" in changed
    assert INSTALL_OP in changed
    wait_for("llama-server and node targets up", lambda: _up(mon, f"llama-server/{host}"))
    wait_for("node target up", lambda: _up(mon, f"node/{host}"))
    target = mon.targets()[f"llama-server/{host}"]
    assert target["scrapeUrl"] == f"http://127.0.0.1:{mon.site.port}/metrics"
    assert target["lastError"] == ""
    # The server refuses /metrics without the key: Prometheus sends it.
    assert mon.site.get("/metrics").status_code == 401
    (series,) = mon.query(f'llamacpp:requests_processing{{host="{host}"}}')
    assert series["metric"]["job"] == "llama-server"
    names = {s["metric"]["__name__"] for s in mon.query('{__name__=~"llamacpp:.+"}')}
    assert len(names) >= 15


def test_prometheus_listens_on_loopback_and_loaded_the_rules(
    mon: Monitoring, monitored: Run
) -> None:
    args = mon.site.sh("cat /etc/default/prometheus")
    assert f"--web.listen-address=127.0.0.1:{mon.prometheus_port}" in args
    doc = yaml.safe_load(RULES_FILE.read_text())
    expected = {r["alert"] for g in doc["groups"] for r in g["rules"]}

    def rules() -> dict[str, Any]:
        return {r["name"]: r for g in mon.api("rules")["groups"] for r in g["rules"]}

    # A rule's health is "unknown" until its group's first evaluation after a (re)load:
    # wait for every rule to have been evaluated, then each must be "ok".
    wait_for(
        "every rule evaluated", lambda: all(r["health"] != "unknown" for r in rules().values())
    )
    loaded = rules()
    assert set(loaded) == expected
    bad = {n: (r["health"], r.get("lastError")) for n, r in loaded.items() if r["health"] != "ok"}
    assert bad == {}


def test_the_key_is_readable_by_prometheus_alone(mon: Monitoring, monitored: Run) -> None:
    host = mon.site.host.name
    path = key_file(host)
    assert mon.site.sh(f"stat -c '%a %U %G' {KEYS_DIR} {path}").split("\n")[:2] == [
        "750 root prometheus",
        "640 root prometheus",
    ]
    key = mon.site.key()
    same = mon.site.sh(f"tr -d '\\n' <{path}") == key
    assert same  # compared outside the assert: a failure never prints the key
    # Never in the run's output, the configuration (or Prometheus's view of it), the
    # process list or the journal.
    places = {
        "the run's output": monitored.output,
        "the configuration": mon.site.sh(
            "cat /etc/prometheus/prometheus.yml /etc/default/prometheus"
        ),
        "Prometheus's view of it": str(mon.api("status/config")),
        "the process list": mon.site.sh("ps -eo args"),
        "the journal": mon.site.sh("journalctl --no-pager -o cat", check=False),
    }
    leaks = [where for where, text in places.items() if key in text]
    assert leaks == []


def test_every_name_used_exists_in_the_live_scrapes(mon: Monitoring, monitored: Run) -> None:
    host = mon.site.host.name
    # The recorded scrape is the pinned build's: the live server serves the same names.
    live = mon.site.get("/metrics", key=mon.site.key())
    assert live.status_code == 200
    assert llama_server_names(live.text) == llama_server_names()
    wait_for(
        "a node exporter scrape",
        lambda: bool(mon.query(f'node_filesystem_avail_bytes{{host="{host}"}}')),
    )
    in_prometheus = set(mon.api("label/__name__/values"))
    used = set()
    for expr in rules_exprs(RULES_FILE.read_text()) + dashboard_exprs(DASHBOARD_FILE.read_text()):
        used |= metric_names(expr)
    local = {n for n in used if n.startswith(("llamacpp:", "node_", "llamahost_"))}
    # The certificate's end date comes only from gateway hosts, and this host is not one:
    # the gateway's own e2e module runs the node exporter there (tests/e2e/test_gateway.py).
    assert local >= GATEWAY_ONLY
    assert local - GATEWAY_ONLY - in_prometheus == set()
    # The model filesystem alert's expression has its series: the mount of the model dir.
    (fs,) = mon.query(
        f'node_filesystem_avail_bytes{{host="{host}"}} * on(job, instance, host, mountpoint) '
        f'group_left(model_dir) llamahost_model_filesystem_info{{host="{host}"}}'
    )
    assert fs["metric"]["model_dir"] == "/var/lib/llama-models"


def test_a_rerun_changes_nothing(mon: Monitoring, monitored: Run) -> None:
    before = mon.site.sh("systemctl show prometheus.service -p MainPID,ActiveEnterTimestamp")
    run = mon.deploy()
    assert run.changed_operations() == []
    assert mon.site.sh("systemctl show prometheus.service -p MainPID,ActiveEnterTimestamp") == (
        before
    )


def test_without_the_credentials_file_the_scrape_fails(mon: Monitoring, monitored: Run) -> None:
    host = mon.site.host.name
    path = key_file(host)
    target = f"llama-server/{host}"

    def error() -> str:
        t = mon.targets()[target]
        return str(t["lastError"]) if t["health"] == "down" else ""

    # A key that is not the server's: 401.
    mon.site.sh(f"printf not-the-server-key-0123456789 >{path}")
    wait_for("a 401", lambda: "401 Unauthorized" in error())
    # No file at all: Prometheus cannot read it, and says so.
    mon.site.sh(f"rm {path}")
    wait_for("a missing credentials file", lambda: "credentials file" in error())
    (down,) = mon.query(f'up{{job="llama-server", host="{host}"}}')
    assert down["value"][1] == "0"

    # The deploy puts the key back; Prometheus reads it at the next scrape, no reload.
    run = mon.deploy()
    assert set(run.changed_operations()) == {
        f"Credentials file for {host}",
        f"Copy the API key of {host} to Prometheus",
    }
    wait_for("the target up again", lambda: _up(mon, target))
    assert mon.deploy().changed_operations() == []


def test_a_host_removed_from_the_inventory_leaves_the_targets(
    mon: Monitoring, monitored: Run
) -> None:
    host = mon.site.host.name
    ghost_key = key_file(GHOST)
    # GHOST is in the inventory (a host to scrape) but not in the run: --limit.
    run = mon.deploy("--limit", host, LLAMAHOST_LOCAL_EXTRA_HOSTS=GHOST)
    assert INSTALL_OP in run.changed_operations()
    assert RELOAD_OP in run.changed_operations()
    assert f"{GHOST} is not in this run" in run.output
    wait_for("the new host's targets", lambda: f"llama-server/{GHOST}" in mon.targets())
    assert f"node/{GHOST}" in mon.targets()
    assert mon.site.sh(f"test -f {ghost_key} && echo present").strip() == "present"

    # Gone from the inventory: gone from the targets, its credentials file removed.
    run = mon.deploy()
    changed = run.changed_operations()
    assert f"Remove the key of a host no longer in the inventory ({ghost_key})" in changed
    assert INSTALL_OP in changed and RELOAD_OP in changed
    wait_for(
        "the removed host's targets gone",
        lambda: not any(GHOST in name for name in mon.targets()),
    )
    assert _up(mon, f"llama-server/{host}")
    assert mon.site.sh(f"test -e {ghost_key} || echo gone").strip() == "gone"
    assert "ghost" not in mon.site.sh("cat /etc/prometheus/prometheus.yml")
    assert mon.deploy().changed_operations() == []
