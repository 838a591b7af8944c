"""Rendering: every file the deploy writes from a template, the llama-server command line,
systemd quoting (the build identity is llamahost.build's).

One Jinja environment renders every template under templates/ (the llama-server unit, the
GPU exporter unit, prometheus.yml, /etc/default arguments); the tasks upload the text it
returns, and the unit tests and compliance checks call the same functions.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jinja2

from llamahost import instances as inst
from llamahost import layout
from llamahost.config import HostConfig, Profile
from llamahost.spec import HostSpec

# How the host counts its online CPUs (`--threads auto`, the build's jobs): pyinfra's own
# Cpus fact runs the same.
ONLINE_CPUS = "getconf NPROCESSORS_ONLN 2> /dev/null || getconf _NPROCESSORS_ONLN"


SINGLE = inst.Instance(None, 0, None, None, (), 1)


def threads(profile: Profile, cpu_count: int, instance: inst.Instance = SINGLE) -> int:
    auto = profile.threads == "auto"
    return instance.threads(auto, 0 if auto else int(profile.threads), cpu_count)


def server_args(
    cfg: HostConfig, cpu_count: int, instance: inst.Instance | None = None
) -> list[str]:
    """llama-server's arguments for a host (or one of its instances), in the guide's
    order. An instance on a GPU of its own sees only that GPU: its device is CUDA0."""
    p = cfg.profile
    x = instance or inst.Instance(None, p.port, None, None, (), 1)
    device = "CUDA0" if x.gpu is not None and p.device is not None else p.device
    args = ["-m", cfg.model_path, "--alias", p.alias]
    if p.chat_template == "embedded":
        args += ["--jinja"]
    else:
        args += ["--no-jinja", "--chat-template", p.chat_template]
    args += ["--host", p.host, "--port", str(x.port), "-fa", p.flash_attn]
    if p.gpu_layers is not None:
        args += ["-ngl", str(p.gpu_layers)]
    if device is not None:
        args += ["--device", device]
    args += ["--fit", "on" if p.fit else "off"]
    args += ["-c", str(p.context), "-b", str(p.batch), "-ub", str(p.micro_batch)]
    args += ["-ctk", p.kv_cache_type_k, "-ctv", p.kv_cache_type_v]
    args += ["--parallel", str(p.parallel)]
    if p.kv_unified:
        args += ["--kv-unified"]
    if p.cache_reuse:
        args += ["--cache-reuse", str(p.cache_reuse)]
    args += ["--threads", str(threads(p, cpu_count, x)), "--threads-http", str(p.threads_http)]
    if p.metrics:
        args += ["--metrics"]
    args += ["--slots" if p.slots else "--no-slots"]
    args += ["--temp", _num(p.temp), "--top-p", _num(p.top_p), "--top-k", str(p.top_k)]
    args += ["--min-p", _num(p.min_p), "--repeat-last-n", str(p.repeat_last_n)]
    args += ["--repeat-penalty", _num(p.repeat_penalty)]
    args += ["--reasoning-format", p.reasoning_format]
    if p.thinking_budget != -1:
        # A server-side default of the chat template's variables; a request's own
        # chat_template_kwargs override it.
        args += ["--chat-template-kwargs", template_kwargs(p)]
    args += ["--api-key-file", cfg.api_key_file]
    return [*args, *cfg.server_extra_args]


def _num(v: float) -> str:
    return f"{v:g}"


def template_kwargs(p: Profile) -> str:
    return json.dumps({"thinking_budget": p.thinking_budget}, separators=(",", ":"))


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


def health_url(cfg: HostConfig, port: int | None = None) -> str:
    """Where the unit's start check asks: the listen address, or loopback for 'all'."""
    h = cfg.profile.host
    if h == "0.0.0.0":  # noqa: S104  (a comparison, not a bind)
        h = "127.0.0.1"
    elif h == "::":
        h = "::1"
    if ":" in h:
        h = f"[{h}]"
    return f"http://{h}:{port or cfg.profile.port}/health"


