"""The bench report: one JSON per host and run, a CSV row per level, a markdown summary
that applies the tuning guide's ladders to the numbers, and the ratio of two runs.

The ladders (the guide's section 4, restated in docs/bench.md):

* time to first token high: make sure flash attention is on; lower ``-ub`` a little; lower
  ``--parallel`` if it is too high. Above ``--parallel`` requests wait for a slot
  (``llamacpp:requests_deferred``): there the time to first token is queueing, and the
  remedy is more slots (if the memory plan allows) or another host.
* throughput below expectations: raise ``-ub`` step by step (1024 → 1536 → 2048) while
  VRAM allows; raise ``--parallel`` step by step (4 → 6 → 8) watching latency; make sure
  the build has CUDA (``-DGGML_CUDA=ON``).
* out of memory: lower ``-ub`` (2048 → 1024), then ``--parallel`` (8 → 6 → 4), then ``-c``
  (32k → 16k); keep the q8_0 KV cache.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import asdict, dataclass
from typing import Any

from llamahost.bench.aiperf import ClientStats
from llamahost.bench.metrics import GpuStats, ServerStats
from llamahost.bench.workload import Level, WorkloadError

KIND = "llamahost-bench"
VERSION = 1

# The targets a profile is judged against, unless --slo says otherwise: time to first
# token p95 in seconds, output tokens/s of one conversation (p50). Chosen from what each
# profile is for (docs/bench.md, "Targets"); the tiny CPU model's are only there to run
# the summary's logic.
TARGETS: dict[str, dict[str, float]] = {
    "low-latency": {"ttft_p95": 1.5, "tps_user": 20.0},
    "balanced": {"ttft_p95": 6.0, "tps_user": 12.0},
    "long-context": {"ttft_p95": 20.0, "tps_user": 8.0},
    "cpu-demo": {"ttft_p95": 5.0, "tps_user": 1.0},
}
SLO_METRICS = {"ttft_p95": "s", "tps_user": "tok/s"}

# The per-level figures, in the CSV's order: (column, unit, higher is better).
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("ttft_p50_ms", "ms", False),
    ("ttft_p95_ms", "ms", False),
    ("ttft_p99_ms", "ms", False),
    ("itl_p50_ms", "ms", False),
    ("itl_p95_ms", "ms", False),
    ("tps_user_p50", "tok/s", True),
    ("tps_total", "tok/s", True),
    ("req_s", "req/s", True),
    ("errors", "", False),
    ("busy_slots_max", "", True),
    ("deferred_max", "", False),
    ("prompt_tokens_cached", "tok", True),
    ("gpu_mem_peak_mib", "MiB", False),
    ("gpu_util_mean", "%", True),
)


def parse_slo(text: str) -> dict[str, float]:
    """``ttft_p95=2s,tps_user=15``: seconds (``ms`` allowed) and tokens/s."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in SLO_METRICS:
            raise WorkloadError("slo", name, f"is not a known metric; known: {sorted(SLO_METRICS)}")
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", value) if eq else None
        if m is None:
            raise WorkloadError("slo", part, "must be name=number (ttft_p95=2s, tps_user=15)")
        v = float(m.group(1))
        if m.group(2) == "ms":
            if name != "ttft_p95":
                raise WorkloadError("slo", part, "only ttft_p95 takes a time unit")
            v /= 1000
        elif m.group(2) == "s" and name != "ttft_p95":
            raise WorkloadError("slo", part, "only ttft_p95 takes a time unit")
        if v <= 0:
            raise WorkloadError("slo", part, "must be more than 0")
        out[name] = v
    return out


@dataclass(frozen=True)
class LevelResult:
    level: Level
    client: ClientStats
    server: ServerStats
    gpu: GpuStats | None = None  # GPU hosts only

    def row(self) -> dict[str, Any]:
        c, s, g = self.client, self.server, self.gpu
        return {
            "concurrency": self.level.concurrency,
            "isl": self.level.isl,
            "osl": self.level.osl,
            "requests": c.requests,
            "errors": c.errors,
            "ttft_p50_ms": c.ttft_p50,
            "ttft_p95_ms": c.ttft_p95,
            "ttft_p99_ms": c.ttft_p99,
            "itl_p50_ms": c.itl_p50,
            "itl_p95_ms": c.itl_p95,
            "tps_user_p50": c.tps_user_p50,
            "tps_total": c.tps_total,
            "req_s": c.req_s,
            "isl_server_avg": c.isl_avg,
            "osl_server_avg": c.osl_avg,
            "duration_s": c.duration_s,
            "busy_slots_max": s.busy_slots_max,
            "busy_slots_mean": s.busy_slots_mean,
            "deferred_max": s.deferred_max,
            "prompt_tokens": s.prompt_tokens,
            "prompt_tokens_cached": s.prompt_tokens_cached,
            "tokens_predicted": s.tokens_predicted,
            "metrics_samples": s.samples,
            "gpu_mem_peak_mib": g.memory_used_peak_mib if g else None,
            "gpu_mem_total_mib": g.memory_total_mib if g else None,
            "gpu_util_peak": g.util_peak if g else None,
            "gpu_util_mean": g.util_mean if g else None,
            "note": self.level.note,
        }


