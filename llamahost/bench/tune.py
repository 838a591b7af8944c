"""Tune: candidates for one host, checked before anything runs, and the choice among their
bench reports.

A candidate is inventory data laid over the host's own: a profile (``--profiles
low-latency,balanced``) or one setting varied (``--vary micro_batch=512,1024,2048``). Each
is validated by ``resolve_host`` and planned (``make plan``'s check) before the first
deploy; a bad one is refused with the field named. The recommendation is the candidate
that meets the targets at the highest concurrency; at equal concurrency, the one with the
higher total throughput there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamahost.bench.report import meets
from llamahost.bench.workload import WorkloadError
from llamahost.checks import PREFIX, ConfigError
from llamahost.plan import plan_for
from llamahost.profiles import PROFILES
from llamahost.spec import resolve_host, setting_keys


@dataclass(frozen=True)
class Candidate:
    label: str
    data: dict[str, Any]  # inventory keys laid over the host's data

    def pyinfra_args(self) -> list[str]:
        """``--data key=value`` for pyinfra (it parses numbers and booleans back)."""
        out = []
        for k, v in self.data.items():
            text = str(v).lower() if isinstance(v, bool) else str(v)
            out += ["--data", f"{k}={text}"]
        return out


def _value(text: str) -> Any:
    """As pyinfra's ``--data`` reads it: integers, booleans, else the text."""
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def candidates(profiles: str | None, vary: str | None) -> list[Candidate]:
    if bool(profiles) == bool(vary):
        raise WorkloadError("candidates", profiles or vary, "give --profiles or --vary, one")
    out: list[Candidate] = []
    if profiles:
        for name in filter(None, (p.strip() for p in profiles.split(","))):
            if name not in PROFILES:
                raise WorkloadError(
                    "profiles", name, f"is not a profile; known: {sorted(PROFILES)}"
                )
            out.append(Candidate(name, {PREFIX + "profile": name}))
    else:
        assert vary is not None
        knob, eq, values = vary.partition("=")
        key = PREFIX + knob.strip()
        if not eq or key not in setting_keys():
            raise WorkloadError(
                "vary", knob.strip(), "is not a llama_* setting (README, Variables)"
            )
        for v in filter(None, (x.strip() for x in values.split(","))):
            out.append(Candidate(f"{knob.strip()}={v}", {key: _value(v)}))
    if len(out) < 2:
        raise WorkloadError("candidates", profiles or vary, "name at least two candidates")
    return out


def check(host: str, data: Mapping[str, Any], cands: list[Candidate]) -> list[str]:
    """Why each bad candidate cannot run (every one, at once); [] when all can."""
    errors = []
    for c in cands:
        try:
            spec = resolve_host(host, {**data, **c.data})
        except ConfigError as e:
            errors.append(f"candidate {c.label}: {e}")
            continue
        if not plan_for(spec).fits:
            errors.append(f"candidate {c.label}: does not fit (`make plan` shows why)")
    return errors


def best_level(report: dict[str, Any]) -> dict[str, Any] | None:
    ok = [lv for lv in report["levels"] if meets(lv, report["targets"])]
    return max(ok, key=lambda lv: lv["concurrency"]) if ok else None


def recommend(reports: Mapping[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """(label, level) of the candidate meeting the targets at the highest concurrency."""
    scored = []
    for label, rep in reports.items():
        lv = best_level(rep)
        if lv is not None:
            scored.append((lv["concurrency"], lv["tps_total"] or 0.0, label, lv))
    if not scored:
        return None
    _, _, label, lv = max(scored, key=lambda s: (s[0], s[1]))
    return label, lv


def side_by_side(reports: Mapping[str, dict[str, Any]]) -> str:
    """One row per concurrency, TTFT p95 (s) / total tok/s per candidate."""
    labels = list(reports)
    levels = sorted({lv["concurrency"] for r in reports.values() for lv in r["levels"]})
    head = "| concurrency | " + " | ".join(labels) + " |"
    lines = [head, "|---" * (len(labels) + 1) + "|"]
    for c in levels:
        cells = []
        for label in labels:
            lv = next((x for x in reports[label]["levels"] if x["concurrency"] == c), None)
            if lv is None or lv["ttft_p95_ms"] is None:
                cells.append("–" if lv is None else f"{lv['errors']} errors")
            else:
                cells.append(f"{lv['ttft_p95_ms'] / 1000:.2f} s / {lv['tps_total'] or 0:.1f} tok/s")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