# ---------------------------------------------------------------- templates
@functools.cache
def environment() -> jinja2.Environment:
    """The one template environment: strict (an unknown variable is an error), blocks
    trimmed, trailing newline kept. Unit and YAML files, not HTML: no autoescape."""
    env = jinja2.Environment(  # noqa: S701
        loader=jinja2.FileSystemLoader(str(layout.TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # JSON strings are YAML strings: any value is quoted safely.
    env.filters["q"] = json.dumps
    return env


def template(name: str, **variables: Any) -> str:
    """templates/<name> rendered with variables."""
    return environment().get_template(name).render(**variables)


def gpu_ordering(uses_gpu: bool) -> tuple[str, ...]:
    """The [Unit] lines of a GPU profile's llama-server.

    The server starts after the persistence daemon, which holds the GPUs initialised and,
    through the drop-in, has made every device node the sandboxed server needs
    (``/dev/nvidiactl``, ``/dev/nvidia<N>``, ``/dev/nvidia-uvm``). ``Wants=`` starts the
    daemon at boot even where its unit is not enabled. Decided by the profile (the spec),
    not by the hardware found, so the deploy and the compliance checks agree.
    """
    if not uses_gpu:
        return ()
    return (f"After={layout.PERSISTENCED_UNIT}", f"Wants={layout.PERSISTENCED_UNIT}")


def server_command(
    cfg: HostConfig, cpu_count: int, instance: inst.Instance | None = None
) -> list[str]:
    """The unit's whole command: the `current` binary and its arguments."""
    return [layout.server_binary(cfg.cpp_prefix), *server_args(cfg, cpu_count, instance)]


def unit(spec: HostSpec, cpu_count: int) -> str:
    """/etc/systemd/system/llama-server.service for a host with one llama-server, or
    llama-server@.service, the template of a host with several (each instance's own lines
    are its drop-in: ``instance_dropin``)."""
    cfg = spec.cfg
    pinned = ["--sha256", cfg.model_sha256] if cfg.model_sha256 else []
    single = len(spec.instances) == 1
    return template(
        "llama-server.service.j2",
        cfg=cfg,
        instanced=not single,
        gpu_unit_lines=gpu_ordering(spec.uses_gpu),
        model_check=exec_line(
            "/usr/bin/python3",
            [layout.FETCH_SCRIPT, "--check", "--dest", cfg.model_path, *pinned],
        ),
        exec_start=exec_line(layout.server_binary(cfg.cpp_prefix), server_args(cfg, cpu_count))
        if single
        else "",
        health_check=exec_line("/usr/bin/python3", [layout.HEALTH_SCRIPT, health_url(cfg)])
        if single
        else "",
    )


def instance_dropin(spec: HostSpec, instance: inst.Instance, cpu_count: int) -> str:
    """llama-server@N.service.d/instance.conf: what one instance of several has of its own
    (llamahost/instances.py)."""
    cfg = spec.cfg
    return template(
        "llama-server-instance.conf.j2",
        cfg=cfg,
        x=instance,
        cpulist=inst.format_cpulist(instance.cpus),
        exec_start=exec_line(
            layout.server_binary(cfg.cpp_prefix), server_args(cfg, cpu_count, instance)
        ),
        health_check=exec_line(
            "/usr/bin/python3", [layout.HEALTH_SCRIPT, health_url(cfg, instance.port)]
        ),
    )


def gpu_exporter_unit(version: str, binary: str, args: list[str]) -> str:
    return template(
        "monitoring/nvidia-gpu-exporter.service.j2",
        version=version,
        exec_start=exec_line(binary, args),
    )


def default_args(args: str) -> str:
    """An /etc/default file of Debian's prometheus packages: ARGS="..."."""
    return template("monitoring/default-args.j2", args=args)
