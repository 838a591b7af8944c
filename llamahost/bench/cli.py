"""``python -m llamahost bench``: the command line (docs/bench.md).

Everything the user gives is checked before any host is touched, and a refusal names the
field: a concurrency of 0, an unknown metric in --slo, a host not in the inventory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamahost import addresses as addr
from llamahost import instances as inst
from llamahost import inventory as inv
from llamahost.bench import report
from llamahost.bench.metrics import GPU_QUERY
from llamahost.bench.workload import WorkloadError, parse_levels, workload_for
from llamahost.layout import REPO
from llamahost.spec import HostSpec, inventory_specs, resolve_host

if TYPE_CHECKING:
    from llamahost.bench import run

USAGE = """python -m llamahost bench INVENTORY [--limit HOST] [--out DIR] [options]
       python -m llamahost bench INVENTORY --gateway [HOST] [--client NAME] [options]
       python -m llamahost bench --compare A.json B.json"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llamahost bench", usage=USAGE, description=__doc__)
    ap.add_argument("inventory", nargs="?")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="ratio B/A per metric")
    ap.add_argument("--limit", action="append", default=[], help="only this host (repeatable)")
    ap.add_argument("--out", help="output directory (default reports/bench/<UTC time>)")
    ap.add_argument("--concurrency", help="levels, e.g. 1,2,4 (default 1, 2, 4 … 2 × slots)")
    ap.add_argument("--requests", type=int, help="requests per level (default max(8, 3 × c))")
    ap.add_argument("--isl", type=int, help="prompt tokens (default: the profile's)")
    ap.add_argument("--osl", type=int, help="output tokens, forced (default: the profile's)")
    ap.add_argument("--seed", type=int, default=None, help="prompt and sampling seed")
    ap.add_argument("--slo", default="", help="targets, e.g. ttft_p95=2s,tps_user=15")
    ap.add_argument(
        "--tokenizer", help="a local tokenizer directory (default: Seed-OSS's, fetched once)"
    )
    ap.add_argument("--aiperf", help="the aiperf program (default .cache/bench-venv/bin/aiperf)")
    ap.add_argument("--key-file", help="a file holding the key (default: the host's, over SSH)")
    ap.add_argument("--url", help="the endpoint, for one host (default http://<address>:<port>)")
    ap.add_argument(
        "--gateway",
        nargs="?",
        const="",
        metavar="HOST",
        help="the whole fleet through its gateway (the first host of group `gateway`, or HOST)",
    )
    ap.add_argument(
        "--client", help="with --gateway: the client whose key is used (default: first)"
    )
    ap.add_argument("--label", default="", help="names this run in the plot and CSV")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per level (3600)")
    return ap


