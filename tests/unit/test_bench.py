"""The bench's pure logic: workloads from the profiles, aiperf's configuration and exports
(recorded from real aiperf 0.13.0 runs against llama-server at the pinned commit serving
the tiny model: tests/bench/fixtures/README.md), /metrics, the report, the guide's ladders,
comparisons, and the refusals of the command line."""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import pytest

from llamahost import inventory as llamahost_inventory
from llamahost.bench import AIPERF_VERSION, aiperf, metrics, report, tune
from llamahost.bench import plot as bench_plot
from llamahost.bench import run as bench_run
from llamahost.bench.cli import bench_main
from llamahost.bench.workload import (
    MIN_REQUESTS,
    ROUNDS,
    SHAPES,
    TEMPLATE_MARGIN,
    Level,
    WorkloadError,
    parse_levels,
    per_conversation,
    sweep,
    workload_for,
)
from llamahost.config import Profile
from llamahost.profiles import PROFILES
from llamahost.spec import resolve_host
from tests.bench import tiny_tokenizer
from tests.support.tinygguf import write as write_tiny

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "bench" / "fixtures"
OK_RUN = FIX / "tiny-c2"  # concurrency 2, 6 requests, 64 in / 16 out, the right key
BAD_KEY_RUN = FIX / "wrong-key-c1"  # concurrency 1, 4 requests, a wrong key
BURST_RUN = FIX / "burst-c2"  # every answer in one read: no per-user rate from aiperf


def profile(name: str, **data: Any) -> Profile:
    return resolve_host("h", {"llama_profile": name, **data}).profile


# --- workloads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parallel", "levels"),
    [(2, (1, 2, 4)), (4, (1, 2, 4, 8)), (6, (1, 2, 4, 6, 8, 12)), (8, (1, 2, 4, 8, 16))],
)
def test_sweep_doubles_up_to_twice_the_slots(parallel: int, levels: tuple[int, ...]) -> None:
    assert sweep(parallel) == levels


def test_every_profile_has_a_workload_and_targets() -> None:
    assert set(SHAPES) == set(PROFILES) == set(report.TARGETS)


def test_each_profile_gets_its_promised_lengths_where_they_fit() -> None:
    ll = workload_for(profile("low-latency"))
    assert [lv.concurrency for lv in ll.levels] == [1, 2, 4, 8]
    # Split KV: 16384 per slot, a 512-token chat always fits.
    assert {(lv.isl, lv.osl, lv.note) for lv in ll.levels} == {(512, 256, "")}
    bal = workload_for(profile("balanced"))
    assert 8000 <= bal.levels[0].isl <= 16000
    lc = workload_for(profile("long-context"))
    assert lc.levels[0].isl == 32000


def test_a_prompt_is_cut_to_what_a_conversation_is_sure_of() -> None:
    bal = profile("balanced")  # one 65536 pool over 8 slots
    wl = workload_for(bal)
    for lv in wl.levels:
        room = per_conversation(bal, lv.concurrency) - lv.osl - TEMPLATE_MARGIN
        assert lv.isl == min(12288, room)
        assert bool(lv.note) == (room < 12288)
    # 8 busy slots share 65536 cells: 8192 each.
    at8 = next(lv for lv in wl.levels if lv.concurrency == 8)
    assert at8.isl == 8192 - 512 - TEMPLATE_MARGIN
    # Above the slot count only `parallel` conversations hold cells at once.
    at16 = next(lv for lv in wl.levels if lv.concurrency == 16)
    assert at16.isl == at8.isl


