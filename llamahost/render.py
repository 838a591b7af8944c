"""Rendering: the llama-server command line, systemd quoting, the build identity."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from llamahost.config import HostConfig, Profile

# The targets the service needs; nothing else is compiled.
BUILD_TARGETS = ("llama-server",)

# A static build: one self-contained binary, swapped in with one symlink.
BASE_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    # No -march=native: the binary must not depend on the CPU of the build's moment.
    "-DGGML_NATIVE=OFF",
)


def threads(profile: Profile, cpu_count: int) -> int:
    return cpu_count if profile.threads == "auto" else int(profile.threads)


def server_args(cfg: HostConfig, cpu_count: int) -> list[str]:
    """llama-server's arguments for a host, in the guide's order."""
    p = cfg.profile
    args = ["-m", cfg.model_path, "--alias", p.alias]
    if p.chat_template == "embedded":
        args += ["--jinja"]
    else:
        args += ["--no-jinja", "--chat-template", p.chat_template]
    args += ["--host", p.host, "--port", str(p.port), "-fa", p.flash_attn]
    if p.gpu_layers is not None:
        args += ["-ngl", str(p.gpu_layers)]
    if p.device is not None:
        args += ["--device", p.device]
    args += ["--fit", "on" if p.fit else "off"]
    args += ["-c", str(p.context), "-b", str(p.batch), "-ub", str(p.micro_batch)]
    args += ["-ctk", p.kv_cache_type_k, "-ctv", p.kv_cache_type_v]
    args += ["--parallel", str(p.parallel)]
    if p.kv_unified:
        args += ["--kv-unified"]
    if p.cache_reuse:
        args += ["--cache-reuse", str(p.cache_reuse)]
    args += ["--threads", str(threads(p, cpu_count)), "--threads-http", str(p.threads_http)]
    if p.metrics:
        args += ["--metrics"]
    args += ["--slots" if p.slots else "--no-slots"]
    args += ["--api-key-file", cfg.api_key_file]
    return args


_SAFE = re.compile(r"[A-Za-z0-9._:/,=+@\[\]-]+")


def systemd_quote(arg: str) -> str:
    """Quote one argument for an Exec*= line (systemd.service(5), "Command lines")."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in arg):
        raise ValueError(f"control character in unit argument {arg!r}")
    # % starts a specifier and $ a variable in Exec lines: double them.
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _SAFE.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(binary: str, args: list[str]) -> str:
    return " ".join(systemd_quote(a) for a in [binary, *args])


def health_url(cfg: HostConfig) -> str:
    """Where the unit's start check asks: the listen address, or loopback for 'all'."""
    h = cfg.profile.host
    if h == "0.0.0.0":  # noqa: S104  (a comparison, not a bind)
        h = "127.0.0.1"
    elif h == "::":
        h = "::1"
    if ":" in h:
        h = f"[{h}]"
    return f"http://{h}:{cfg.profile.port}/health"


def unit_context(
    cfg: HostConfig, binary: str, health_script: str, cpu_count: int, fetch_script: str
) -> dict[str, Any]:
    """The variables of templates/llama-server.service.j2."""
    pinned = ["--sha256", cfg.model_sha256] if cfg.model_sha256 else []
    return {
        "cfg": cfg,
        "model_check": exec_line(
            "/usr/bin/python3", [fetch_script, "--check", "--dest", cfg.model_path, *pinned]
        ),
        "exec_start": exec_line(binary, server_args(cfg, cpu_count)),
        "health_check": exec_line("/usr/bin/python3", [health_script, health_url(cfg)]),
    }


def cmake_args(cfg: HostConfig, extra: tuple[str, ...] = ()) -> list[str]:
    return [*BASE_CMAKE_ARGS, *extra, *cfg.cpp_cmake_args]


def build_id(commit: str, cmake: list[str]) -> str:
    """Names a build by what went into it: a new commit or new flags → a new build."""
    h = hashlib.sha256("\n".join([commit, *BUILD_TARGETS, *cmake]).encode()).hexdigest()
    return f"{commit[:12]}-{h[:12]}"