def out_dir(given: str | None, kind: str) -> Path:
    """--out, else reports/<kind>/<UTC time>; made."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(given) if given else REPO / "reports" / kind / stamp
    out.mkdir(parents=True, exist_ok=True)
    return out


def print_written(lines: list[str]) -> None:
    for line in lines:
        print(f"wrote {line}" if not line.startswith("no plot") else line)


def compare_main(a_path: str, b_path: str) -> int:
    def load(p: str) -> dict[str, Any]:
        try:
            out: dict[str, Any] = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"REFUSED compare={p!r}: {e}") from None
        return out

    try:
        rows = report.compare(load(a_path), load(b_path))
    except WorkloadError as e:
        print(f"REFUSED {e}")
        return 1
    print(report.render_compare(rows, a_path, b_path), end="")
    return 0


def bench_main(argv: list[str]) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.compare:
        return compare_main(*a.compare)
    if not a.inventory:
        ap.error("INVENTORY is required (or --compare A.json B.json)")
    try:
        levels = parse_levels(a.concurrency) if a.concurrency else None
        slo = report.parse_slo(a.slo)
        for field, v in (("requests", a.requests), ("isl", a.isl), ("osl", a.osl)):
            if v is not None and v < 1:
                raise WorkloadError(field, v, "must be 1 or more")
    except WorkloadError as e:
        print(f"REFUSED {e}")
        return 2
    try:
        hosts = inv.hosts(a.inventory)
    except inv.InventoryError as e:
        raise SystemExit(f"cannot read {a.inventory}: {e}") from None
    names = [h[0] for h in hosts]
    if a.gateway is not None:
        return gateway_main(a, hosts, levels, slo)
    unknown = [h for h in a.limit if h not in names]
    if unknown:
        print(f"REFUSED limit={unknown[0]!r}: not a host of {a.inventory} ({', '.join(names)})")
        return 2
    chosen = [h for h in hosts if not a.limit or h[0] in a.limit]
    if a.url and len(chosen) != 1:
        print(f"REFUSED url={a.url!r}: one host only (use --limit)")
        return 2
    specs, errors = inventory_specs(chosen)
    if errors:
        print("\n".join(f"REFUSED {e}" for e in errors))
        return 1
    specs = [s for s in specs if s.serves]  # a gateway- or monitoring-only host: nothing
    from llamahost.bench.workload import DEFAULT_SEED

    seed = DEFAULT_SEED if a.seed is None else a.seed
    plans = []
    try:
        for spec in specs:
            wl = workload_for(
                spec.profile, levels=levels, isl=a.isl, osl=a.osl, requests=a.requests, seed=seed
            )
            targets = {**report.TARGETS.get(spec.profile.name, report.TARGETS["balanced"]), **slo}
            plans.append((spec, wl, targets))
    except WorkloadError as e:
        print(f"REFUSED {e}")
        return 2

    from llamahost.bench import run
    from llamahost.bench import tokenizer as tok

    try:
        aiperf = run.aiperf_path(a.aiperf)
    except run.BenchError as e:
        print(f"REFUSED {e}")
        return 2
    out = out_dir(a.out, "bench")
    data = {name: d for name, d, _ in chosen}
    reports, failed = [], False
    for spec, wl, targets in plans:
        try:
            tokenizer = local_tokenizer(a.tokenizer) or str(tok.fetch(spec.cfg, REPO / ".cache"))
            key = run.read_key(spec.cfg, data[spec.name], a.key_file)
        except (run.BenchError, tok.TokenizerError, OSError) as e:
            print(f"FAILED {spec.name}: {e}")
            failed = True
            continue
        url = a.url or f"http://{addr.hostport(direct(spec), spec.profile.port)}"
        probe = run.ssh_command(spec.cfg, data[spec.name], GPU_QUERY) if spec.uses_gpu else []
        target = run.Target(spec.name, url, spec.profile.alias, spec.cfg, key, tuple(probe))
        print(
            f"{spec.name}: {wl.profile} ({wl.purpose}), levels "
            f"{', '.join(str(lv.concurrency) for lv in wl.levels)}, {url}"
        )
        try:
            several = [] if a.url else instance_targets(spec, data[spec.name], target)
        except run.BenchError as e:
            print(f"FAILED {spec.name}: {e}")
            failed = True
            continue
        if several:
            print(f"{spec.name}: {len(several)} instances, each level on all of them at once")
            try:
                reps = run.run_instances(
                    spec.name, several, wl, targets, aiperf=aiperf, tokenizer=tokenizer,
                    out=out, run_label=a.label, timeout_s=a.timeout,
                )  # fmt: skip
            except run.BenchError as e:
                print(f"FAILED {spec.name}: {e}")
                failed = True
                continue
            reports += reps
            print(report.summary(reps[-1]))
            failed = failed or any(lv["errors"] for r in reps for lv in r["levels"])
            continue
        try:
            rep = run.run_host(
                target,
                wl,
                targets,
                aiperf=aiperf,
                tokenizer=tokenizer,
                out=out,
                run_label=a.label,
                timeout_s=a.timeout,
            )
        except run.BenchError as e:
            print(f"FAILED {spec.name}: {e}")
            failed = True
            continue
        reports.append(rep)
        print(report.summary(rep))
        failed = failed or any(lv["errors"] for lv in rep["levels"])
    if reports:
        print_written(run.write_run(reports, out, aiperf))
    print(f"bench: {out}")
    return 1 if failed or not reports else 0


def instance_targets(spec: HostSpec, data: dict[str, Any], target: run.Target) -> list[run.Target]:
    """A host with several llama-servers: one target per instance (``host:N``, its port);
    none for a host with one. A GPU host's ``per-gpu`` count is read from its sysfs over
    SSH, as the deploy reads it."""
    xs = with_topology(spec, data).instances
    if len(xs) < 2:
        return []
    return [
        dataclasses.replace(
            target, host=x.server(spec.name), url=f"http://{addr.hostport(direct(spec), x.port)}"
        )
        for x in xs
    ]


def with_topology(spec: HostSpec, data: dict[str, Any]) -> HostSpec:
    """The spec with the GPUs its host shows: a GPU host's ``per-gpu`` count is read from
    its sysfs over SSH, as the deploy reads it (nothing is read for a CPU host or a count)."""
    from llamahost.bench import run

    if not (spec.serves and spec.uses_gpu and spec.cfg.instances == inst.PER_GPU):
        return spec
    argv = run.ssh_command(spec.cfg, data, inst.TOPOLOGY_COMMAND)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if p.returncode != 0:
        raise run.BenchError(
            f"{spec.name}: its GPUs could not be read over SSH: {p.stderr.strip()[-300:]}"
        )
    return dataclasses.replace(spec, topology=inst.parse_topology(p.stdout.splitlines()))


def direct(spec: HostSpec) -> str:
    """Where the controller reaches a host's llama-server: its listen address when that is
    one address, else the host's address (as the compliance checks reach it)."""
    return addr.reach("the controller", spec.name, spec.address, spec.profile.host,
                      "llama-server", "llama_host")  # fmt: skip