def test_split_kv_gives_every_slot_the_same_share() -> None:
    demo = profile("cpu-demo")
    assert not demo.kv_unified
    assert {per_conversation(demo, c) for c in (1, 2, 4)} == {demo.context // demo.parallel}


def test_requests_per_level_and_overrides() -> None:
    wl = workload_for(profile("low-latency"))
    assert [lv.requests for lv in wl.levels] == [
        max(MIN_REQUESTS, ROUNDS * lv.concurrency) for lv in wl.levels
    ]
    wl = workload_for(profile("cpu-demo"), levels=(1, 3), isl=40, osl=8, requests=5, seed=3)
    assert [(lv.concurrency, lv.isl, lv.osl, lv.requests) for lv in wl.levels] == [
        (1, 40, 8, 5),
        (3, 40, 8, 5),
    ]
    assert wl.seed == 3


@pytest.mark.parametrize(
    ("text", "field"),
    [("0", "concurrency"), ("1,0", "concurrency"), ("x", "concurrency"), ("-2", "concurrency")],
)
def test_bad_concurrency_is_refused_by_name(text: str, field: str) -> None:
    with pytest.raises(WorkloadError) as e:
        parse_levels(text)
    assert e.value.field == field
    assert field in str(e.value)


def test_levels_are_sorted_and_unique() -> None:
    assert parse_levels("4, 1,2,4") == (1, 2, 4)


def test_an_output_that_leaves_no_room_is_refused() -> None:
    with pytest.raises(WorkloadError) as e:
        workload_for(profile("cpu-demo"), osl=4000)
    assert e.value.field == "osl"


# --- aiperf's configuration ------------------------------------------------------------


def test_config_carries_a_placeholder_never_a_key() -> None:
    lv = Level(concurrency=4, isl=100, osl=20, requests=12, warmup=1)
    conf = aiperf.config(
        level=lv, model="m", url="http://h:8080/", tokenizer="/t", seed=9, artifacts="/a"
    )
    ep = conf["benchmark"]["endpoint"]
    assert ep["apiKey"] == "${" + aiperf.KEY_ENV + "}"
    assert ep["url"] == "http://h:8080/v1/chat/completions"
    assert ep["streaming"] is True
    assert ep["extra"] == {"ignore_eos": True, "seed": 9}
    prompts = conf["benchmark"]["dataset"]["prompts"]
    assert prompts == {"isl": {"mean": 100, "stddev": 0}, "osl": {"mean": 20, "stddev": 0}}
    assert conf["benchmark"]["profiling"] == {
        "type": "concurrency",
        "requests": 12,
        "concurrency": 4,
    }
    assert conf["randomSeed"] == 9
    assert conf["benchmark"]["tokenizer"] == {"name": "/t"}


def test_recorded_configs_are_what_config_writes() -> None:
    """The recorded runs used this module's configuration (paths aside)."""
    for run in (OK_RUN, BAD_KEY_RUN):
        rec = json.loads((run / "aiperf-config.json").read_text())
        b = rec["benchmark"]
        lv = Level(
            concurrency=b["profiling"]["concurrency"],
            isl=b["dataset"]["prompts"]["isl"]["mean"],
            osl=b["dataset"]["prompts"]["osl"]["mean"],
            requests=b["profiling"]["requests"],
            warmup=b["warmup"]["requests"],
        )
        mine = aiperf.config(
            level=lv,
            model=b["model"],
            url=b["endpoint"]["url"].removesuffix("/v1/chat/completions"),
            tokenizer=b["tokenizer"]["name"],
            seed=rec["randomSeed"],
            artifacts=b["artifacts"]["dir"],
        )
        assert mine == rec


# --- aiperf's exports ------------------------------------------------------------------


def test_a_recorded_run_reads_consistent_positive_figures() -> None:
    conf = json.loads((OK_RUN / "aiperf-config.json").read_text())["benchmark"]
    s = aiperf.read(OK_RUN)
    assert s.requests == conf["profiling"]["requests"]
    assert s.errors == 0 and s.error_kinds == {}
    for v in (s.ttft_p50, s.ttft_p95, s.ttft_p99, s.itl_p50, s.itl_p95):
        assert v is not None and v > 0
    assert s.ttft_p50 is not None and s.ttft_p95 is not None and s.ttft_p99 is not None
    assert s.ttft_p50 <= s.ttft_p95 <= s.ttft_p99
    assert s.tps_total is not None and s.tps_user_p50 is not None and s.req_s is not None
    assert s.tps_total > 0 and s.tps_user_p50 > 0 and s.req_s > 0
    # The output length is forced: the server generated exactly what was asked.
    assert s.osl_avg == conf["dataset"]["prompts"]["osl"]["mean"]
    # Throughput is output tokens over the run's duration.
    assert s.duration_s is not None and s.osl_avg is not None
    assert s.tps_total == pytest.approx(s.requests * s.osl_avg / s.duration_s, rel=0.05)
    # The records agree with the summary.
    ok, errors, _ = aiperf.read_records(OK_RUN / aiperf.RECORDS)
    assert (ok, errors) == (s.requests, 0)


def test_an_answer_in_one_read_still_has_a_per_user_rate() -> None:
    summary = json.loads((BURST_RUN / aiperf.SUMMARY).read_text())
    assert summary.get("output_token_throughput_per_user") is None  # what aiperf wrote
    c = aiperf.read(BURST_RUN)
    assert c.itl_p95 == 0 and c.requests == 4
    latency = summary["request_latency"]["p50"]
    assert c.tps_user_p50 == pytest.approx(16 / (latency / 1000))


def test_a_refused_key_counts_every_request_as_an_error() -> None:
    conf = json.loads((BAD_KEY_RUN / "aiperf-config.json").read_text())["benchmark"]
    s = aiperf.read(BAD_KEY_RUN)
    assert s.requests == 0
    assert s.errors == conf["profiling"]["requests"]
    assert s.ttft_p95 is None and s.tps_total is None
    assert sum(s.error_kinds.values()) == s.errors
    assert any("401" in k for k in s.error_kinds), s.error_kinds


def test_no_recorded_file_holds_a_key() -> None:
    """The recordings' keys were random: no bearer token or key value is in any file."""
    for f in FIX.rglob("*"):
        if f.is_file():
            text = f.read_text(errors="replace")
            assert "Bearer " not in text, f
            assert not re.search(r'"api_?key"\s*:\s*"(?!\$\{|<redacted>)', text, re.I), f


# --- /metrics --------------------------------------------------------------------------


def test_metrics_page_parses_the_llamacpp_series() -> None:
    page = (FIX / "metrics.txt").read_text()
    m = metrics.parse(page)
    for name in (*metrics.GAUGES, *metrics.COUNTERS):
        assert name in m, name
    assert all(isinstance(v, float) for v in m.values())


def test_summarise_takes_gauge_peaks_and_counter_deltas() -> None:
    samples: list[dict[str, float]] = [
        {"requests_processing": 0, "requests_deferred": 0, "prompt_tokens_total": 100.0},
        {"requests_processing": 2, "requests_deferred": 3, "prompt_tokens_total": 160.0},
        {"requests_processing": 1, "requests_deferred": 0, "prompt_tokens_total": 400.0},
    ]
    s = metrics.summarise(samples)
    assert (s.samples, s.busy_slots_max, s.deferred_max, s.prompt_tokens) == (3, 2, 3, 300)
    assert s.busy_slots_mean == pytest.approx(1.0)
    assert s.prompt_tokens_cached is None and s.cached_share is None
    assert metrics.summarise([]).busy_slots_max is None


# --- the report ------------------------------------------------------------------------


def recorded_report(targets: dict[str, float] | None = None) -> dict[str, Any]:
    demo = profile("cpu-demo")
    conf = json.loads((OK_RUN / "aiperf-config.json").read_text())["benchmark"]
    lv = Level(2, conf["dataset"]["prompts"]["isl"]["mean"], 16, 6, 1)
    server = metrics.summarise(json.loads((OK_RUN / "metrics-samples.json").read_text()))
    return report.build(
        host="demo",
        profile={
            "name": demo.name,
            "parallel": demo.parallel,
            "context": demo.context,
            "micro_batch": demo.micro_batch,
            "flash_attn": demo.flash_attn,
            "uses_gpu": demo.uses_gpu,
        },
        purpose="test",
        seed=1,
        targets=targets or report.TARGETS["cpu-demo"],
        results=[report.LevelResult(lv, aiperf.read(OK_RUN), server)],
        meta={"aiperf": AIPERF_VERSION},
    )


def test_report_has_every_figure_per_level() -> None:
    rep = recorded_report()
    assert rep["kind"] == report.KIND
    (lv,) = rep["levels"]
    for col, _, _ in report.COLUMNS:
        assert col in lv
    assert lv["concurrency"] == 2
    # The server counted at least the forced output of every request.
    assert lv["tokens_predicted"] >= lv["requests"] * lv["osl"]
    assert lv["busy_slots_max"] >= 1
    json.dumps(rep)  # serialisable as is


def test_csv_has_one_row_per_level_with_the_headers() -> None:
    rep = recorded_report()
    lines = report.csv_text([rep, rep]).splitlines()
    assert len(lines) == 3
    head = lines[0].split(",")
    for col in ("host", "concurrency", "ttft_p95_ms", "tps_total", "errors", "deferred_max"):
        assert col in head


def test_summary_meets_generous_targets_and_flags_strict_ones() -> None:
    rep = recorded_report({"ttft_p95": 1000.0, "tps_user": 0.001})
    text = report.summary(rep)
    assert "Meets the targets up to concurrency 2" in text
    assert "Nothing to tune" in text
    strict = recorded_report({"ttft_p95": 1e-6, "tps_user": 1e9})
    text = report.summary(strict)
    assert "No level meets the targets" in text
    assert "exceeds the target" in text
    assert "throughput ladder" in text
    # cpu-demo: no GPU, so the throughput remedy is a GPU profile, not a CUDA build.
    assert "serves from the CPU" in text


def level_row(c: int, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {col: None for col, _, _ in report.COLUMNS}
    row.update(concurrency=c, isl=512, osl=256, requests=10, errors=0, error_kinds={}, note="")
    row.update(kw)
    return row


def synthetic(levels: list[dict[str, Any]], **prof: Any) -> dict[str, Any]:
    p = {"name": "low-latency", "parallel": 4, "context": 65536, "micro_batch": 1024}
    p.update(flash_attn="on", uses_gpu=True)
    p.update(prof)
    return {
        "kind": report.KIND,
        "host": "a100",
        "profile": p,
        "targets": {"ttft_p95": 2.0, "tps_user": 15.0},
        "workload": {"purpose": "x", "seed": 1},
        "levels": levels,
    }


def test_ttft_ladder_within_the_slots_and_queueing_above() -> None:
    rep = synthetic(
        [
            level_row(2, ttft_p95_ms=2800.0, tps_user_p50=30.0, deferred_max=0.0),
            level_row(8, ttft_p95_ms=9000.0, tps_user_p50=30.0, deferred_max=4.0),
        ]
    )
    notes = report.ladder_notes(rep)
    within = next(n for n in notes if n.startswith("Concurrency 2"))
    assert "TTFT p95 2.80 s exceeds the target 2 s" in within
    assert "lower -ub a little (1024 → 512)" in within
    assert "--parallel" not in within  # 4 slots are not "too high"
    above = next(n for n in notes if n.startswith("Concurrency 8"))
    assert "the wait is for a slot" in above and "4 deferred" in above


def test_ttft_ladder_turns_flash_attention_on_first() -> None:
    rep = synthetic([level_row(1, ttft_p95_ms=5000.0)], flash_attn="off", parallel=8)
    (note,) = report.ladder_notes(rep)
    assert note.index("-fa on") < note.index("-ub")
    assert "lower --parallel (8 → 6)" in note


def test_throughput_ladder_raises_ub_then_parallel_and_names_cuda() -> None:
    rep = synthetic([level_row(4, ttft_p95_ms=100.0, tps_user_p50=9.5)])
    (note,) = report.ladder_notes(rep)
    assert "9.5 output tok/s per conversation is below the target 15" in note
    assert note.index("1024 → 1536") < note.index("4 → 6") < note.index("-DGGML_CUDA=ON")


def test_errors_are_reported_with_the_key_hint() -> None:
    rep = synthetic([level_row(1, requests=0, errors=4, error_kinds={"401": 4})])
    (note,) = report.ladder_notes(rep)
    assert "4 of 4 requests failed" in note and "key was refused" in note


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("ttft_p95=2s,tps_user=15", {"ttft_p95": 2.0, "tps_user": 15.0}),
        ("ttft_p95=500ms", {"ttft_p95": 0.5}),
        ("tps_user=7.5", {"tps_user": 7.5}),
        ("", {}),
    ],
)
def test_slo_parses(text: str, want: dict[str, float]) -> None:
    assert report.parse_slo(text) == want


