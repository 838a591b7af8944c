"""Per-module wall time of every test run, kept in reports/e2e-timings.json ("modules_s")
so that the growth of `make test` is visible module by module (issue 24).

A module's time is the sum of its tests' setup, call and teardown: a session-scoped host or
fleet is counted in the first module that asks for it, and its teardown in the last test's.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

REPORTS = Path(__file__).resolve().parent.parent / "reports"
TIMINGS = REPORTS / "e2e-timings.json"

_modules: defaultdict[str, float] = defaultdict(float)
_started = time.monotonic()
# A pytest run by a test (the compliance suites over a test host) is not the one to time.
_nested = os.environ.get("LLAMAHOST_PYTEST_OUTER") is not None
os.environ["LLAMAHOST_PYTEST_OUTER"] = str(os.getpid())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _modules[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _nested or not any(m.startswith("tests/e2e/") for m in _modules):
        return
    # The e2e site fixture writes its own measurements to the same file at its teardown
    # (before this hook); keep them when they are this session's.
    data: dict[str, object] = {}
    if TIMINGS.exists() and TIMINGS.stat().st_mtime >= time.time() - (time.monotonic() - _started):
        data = json.loads(TIMINGS.read_text())
    data["session_s"] = round(time.monotonic() - _started, 1)
    data["modules_s"] = {
        m: round(s, 1) for m, s in sorted(_modules.items(), key=lambda kv: -kv[1]) if s >= 0.5
    }
    REPORTS.mkdir(exist_ok=True)
    TIMINGS.write_text(json.dumps(data, indent=2) + "\n")