def local_tokenizer(given: str | None) -> str | None:
    """--tokenizer as an absolute path: aiperf runs in each level's directory."""
    return str(Path(given).resolve()) if given else None


def gateway_main(
    a: argparse.Namespace,
    hosts: list[tuple[str, dict[str, Any], list[str]]],
    levels: tuple[int, ...] | None,
    slo: dict[str, float],
) -> int:
    """The fleet through its gateway: what its clients see (TLS, the queue, every host).
    The sweep runs to twice the fleet's slots; server-side figures are the gateway's to
    give, not one host's, so they are left out (bench a host with --limit for those)."""
    from llamahost.bench import run
    from llamahost.bench import tokenizer as tok
    from llamahost.bench.workload import DEFAULT_SEED, sweep
    from llamahost.gateway import haproxy as hx
    from llamahost.gateway.clients import read_client_keys
    from llamahost.gateway.settings import GROUP, controller_file

    gws = [h for h in hosts if GROUP in h[2] and (not a.gateway or h[0] == a.gateway)]
    if not gws:
        why = "is not a host of group `gateway`" if a.gateway else "no group `gateway`"
        print(f"REFUSED gateway={a.gateway!r}: {why} in {a.inventory}")
        return 2
    if a.limit:
        print("REFUSED limit: --gateway benches the whole fleet; drop --limit")
        return 2
    specs, errors = inventory_specs(hosts)
    if errors:
        print("\n".join(f"REFUSED {e}" for e in errors))
        return 1
    gw = next(s for s in specs if s.name == gws[0][0])
    data = {name: d for name, d, _ in hosts}
    try:
        specs = [with_topology(s, data[s.name]) for s in specs if s.serves]
    except run.BenchError as e:
        print(f"FAILED {e}")
        return 1
    # Every llama-server the gateway balances: a host with several instances is several.
    servers = [x for s in specs for x in hx.servers(gw.name, [s])]
    slots = sum(x.maxconn for x in servers)
    first = specs[0]
    # One client key may hold only its share of the slots (llama_gateway_max_in_flight):
    # the default sweep stops there; --concurrency past it measures the 429s.
    share = hx.max_in_flight(gw.gateway, servers)
    default = sweep(slots)
    if share:
        default = tuple(sorted({c for c in default if c <= share} | {share}))
        if not levels:
            print(
                f"one client key may have {share} requests in flight on this gateway "
                "(llama_gateway_max_in_flight): the sweep stops there"
            )
    try:
        wl = workload_for(
            first.profile,
            levels=levels or default,
            isl=a.isl,
            osl=a.osl,
            requests=a.requests,
            seed=DEFAULT_SEED if a.seed is None else a.seed,
        )
        aiperf = run.aiperf_path(a.aiperf)
    except (WorkloadError, run.BenchError) as e:
        print(f"REFUSED {e}")
        return 2
    g = gw.gateway
    try:
        if a.key_file:
            key = Path(a.key_file).read_text().strip()
        else:
            clients = read_client_keys(controller_file(g.gateway_client_keys_file or ""))
            chosen = [c for c in clients if not a.client or c.name == a.client]
            if not chosen:
                print(f"REFUSED client={a.client!r}: not in the gateway's client keys file")
                return 2
            key = chosen[0].token()
        tokenizer = local_tokenizer(a.tokenizer) or str(tok.fetch(first.cfg, REPO / ".cache"))
    except (OSError, ValueError, tok.TokenizerError) as e:
        print(f"REFUSED {e}")
        return 2
    out = out_dir(a.out, "bench")
    data = {name: d for name, d, _ in hosts}
    try:
        ca = run.gateway_ca(gw, data[gw.name], out)
    except run.BenchError as e:
        print(f"FAILED {e}")
        return 1
    url = a.url or f"https://{addr.hostport(gw.address, g.gateway_port)}"
    target = run.Target(f"gateway-{gw.name}", url, first.profile.alias,
                        replace(first.cfg, profile=replace(first.profile, parallel=slots)),
                        key, ca_file=str(ca))  # fmt: skip
    targets = {**report.TARGETS.get(first.profile.name, report.TARGETS["balanced"]), **slo}
    print(
        f"{target.host}: {len(specs)} hosts, {len(servers)} llama-servers, {slots} slots, "
        f"{wl.profile} ({wl.purpose}), "
        f"levels {', '.join(str(lv.concurrency) for lv in wl.levels)}, {url}"
    )
    try:
        rep = run.run_host(target, wl, targets, aiperf=aiperf, tokenizer=tokenizer, out=out,
                           run_label=a.label, timeout_s=a.timeout, sample_server=False)  # fmt: skip
    except run.BenchError as e:
        print(f"FAILED {target.host}: {e}")
        return 1
    print(report.summary(rep))
    print_written(run.write_run([rep], out, aiperf))
    print(f"bench: {out}")
    return 1 if any(lv["errors"] for lv in rep["levels"]) else 0