@pytest.mark.parametrize("text", ["latency=2s", "ttft_p95=fast", "tps_user=2s", "ttft_p95=0"])
def test_bad_slo_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(WorkloadError) as e:
        report.parse_slo(text)
    assert e.value.field == "slo"
    if text.startswith("latency"):
        assert "'latency'" in str(e.value) and "known" in str(e.value)


# --- compare ---------------------------------------------------------------------------


def test_compare_a_run_with_itself_is_all_ones() -> None:
    rep = recorded_report()
    rows = report.compare(rep, rep)
    numeric = [r for r in rows if r["a"]]
    assert numeric and all(r["ratio"] == pytest.approx(1.0) for r in numeric)
    assert all(r["better"] is None for r in numeric)


def test_compare_gives_ratios_and_direction() -> None:
    a = synthetic([level_row(1, ttft_p95_ms=1000.0, tps_total=40.0), level_row(2)])
    b = copy.deepcopy(a)
    b["levels"][0].update(ttft_p95_ms=500.0, tps_total=30.0)
    b["levels"] = [*b["levels"][:1], level_row(16)]  # level 16 is only in B: skipped
    rows = {(r["concurrency"], r["metric"]): r for r in report.compare(a, b)}
    assert {c for c, _ in rows} == {1}
    assert rows[1, "ttft_p95_ms"]["ratio"] == pytest.approx(0.5)
    assert rows[1, "ttft_p95_ms"]["better"] is True  # lower latency is better
    assert rows[1, "tps_total"]["ratio"] == pytest.approx(0.75)
    assert rows[1, "tps_total"]["better"] is False
    text = report.render_compare(list(rows.values()), "a.json", "b.json")
    assert re.search(r"tps_total\s+40\s+30\s+0\.750\s+worse", text), text


