"""The prepared GPU check (tests/gpu_check/), everything of it that runs without a GPU: the
model generator at small scale read back with the `gguf` package, the full-scale tensor table
against the planner, the log parsing against recorded llama.cpp logs, the plan the check
carries against what the deploy renders, the time budget and the JSON's shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from llamahost.gguf_header import read_file
from llamahost.memory import MIB, REFERENCE_SHAPES, ModelShape, kv_bytes
from llamahost.render import server_args
from llamahost.spec import resolve_host
from tests.compliance import gpu_parse
from tests.gpu_check import budget as B
from tests.gpu_check import check, logparse, prepare, seedgguf
from tests.support import tinygguf

FIXTURES = Path(__file__).resolve().parents[1] / "compliance" / "fixtures"
SMALL = seedgguf.Config(
    n_layer=2, n_embd=256, n_head=4, n_head_kv=1, head_dim=128, n_ff=512, n_vocab=300
)
SEED = REFERENCE_SHAPES["unsloth/Seed-OSS-36B-Instruct-GGUF"]
EXPECTED_MIX = {
    **dict.fromkeys(["token_embd.weight", "output.weight", "attn_v.weight"], "Q6_K"),
    **dict.fromkeys(["ffn_down.weight"], "Q6_K"),
    **dict.fromkeys(
        ["attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight"], "Q5_K"
    ),
    **dict.fromkeys(["ffn_up.weight"], "Q5_K"),
    **dict.fromkeys(
        ["output_norm.weight", "attn_norm.weight", "post_attention_norm.weight"], "F32"
    ),
    **dict.fromkeys(["attn_q.bias", "attn_k.bias", "attn_v.bias"], "F32"),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gc") / "small.gguf"
    size = seedgguf.write(path, SMALL)
    assert size == path.stat().st_size
    return path


# ---------------------------------------------------------------- the generator
def test_small_file_has_the_tables_names_shapes_and_types(small: Path) -> None:
    r = gguf.GGUFReader(small)
    table = seedgguf.tensor_table(SMALL)
    assert [t.name for t in r.tensors] == [t.name for t in table]
    assert len(table) == 12 * SMALL.n_layer + 3
    for got, want in zip(r.tensors, table, strict=True):
        assert tuple(int(d) for d in got.shape) == want.dims, want.name
        assert got.tensor_type.name == want.type_name, want.name
        assert int(got.n_bytes) == want.nbytes, want.name
    by_name = {t.name: t for t in r.tensors}
    # the UD-Q5_K_XL mix as documented in seedgguf (derived, not read from the real file)
    assert seedgguf.TYPE_MIX == EXPECTED_MIX
    for role, type_name in EXPECTED_MIX.items():
        name = role if role in by_name else f"blk.1.{role}"
        assert by_name[name].tensor_type.name == type_name, role
    # orientation as llama.cpp's seed-oss.cpp creates them: {n_embd, n_q}, {n_q, n_embd}...
    q = SMALL.n_head * SMALL.head_dim
    assert tuple(by_name["blk.0.attn_q.weight"].shape) == (SMALL.n_embd, q)
    assert tuple(by_name["blk.0.attn_output.weight"].shape) == (q, SMALL.n_embd)
    assert tuple(by_name["blk.0.ffn_down.weight"].shape) == (SMALL.n_ff, SMALL.n_embd)
    assert tuple(by_name["token_embd.weight"].shape) == (SMALL.n_embd, SMALL.n_vocab)


def test_every_weight_is_finite_and_small(small: Path) -> None:
    r = gguf.GGUFReader(small)
    seen = set()
    for t in r.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(values).all(), t.name
        assert float(np.abs(values).max()) <= 1.0, t.name  # norms are exactly 1
        seen.add(t.tensor_type.name)
        if t.tensor_type.name != "F32":
            assert float(np.abs(values).max()) > 0, t.name  # random, not zeros
    assert seen == {"F32", "Q5_K", "Q6_K"}


def test_metadata_is_seed_oss_and_the_vocabulary_matches_the_embedding(small: Path) -> None:
    r = gguf.GGUFReader(small)

    def value(key: str) -> Any:
        f = r.fields[key]
        return f.contents()

    assert value("general.architecture") == "seed_oss"
    assert value("seed_oss.block_count") == SMALL.n_layer
    assert value("seed_oss.attention.head_count_kv") == SMALL.n_head_kv
    assert value("seed_oss.attention.key_length") == SMALL.head_dim
    assert value("seed_oss.rope.freq_base") == pytest.approx(1e7)
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == SMALL.n_vocab == len(set(tokens))
    assert tokens[:3] == ["<unk>", "<seed:bos>", "<seed:eos>"]
    assert value("tokenizer.chat_template") == tinygguf.CHAT_TEMPLATE


def test_block_layouts_agree_with_the_gguf_package() -> None:
    for name, (type_id, block, size, halves) in seedgguf.GGML_TYPES.items():
        qt = gguf.GGMLQuantizationType[name]
        assert int(qt) == type_id
        assert gguf.GGML_QUANT_SIZES[qt] == (block, size)
        assert all(0 <= off <= size - 2 for off in halves)


def test_the_planners_shape_of_the_table_equals_the_written_files(small: Path) -> None:
    assert prepare.generated_shape(SMALL) == ModelShape.from_header(read_file(small))


def test_full_scale_table_is_seed_oss_36b_at_about_26_gb() -> None:
    shape = prepare.generated_shape()
    for f in ("arch", "n_layer", "n_embd", "n_head", "n_head_kv", "head_dim_k", "n_ff"):
        assert getattr(shape, f) == getattr(SEED, f), f
    assert (shape.n_vocab, shape.n_ctx_train) == (SEED.n_vocab, SEED.n_ctx_train)
    # "roughly 26 GB" (docs/facts.md); the token embedding at Q6_K, as the reference card
    assert 25.5e9 < shape.weights_bytes < 27.0e9
    assert shape.token_embd_bytes == SEED.token_embd_bytes
    assert len(seedgguf.tensor_table()) == 12 * 64 + 3
    assert seedgguf.expected_size() >= shape.weights_bytes


def test_a_row_that_is_not_whole_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="not a multiple of 256"):
        seedgguf.tensor_table(seedgguf.Config(n_embd=100))[0].nbytes  # noqa: B018


# ---------------------------------------------------------------- log parsing
def test_recorded_full_offload_log() -> None:
    log = (FIXTURES / "offload-full-81of81.log").read_text()
    r = logparse.parse(log)
    assert (r.offloaded, r.total_layers, r.all_offloaded) == (81, 81, True)
    assert r.buffers["model"] == {"CUDA0": 24277.75, "CUDA2": 46151.91, "CPU_Mapped": 1064.62}
    assert r.cuda_mib()["model"] == round(24277.75 + 46151.91, 2)
    assert r.host_mib()["model"] == 1064.62
    ref = gpu_parse.offload(log)
    assert ref is not None and (ref.offloaded, ref.total) == (r.offloaded, r.total_layers)


def test_recorded_partial_offload_log() -> None:
    log = (FIXTURES / "offload-partial-30of81.log").read_text()
    r = logparse.parse(log)
    assert (r.offloaded, r.total_layers, r.all_offloaded) == (30, 81, False)
    ref = gpu_parse.offload(log)
    assert ref is not None and not ref.complete


# Recorded here: the pinned llama-server (CPU build, the project's dev build) serving the
# generator's small model with the balanced profile's flags minus the GPU ones (-c 2048,
# -ub 256, --parallel 2), through check.serve_profile; its load log at -lv 4.
RECORDED = Path(check.__file__).parent / "fixtures" / "server-cpu-small.log"


def test_recorded_log_of_the_generated_model_on_the_pinned_server() -> None:
    log = RECORDED.read_text()
    # llama.cpp loaded exactly what the generator writes
    n_kv, n_t = len(seedgguf.metadata(SMALL)), len(seedgguf.tensor_table(SMALL))
    assert f"loaded meta data with {n_kv} key-value pairs and {n_t} tensors" in log
    assert "print_info: arch                  = seed_oss" in log
    r = logparse.parse(log)
    assert r.offloaded is None and not r.all_offloaded  # a CPU build prints no offload line
    assert r.cuda_mib() == {"model": 0.0, "KV": 0.0, "compute": 0.0}
    assert r.host_mib() == {"model": 1.12, "KV": 1.06, "compute": 3.33}
    # the planner's exact parts agree with the server's report, to the printed 0.01 MiB
    shape = prepare.generated_shape(SMALL)
    assert r.host_mib()["model"] == round(shape.weights_bytes / MIB, 2)
    assert r.host_mib()["KV"] == round(kv_bytes(shape, 2048, "q8_0", "q8_0") / MIB, 2)


# Lines formatted with the pinned source's own printf formats (no recorded CUDA log of the KV
# and compute lines exists here): src/llama-kv-cache.cpp, src/llama-context.cpp and
# src/llama-model.cpp at the pin (vendor/llama.cpp of llama-cpp-python 0.3.36).
FMT_MODEL = "%s: %12s model buffer size = %8.2f MiB"
FMT_KV = "%s: %10s KV buffer size = %8.2f MiB"
FMT_COMPUTE = "%s: %10s compute buffer size = %8.2f MiB"
FMT_OUTPUT = "%s: %10s  output buffer size = %8.2f MiB"
FMT_OFFLOAD = "%s: offloaded %d/%d layers to GPU"


def _cuda_log(model: float, kv: float, compute: float, layers: tuple[int, int]) -> str:
    return "\n".join(
        [
            FMT_OFFLOAD % ("load_tensors", *layers),
            FMT_MODEL % ("load_tensors", "CPU_Mapped", 621.39),
            FMT_MODEL % ("load_tensors", "CUDA0", model),
            FMT_OUTPUT % ("llama_context", "CUDA_Host", 4.73),
            FMT_KV % ("llama_kv_cache", "CUDA0", kv),
            FMT_COMPUTE % ("sched_reserve", "CUDA0", compute),
            FMT_COMPUTE % ("sched_reserve", "CUDA_Host", 58.02),
        ]
    )


def test_cuda_lines_in_the_pinned_format() -> None:
    r = logparse.parse(_cuda_log(24476.91, 8704.0, 1940.0, (65, 65)))
    assert r.all_offloaded
    assert r.cuda_mib() == {"model": 24476.91, "KV": 8704.0, "compute": 1940.0}
    # pinned host memory (CUDA_Host) is host memory, not the GPU's
    assert r.host_mib() == {"model": 621.39, "KV": 0.0, "compute": 58.02}
    assert "output" not in r.buffers


def test_only_the_last_load_counts() -> None:
    first = _cuda_log(1.0, 2.0, 3.0, (10, 65))
    second = _cuda_log(24476.91, 8704.0, 1940.0, (65, 65))
    r = logparse.parse(first + "\n" + second)
    assert r.offloaded == 65 and r.cuda_mib()["KV"] == 8704.0


def test_a_log_without_a_load_reports_nothing() -> None:
    r = logparse.parse("main: server is listening\n")
    assert r.offloaded is None and not r.all_offloaded and r.cuda_mib()["model"] == 0.0


def test_measured_against_the_plan() -> None:
    plan = prepare.plan()["profiles"]["balanced"]["plan_mib"]
    r = logparse.parse(_cuda_log(plan["model"], plan["KV"], plan["compute"] * 1.5, (65, 65)))
    cmp = check.compare(r, plan, 40960)
    assert cmp["measured_over_plan"] == {"model": 1.0, "KV": 1.0, "compute": 1.5}
    assert cmp["a100_40gb_fits_measured"] is True
    big = logparse.parse(_cuda_log(plan["model"], 16000.0, plan["compute"], (65, 65)))
    assert check.compare(big, plan, 40960)["a100_40gb_fits_measured"] is False
    partial = logparse.parse(_cuda_log(1000.0, 10.0, 10.0, (30, 65)))
    assert check.compare(partial, plan, 40960)["a100_40gb_fits_measured"] is None


# ---------------------------------------------------------------- what the check serves
@pytest.mark.parametrize("name", prepare.ORDER)
def test_the_check_serves_the_deploys_arguments(name: str) -> None:
    pp = prepare.plan()["profiles"][name]
    filled = check.fill_args(pp["args"], "/m.gguf", "/k", 16)
    cfg = resolve_host("gpu-check", {"llama_profile": name}).cfg
    rendered = server_args(cfg, cpu_count=16)
    assert filled[-2:] == ["-lv", "4"]
    body = filled[:-2]
    assert len(body) == len(rendered)
    differ = {
        rendered[i - 1] for i, (a, b) in enumerate(zip(body, rendered, strict=True)) if a != b
    }
    assert differ <= {"-m", "--port", "--api-key-file"}  # only where it runs, not how
    assert body[body.index("-m") + 1] == "/m.gguf"
    assert body[body.index("--port") + 1] == str(check.PORT)
    placeholders = {*prepare.PLACEHOLDERS.values(), "{threads}"}
    assert not placeholders & set(body)
    assert pp["slots"] == cfg.profile.parallel


def test_the_plan_covers_every_gpu_profile_with_estimates() -> None:
    doc = prepare.plan()
    assert list(doc["profiles"]) == ["low-latency", "balanced", "long-context"]
    for p in doc["profiles"].values():
        mib = p["plan_mib"]
        assert mib["KV"] == 8704.0  # 65536 cells x 136 KiB (q8_0)
        assert mib["total"] == pytest.approx(
            mib["model"] + mib["KV"] + mib["compute"] + mib["reserve"], abs=0.05
        )
        assert mib["model"] + mib["model_host"] == pytest.approx(
            seedgguf.expected_size() / MIB, rel=1e-3
        )
    assert "-DGGML_NATIVE=OFF" in doc["cmake_args"] and "llama-server" in doc["targets"]


def test_the_trimmed_source_keeps_what_the_targets_read() -> None:
    top = "llama.cpp-0c1e/"
    for kept in (
        "CMakeLists.txt",
        "ggml/src/ggml-cuda/fattn.cu",
        "tools/server/server.cpp",
        "tools/ui/src/app.html",
        "vendor/cpp-httplib/httplib.h",
        "src/models/seed-oss.cpp",
    ):
        assert prepare.keep(top + kept), kept
    for dropped in (
        "models/ggml-vocab-llama.gguf",
        "docs/build.md",
        "tests/test-backend-ops.cpp",
        "ggml/src/ggml-vulkan/ggml-vulkan.cpp",
        "ggml/src/ggml-hip",
        "tools/ui/tests/x.ts",
    ):
        assert not prepare.keep(top + dropped), dropped
    assert prepare.keep(top) and prepare.keep("llama.cpp-0c1e")


def test_trim_writes_an_archive_without_the_dropped_parts(tmp_path: Path) -> None:
    import tarfile

    src = tmp_path / "src.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for name in (
            "top/CMakeLists.txt",
            "top/docs/a.md",
            "top/ggml/src/ggml-cuda/a.cu",
            "top/ggml/src/ggml-sycl/b.cpp",
        ):
            f = tmp_path / "f"
            f.write_text(name)
            tar.add(f, arcname=name)
    info = prepare.trim(src, tmp_path / "out.tar.gz")
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == ["top/CMakeLists.txt", "top/ggml/src/ggml-cuda/a.cu"]
    assert (info["files_kept"], info["files_dropped"]) == (2, 2)


# ---------------------------------------------------------------- budget
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_grants_shortens_and_skips() -> None:
    clock = Clock()
    b = B.Budget(total_s=570, clock=clock)
    assert b.grant("build", 330, min_s=60, keep_s=40) == 330
    clock.now += 400  # the build ran long: 170 s left
    assert b.grant("profile a", 70, min_s=40) == 70
    assert b.grant("build again", 330, min_s=60, keep_s=140) == 0  # 30 s: under its minimum
    assert b.skipped == ["build again: 170 s left, needs 60"]
    clock.now += 150
    assert b.left() == 20
    assert b.grant("profile b", 70, min_s=40) == 0
    assert b.grant("short", 70, min_s=5) == 20  # what is left, not what it wanted
    clock.now += 100
    assert b.left() == 0.0
    b.note("x", 1.234)
    assert b.spent == {"x": 1.2}


@pytest.mark.parametrize(
    ("slots", "seconds", "levels", "tokens"),
    [
        (8, 60, [1, 2, 3, 4, 5, 6, 7, 8], 64),
        (8, 12, [1, 2, 3, 4, 5, 6, 7, 8], 32),
        (8, 8, [1, 8], 32),
        (1, 2, [1], 32),
    ],
)
def test_decode_sweep_shrinks_with_time(
    slots: int, seconds: float, levels: list[int], tokens: int
) -> None:
    assert B.decode_plan(slots, seconds) == (levels, tokens)


def test_the_budget_fits_the_device_limit() -> None:
    assert B.TOTAL_S <= 600 - 20
    # build, then one profile at least, fit; three profiles and the bench fit when the build
    # stays near its plan
    assert B.BUILD_S + B.PROFILE_MIN_S <= B.TOTAL_S
    assert B.BUILD_S + 3 * B.PROFILE_S + B.BENCH_S <= B.TOTAL_S + 15
    # with the download benchmark first, all of them fit when the build ends 45 s early
    assert B.DOWNLOAD_S + B.BUILD_S + 3 * B.PROFILE_S + B.BENCH_S <= B.TOTAL_S + 45


# ---------------------------------------------------------------- the JSON
def test_without_a_gpu_the_check_still_writes_its_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "plan.json").write_text(
        json.dumps({**prepare.plan(), "source": {"bytes_unpacked": 1}})
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi
    out = tmp_path / "o" / "gpu_check.json"
    rc = check.main(["--prepared", str(prepared), "--work", str(tmp_path / "w"), "--out", str(out)])
    assert rc == 1
    doc = json.loads(out.read_text())
    assert set(check.result_skeleton()) <= set(doc)
    assert doc["schema"] == check.SCHEMA and doc["finished"] is False
    assert doc["errors"] and doc["errors"][0].startswith("nvidia-smi:")
    assert doc["profiles"] == {} and doc["build"] == {"ok": False}
    assert "total" in doc["seconds"]


def test_profile_record_shape() -> None:
    r = check.profile_skeleton("balanced", 8)
    want = {
        "profile",
        "slots",
        "args",
        "loaded",
        "load_s",
        "offloaded",
        "all_layers_offloaded",
        "cuda_mib",
        "host_mib",
        "plan_mib",
        "measured_over_plan",
        "a100_40gb_fits_measured",
        "prompt",
        "decode",
        "skipped",
        "log_tail",
    }
    assert set(r) == want
    json.dumps(r)


def test_a_failed_build_is_recorded_and_nothing_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "plan.json").write_text(
        json.dumps({**prepare.plan(), "source": {"bytes_unpacked": 1}})
    )
    src = tmp_path / "top"
    src.mkdir()
    (src / "CMakeLists.txt").write_text("")
    import tarfile

    with tarfile.open(prepared / prepare.SOURCE_NAME, "w:gz") as tar:
        tar.add(src, arcname="top")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 9.0, 143771, 580.95.05'\n")
    (bin_dir / "cmake").write_text("#!/bin/sh\necho 'CMake Error: no CUDA compiler' >&2\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    # the generator at small scale, not 26 GB
    real_write = seedgguf.write
    monkeypatch.setattr(seedgguf, "write", lambda path: real_write(path, SMALL))
    out = tmp_path / "gpu_check.json"
    rc = check.main(["--prepared", str(prepared), "--work", str(tmp_path / "w"), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 1
    assert doc["gpu"] == {
        "name": "NVIDIA H200",
        "compute_cap": "9.0",
        "arch": "90",
        "memory_mib": 143771,
        "driver": "580.95.05",
    }
    assert doc["build"]["ok"] is False and "no CUDA compiler" in doc["build"]["error"]
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in doc["build"]["cmake_args"]
    assert "-DGGML_CUDA=ON" in doc["build"]["cmake_args"]
    assert "every profile: no build or no model" in doc["skipped"]
    assert doc["profiles"] == {}


# ---------------------------------------------------------------- two instances on the GPU
def test_the_two_instances_are_the_deploys_instances_of_a_one_gpu_host() -> None:
    """As the deploy renders `llama_instances: 2` on a host with one GPU: each instance on
    its own port, the GPU as CUDA0 under CUDA_VISIBLE_DEVICES=0, the threads shared."""
    ip = prepare.plan()["instances"]
    assert ip["profile"] == "low-latency"
    assert ip["needs_mib"] == pytest.approx(2 * ip["plan_total_mib"], abs=0.02)
    cfg = resolve_host("gpu-check", {"llama_profile": "low-latency"}).cfg
    for x in ip["instances"]:
        assert x["gpu"] == 0
        body = check.fill_args(x["args"], "/m.gguf", "/k", 8)[:-2]
        assert body[body.index("--port") + 1] == str(check.PORT + x["index"])
        assert body[body.index("--device") + 1] == "CUDA0"
        assert body[body.index("--threads") + 1] == "8"
        rendered = server_args(cfg, cpu_count=8)
        differ = {rendered[i - 1] for i, (a, b) in enumerate(zip(body, rendered, strict=True))
                  if a != b}  # fmt: skip
        assert differ <= {"-m", "--port", "--api-key-file"}


def test_two_instances_are_skipped_when_the_gpu_cannot_hold_both(tmp_path: Path) -> None:
    ip = prepare.plan()["instances"]
    r = check.serve_instances(ip, tmp_path / "no-bin", tmp_path / "m.gguf", tmp_path, 40960,
                              60, 1000)  # fmt: skip
    assert r["served"] is False and r["instances"] == []
    assert r["skipped"] == [f"the GPU's 40960 MiB hold fewer than 2 x {ip['plan_total_mib']} MiB"]


# ---------------------------------------------------------------- the download step
def test_the_download_step_runs_on_a_bare_python_with_the_prepared_pylib(tmp_path: Path) -> None:
    """The device's Python has no virtualenv: this one's base interpreter, which lacks
    huggingface_hub, runs the step with only the repository and the copied pylib/."""
    prepared = tmp_path / "prepared"
    info = prepare.pylib(prepared / "pylib")
    assert info["dists"]["huggingface_hub"] == "2.4.0"  # the toolkit's pin travels
    assert "hf-xet" not in info["dists"] and info["bytes"] < 20_000_000
    bare = str(Path(sys.base_prefix) / "bin" / "python3")
    no_hub = subprocess.run([bare, "-c", "import huggingface_hub"], capture_output=True,
                            check=False)  # fmt: skip
    assert no_hub.returncode != 0  # the bare interpreter alone has no huggingface_hub
    r = check.download(prepared, tmp_path, 120, mib=8, rounds=1, python=bare)
    assert r["ok"] is True, r
    assert r["python"] == sys.version.split()[0]  # this one's base, not the virtualenv's
    assert r["mib"] == 8 and r["curl_s"] > 0 and r["fetch_s"] > 0
    assert r["throughput_ratio"] > 0
    assert r["goal"] == 0.8 and r["goal_met"] == (r["throughput_ratio"] >= 0.8)


def test_the_download_step_without_the_pylib_says_to_prepare(tmp_path: Path) -> None:
    r = check.download(tmp_path, tmp_path, 10)
    assert r["ok"] is False and "rerun the prepare step" in r["error"]


def test_the_download_step_leaves_the_build_and_a_profile_their_time() -> None:
    assert B.DOWNLOAD_S + B.BUILD_S + B.PROFILE_MIN_S <= B.TOTAL_S
