"""Benchmark, not a test: bring-up of a fleet of fresh hosts that share one build id,
against one fresh host, and reruns of 1, N and K hosts.

    python -m tests.bench.fleet [--hosts 3] [--rerun-hosts 10] [--json FILE]

In one run:
  1. one fresh Debian 12 test host brought up from nothing with an empty build cache (it
     compiles), then rerun;
  2. N fresh hosts (--hosts) in one inventory with another empty cache (one compiles, the
     others receive), then rerun;
  3. K fresh hosts (--rerun-hosts; 0 skips it) created from the now warm cache of step 2
     (nobody compiles: every host receives), then rerun.
Prints each wall time (pyinfra's whole run, host creation not included), the machine's load
average before and after each step, and the ratios against one host: fresh N / 1 (goal
<= 1.3), rerun N / 1 (<= 1.5), rerun K / 1 (<= 2). --json writes the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import MODEL_FILE, MODEL_REPO
from tests.e2e.fleet import Fleet
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive
from tests.support.tinygguf import write as write_tiny


def load() -> str:
    """The 1, 5 and 15 minute load averages (2 cores here)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bring_up(names: list[str], hub_url: str, workdir: Path) -> dict[str, Any]:
    """Wall seconds of the first deploy and of the rerun of fresh hosts, with the load."""
    workdir.mkdir(exist_ok=True)
    t0 = time.monotonic()
    fleet = Fleet.create(names, hub_url, workdir, workdir / "build-cache")
    created = time.monotonic() - t0
    try:
        out: dict[str, Any] = {"hosts": len(names), "create_s": round(created, 1)}
        out["load_before"] = load()
        first = fleet.deploy()
        if first.rc != 0:
            raise SystemExit(first.output[-4000:])
        out["fresh_s"] = round(first.seconds, 1)
        out["compiles"] = first.stderr.count("compiles it and the controller caches it")
        out["receives"] = first.stderr.count("receives it from the controller's cache")
        out["load_after_fresh"] = load()
        again = fleet.deploy()
        if again.rc != 0 or again.changed_operations():
            raise SystemExit(f"rerun changed {again.changed_operations()}: {again.output[-4000:]}")
        out["rerun_s"] = round(again.seconds, 1)
        out["load_after_rerun"] = load()
        return out
    finally:
        fleet.destroy()


def say(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label}: fresh {r['fresh_s']:.0f} s ({r['compiles']} compile, {r['receives']} "
        f"receive), rerun {r['rerun_s']:.1f} s; load {r['load_before']} -> "
        f"{r['load_after_fresh']} -> {r['load_after_rerun']}; hosts created in "
        f"{r['create_s']:.0f} s",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hosts", type=int, default=3, help="N: the cold fleet's size")
    ap.add_argument(
        "--rerun-hosts", type=int, default=10, help="K: fresh hosts from the warm cache (0: skip)"
    )
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    a = ap.parse_args()
    archive()
    pid = os.getpid()
    figures: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "started": time.strftime("%FT%TZ", time.gmtime()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hub"
        (root / MODEL_REPO).mkdir(parents=True)
        write_tiny(str(root / MODEL_REPO / MODEL_FILE))
        with HubServer(root) as hub:
            one = bring_up([f"bench{pid}-solo"], hub.url, Path(tmp) / "one")
            say("1 fresh host", one)
            figures["one"] = one
            many_dir = Path(tmp) / "many"
            many = bring_up([f"bench{pid}-{i}" for i in range(a.hosts)], hub.url, many_dir)
            say(f"{a.hosts} fresh hosts", many)
            figures["many"] = many
            ratios = {
                f"fresh_{a.hosts}_over_1": round(many["fresh_s"] / one["fresh_s"], 2),
                f"rerun_{a.hosts}_over_1": round(many["rerun_s"] / one["rerun_s"], 2),
            }
            if a.rerun_hosts:
                # The same cache, now holding the build: fresh hosts that never compile.
                names = [f"bench{pid}-w{i}" for i in range(a.rerun_hosts)]
                warm = bring_up(names, hub.url, many_dir)
                say(f"{a.rerun_hosts} fresh hosts, warm cache", warm)
                figures["warm"] = warm
                ratios[f"rerun_{a.rerun_hosts}_over_1"] = round(warm["rerun_s"] / one["rerun_s"], 2)
                ratios[f"fresh_{a.rerun_hosts}_warm_over_1_cold"] = round(
                    warm["fresh_s"] / one["fresh_s"], 2
                )
    figures["ratios"] = ratios
    figures["finished"] = time.strftime("%FT%TZ", time.gmtime())
    goals = {f"fresh_{a.hosts}_over_1": 1.3, f"rerun_{a.hosts}_over_1": 1.5}
    goals[f"rerun_{a.rerun_hosts}_over_1"] = 2.0
    for k, v in ratios.items():
        goal = f" (goal <= {goals[k]})" if k in goals else ""
        print(f"{k.replace('_', ' ')} = {v:.2f}{goal}")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