def test_compare_refuses_what_is_not_a_report() -> None:
    with pytest.raises(WorkloadError) as e:
        report.compare({"kind": "other"}, synthetic([]))
    assert e.value.field == "compare"
    with pytest.raises(WorkloadError):
        report.compare(synthetic([level_row(1)]), synthetic([level_row(2)]))


def test_compare_command_prints_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = synthetic([level_row(1, tps_total=40.0)])
    b = synthetic([level_row(1, tps_total=50.0)])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert bench_main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert re.search(r"tps_total\s+40\s+50\s+1\.250\s+better", capsys.readouterr().out)


# --- the GPU, sampled with nvidia-smi on GPU hosts -----------------------------------------

# nvidia-smi --query-gpu=index,memory.used,memory.total,utilization.gpu
# --format=csv,noheader,nounits, two A100 40GB, two samples, and a GPU that fell off.
NVIDIA_SMI_LINES = [
    "0, 30712, 40960, 87\n",
    "1, 29001, 40960, 80\n",
    "0, 39100, 40960, 100\n",
    "1, [N/A], 40960, [N/A]\n",
    "Unable to determine the device handle for GPU 0000:00:05.0: Unknown Error\n",
]


def test_gpu_peaks_come_from_the_fullest_gpu() -> None:
    g = metrics.parse_gpu(NVIDIA_SMI_LINES)
    assert (g.samples, g.memory_used_peak_mib, g.memory_total_mib) == (3, 39100, 40960)
    assert g.util_peak == 100 and g.util_mean == pytest.approx(89)
    assert g.memory_peak_share == pytest.approx(39100 / 40960)
    assert metrics.parse_gpu([]).memory_used_peak_mib is None


