"""python -m llamahost plan|lock INVENTORY

plan: for every host of the inventory, what its profile needs and gives, and whether it
      fits (exit 1 when any host does not fit or is invalid).
lock: resolve every host's model through the Hub API and write <inventory>.lock.json.

The inventory is read by pyinfra itself (`pyinfra INVENTORY debug-inventory --json`, which
connects to nothing), so groups and data merge exactly as in a deploy.
"""

from __future__ import annotations

import argparse
import sys

from llamahost import inventory as inv
from llamahost import lock as locks
from llamahost.plan import plan_for, render
from llamahost.spec import HostSpec, inventory_specs, lock_file


def specs(inventory: str, use_lock: bool = True) -> tuple[list[HostSpec], list[str]]:
    try:
        hosts = inv.hosts(inventory)
    except inv.InventoryError as e:
        raise SystemExit(f"cannot read {inventory}: {e}") from None
    found, errors = inventory_specs(hosts, use_lock=use_lock)
    return found, [str(e) for e in errors]


def cmd_plan(inventory: str, use_lock: bool = True) -> int:
    found, errors = specs(inventory, use_lock)
    ok = not errors
    for spec in found:
        hp = plan_for(spec)
        print(render(hp))
        print()
        ok = ok and hp.fits
    # Refusals last, apart from the plans, where the eye lands.
    for e in errors:
        print(f"REFUSED {e}\n")
    print("plan: all hosts fit" if ok else "plan: REFUSED: some hosts do not fit or are invalid")
    return 0 if ok else 1


def cmd_lock(inventory: str) -> int:
    found, errors = specs(inventory, use_lock=False)
    if errors:
        print("\n".join(f"REFUSED {e}" for e in errors))
        return 1
    by_path: dict[str, list[HostSpec]] = {}
    for spec in found:
        lock = spec.cfg.model_lock
        path = str(lock_file(lock) if lock else locks.lock_path(inventory))
        by_path.setdefault(path, []).append(spec)
    for path, group in by_path.items():
        models = locks.load(path)
        for spec in group:
            k = locks.key(spec.cfg)
            entry = locks.resolve(spec.cfg)
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
