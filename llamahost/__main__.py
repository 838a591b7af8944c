"""python -m llamahost plan|lock INVENTORY

plan: for every host of the inventory, what its profile needs and gives, and whether it
      fits (exit 1 when any host does not fit or is invalid).
lock: resolve every host's model through the Hub API and write <inventory>.lock.json.

The inventory is read by pyinfra itself (`pyinfra INVENTORY debug-inventory --json`, which
connects to nothing), so groups and data merge exactly as in a deploy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

from llamahost import lock as locks
from llamahost.config import ConfigError, HostConfig, resolve
from llamahost.plan import plan_for, render


def inventory_hosts(inventory: str) -> list[tuple[str, dict[str, Any]]]:
    out = subprocess.run(
        [sys.executable, "-m", "pyinfra", inventory, "debug-inventory", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"cannot read {inventory}:\n{out.stderr[-2000:]}")
    return [(h["name"], h["data"]) for h in json.loads(out.stdout)]


def configs(inventory: str) -> tuple[list[HostConfig], list[str]]:
    cfgs, errors = [], []
    for name, data in inventory_hosts(inventory):
        try:
            cfgs.append(resolve(name, data))
        except ConfigError as e:
            errors.append(str(e))
    return cfgs, errors


def cmd_plan(inventory: str, use_lock: bool = True) -> int:
    cfgs, errors = configs(inventory)
    if not use_lock:
        cfgs = [dataclasses.replace(c, model_lock=None) for c in cfgs]
    for e in errors:
        print(e)
    ok = not errors
    for cfg in cfgs:
        hp = plan_for(cfg)
        print(render(hp))
        print()
        ok = ok and hp.fits
    print("plan: all hosts fit" if ok else "plan: some hosts do not fit or are invalid")
    return 0 if ok else 1


def cmd_lock(inventory: str) -> int:
    cfgs, errors = configs(inventory)
    if errors:
        print("\n".join(errors))
        return 1
    token = os.environ.get("HF_TOKEN")
    by_path: dict[str, list[HostConfig]] = {}
    for cfg in cfgs:
        by_path.setdefault(cfg.model_lock or str(locks.lock_path(inventory)), []).append(cfg)
    for path, group in by_path.items():
        models = locks.load(path)
        for cfg in group:
            k = locks.key(cfg)
            entry = locks.resolve(cfg, token)
            if models.get(k) != entry:
                print(
                    f"{k} -> {entry['file']} @ {entry['commit']} ({entry['size']} bytes, "
                    f"sha256 {entry['sha256']})"
                )
            models[k] = entry
        locks.save(path, models)
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m llamahost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("command", choices=["plan", "lock"])
    ap.add_argument("inventory")
    ap.add_argument(
        "--no-lock", action="store_true", help="plan: ignore the lock (what-if, estimates)"
    )
    a = ap.parse_args(argv)
    if a.command == "plan":
        return cmd_plan(a.inventory, use_lock=not a.no_lock)
    return cmd_lock(a.inventory)


if __name__ == "__main__":
    sys.exit(main())