def test_the_gpu_sampler_reads_its_probe_while_the_level_runs() -> None:
    """The probe is a stand-in printing what nvidia-smi prints, then waiting as -lms does."""
    lines = "".join(NVIDIA_SMI_LINES[:3])
    code = f"import sys,time; sys.stdout.write({lines!r}); sys.stdout.flush(); time.sleep(60)"
    sampler = bench_run.GpuSampler((sys.executable, "-c", code))
    time.sleep(1.0)
    t0 = time.monotonic()
    g = sampler.finish()
    assert time.monotonic() - t0 < 15  # stopped, not waited for
    assert g is not None and g.memory_used_peak_mib == 39100
    assert bench_run.GpuSampler(()).finish() is None  # a CPU host: no figures


def test_gpu_columns_and_the_near_full_note() -> None:
    rep = recorded_report()
    (lv,) = rep["levels"]
    assert lv["gpu_mem_peak_mib"] is None and "GPU memory" not in report.summary(rep)
    lv.update(gpu_mem_peak_mib=39100.0, gpu_mem_total_mib=40960.0, gpu_util_peak=100.0,
              gpu_util_mean=89.0)  # fmt: skip
    text = report.summary(rep)
    assert "| 38.2 | 89/100 |" in text
    assert "peak GPU memory 38.2 of 40.0 GiB (95%)" in text and "OOM ladder" in text
    lv.update(gpu_mem_peak_mib=20000.0)
    assert "peak GPU memory" not in report.summary(rep)


