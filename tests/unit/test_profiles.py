"""The three guide profiles render the guide's flags, except the documented corrections."""

from __future__ import annotations

import shlex

import pytest

from llamahost.render import server_args
from llamahost.spec import resolve_host

# Verbatim from the guide (docs/facts.md, "The guide's profiles"), line continuations removed.
_COMMON = (
    "-hf unsloth/Seed-OSS-36B-Instruct-GGUF:Q5_K_XL --alias seed-oss-36b-q5kx "
    "--chat-template seed_oss --host 0.0.0.0 --port 8080 -fa on -ngl 999 --device CUDA0 "
)
GUIDE = {
    "low-latency": _COMMON + "-c 16384 -b 4096 -ub 1024 -ctk q8_0 -ctv q8_0 --parallel 4 "
    "--threads $(nproc) --threads-http -1 --metrics --slots",
    "balanced": _COMMON + "-c 32768 -b 4096 -ub 2048 -ctk q8_0 -ctv q8_0 --parallel 8 "
    "--cache-reuse 1024 --threads $(nproc) --threads-http -1 --metrics --slots",
    "long-context": _COMMON + "-c 32768 -b 4096 -ub 1024 -ctk q8_0 -ctv q8_0 --parallel 6 "
    "--threads $(nproc) --threads-http -1 --metrics --slots",
}

# The guide's section 3 server defaults for the Instruct model, verbatim: every profile's
# default sampling (the "guide" preset).
GUIDE_SAMPLING = (
    "--temp 0.6 --top-p 0.95 --top-k 60 --min-p 0.05 --repeat-last-n 64 --repeat-penalty 1.05"
)
# Ours, not the guide's (README, "Profiles"): each profile's thinking budget.
THINKING = {"low-latency": 0, "balanced": 2048, "long-context": 8192}

SWITCHES = {"--metrics", "--slots", "--jinja", "--no-jinja", "--kv-unified"}


def as_flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("-"), f"stray value {flag!r}"
        if flag in SWITCHES:
            out[flag] = None
            i += 1
        else:
            out[flag] = argv[i + 1]
            i += 2
    return out


# Context sizing so each profile delivers the per-conversation context the guide promises
# (README, "Profiles"): the total -c, and a unified KV pool where the slots share it.
SIZING: dict[str, dict[str, str | None]] = {
    "low-latency": {"-c": "65536"},
    "balanced": {"-c": "65536", "--kv-unified": None},
    "long-context": {"-c": "65536", "--kv-unified": None},
}


def corrected(
    profile: str, guide: dict[str, str | None], cpus: int, model: str, keyfile: str
) -> dict[str, str | None]:
    """The documented corrections (README, "Profiles"), applied to the guide's flags."""
    fixed = {**guide, **SIZING[profile]}
    del fixed["-hf"]  # the model is pre-downloaded: -m with a local path
    fixed["-m"] = model
    del fixed["--chat-template"]  # a literal Jinja template under --jinja: use the embedded one
    fixed["--jinja"] = None
    fixed["--fit"] = "off"  # fail loudly instead of moving layers to the CPU
    assert fixed["--threads"] == "$(nproc)"
    fixed["--threads"] = str(cpus)  # systemd does not run $(nproc)
    fixed["--api-key-file"] = keyfile  # the guide's own security advice, always on
    fixed |= as_flags(shlex.split(GUIDE_SAMPLING))
    fixed["--reasoning-format"] = "auto"  # llama.cpp's default, said explicitly
    fixed["--chat-template-kwargs"] = f'{{"thinking_budget":{THINKING[profile]}}}'
    return fixed


@pytest.mark.parametrize("profile", sorted(GUIDE))
def test_guide_profiles_render_the_guides_flags(profile: str) -> None:
    cfg = resolve_host("gpu-1", {"llama_profile": profile}).cfg
    ours = as_flags(server_args(cfg, cpu_count=32))
    guide = as_flags(shlex.split(GUIDE[profile].replace("$(nproc)", "'$(nproc)'")))
    assert ours == corrected(profile, guide, 32, cfg.model_path, cfg.api_key_file)


def test_cpu_demo_has_the_same_shape_without_gpu_flags() -> None:
    cfg = resolve_host("cpu-1", {"llama_profile": "cpu-demo"}).cfg
    flags = as_flags(server_args(cfg, cpu_count=2))
    assert "-ngl" not in flags and "--device" not in flags
    balanced = as_flags(server_args(resolve_host("gpu-1", {}).cfg, cpu_count=2))
    # cpu-demo's thinking budget is unlimited (-1): no template default is passed.
    gpu_only = {"-ngl", "--device", "--cache-reuse", "--kv-unified", "--chat-template-kwargs"}
    assert set(flags) == set(balanced) - gpu_only
    assert flags["-c"] == "4096" and flags["--parallel"] == "2"


def test_overrides_win_over_the_profile() -> None:
    cfg = resolve_host(
        "h", {"llama_profile": "low-latency", "llama_parallel": 2, "llama_port": 9000}
    ).cfg
    flags = as_flags(server_args(cfg, cpu_count=8))
    assert flags["--parallel"] == "2" and flags["--port"] == "9000"
    assert flags["-c"] == "65536"


def test_builtin_template_is_used_without_jinja() -> None:
    data = {"llama_chat_template": "seed_oss", "llama_thinking_budget": -1}
    cfg = resolve_host("h", data).cfg
    flags = as_flags(server_args(cfg, cpu_count=8))
    assert flags["--chat-template"] == "seed_oss"
    assert "--no-jinja" in flags and "--jinja" not in flags


def test_explicit_threads_and_unified_kv() -> None:
    cfg = resolve_host(
        "h", {"llama_threads": 6, "llama_kv_unified": True, "llama_slots": False}
    ).cfg
    argv = server_args(cfg, cpu_count=64)
    flags = as_flags([a for a in argv if a != "--no-slots"])
    assert flags["--threads"] == "6" and "--kv-unified" in flags
    assert "--no-slots" in argv and "--slots" not in argv


def test_default_profile_is_the_guides_production_profile() -> None:
    assert resolve_host("h", {}).cfg.profile.name == "balanced"