def build(
    *,
    host: str,
    profile: dict[str, Any],
    purpose: str,
    seed: int,
    targets: dict[str, float],
    results: list[LevelResult],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The JSON report of one host's run. ``profile``: the profile's settings that matter
    to the ladders (name, parallel, context, micro_batch, flash_attn, kv_unified, uses_gpu)."""
    return {
        "kind": KIND,
        "version": VERSION,
        "host": host,
        "profile": profile,
        "workload": {"purpose": purpose, "seed": seed},
        "targets": targets,
        **meta,
        "levels": [
            {**r.row(), "error_kinds": r.client.error_kinds, "server": asdict(r.server)}
            for r in results
        ],
    }


def csv_text(reports: list[dict[str, Any]]) -> str:
    fields = ["host", "profile", "run", "concurrency", "isl", "osl", "requests"]
    fields += [c for c, _, _ in COLUMNS if c not in fields]
    fields += ["isl_server_avg", "osl_server_avg", "busy_slots_mean", "note"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for rep in reports:
        for lv in rep["levels"]:
            w.writerow(
                {
                    **lv,
                    "host": rep["host"],
                    "profile": rep["profile"]["name"],
                    "run": rep.get("run", ""),
                }
            )
    return buf.getvalue()


# Peak GPU memory from which a level's note warns of the OOM ladder (nvidia-smi's share).
GPU_MEMORY_NEAR_FULL = 0.95


def _lower_ub(ub: int) -> int:
    """The guide's "a little": one step of 512 (its own steps are 1024/1536/2048)."""
    return max(512, ub - 512)


def ladder_notes(report: dict[str, Any]) -> list[str]:
    """The guide's ladders applied to each level, worst first within a level."""
    p = report["profile"]
    t = report["targets"]
    notes: list[str] = []
    parallel, ub = int(p["parallel"]), int(p["micro_batch"])
    for lv in report["levels"]:
        c = lv["concurrency"]
        if lv["errors"]:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(lv["error_kinds"].items()))
            why = ""
            if any("401" in k or "auth" in k.lower() for k in lv["error_kinds"]):
                why = " The key was refused: check the host's key (docs/secrets.md)."
            elif any("memory" in k.lower() for k in lv["error_kinds"]):
                why = (
                    " Out of memory: the OOM ladder: lower -ub (2048 → 1024), then "
                    "--parallel (8 → 6 → 4), then -c (32k → 16k); keep q8_0 KV."
                )
            notes.append(
                f"Concurrency {c}: {lv['errors']} of {lv['errors'] + lv['requests']} "
                f"requests failed ({kinds}).{why}"
            )
        used, total = lv.get("gpu_mem_peak_mib"), lv.get("gpu_mem_total_mib")
        if used is not None and total and used / total >= GPU_MEMORY_NEAR_FULL:
            notes.append(
                f"Concurrency {c}: peak GPU memory {used / 1024:.1f} of {total / 1024:.1f} GiB "
                f"({used / total:.0%}): a longer prompt or one more slot may not fit; the OOM "
                f"ladder, before it happens: lower -ub ({ub} → {_lower_ub(ub)}), then "
                "--parallel, then -c; keep q8_0 KV."
            )
        ttft = lv["ttft_p95_ms"]
        if ttft is not None and ttft / 1000 > t["ttft_p95"]:
            head = (
                f"Concurrency {c}: TTFT p95 {ttft / 1000:.2f} s exceeds the target "
                f"{t['ttft_p95']:g} s"
            )
            deferred = lv["deferred_max"] or 0
            if c > parallel or deferred > 0:
                notes.append(
                    f"{head}; {c} requests for {parallel} slots, up to {deferred:g} "
                    "deferred: the wait is for a slot. More slots (--parallel up, if "
                    "`make plan` shows the memory) or another host; below the slot count "
                    "the TTFT ladder applies."
                )
            else:
                steps = []
                if p.get("flash_attn") != "on":
                    steps.append("turn flash attention on (-fa on)")
                if ub > 512:
                    steps.append(f"lower -ub a little ({ub} → {_lower_ub(ub)})")
                if parallel > 4:
                    steps.append(f"lower --parallel ({parallel} → {max(4, parallel - 2)})")
                notes.append(
                    f"{head} with every request in a slot: the guide's TTFT ladder: "
                    + ("; ".join(steps) or "nothing left to lower: a faster GPU or shorter prompts")
                    + "."
                )
        tps = lv["tps_user_p50"]
        if tps is not None and tps < t["tps_user"] and c <= parallel:
            steps = []
            if ub < 2048:
                steps.append(
                    f"raise -ub step by step ({ub} → {min(2048, ub + 512)}) while VRAM allows"
                )
            if parallel < 8:
                steps.append(
                    f"raise --parallel ({parallel} → {min(8, parallel + 2)}) watching latency"
                )
            steps.append(
                "make sure the build has CUDA (-DGGML_CUDA=ON)"
                if p.get("uses_gpu")
                else "this host serves from the CPU: a GPU profile is the remedy"
            )
            notes.append(
                f"Concurrency {c}: {tps:.1f} output tok/s per conversation is below the "
                f"target {t['tps_user']:g}: the guide's throughput ladder: "
                + "; ".join(steps)
                + "."
            )
    return notes