# --- the command line's refusals (before any host is touched) -----------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--concurrency", "0"], "concurrency"),
        (["--slo", "latency=2s"], "slo"),
        (["--requests", "0"], "requests"),
        (["--limit", "no-such-host"], "limit"),
        (["--gateway"], "gateway"),  # the local inventory has no group `gateway`
    ],
)
def test_bad_input_is_refused_naming_the_field(
    args: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = bench_main(["inventory/local.py", *args])
    out = capsys.readouterr().out
    assert rc == 2
    assert out.startswith(f"REFUSED {field}="), out


# --- the plot's pure part ------------------------------------------------------------------


def test_plot_points_skip_levels_without_figures() -> None:
    rep = synthetic([level_row(1, ttft_p95_ms=1500.0, tps_total=40.0), level_row(2)])
    assert bench_plot.points(rep) == [(1.5, 40.0, 1)]
    assert bench_plot.label({**rep, "run": "ub1024"}) == "a100 (low-latency) ub1024"


# --- the tiny model's tokenizer ------------------------------------------------------------


def test_tiny_tokenizer_has_the_tiny_models_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny(str(path))
    r = gguf.GGUFReader(str(path))
    field = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    assert tokens == tiny_tokenizer.vocab()
    d = tiny_tokenizer.write(tmp_path / "tok")
    tj = json.loads((d / "tokenizer.json").read_text())
    assert tj["model"]["vocab"] == {t: i for i, t in enumerate(tokens)}
    assert tj["model"]["byte_fallback"] is True
    assert tiny_tokenizer.server_count("a b") == 8  # "▁a▁b": 3 + 1 + 3 + 1 bytes


# --- tune: candidates and the recommendation ------------------------------------------------


def test_tune_candidates_from_profiles_or_one_setting() -> None:
    cs = tune.candidates("low-latency, balanced", None)
    assert [(c.label, c.data) for c in cs] == [
        ("low-latency", {"llama_profile": "low-latency"}),
        ("balanced", {"llama_profile": "balanced"}),
    ]
    cs = tune.candidates(None, "micro_batch=512,1024")
    assert [c.data for c in cs] == [{"llama_micro_batch": 512}, {"llama_micro_batch": 1024}]
    assert cs[1].pyinfra_args() == ["--data", "llama_micro_batch=1024"]


@pytest.mark.parametrize(
    ("profiles", "vary", "field"),
    [
        ("low-latency,turbo", None, "profiles"),
        (None, "microbatch=1,2", "vary"),
        ("balanced", None, "candidates"),
        ("balanced,low-latency", "micro_batch=1,2", "candidates"),
        (None, None, "candidates"),
    ],
)
def test_bad_candidates_are_refused_by_name(
    profiles: str | None, vary: str | None, field: str
) -> None:
    with pytest.raises(WorkloadError) as e:
        tune.candidates(profiles, vary)
    assert e.value.field == field


def test_tune_checks_every_candidate_before_any_deploy() -> None:
    data = {"llama_profile": "balanced"}
    ok = tune.candidates(None, "micro_batch=1024,2048")
    assert tune.check("h", data, ok) == []
    bad = tune.candidates(None, "micro_batch=1024,8192,999999")
    errors = tune.check("h", data, bad)
    assert len(errors) == 2
    assert all("llama_micro_batch" in e for e in errors)
    too_big = tune.candidates(None, "context=65536,262144")
    (err,) = tune.check("h", data, too_big)
    assert err.startswith("candidate context=262144") and "does not fit" in err


def test_tune_recommends_the_highest_concurrency_within_targets() -> None:
    a = synthetic(
        [
            level_row(1, ttft_p95_ms=500.0, tps_user_p50=30.0, tps_total=30.0),
            level_row(4, ttft_p95_ms=1900.0, tps_user_p50=16.0, tps_total=64.0),
        ]
    )
    b = synthetic(
        [
            level_row(1, ttft_p95_ms=400.0, tps_user_p50=35.0, tps_total=35.0),
            level_row(4, ttft_p95_ms=2500.0, tps_user_p50=20.0, tps_total=80.0),
        ]
    )
    choice = tune.recommend({"ub=1024": a, "ub=2048": b})
    assert choice is not None and choice[0] == "ub=1024" and choice[1]["concurrency"] == 4
    assert (
        tune.recommend({"x": synthetic([level_row(1, ttft_p95_ms=9e9, tps_user_p50=1.0)])}) is None
    )
    table = tune.side_by_side({"ub=1024": a, "ub=2048": b})
    assert "| 4 | 1.90 s / 64.0 tok/s | 2.50 s / 80.0 tok/s |" in table


plotted: list[Path] = []  # the report files tune hands to the plot


def _fake_tune(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail_at: int | None, exc: type[BaseException]
) -> list[list[str]]:
    """tune_main with pyinfra, aiperf and the host replaced: the deploys it asks for."""
    from llamahost.bench import cli as bench_cli
    from llamahost.bench import run as bench_run

    calls: list[list[str]] = []
    plotted.clear()

    def deploy(inventory: str, host: str, extra: list[str], log: Path) -> int:
        calls.append(extra)
        if fail_at is not None and len(calls) == fail_at:
            raise exc()
        return 0

    def run_host(target: Any, wl: Any, targets: Any, **kw: Any) -> dict[str, Any]:
        return synthetic([level_row(1, ttft_p95_ms=100.0, tps_user_p50=50.0, tps_total=50.0)])

    monkeypatch.setattr(bench_cli, "deploy", deploy)
    monkeypatch.setattr(
        llamahost_inventory, "hosts", lambda _: [("h1", {"llama_profile": "low-latency"}, [])]
    )
    monkeypatch.setattr(bench_run, "aiperf_path", lambda _: tmp_path / "aiperf")
    monkeypatch.setattr(bench_run, "read_key", lambda *_: "k")
    monkeypatch.setattr(bench_run, "run_host", run_host)

    def write_run(
        reports: Any, out: Path, aiperf: Path, paths: list[Path] | None = None
    ) -> list[str]:
        plotted.extend(paths or [])
        return []

    monkeypatch.setattr(bench_run, "write_run", write_run)
    return calls


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_tune_restores_the_host_after_an_interrupt_or_a_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exc: type[BaseException]
) -> None:
    from llamahost.bench.cli import tune_main

    calls = _fake_tune(monkeypatch, tmp_path, fail_at=2, exc=exc)
    args = ["inv.py", "--limit", "h1", "--vary", "micro_batch=512,1024,2048"]
    with pytest.raises(exc):
        tune_main([*args, "--tokenizer", "/t", "--out", str(tmp_path)])
    # Candidate 1 deployed, candidate 2 interrupted, candidate 3 never; then the restore:
    # the host's own data, no --data.
    assert calls == [["--data", "llama_micro_batch=512"], ["--data", "llama_micro_batch=1024"], []]


