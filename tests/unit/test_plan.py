"""Memory model, GGUF header reading, the plan's refusals and the OOM ladder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llamahost import lock as locks
from llamahost.checks import ConfigError
from llamahost.gguf_header import HeaderError, read_file
from llamahost.memory import MIB, REFERENCE_SHAPES, ModelShape, compute_bytes, kv_bytes
from llamahost.plan import check_gpu_memory, plan_host, render
from llamahost.spec import resolve_host
from tests.support.tinygguf import write as write_tiny

SEED = REFERENCE_SHAPES["unsloth/Seed-OSS-36B-Instruct-GGUF"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    write_tiny(str(path))
    return ModelShape.from_header(read_file(path))


def test_header_gives_the_shape_and_exact_tensor_bytes(tiny: ModelShape) -> None:
    assert (tiny.arch, tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.n_head_kv) == (
        "seed_oss",
        2,
        64,
        4,
        2,
    )
    assert (tiny.head_dim_k, tiny.n_ff, tiny.n_vocab, tiny.n_ctx_train) == (32, 128, 259, 8192)
    # All f32: 4 bytes per weight. llama-server reports "model buffer size = 0.44 MiB".
    assert tiny.weights_bytes == 460800
    assert tiny.token_embd_bytes == 259 * 64 * 4


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(HeaderError, match="bad magic"):
        read_file(bad)
    short = tmp_path / "y.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(HeaderError, match="ends inside"):
        read_file(short)


def test_seed_oss_kv_per_token_matches_the_published_arithmetic() -> None:
    # docs/facts.md: f16 256 KiB, q8_0 136 KiB per token; 32k at q8_0 = 4.25 GiB.
    assert kv_bytes(SEED, 1, "f16", "f16") == 256 * 1024
    assert kv_bytes(SEED, 1, "q8_0", "q8_0") == 136 * 1024
    assert kv_bytes(SEED, 32768, "q8_0", "q8_0") == int(4.25 * 1024 * MIB)


# llama-server's own reports for the tiny model at the pinned commit (CPU, -fa on, -lv 4),
# (-c, --parallel, -ub, --kv-unified) -> "CPU compute buffer size" in MiB, as printed.
COMPUTE_REPORTED = [
    ((4096, 2, 512, False), 3.14),
    ((4096, 2, 256, False), 1.57),
    ((4096, 2, 128, False), 0.78),
    ((8192, 4, 512, False), 3.14),
    ((8192, 4, 512, True), 9.14),
    ((4096, 1, 1024, False), 10.27),
]


@pytest.mark.parametrize(("cfg", "reported_mib"), COMPUTE_REPORTED)
def test_compute_estimate_within_10_percent_of_the_report(
    tiny: ModelShape, cfg: tuple[int, int, int, bool], reported_mib: float
) -> None:
    n_ctx, parallel, ub, unified = cfg
    seen = n_ctx if unified else n_ctx // parallel
    est = compute_bytes(tiny, ub, seen, flash_attn=True) / MIB
    assert abs(est - reported_mib) / reported_mib < 0.10


def _host(data: dict[str, Any]) -> Any:
    return plan_host(resolve_host("gpu-1", data), SEED, "reference")


@pytest.mark.parametrize("profile", ["low-latency", "balanced", "long-context"])
def test_the_guide_profiles_fit_an_a100_40gb_with_headroom(profile: str) -> None:
    hp = _host({"llama_profile": profile})
    assert hp.fits and hp.est is not None
    assert hp.est.total_gpu < 0.88 * 40960 * MIB  # at least 12% free


def test_an_oversized_profile_is_refused_with_the_ladder() -> None:
    hp = _host(
        {
            "llama_kv_cache_type_k": "f16",
            "llama_kv_cache_type_v": "f16",
            "llama_context": 131072,
            "llama_parallel": 16,
            "llama_kv_unified": False,
        }
    )
    assert not hp.fits
    text = render(hp)
    assert "DOES NOT FIT" in text
    steps = hp.ladder
    assert steps[0].startswith("1. KV cache -> q8_0/q8_0")
    assert any("-ub -> 1024" in s for s in steps)
    assert any("--parallel -> 8" in s for s in steps)
    assert any("-c -> 65536" in s for s in steps)
    assert "fits, headroom" in steps[-1]
    assert all("does not fit" in s for s in steps[:-1])


def test_kv_pair_outside_the_cuda_kernels_is_refused() -> None:
    hp = _host({"llama_kv_cache_type_k": "q8_0", "llama_kv_cache_type_v": "q4_0"})
    assert not hp.fits
    assert any("llama_kv_cache_type_k/llama_kv_cache_type_v = q8_0/q4_0" in p for p in hp.problems)


def test_context_beyond_training_without_rope_is_refused(tiny: ModelShape) -> None:
    hp = plan_host(
        resolve_host(
            "cpu-1", {"llama_profile": "cpu-demo", "llama_context": 32768, "llama_parallel": 1}
        ),
        tiny,
        "header",
    )
    assert not hp.fits
    assert any("llama_context = 32768" in p and "trained context (8192)" in p for p in hp.problems)


def test_context_beyond_training_with_rope_scaling_is_planned(tiny: ModelShape) -> None:
    data = {"llama_profile": "cpu-demo", "llama_context": 32768, "llama_parallel": 1}
    data["llama_server_extra_args"] = ["--rope-scaling", "yarn", "--rope-scale", "4"]
    hp = plan_host(resolve_host("cpu-1", data), tiny, "header")
    assert not [p for p in hp.problems if "trained context" in p]


def test_unified_kv_shows_guarantee_and_reach() -> None:
    text = render(_host({"llama_profile": "balanced"}))
    assert "8192 tokens guaranteed, up to 65536" in text


def test_lock_pins_file_commit_and_sha(tmp_path: Path) -> None:
    lock = tmp_path / "prod.lock.json"
    data = {"llama_model_lock": str(lock), "llama_model_file": "Q5_K_XL"}
    unlocked = resolve_host("h", data)
    missing = plan_host(unlocked, SEED)
    assert not missing.fits and "missing" in missing.lock_state
    entry = {
        "file": "M-UD-Q5_K_XL.gguf",
        "commit": "c" * 40,
        "sha256": "a" * 64,
        "shape": SEED.to_dict(),
    }
    locks.save(lock, {locks.key(unlocked.cfg): entry})
    hp = plan_host(resolve_host("h", data), None)
    assert hp.fits and hp.lock_state == "locked"
    assert hp.cfg.model_revision == "c" * 40 and hp.cfg.model_sha256 == "a" * 64
    assert hp.cfg.model_path.endswith(f"/{'c' * 40}/M-UD-Q5_K_XL.gguf")
    with pytest.raises(ConfigError, match=r"llama_model_sha256 = .bbbb.*differs from the lock"):
        resolve_host("h", {**data, "llama_model_sha256": "b" * 64})


@pytest.mark.parametrize(
    ("wanted", "files", "picked"),
    [
        ("Q5_K_XL", ["A-UD-Q5_K_XL.gguf", "A-Q5_K_M.gguf", "README.md"], "A-UD-Q5_K_XL.gguf"),
        ("q4_k_m", ["A-Q4_K_M.gguf", "A-UD-Q5_K_XL.gguf"], "A-Q4_K_M.gguf"),
        ("A-Q4_K_M.gguf", ["A-Q4_K_M.gguf"], "A-Q4_K_M.gguf"),
    ],
)
def test_pick_file_resolves_the_guides_quant_tag(
    wanted: str, files: list[str], picked: str
) -> None:
    assert locks.pick_file(files, wanted) == picked


def test_pick_file_refuses_what_it_cannot_find() -> None:
    with pytest.raises(locks.LockError, match="no GGUF for tag Q8_0"):
        locks.pick_file(["A-Q4_K_M.gguf"], "Q8_0")


def test_plan_memory_is_checked_against_nvidia_smi() -> None:
    cfg = resolve_host("gpu-1", {"llama_profile": "balanced"}).cfg
    assert check_gpu_memory(cfg, (40960,)) == []
    assert check_gpu_memory(cfg, ()) == []  # no driver yet: nothing to compare
    (problem,) = check_gpu_memory(cfg, (40960, 24576))
    assert problem.startswith("llama_gpu_memory_mib = 40960: nvidia-smi reports 24576 MiB")
    cpu = resolve_host("cpu-1", {"llama_profile": "cpu-demo"}).cfg
    assert check_gpu_memory(cpu, (1024,)) == []