def meets(lv: dict[str, Any], targets: dict[str, float]) -> bool:
    ttft, tps = lv["ttft_p95_ms"], lv["tps_user_p50"]
    return (
        not lv["errors"]
        and ttft is not None
        and tps is not None
        and ttft / 1000 <= targets["ttft_p95"]
        and tps >= targets["tps_user"]
    )


def summary(report: dict[str, Any]) -> str:
    p, t = report["profile"], report["targets"]
    lines = [
        f"# Bench: {report['host']} ({p['name']})",
        "",
        f"Workload: {report['workload']['purpose']}; seed {report['workload']['seed']}; "
        f"{p['parallel']} slots, -ub {p['micro_batch']}, -c {p['context']}. "
        f"Targets: TTFT p95 ≤ {t['ttft_p95']:g} s, ≥ {t['tps_user']:g} output tok/s per "
        "conversation.",
        *(
            [
                "",
                f"The host: its instances {', '.join(report['instances'])}, each level run on "
                "all of them at once (concurrency, requests, tok/s total, req/s summed; "
                "latencies the worst instance's; tok/s per user the slowest's).",
            ]
            if report.get("instances")
            else []
        ),
        "",
        "| concurrency | prompt/output | TTFT p50/p95/p99 (s) | ITL p50/p95 (ms) "
        "| tok/s per user | tok/s total | req/s | errors | busy slots (max) | deferred (max) "
        "| prompt tok from cache |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gpu = any(lv.get("gpu_mem_peak_mib") is not None for lv in report["levels"])
    if gpu:
        lines[-2] += " GPU memory peak (GiB) | GPU util mean/peak (%) |"
        lines[-1] += "---|---|"

    def f(v: Any, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        return "–" if v is None else fmt.format(v * scale)

    for lv in report["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['isl']}/{lv['osl']} | "
            f"{f(lv['ttft_p50_ms'], 1e-3)}/{f(lv['ttft_p95_ms'], 1e-3)}/"
            f"{f(lv['ttft_p99_ms'], 1e-3)} | {f(lv['itl_p50_ms'], fmt='{:.1f}')}/"
            f"{f(lv['itl_p95_ms'], fmt='{:.1f}')} | {f(lv['tps_user_p50'], fmt='{:.1f}')} | "
            f"{f(lv['tps_total'], fmt='{:.1f}')} | {f(lv['req_s'])} | {lv['errors']} | "
            f"{f(lv['busy_slots_max'], fmt='{:g}')} | {f(lv['deferred_max'], fmt='{:g}')} | "
            f"{f(lv['prompt_tokens_cached'], fmt='{:g}')} |"
            + (
                f" {f(lv['gpu_mem_peak_mib'], 1 / 1024, '{:.1f}')} | "
                f"{f(lv['gpu_util_mean'], fmt='{:.0f}')}/{f(lv['gpu_util_peak'], fmt='{:.0f}')} |"
                if gpu
                else ""
            )
        )
    ok = [lv for lv in report["levels"] if meets(lv, t)]
    lines.append("")
    if ok:
        best = max(ok, key=lambda lv: lv["concurrency"])
        lines.append(
            f"Meets the targets up to concurrency {best['concurrency']} "
            f"({best['tps_total']:.1f} output tok/s in total)."
        )
    else:
        lines.append("No level meets the targets.")
    notes = ladder_notes(report)
    lines += ["", *(f"- {n}" for n in notes)] if notes else ["", "- Nothing to tune."]
    cut = [lv for lv in report["levels"] if lv.get("note")]
    for lv in cut:
        lines.append(f"- Concurrency {lv['concurrency']}: {lv['note']}.")
    return "\n".join(lines) + "\n"


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """B over A per level present in both and per metric (None where either is missing
    or A is 0). ``better``: whether the ratio is an improvement."""
    for name, rep in (("A", a), ("B", b)):
        if rep.get("kind") != KIND:
            raise WorkloadError("compare", name, f"is not a {KIND} report")
    rows = []
    a_levels = {lv["concurrency"]: lv for lv in a["levels"]}
    for lv in b["levels"]:
        base = a_levels.get(lv["concurrency"])
        if base is None:
            continue
        for col, unit, higher in COLUMNS:
            x, y = base.get(col), lv.get(col)
            ratio = (
                y / x if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x else None
            )
            rows.append(
                {
                    "concurrency": lv["concurrency"],
                    "metric": col,
                    "unit": unit,
                    "a": x,
                    "b": y,
                    "ratio": ratio,
                    "better": None if ratio is None or ratio == 1 else (ratio > 1) == higher,
                }
            )
    if not rows:
        raise WorkloadError("compare", "levels", "the two runs share no concurrency level")
    return rows


def render_compare(rows: list[dict[str, Any]], a_name: str, b_name: str) -> str:
    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.4g}"

    out = [
        f"B = {b_name}\nA = {a_name}\n",
        f"{'conc':>4}  {'metric':<22}{'A':>12}{'B':>12}{'B/A':>9}",
    ]
    for r in rows:
        mark = {True: "  better", False: "  worse", None: ""}[r["better"]]
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}"
        out.append(
            f"{r['concurrency']:>4}  {r['metric']:<22}{f(r['a']):>12}{f(r['b']):>12}"
            f"{ratio:>9}{mark}"
        )
    return "\n".join(out) + "\n"


