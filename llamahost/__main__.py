"""python -m llamahost plan|lock INVENTORY
   python -m llamahost builds list|prune [INVENTORY] [--cache DIR] [--keep N]
   python -m llamahost bench INVENTORY [--limit HOST] [--out DIR] [...]
   python -m llamahost bench --compare A.json B.json
   python -m llamahost tune INVENTORY --limit HOST (--profiles A,B | --vary KNOB=V1,V2)
   python -m llamahost watch URL --key-file FILE [--cacert PEM]

plan: for every host of the inventory, what its profile needs and gives, and whether it
      fits (exit 1 when any host does not fit or is invalid).
lock: resolve every host's model through the Hub API and write <inventory>.lock.json.
builds: the controller's cache of built llama.cpp trees (docs/build.md): list them, or
      prune all but the --keep most recently used; the cache is --cache, else those the
      inventory's hosts use (llama_cpp_build_cache), else .cache/builds.
bench: drive aiperf against each host's endpoint, a concurrency sweep with the profile's
      workload; JSON, CSV, PNG and a summary under --out (docs/bench.md). --compare: the
      ratio per metric of two reports.
tune: deploy each candidate on one host, bench it, restore the host, recommend one.
watch: stream chat completions through URL and print, every second, how many finished and
      how many failed (llamahost/watch.py): a change made visible.

The inventory is read by pyinfra itself (`pyinfra INVENTORY debug-inventory --json`, which
connects to nothing), so groups and data merge exactly as in a deploy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llamahost import build as builds
from llamahost import inventory as inv
from llamahost import lock as locks
from llamahost.fleet import inventory_specs
from llamahost.plan import plan_for, render
from llamahost.spec import HostSpec, lock_file


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
        if not spec.serves:
            print(f"host {spec.name}: serves no llama-server (llama_serve: false)\n")
            continue
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


def cmd_builds(action: str, caches: list[Path], keep: int) -> int:
    for cache in caches:
        entries = builds.cache_entries(cache)
        print(f"{cache}: {len(entries)} build(s)")
        for e in entries:
            i = e.info()
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used()))
            size = e.archive.stat().st_size / 2**20
            print(
                f"  {e.build_id}  {size:8.1f} MiB  used {used}  "
                f"{i.get('platform', '?')}  built by {i.get('built_by', '?')}"
            )
        if action == "prune":
            for e in builds.cache_to_prune(entries, keep):
                for f in e.files():
                    f.unlink(missing_ok=True)
                print(f"  removed {e.build_id}")
    return 0


def builds_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m llamahost builds", description=__doc__)
    ap.add_argument("action", choices=["list", "prune"])
    ap.add_argument("inventory", nargs="?")
    ap.add_argument("--cache", help="a cache directory (default: the inventory's)")
    ap.add_argument("--keep", type=int, default=2, help="prune: how many to keep (2)")
    a = ap.parse_args(argv)
    if a.keep < 0:
        ap.error("--keep must be 0 or more")
    if a.cache:
        caches = [builds.cache_dir(a.cache)]
    elif a.inventory:
        found, errors = specs(a.inventory, use_lock=False)
        if errors:
            print("\n".join(f"REFUSED {e}" for e in errors))
            return 1
        caches = sorted({builds.cache_dir(s.cfg.cpp_build_cache) for s in found})
    else:
        caches = [builds.cache_dir(None)]
    return cmd_builds(a.action, caches, a.keep)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["builds"]:
        return builds_main(argv[1:])
    if argv[:1] == ["bench"]:
        from llamahost.bench.cli import bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["watch"]:
        from llamahost.watch import main as watch_main

        return watch_main(argv[1:])
    if argv[:1] == ["tune"]:
        from llamahost.bench.cli import tune_main

        return tune_main(argv[1:])
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