def test_tune_benches_each_candidate_then_restores_and_recommends(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llamahost.bench.cli import tune_main

    calls = _fake_tune(monkeypatch, tmp_path, fail_at=None, exc=RuntimeError)
    args = ["inv.py", "--limit", "h1", "--profiles", "low-latency,balanced"]
    assert tune_main([*args, "--tokenizer", "/t", "--out", str(tmp_path)]) == 0
    assert calls == [
        ["--data", "llama_profile=low-latency"],
        ["--data", "llama_profile=balanced"],
        [],
    ]
    out = capsys.readouterr().out
    assert "tune: recommend low-latency" in out
    assert plotted == [tmp_path / "low-latency" / "h1.json", tmp_path / "balanced" / "h1.json"]
    assert (tmp_path / "tune.md").read_text().startswith("| concurrency | low-latency | balanced |")


def test_tune_refuses_bad_candidates_before_any_deploy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llamahost.bench.cli import tune_main

    calls = _fake_tune(monkeypatch, tmp_path, fail_at=None, exc=RuntimeError)
    rc = tune_main(["inv.py", "--limit", "h1", "--profiles", "low-latency,turbo"])
    assert rc == 2 and calls == []
    assert capsys.readouterr().out.startswith("REFUSED profiles='turbo'")
    rc = tune_main(["inv.py", "--limit", "h1", "--vary", "micro_batch=1024,99999"])
    assert rc == 2 and calls == []
    assert "llama_micro_batch" in capsys.readouterr().out
    rc = tune_main(["inv.py", "--limit", "nope", "--vary", "micro_batch=512,1024"])
    assert rc == 2 and calls == []


# --- the Seed-OSS tokenizer, fetched once under the Hub rule -------------------------------


def test_tokenizer_is_fetched_once_through_the_hosts_endpoint_and_pinned(tmp_path: Path) -> None:
    from llamahost.bench import tokenizer as tok
    from tests.support.hubserver import HubServer

    root = tmp_path / "hub"
    repo = root / tok.TOKENIZER_REPO
    repo.mkdir(parents=True)
    tiny_tokenizer.write(repo)
    cache = tmp_path / "cache"
    with HubServer(root) as hub:
        cfg = resolve_host("h", {"llama_profile": "cpu-demo", "llama_hf_endpoint": hub.url}).cfg
        d = tok.fetch(cfg, cache)
        commit = (tok.repo_dir(cache) / "pinned").read_text().strip()
        assert d == tok.repo_dir(cache) / commit and len(commit) == 40
        for name in tok.FILES:
            assert (d / name).read_bytes() == (repo / name).read_bytes()
    # Nothing listens at the endpoint now: a second run takes the pinned copy, asks nothing.
    gone = resolve_host(
        "h", {"llama_profile": "cpu-demo", "llama_hf_endpoint": "http://127.0.0.1:9"}
    )
    assert tok.fetch(gone.cfg, cache) == d
    # A broken copy (a file missing) is fetched again: here that fails, saying what to do.
    (d / "tokenizer.json").unlink()
    with pytest.raises(tok.TokenizerError, match="--tokenizer DIR"):
        tok.fetch(gone.cfg, cache)


def test_make_installs_the_pinned_aiperf_in_its_own_environment() -> None:
    """The Makefile reads the one pin (llamahost/bench/__init__.py) and installs it apart."""
    import subprocess

    out = subprocess.run(
        ["make", "-s", "-n", "--always-make", "bench-venv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"bin/pip install -q 'aiperf=={AIPERF_VERSION}'" in out
    assert ".cache/bench-venv" in out and ".venv/bin/pip" not in out


def test_an_aiperf_that_does_not_run_fails_the_bench_naming_why(tmp_path: Path) -> None:
    """aiperf exiting non-zero (here: a tokenizer it cannot load) is a failure with its own
    error line and log, never a level of 0 requests and 0 errors reported as a success."""
    fake = tmp_path / "aiperf"
    fake.write_text(
        "#!/bin/sh\necho 'starting'\n"
        "echo \"TokenizerError: Failed to load tokenizer 'tok'\"\nexit 3\n"
    )
    fake.chmod(0o755)
    spec = resolve_host("h", {"llama_profile": "cpu-demo"})
    wl = workload_for(spec.profile, levels=(1,), isl=None, osl=None, requests=None, seed=1)
    target = bench_run.Target("h", "http://127.0.0.1:9", "alias", spec.cfg, "k")
    with pytest.raises(bench_run.BenchError) as e:
        bench_run.run_level(target, wl, 0, aiperf=fake, tokenizer="tok", out=tmp_path,
                            timeout_s=30, sample_server=False)  # fmt: skip
    assert str(e.value).startswith(
        "aiperf exited 3 at concurrency 1: TokenizerError: Failed to load tokenizer 'tok'"
    )
    assert str(tmp_path / "h" / "c1" / "aiperf.log") in str(e.value)


def test_a_relative_tokenizer_is_given_to_aiperf_as_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamahost.bench.cli import local_tokenizer

    monkeypatch.chdir(tmp_path)
    assert local_tokenizer(".cache/demo/tokenizer") == str(tmp_path / ".cache/demo/tokenizer")
    assert local_tokenizer(None) is None


def test_an_aiperf_that_ran_and_counted_failures_gives_the_level_its_figures(
    tmp_path: Path,
) -> None:
    """aiperf exits non-zero when requests failed (a wrong key): that is a level with
    errors, read from its records, not a bench that did not run."""
    fake = tmp_path / "aiperf"
    record = json.dumps({"metadata": {"benchmark_phase": "profiling"},
                         "error": {"code": 401, "type": "Unauthorized"}})  # fmt: skip
    fake.write_text(f"#!/bin/sh\necho '{record}' > {aiperf.RECORDS}\nexit 1\n")
    fake.chmod(0o755)
    spec = resolve_host("h", {"llama_profile": "cpu-demo"})
    wl = workload_for(spec.profile, levels=(1,), isl=None, osl=None, requests=None, seed=1)
    target = bench_run.Target("h", "http://127.0.0.1:9", "alias", spec.cfg, "k")
    level = bench_run.run_level(target, wl, 0, aiperf=fake, tokenizer="tok", out=tmp_path,
                                timeout_s=30, sample_server=False)  # fmt: skip
    assert level.client.requests == 0 and level.client.errors == 1
