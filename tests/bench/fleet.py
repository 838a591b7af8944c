"""Benchmark, not a test: bring-up of a fleet of fresh hosts that share one build id,
against one fresh host.

    python -m tests.bench.fleet [--hosts 3]

In one run: one fresh Debian 12 test host brought up from nothing with an empty build
cache (it compiles), then rerun; then N fresh hosts in one inventory with another empty
cache (one compiles, the others receive), then rerun; then N more fresh hosts with the
now warm cache (nobody compiles). Prints each wall time and the ratios N hosts / 1 host
(goals: fresh ≤ 1.3, rerun ≤ 1.5).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tests.e2e.conftest import MODEL_FILE, MODEL_REPO
from tests.e2e.test_fleet import Fleet
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive
from tests.support.tinygguf import write as write_tiny


def bring_up(names: list[str], hub_url: str, workdir: Path) -> tuple[float, float]:
    """Wall seconds of the first deploy and of the rerun of fresh hosts."""
    fleet = Fleet.create(names, hub_url, workdir)
    try:
        first = fleet.deploy()
        if first.rc != 0:
            raise SystemExit(first.output[-4000:])
        again = fleet.deploy()
        if again.rc != 0 or again.changed_operations():
            raise SystemExit(f"rerun changed {again.changed_operations()}: {again.output[-4000:]}")
        return first.seconds, again.seconds
    finally:
        fleet.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-cache fleet")
    a = ap.parse_args()
    archive()
    pid = os.getpid()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hub"
        (root / MODEL_REPO).mkdir(parents=True)
        write_tiny(str(root / MODEL_REPO / MODEL_FILE))
        with HubServer(root) as hub:
            one_dir, many_dir = Path(tmp) / "one", Path(tmp) / "many"
            one_dir.mkdir()
            many_dir.mkdir()
            one = bring_up([f"bench{pid}-solo"], hub.url, one_dir)
            print(f"1 fresh host: {one[0]:.0f} s, rerun {one[1]:.1f} s", flush=True)
            names = [f"bench{pid}-{i}" for i in range(a.hosts)]
            many = bring_up(names, hub.url, many_dir)
            print(f"{a.hosts} fresh hosts: {many[0]:.0f} s, rerun {many[1]:.1f} s", flush=True)
            print(f"fresh: {a.hosts} hosts / 1 host = {many[0] / one[0]:.2f} (goal <= 1.3)")
            print(f"rerun: {a.hosts} hosts / 1 host = {many[1] / one[1]:.2f} (goal <= 1.5)")
            if a.no_warm:
                return 0
            # The same cache, now holding the build: fresh hosts that never compile.
            warm = bring_up([f"bench{pid}-w{i}" for i in range(a.hosts)], hub.url, many_dir)
            print(f"{a.hosts} fresh hosts, warm cache: {warm[0]:.0f} s, rerun {warm[1]:.1f} s")
            print(f"fresh, warm cache / cold, {a.hosts} hosts = {warm[0] / many[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
