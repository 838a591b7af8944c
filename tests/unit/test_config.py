"""Bad inventory data: one clear error per field, naming host, field and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from llamahost.checks import ConfigError
from llamahost.spec import resolve_host

BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"llama_profile": "turbo"}, "llama_profile", "must be one of: low-latency, balanced"),
    ({"llama_micro_batch": 8192}, "llama_micro_batch", "must be at most llama_batch (4096)"),
    ({"llama_context": 0}, "llama_context", "must be an integer from 256"),
    ({"llama_context": -5}, "llama_context", "must be an integer from 256"),
    ({"llama_port": 70000}, "llama_port", "must be an integer from 1024 to 65535"),
    ({"llama_port": 0}, "llama_port", "must be an integer from 1024 to 65535"),
    ({"llama_port": True}, "llama_port", "must be an integer"),
    ({"llama_model_file": ""}, "llama_model_file", "a non-empty GGUF file name"),
    ({"llama_model_file": "m.bin"}, "llama_model_file", "a non-empty GGUF file name"),
    ({"llama_model_file": "Q5 K"}, "llama_model_file", "or a quantisation tag"),
    ({"llama_alias": "x\nExecStartPre=/bin/sh"}, "llama_alias", "1-128 of letters"),
    ({"llama_alias": "ok\n"}, "llama_alias", "1-128 of letters"),
    ({"llama_model_revision": "main\nUser=root"}, "llama_model_revision", "a branch or tag name"),
    ({"llama_model_dir": "/srv/m\n[Service]"}, "llama_model_dir", "an absolute path"),
    ({"llama_model_dir": "relative/dir"}, "llama_model_dir", "an absolute path"),
    ({"llama_model_dir": "/srv/../etc"}, "llama_model_dir", "no '..'"),
    ({"llama_host": "0.0.0.0 --no-mmap"}, "llama_host", "an IPv4 or IPv6 address"),
    ({"llama_kv_cache_type_k": "q9_0"}, "llama_kv_cache_type_k", "must be one of: f32"),
    ({"llama_flash_attn": "off"}, "llama_kv_cache_type_v", "a quantized V cache needs"),
    ({"llama_service_user": "root"}, "llama_service_user", "other than root"),
    ({"llama_threads": 0}, "llama_threads", "'auto' or 1-4096"),
    ({"llama_cpp_commit": "master"}, "llama_cpp_commit", "a 40-digit commit"),
    ({"llama_cpp_source": "archive"}, "llama_cpp_archive", "must name a .tar.gz"),
    ({"llama_cpp_cmake_args": ["-DX=1; rm -rf /"]}, "llama_cpp_cmake_args", "-DNAME=VALUE"),
    ({"llama_api_key": "short"}, "llama_api_key", "16-256 of letters"),
    ({"llama_paralel": 4}, "llama_paralel", "did you mean llama_parallel?"),
    ({"llama_device": None}, "llama_device", "set llama_gpu_layers and llama_device together"),
]


@pytest.mark.parametrize(("data", "field", "allowed"), BAD, ids=[b[1] for b in BAD])
def test_bad_value_names_host_field_and_what_is_allowed(
    data: dict[str, Any], field: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_host("gpu-7", data)
    message = str(exc.value)
    assert message.startswith("host 'gpu-7': invalid inventory data (nothing was changed)")
    line = next(ln for ln in message.splitlines() if ln.strip().startswith(field + " ="))
    assert allowed in line
    # An error message is one line per field: a newline in a value is shown escaped.
    assert all(ln.startswith(("host ", "  ")) for ln in message.splitlines())


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_host("h", {"llama_port": -1, "llama_profile": "x", "llama_model_file": ""})
    assert {e.key for e in exc.value.errors} == {"llama_port", "llama_profile", "llama_model_file"}


def test_non_llama_keys_are_ignored() -> None:
    cfg = resolve_host("h", {"ssh_port": 22, "_sudo": True, "llama_port": 8081}).cfg
    assert cfg.profile.port == 8081


def test_model_path_is_per_repository_revision_and_file() -> None:
    cfg = resolve_host("h", {"llama_model_revision": "abc123"}).cfg
    assert cfg.model_path == (
        "/var/lib/llama-models/unsloth--Seed-OSS-36B-Instruct-GGUF/abc123/"
        "Seed-OSS-36B-Instruct-UD-Q5_K_XL.gguf"
    )


@pytest.mark.parametrize(
    ("data", "field", "allowed"),
    [
        (
            {"llama_api_key_file": "/etc/passwd"},
            "llama_api_key_file",
            "not in the system directory /etc",
        ),
        ({"llama_api_key_file": "/etc/ssl/key"}, "llama_api_key_file", "system directory /etc/ssl"),
        ({"llama_api_key_file": "/tmp/k/key"}, "llama_api_key_file", "other users write there"),
        (
            {"llama_api_key_file": "/var/lib/llama-models/key"},
            "llama_api_key_file",
            "must not be inside llama_model_dir",
        ),
        ({"llama_model_dir": "/"}, "llama_model_dir", "not the system directory /"),
        ({"llama_model_dir": "/var/lib"}, "llama_model_dir", "not the system directory /var/lib"),
        ({"llama_model_dir": "/dev/shm/m"}, "llama_model_dir", "other users write there"),
        ({"llama_cpp_prefix": "/opt"}, "llama_cpp_prefix", "not the system directory /opt"),
        ({"llama_hf_venv": "/usr"}, "llama_hf_venv", "not the system directory /usr"),
        (
            {"llama_parallel": 32, "llama_context": 4096},
            "llama_parallel",
            "gives each conversation 128 tokens",
        ),
        ({"llama_model_revision": "feature..x"}, "llama_model_revision", "git's rules"),
        ({"llama_model_revision": "v1.lock"}, "llama_model_revision", "git's rules"),
    ],
)
def test_paths_and_shapes_that_would_break_the_host_are_refused(
    data: dict[str, Any], field: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_host("gpu-7", data)
    (line,) = [ln for ln in str(exc.value).splitlines() if ln.strip().startswith(field + " =")]
    assert allowed in line


def test_paths_of_their_own_are_accepted() -> None:
    cfg = resolve_host(
        "h",
        {
            "llama_api_key_file": "/etc/llama/key",
            "llama_model_dir": "/data/models",
            "llama_cpp_prefix": "/opt/llama",
            "llama_parallel": 4,
            "llama_context": 4096,
            "llama_model_revision": "refs-pr-3.v2",
        },
    ).cfg
    assert cfg.model_dir == "/data/models" and cfg.api_key_file == "/etc/llama/key"
