from __future__ import annotations

import pytest

from llamahost.render import build_id, cmake_args, exec_line, systemd_quote
from llamahost.spec import resolve_host


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("plain-1.0", "plain-1.0"),
        ("/var/lib/x.gguf", "/var/lib/x.gguf"),
        ("100%", '"100%%"'),
        ("$HOME", '"$$HOME"'),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
    ],
)
def test_systemd_quote(arg: str, quoted: str) -> None:
    assert systemd_quote(arg) == quoted


@pytest.mark.parametrize("arg", ["a\nb", "a\rb", "tab\there", "nul\x00"])
def test_systemd_quote_refuses_control_characters(arg: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        systemd_quote(arg)


def test_exec_line_is_one_line() -> None:
    line = exec_line("/opt/llama.cpp/current/bin/llama-server", ["-m", "/m.gguf", "--alias", "x"])
    assert line == "/opt/llama.cpp/current/bin/llama-server -m /m.gguf --alias x"


def test_build_id_changes_with_commit_and_flags_only() -> None:
    cfg = resolve_host("h", {}).cfg
    base = build_id(cfg.cpp_commit, cmake_args(cfg))
    assert base == build_id(cfg.cpp_commit, cmake_args(cfg))
    assert base != build_id("f" * 40, cmake_args(cfg))
    assert base != build_id(cfg.cpp_commit, cmake_args(cfg, ("-DGGML_CUDA=ON",)))
    extra = resolve_host("h", {"llama_cpp_cmake_args": ["-DGGML_AVX512=OFF"]}).cfg
    assert base != build_id(cfg.cpp_commit, cmake_args(extra))
    assert base.startswith(cfg.cpp_commit[:12])


def test_build_is_static_and_release() -> None:
    args = cmake_args(resolve_host("h", {}).cfg)
    assert "-DBUILD_SHARED_LIBS=OFF" in args and "-DCMAKE_BUILD_TYPE=Release" in args
