"""`python -m llamahost bench` for real against the test host (the tiny model, served by the
deploy): aiperf 0.13.0 from .cache/bench-venv (`make bench-venv`), a sweep at concurrency
1 and 2 with a few requests each, the key read from the host over SSH.

Proves: the report's shape (JSON, CSV, a non-empty PNG, the summary), figures that are
positive and consistent (percentiles ordered, the forced output length served exactly, the
server's counters at least what the client counted), the key on no command line and in no
file or output, a wrong key counted as errors (and the exit status saying so), and
`bench --compare` on two real runs; `tune` over two candidates through the real deploy
restores the unit byte for byte with one restart per candidate plus one, also when
interrupted with SIGINT mid-way. The figures themselves mean nothing (a random 0.5 MB
model on a busy CPU); the path is what is real.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llamahost.bench import AIPERF_VERSION
from llamahost.bench.run import BENCH_VENV
from tests.bench import tiny_tokenizer
from tests.e2e.conftest import REPO, Run, Site

pytestmark = pytest.mark.e2e

AIPERF = BENCH_VENV / "bin" / "aiperf"
REQUESTS = 4
OSL = 16
ISL = 64


@pytest.fixture(scope="module")
def aiperf_ready() -> Path:
    if not AIPERF.is_file():
        why = f"needs aiperf {AIPERF_VERSION} in {BENCH_VENV} (make bench-venv)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return AIPERF


def bench(site: Site, out: Path, tok: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "llamahost", "bench", "inventory/local.py"]
    argv += ["--limit", site.host.name, "--out", str(out), "--tokenizer", str(tok)]
    argv += ["--concurrency", "1,2", "--requests", str(REQUESTS)]
    argv += ["--isl", str(ISL), "--osl", str(OSL), *extra]
    return subprocess.run(
        argv, cwd=REPO, env=site.env(), capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer.write(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def good(
    site: Site,
    deployed: Run,
    aiperf_ready: Path,
    tok: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench-a")
    t0 = time.monotonic()
    p = bench(site, out, tok, "--label", "a")
    site.timings["bench_sweep_s"] = round(time.monotonic() - t0, 1)
    return out, p


def load(out: Path, site: Site) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{site.host.name}.json").read_text())
    return data


def test_sweep_writes_json_csv_png_and_summary(
    site: Site, good: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    out, p = good
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rep = load(out, site)
    assert rep["profile"]["name"] == "cpu-demo"
    assert [lv["concurrency"] for lv in rep["levels"]] == [1, 2]
    csv_rows = (out / "bench.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    md = (out / f"{site.host.name}.md").read_text()
    assert md.startswith(f"# Bench: {site.host.name} (cpu-demo)")
    assert md.count("\n| 1 |") == 1 and md.count("\n| 2 |") == 1
    # Each level's aiperf artifacts are kept.
    for c in (1, 2):
        assert (out / site.host.name / f"c{c}" / "profile_export_aiperf.json").is_file()


def test_figures_are_positive_and_consistent(
    site: Site, good: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    out, _ = good
    for lv in load(out, site)["levels"]:
        assert lv["requests"] == REQUESTS and lv["errors"] == 0
        assert 0 < lv["ttft_p50_ms"] <= lv["ttft_p95_ms"] <= lv["ttft_p99_ms"]
        # Tokens read in one burst have an inter-token latency of 0: on an idle machine the
        # tiny model's median is 0.0 ms, so only the order can be asserted.
        assert 0 <= lv["itl_p50_ms"] <= lv["itl_p95_ms"]
        assert lv["tps_user_p50"] > 0 and lv["tps_total"] > 0 and lv["req_s"] > 0
        # ignore_eos: every request got exactly the output asked for, by the server's count.
        assert lv["osl_server_avg"] == OSL
        # The prompt as the server counted it: the test tokenizer's ISL plus the "▁"
        # rewriting and the chat template, never less.
        assert lv["isl_server_avg"] >= ISL
        # /metrics was read during the level, with the key; its counters saw at least the
        # measured requests (plus the warmup request).
        assert lv["metrics_samples"] >= 2
        assert lv["tokens_predicted"] >= REQUESTS * OSL
        assert lv["prompt_tokens"] + lv["prompt_tokens_cached"] >= REQUESTS * ISL


def test_the_key_is_in_no_file_and_no_output(
    site: Site, good: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    out, p = good
    key = site.key()
    assert len(key) >= 16
    assert key not in p.stdout + p.stderr
    for f in out.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f


def test_a_wrong_key_is_counted_as_errors(
    site: Site, deployed: Run, aiperf_ready: Path, tok: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not-the-key-" + "x" * 20 + "\n")
    p = bench(site, tmp_path / "out", tok, "--key-file", str(wrong), "--concurrency", "1")
    assert p.returncode == 1, (p.stdout + p.stderr)[-4000:]
    (lv,) = load(tmp_path / "out", site)["levels"]
    assert lv["requests"] == 0 and lv["errors"] == REQUESTS
    assert any("401" in k for k in lv["error_kinds"]), lv["error_kinds"]
    assert "key was refused" in (tmp_path / "out" / f"{site.host.name}.md").read_text()
    # /metrics refused the wrong key too: no server sample.
    assert lv["metrics_samples"] == 0


def test_compare_two_real_runs(
    site: Site,
    good: tuple[Path, subprocess.CompletedProcess[str]],
    tok: Path,
    tmp_path: Path,
) -> None:
    out_a, _ = good
    p = bench(site, tmp_path, tok, "--label", "b")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    a, b = out_a / f"{site.host.name}.json", tmp_path / f"{site.host.name}.json"
    c = subprocess.run(
        [sys.executable, "-m", "llamahost", "bench", "--compare", str(a), str(b)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert c.returncode == 0, c.stderr
    ratios = re.findall(r"^\s*([12])\s+tps_total\s+\S+\s+\S+\s+([0-9.]+)", c.stdout, re.M)
    assert [lvl for lvl, _ in ratios] == ["1", "2"], c.stdout
    assert all(float(r) > 0 for _, r in ratios)


# --- tune: two candidates through the real deploy, and the restore ----------------------------

UNIT = "/etc/systemd/system/llama-server.service"
TUNE = ["--vary", "micro_batch=256,1024", "--concurrency", "1", "--requests", "2"]


def tune_argv(site: Site, out: Path, tok: Path) -> list[str]:
    argv = [sys.executable, "-m", "llamahost", "tune", "inventory/local.py"]
    argv += ["--limit", site.host.name, "--out", str(out), "--tokenizer", str(tok), *TUNE]
    return [*argv, "--isl", "32", "--osl", "8"]


def starts_since(site: Site, since: str) -> int:
    out = site.sh(
        f"journalctl -u llama-server.service --since '{since}' -o cat | grep -c '^Started' || true"
    )
    return int(out.strip() or 0)


def test_tune_two_candidates_restores_the_unit(
    site: Site, deployed: Run, aiperf_ready: Path, tok: Path, tmp_path: Path
) -> None:
    before = site.sh(f"cat {UNIT}")
    since = site.sh("date '+%Y-%m-%d %H:%M:%S'").strip()
    time.sleep(1)
    p = subprocess.run(
        tune_argv(site, tmp_path, tok),
        cwd=REPO,
        env=site.env(),
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "tune: recommend micro_batch=" in p.stdout
    assert "restore done" in p.stdout
    assert site.sh(f"cat {UNIT}") == before
    # One restart per candidate (each changes -ub), one for the restore.
    assert starts_since(site, since) == 3
    table = (tmp_path / "tune.md").read_text()
    assert table.startswith("| concurrency | micro_batch=256 | micro_batch=1024 |")


def test_tune_interrupted_still_restores(
    site: Site, deployed: Run, aiperf_ready: Path, tok: Path, tmp_path: Path
) -> None:
    before = site.sh(f"cat {UNIT}")
    proc = subprocess.Popen(
        tune_argv(site, tmp_path, tok),
        cwd=REPO,
        env=site.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Interrupt once the first candidate is deployed and its bench has begun.
    level_dir = tmp_path / "micro_batch=256" / site.host.name / "c1"
    deadline = time.monotonic() + 1500
    while not level_dir.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert level_dir.exists(), "the first candidate's bench never started"
    assert site.sh(f"cat {UNIT}") != before  # candidate 1 is live
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode != 0, out[-3000:]
    assert "restore done" in out, out[-3000:]
    assert "micro_batch=1024" not in out.split("restoring")[0]  # candidate 2 never deployed
    assert site.sh(f"cat {UNIT}") == before
