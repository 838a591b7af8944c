"""Metric names used by the alert rules and the dashboard, and where each must exist.

A PromQL expression's metric names are its identifiers once strings, label matchers, range
selectors and grouping label lists are taken out, less functions (an identifier followed by
"(") and keywords. Every name must be in the list of the family it belongs to: the pinned
llama-server's scrape, the GPU exporter's documented names, the node exporter's, or the
metrics llamahost writes itself.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from llamahost.monitoring import exporters as ex

FIXTURES = Path(__file__).resolve().parent / "fixtures"
yaml: Any = importlib.import_module("yaml")  # PyYAML comes with gguf and huggingface_hub

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*(?![\w:])")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}
# Series Prometheus makes itself.
BUILTIN = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query) reads."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        if word in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def rules_exprs(text: str) -> list[str]:
    doc = yaml.safe_load(text)
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs(text: str) -> list[str]:
    dash = json.loads(text)
    exprs: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for p in items:
            exprs.extend(t["expr"] for t in p.get("targets", []) if "expr" in t)
            panels(p.get("panels", []))

    panels(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        q = query.get("query", "") if isinstance(query, dict) else ""
        # Grafana's label_values(EXPR, LABEL): only EXPR is PromQL.
        m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", q, re.S)
        if m:
            exprs.append(m.group(1))
        elif q and var.get("type") == "query":
            exprs.append(q)
    return exprs


def _names_file(name: str) -> set[str]:
    lines = (FIXTURES / name).read_text().splitlines()
    return {line.split("{")[0].split()[0] for line in lines if line and not line.startswith("#")}


def llama_server_names(exposition: str | None = None) -> set[str]:
    """Names in a llama-server scrape (by default the one recorded from the pinned build)."""
    text = (
        exposition
        if exposition is not None
        else (FIXTURES / "llama-server-metrics.txt").read_text()
    )
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def known_names() -> dict[str, set[str]]:
    """Each family: its name prefix and the names that exist."""
    return {
        "llamacpp:": llama_server_names(),
        "nvidia_smi_": _names_file("nvidia-gpu-exporter-metrics.txt"),
        "node_": _names_file("node-exporter-metrics.txt"),
        "llamahost_": set(ex.OWN_METRICS),
    }


def unknown_names(exprs: list[str], known: dict[str, set[str]] | None = None) -> set[str]:
    """Names used that do not exist (or belong to no known family)."""
    known = known if known is not None else known_names()
    missing = set()
    for expr in exprs:
        for name in metric_names(expr):
            if name in BUILTIN:
                continue
            family = next((k for k in known if name.startswith(k)), None)
            if family is None or name not in known[family]:
                missing.add(name)
    return missing