# How a host's level is made from its instances' levels, swept at the same time: counts and
# throughputs add up; latencies are the worst instance's (a percentile of the host's requests
# cannot be made from the instances' percentiles); per-user speed the slowest instance's.
_SUMMED = ("concurrency", "requests", "errors", "tps_total", "req_s", "busy_slots_max",
           "deferred_max", "prompt_tokens", "prompt_tokens_cached", "tokens_predicted")  # fmt: skip
_WORST = ("ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p95_ms",
          "duration_s", "gpu_mem_peak_mib", "gpu_util_peak")  # fmt: skip


def combine(host: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The host's report from its instances' reports of one run (the same workload, each
    level run on every instance at once): one level per level index."""
    first = reports[0]
    levels = []
    for i, lv in enumerate(first["levels"]):
        same = [r["levels"][i] for r in reports]

        def values(key: str, same: list[dict[str, Any]] = same) -> list[Any]:
            return [x.get(key) for x in same if x.get(key) is not None]

        row: dict[str, Any] = {k: None for k in lv}
        row.update(isl=lv["isl"], osl=lv["osl"], note=lv.get("note"))
        for k in _SUMMED:
            row[k] = sum(values(k)) if values(k) else None
        for k in _WORST:
            row[k] = max(values(k)) if values(k) else None
        row["tps_user_p50"] = min(values("tps_user_p50")) if values("tps_user_p50") else None
        row["error_kinds"] = {}
        for x in same:
            for kind, n in (x.get("error_kinds") or {}).items():
                row["error_kinds"][kind] = row["error_kinds"].get(kind, 0) + n
        row["instances"] = [r["host"] for r in reports]
        levels.append(row)
    return {
        **{k: v for k, v in first.items() if k != "levels"},
        "host": host,
        "instances": [r["host"] for r in reports],
        "levels": levels,
    }