TUNE_USAGE = """python -m llamahost tune INVENTORY --limit HOST (--profiles A,B | --vary KNOB=V1,V2)
       [--slo ttft_p95=2s,tps_user=15] [--out DIR] [bench options]"""


def deploy(inventory: str, host: str, extra: list[str], log: Path) -> int:
    """The normal deploy path, for one host, with candidate data laid over its own."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "pyinfra", "-y", inventory, "deploy.py", "--limit", host]
    with open(log, "w") as f:
        return subprocess.run(
            [*argv, *extra], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False
        ).returncode


def tune_main(argv: list[str]) -> int:
    """Deploy each candidate on one host, bench it, restore the host's own configuration
    at the end (also after a failure or Ctrl-C), and recommend one."""
    import signal

    from llamahost.bench import run, tune
    from llamahost.bench import tokenizer as tok
    from llamahost.bench.workload import DEFAULT_SEED

    ap = parser()
    ap.prog, ap.usage = "python -m llamahost tune", TUNE_USAGE
    ap.add_argument("--profiles", help="candidates: profiles, e.g. low-latency,balanced")
    ap.add_argument("--vary", help="candidates: one setting, e.g. micro_batch=512,1024,2048")
    a = ap.parse_args(argv)
    if not a.inventory or len(a.limit) != 1:
        print("REFUSED limit: tune needs INVENTORY and exactly one --limit HOST")
        return 2
    try:
        cands = tune.candidates(a.profiles, a.vary)
        levels = parse_levels(a.concurrency) if a.concurrency else None
        slo = report.parse_slo(a.slo)
    except WorkloadError as e:
        print(f"REFUSED {e}")
        return 2
    hosts = inv.hosts(a.inventory)
    data = {name: d for name, d, _ in hosts}
    host = a.limit[0]
    if host not in data:
        print(f"REFUSED limit={host!r}: not a host of {a.inventory} ({', '.join(data)})")
        return 2
    errors = tune.check(host, data[host], cands)
    if errors:
        print("\n".join(f"REFUSED {e}" for e in errors))
        return 2
    specs, spec_errors = inventory_specs([h for h in hosts if h[0] == host])
    if spec_errors:
        print("\n".join(f"REFUSED {e}" for e in spec_errors))
        return 1
    own = specs[0]
    try:
        aiperf = run.aiperf_path(a.aiperf)
        tokenizer = local_tokenizer(a.tokenizer) or str(tok.fetch(own.cfg, REPO / ".cache"))
        key = run.read_key(own.cfg, data[host], a.key_file)
    except (run.BenchError, tok.TokenizerError, OSError) as e:
        print(f"REFUSED {e}")
        return 2
    # Ctrl-C must reach the loop below (and so the restore), even when tune was started
    # with SIGINT ignored, as a shell does for a job it puts in the background.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = out_dir(a.out, "tune")
    reports: dict[str, dict[str, Any]] = {}
    report_paths: list[Path] = []
    try:
        for c in cands:
            d = out / re.sub(r"[^A-Za-z0-9_.=-]", "_", c.label)
            d.mkdir(exist_ok=True)
            print(f"{host}: deploying candidate {c.label}")
            if deploy(a.inventory, host, c.pyinfra_args(), d / "deploy.log") != 0:
                print(f"  deploy failed: {d / 'deploy.log'}")
                continue
            spec = resolve_host(host, {**data[host], **c.data})
            wl = workload_for(
                spec.profile,
                levels=levels,
                isl=a.isl,
                osl=a.osl,
                requests=a.requests,
                seed=DEFAULT_SEED if a.seed is None else a.seed,
            )
            targets = {**report.TARGETS.get(own.profile.name, report.TARGETS["balanced"]), **slo}
            url = a.url or f"http://{spec.address}:{spec.profile.port}"
            target = run.Target(host, url, spec.profile.alias, spec.cfg, key)
            try:
                reports[c.label] = run.run_host(
                    target, wl, targets, aiperf=aiperf, tokenizer=tokenizer, out=d,
                    run_label=c.label,
                )  # fmt: skip
            except run.BenchError as e:
                print(f"  bench failed: {e}")
                continue
            report_paths.append(d / f"{host}.json")
    finally:
        # The restore must finish: a second Ctrl-C is ignored until it has.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            print(f"{host}: restoring its own configuration")
            rc = deploy(a.inventory, host, [], out / "restore.log")
            print(f"  restore {'done' if rc == 0 else 'FAILED: ' + str(out / 'restore.log')}")
        finally:
            signal.signal(signal.SIGINT, old)
    if not reports:
        print("tune: no candidate was benched")
        return 1
    (out / "tune.md").write_text(tune.side_by_side(reports))
    print(tune.side_by_side(reports))
    for line in run.write_run(list(reports.values()), out, aiperf, report_paths):
        print(line)
    choice = tune.recommend(reports)
    if choice is None:
        print("tune: no candidate meets the targets at any level")
        return 1
    label, lv = choice
    print(
        f"tune: recommend {label}: meets the targets up to concurrency {lv['concurrency']} "
        f"({lv['tps_total']:.1f} output tok/s)"
    )
    return 0
