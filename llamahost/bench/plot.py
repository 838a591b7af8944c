"""The bench plot: total output tokens/s against time-to-first-token p95, one line per run,
each point labelled with its concurrency.

Runs with the bench environment's Python, where aiperf brings matplotlib (the provisioning
environment has none); it imports nothing of llamahost:

  .cache/bench-venv/bin/python llamahost/bench/plot.py OUT.png REPORT.json [REPORT.json ...]
"""

from __future__ import annotations

import json
import sys
from typing import Any


def label(report: dict[str, Any]) -> str:
    run = report.get("run")
    base = f"{report['host']} ({report['profile']['name']})"
    return f"{base} {run}" if run else base


def points(report: dict[str, Any]) -> list[tuple[float, float, int]]:
    """(TTFT p95 in s, total tok/s, concurrency) of the levels that have both."""
    out = []
    for lv in report["levels"]:
        if lv.get("ttft_p95_ms") is not None and lv.get("tps_total") is not None:
            out.append((lv["ttft_p95_ms"] / 1000, lv["tps_total"], lv["concurrency"]))
    return out


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, paths = argv[0], argv[1:]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    drawn = 0
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        pts = points(report)
        if not pts:
            continue
        xs, ys, _ = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=label(report))
        for x, y, c in pts:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        drawn += 1
    ax.set_xlabel("time to first token, p95 (s)")
    ax.set_ylabel("output tokens/s, all conversations")
    ax.set_title("Throughput against time to first token (c = concurrency)")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out} ({drawn} line(s))")
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
