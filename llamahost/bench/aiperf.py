"""aiperf's side: the configuration of one level, and what its exports say.

The key never reaches aiperf's command line: aiperf 0.13's ``--api-key`` is an argument
(visible in ``ps`` and in its own ``run_info.cli_command``), but its YAML configuration
substitutes ``${VAR}`` from the environment. So each level is one configuration file
(JSON, which YAML reads) whose ``apiKey`` is ``${LLAMAHOST_BENCH_API_KEY}``, and the key
is in that variable of aiperf's environment only. aiperf writes it to no export (it
redacts ``api_key`` when it serialises its configuration; the e2e test greps every file).

Exports read (aiperf 0.13): ``profile_export_aiperf.json`` (one object per metric tag,
each with a ``unit`` and ``avg``/``p50``/``p95``/``p99``…) and ``profile_export.jsonl``
(one record per request, an ``error`` object on a failed one). When every request of a
level fails aiperf writes no summary, only the records: errors are counted from those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamahost.bench.workload import Level

KEY_ENV = "LLAMAHOST_BENCH_API_KEY"
SUMMARY = "profile_export_aiperf.json"
RECORDS = "profile_export.jsonl"
PROFILING = "profiling"


def config(
    *,
    level: Level,
    model: str,
    url: str,
    tokenizer: str,
    seed: int,
    artifacts: str,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """aiperf's configuration for one level of the sweep (write it as JSON)."""
    return {
        "schemaVersion": "2.0",
        "randomSeed": seed,
        "benchmark": {
            "model": model,
            "endpoint": {
                "url": url.rstrip("/") + "/v1/chat/completions",
                "type": "chat",
                "streaming": True,
                "timeout": timeout_s,
                "apiKey": "${" + KEY_ENV + "}",
                # Counts from the server's `usage`: the server's tokenizer is the truth
                # (a test tokenizer only approximates it).
                "useServerTokenCount": True,
                # A new connection per request: llama-server (cpp-httplib) closes an idle
                # kept-alive connection after 5 s, and a pooled one reused just then fails
                # as "Cannot write to closing transport", an error of the client, not of
                # the server. Setting up a connection costs microseconds against TTFT.
                "connectionReuse": "never",
                # Output length forced: llama-server generates exactly max_tokens.
                # A fixed sampling seed as well as a fixed prompt seed.
                "extra": {"ignore_eos": True, "seed": seed},
            },
            "tokenizer": {"name": tokenizer},
            "dataset": {
                "type": "synthetic",
                "entries": max(level.requests, 1),
                "prompts": {
                    "isl": {"mean": level.isl, "stddev": 0},
                    "osl": {"mean": level.osl, "stddev": 0},
                },
            },
            "warmup": {
                "type": "concurrency",
                "requests": level.warmup,
                "concurrency": min(level.warmup, level.concurrency),
            },
            "profiling": {
                "type": "concurrency",
                "requests": level.requests,
                "concurrency": level.concurrency,
            },
            "artifacts": {"dir": artifacts, "summary": ["json"]},
            # /metrics needs the key and is sampled by the bench itself; no GPU exporter.
            "serverMetrics": {"enabled": False},
            "gpuTelemetry": {"enabled": False},
        },
    }


@dataclass(frozen=True)
class ClientStats:
    """What aiperf measured at one level (times in ms, rates per second)."""

    requests: int  # completed without error
    errors: int
    ttft_p50: float | None
    ttft_p95: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p95: float | None
    tps_user_p50: float | None  # output tokens/s of one conversation
    tps_total: float | None  # output tokens/s of the host
    req_s: float | None
    isl_avg: float | None  # prompt tokens, as the server counted them
    osl_avg: float | None
    duration_s: float | None
    error_kinds: dict[str, int]


def _stat(summary: dict[str, Any], tag: str, stat: str) -> float | None:
    m = summary.get(tag)
    if not isinstance(m, dict):
        return None
    v = m.get(stat)
    return float(v) if isinstance(v, (int, float)) else None


def read_records(path: Path) -> tuple[int, int, dict[str, int]]:
    """(successes, errors, errors by kind) of the profiling phase, from the records."""
    ok = errors = 0
    kinds: dict[str, int] = {}
    if not path.exists():
        return 0, 0, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        meta = rec.get("metadata") or {}
        if meta.get("benchmark_phase", PROFILING) != PROFILING:
            continue
        err = rec.get("error")
        if err:
            errors += 1
            kind = str(err.get("code") or err.get("type") or "error")
            kinds[kind] = kinds.get(kind, 0) + 1
        else:
            ok += 1
    return ok, errors, kinds


def read(artifacts: Path) -> ClientStats:
    """One level's figures from aiperf's artifact directory."""
    ok, errors, kinds = read_records(artifacts / RECORDS)
    summary_path = artifacts / SUMMARY
    s: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if s:
        # The summary's own counts win; the records cover the all-failed case.
        ok = int(_stat(s, "request_count", "avg") or ok)
        errors = max(errors, int(_stat(s, "error_request_count", "avg") or 0))
    tps_user = _stat(s, "output_token_throughput_per_user", "p50")
    latency = _stat(s, "request_latency", "p50")
    osl = _stat(s, "output_sequence_length", "p50")
    if tps_user is None and ok and latency and osl:
        # aiperf gives no per-user rate when nothing came after the first chunk (inter-token
        # latency 0: the whole answer in one read, as a tiny model's can be): the answer's
        # tokens over its whole latency stand in, a lower bound of the rate.
        tps_user = osl / (latency / 1000)
    return ClientStats(
        requests=ok,
        errors=errors,
        ttft_p50=_stat(s, "time_to_first_token", "p50"),
        ttft_p95=_stat(s, "time_to_first_token", "p95"),
        ttft_p99=_stat(s, "time_to_first_token", "p99"),
        itl_p50=_stat(s, "inter_token_latency", "p50"),
        itl_p95=_stat(s, "inter_token_latency", "p95"),
        tps_user_p50=tps_user,
        tps_total=_stat(s, "output_token_throughput", "avg"),
        req_s=_stat(s, "request_throughput", "avg"),
        isl_avg=_stat(s, "input_sequence_length", "avg"),
        osl_avg=_stat(s, "output_sequence_length", "avg"),
        duration_s=_stat(s, "benchmark_duration", "avg"),
        error_kinds=kinds,
    )
