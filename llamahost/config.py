"""The core settings: profile, model, llama.cpp build and service.

Every knob is a row of ``SETTINGS`` (its inventory key, default and what is allowed) and a
row of the README's variables table; a test keeps the two in step. The GPU stack's and
monitoring's rows live with those concerns; ``llamahost.spec.resolve_host`` validates them
all together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from llamahost.checks import (
    PREFIX,
    PROFILE,
    FieldError,
    Invalid,
    Setting,
    api_key,
    boolean,
    choice,
    cmake_args,
    either,
    http_url,
    integer,
    listen_address,
    number,
    optional,
    owned_dir,
    owned_file,
    pattern,
    sha256_hex,
    unprivileged_port,
)
from llamahost.profiles import DEFAULT_PROFILE, PROFILES, SAMPLING_PRESETS

# The smallest context a conversation may be guaranteed (llama_context over
# llama_parallel): Seed-OSS's chat template alone (its system line, a thinking-budget
# instruction, a tool block) takes a few hundred tokens, so below 1024 a slot cannot hold
# a short exchange; the guide's smallest profile gives 4096.
MIN_SLOT_CONTEXT = 1024

# Flags the toolkit renders itself (llamahost.render.server_args), with their aliases at the
# pinned llama.cpp (common/arg.cpp): an extra argument may not set them a second time.
MANAGED_FLAGS = frozenset(
    [
        "-m",
        "--model",
        "-mu",
        "--model-url",
        "-hf",
        "-hfr",
        "--hf-repo",
        "-hff",
        "--hf-file",
        "-a",
        "--alias",
        "--jinja",
        "--no-jinja",
        "--chat-template",
        "--chat-template-file",
        "--chat-template-kwargs",
        "--host",
        "--port",
        "-fa",
        "--flash-attn",
        "-ngl",
        "--gpu-layers",
        "--n-gpu-layers",
        "-dev",
        "--device",
        "--fit",
        "-c",
        "--ctx-size",
        "-b",
        "--batch-size",
        "-ub",
        "--ubatch-size",
        "-ctk",
        "--cache-type-k",
        "-ctv",
        "--cache-type-v",
        "-np",
        "--parallel",
        "-kvu",
        "--kv-unified",
        "--cache-reuse",
        "-t",
        "--threads",
        "--threads-http",
        "--metrics",
        "--slots",
        "--no-slots",
        "--temp",
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--repeat-last-n",
        "--repeat-penalty",
        "--reasoning-format",
    ]
)
# Flags that would put a secret on the command line (readable in ps and the unit).
SECRET_FLAGS = frozenset(["--api-key", "-hft", "--hf-token"])
# Refused outright, each with its reason. --sleep-idle-seconds: /health stays 200 while
# the model is unloaded, so health checks (a gateway's, the deploy's, the compliance
# checks') would call a sleeping host ready.
_AGENT = "the experimental MCP/agent tools act on the host's behalf: kept off"
REFUSED_FLAGS = {
    "--sleep-idle-seconds": "its /health answers 200 while the model is unloaded",
    "--props": "POST /props would change the served settings behind the deploy's back",
    "--embedding": "this toolkit serves the chat model; embeddings stay off",
    "--embeddings": "this toolkit serves the chat model; embeddings stay off",
    "--slot-save-path": (
        "it turns on POST /slots/:id save and restore, which writes and reads files on the "
        "host for any holder of its key; slot caches stay off"
    ),
    **dict.fromkeys(
        [
            "--tools",
            "--tools-runtime",
            "--mcp-servers-config",
            "--mcp-servers-json",
            "-ag",
            "--agent",
            "--ui-mcp-proxy",
            "--webui-mcp-proxy",
        ],
        _AGENT,
    ),
}

PINNED_LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
PINNED_HF_HUB_VERSION = "2.4.0"

# llama.cpp's accepted KV cache types (common/arg.cpp, kv_cache_types, at the pin).
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def thinking_budget(v: Any) -> int:
    # The model's trained budgets are multiples of 512 (its template reflects every
    # 512-token interval or more); -1 and 0 are the template's "unlimited" and "none".
    if (
        isinstance(v, bool)
        or not isinstance(v, int)
        or not (v in (-1, 0) or (0 < v <= 65536 and v % 512 == 0))
    ):
        raise Invalid(
            "must be -1 (unlimited), 0 (answer directly) or a multiple of 512 up to 65536"
        )
    return v


def server_extra_args(v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(a, str) for a in v):
        raise Invalid("must be a list of strings, one argument each")
    for a in v:
        if not a or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in a):
            raise Invalid(f"{a!r}: one argument per item, without control characters")
        flag = a.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            raise Invalid(f"{flag} puts a secret on the command line: use llama_api_key")
        if flag in REFUSED_FLAGS:
            raise Invalid(f"{flag} is refused: {REFUSED_FLAGS[flag]}")
        if flag in MANAGED_FLAGS:
            raise Invalid(f"{flag} is set by the toolkit: use its llama_* setting")
    return tuple(v)


# ---------------------------------------------------------------- the settings
SETTINGS: tuple[Setting, ...] = (
    Setting("profile", DEFAULT_PROFILE, choice(*PROFILES), "Tuning profile (see Profiles)."),
    # Profile fields: each defaults to the profile's value.
    Setting("context", PROFILE, integer(256, 4_194_304), "`-c`: total context, shared by slots."),
    Setting("parallel", PROFILE, integer(1, 256), "`--parallel`: concurrent slots."),
    Setting("batch", PROFILE, integer(32, 65536), "`-b`: logical batch."),
    Setting("micro_batch", PROFILE, integer(32, 65536), "`-ub`: physical batch, ≤ batch."),
    Setting("kv_cache_type_k", PROFILE, choice(*KV_CACHE_TYPES), "`-ctk`: K cache type."),
    Setting("kv_cache_type_v", PROFILE, choice(*KV_CACHE_TYPES), "`-ctv`: V cache type."),
    Setting("flash_attn", PROFILE, choice("on", "off", "auto"), "`-fa`."),
    Setting(
        "gpu_layers",
        PROFILE,
        optional(integer(0, 999)),
        "`-ngl`; `None` passes no GPU flags (CPU).",
    ),
    Setting(
        "device",
        PROFILE,
        optional(pattern(r"[A-Za-z]+[0-9]+(?:,[A-Za-z]+[0-9]+)*", "a device list like CUDA0")),
        "`--device`; `None` for CPU.",
    ),
    Setting("cache_reuse", PROFILE, integer(0, 1_000_000), "`--cache-reuse` (0: off)."),
    Setting("kv_unified", PROFILE, boolean, "`--kv-unified`: one KV pool shared by all slots."),
    Setting(
        "alias",
        PROFILE,
        pattern(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", "1-128 of letters, digits and ._:/-"),
        "`--alias`: model name in the API.",
    ),
    Setting("host", PROFILE, listen_address, "`--host`: listen address."),
    Setting("port", PROFILE, unprivileged_port("llama-server"), "`--port` (1024 to 65535)."),
    Setting(
        "threads",
        PROFILE,
        either(choice("auto"), integer(1, 4096), "'auto' or 1-4096"),
        "`--threads`; `auto` = the host's online CPUs.",
    ),
    Setting("threads_http", PROFILE, integer(-1, 4096), "`--threads-http` (-1: auto)."),
    Setting("metrics", PROFILE, boolean, "`--metrics`: Prometheus endpoint."),
    Setting("slots", PROFILE, boolean, "`--slots` / `--no-slots`: slot monitoring."),
    Setting(
        "chat_template",
        PROFILE,
        pattern(r"[a-z0-9][a-z0-9_.-]{0,63}", "'embedded' or a llama.cpp built-in template name"),
        "`embedded` (model's Jinja template) or a built-in name, e.g. `seed_oss` "
        "(`--no-jinja --chat-template seed_oss`).",
    ),
    Setting("fit", PROFILE, boolean, "`--fit`; off so a profile that does not fit fails."),
    # Sampling: server defaults; a request's own values win.
    Setting(
        "sampling",
        PROFILE,
        choice(*SAMPLING_PRESETS),
        "Sampling preset the six values below default to: `guide` (the tuning guide's) or "
        "`authors` (the model authors': temperature 1.1, top-p 0.95, other samplers off).",
    ),
    Setting("temp", PROFILE, number(0, 5), "`--temp`: sampling temperature (0: greedy)."),
    Setting("top_p", PROFILE, number(0, 1, lo_open=True), "`--top-p` (1.0: off)."),
    Setting("top_k", PROFILE, integer(0, 1000), "`--top-k` (0: off)."),
    Setting("min_p", PROFILE, number(0, 1), "`--min-p` (0.0: off)."),
    Setting("repeat_last_n", PROFILE, integer(0, 65536), "`--repeat-last-n` (0: off)."),
    Setting(
        "repeat_penalty", PROFILE, number(0, 10, lo_open=True), "`--repeat-penalty` (1.0: off)."
    ),
    Setting(
        "thinking_budget",
        PROFILE,
        thinking_budget,
        "Seed-OSS thinking budget, a server-side template default "
        '(`--chat-template-kwargs {"thinking_budget":N}`): -1 unlimited, 0 answer directly, '
        "else a multiple of 512; a request's `chat_template_kwargs` overrides it.",
    ),
    Setting(
        "reasoning_format",
        PROFILE,
        choice("auto", "none", "deepseek", "deepseek-legacy"),
        "`--reasoning-format`: `auto` puts the thinking in `reasoning_content`; `none` "
        "leaves it in `content`.",
    ),
    # Model
    Setting(
        "model_repo",
        "unsloth/Seed-OSS-36B-Instruct-GGUF",
        pattern(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", "owner/name"),
        "Hub repository of the GGUF.",
    ),
    Setting(
        "model_file",
        "Seed-OSS-36B-Instruct-UD-Q5_K_XL.gguf",
        pattern(
            r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.gguf|[A-Za-z0-9_]+",
            "a non-empty GGUF file name (NAME.gguf) or a quantisation tag like Q5_K_XL",
        ),
        "File in the repository, or a quantisation tag that the lock resolves.",
    ),
    Setting(
        "model_revision",
        "main",
        pattern(
            r"(?!.*\.\.)(?!.*\.lock$)(?!.*\.$)[A-Za-z0-9][A-Za-z0-9._-]{0,99}",
            "a branch or tag name by git's rules (no '..', not ending in '.' or '.lock'; "
            "no '/': one directory level) or a 40-digit commit",
        ),
        "Revision to download; pin a commit for reproducible hosts.",
    ),
    Setting("model_sha256", None, optional(sha256_hex), "Expected sha256; checked when set."),
    Setting("model_dir", "/var/lib/llama-models", owned_dir, "Where models are stored."),
    Setting(
        "model_lock",
        None,
        optional(pattern(r"[^\x00-\x1f\x7f]+\.lock\.json", "a path ending in .lock.json")),
        "Controller path of the model lock (relative: to the repository); when set, hosts "
        "serve exactly what it pins.",
    ),
    Setting(
        "gpu_memory_mib",
        40960,
        integer(1024, 1 << 22),
        "GPU memory the plan fits into (A100 40GB: 40960, nvidia-smi memory.total).",
    ),
    Setting(
        "vram_reserve_mib",
        1024,
        integer(0, 1 << 20),
        "Held back for the CUDA context, cuBLAS workspace and fragmentation.",
    ),
    Setting("hf_endpoint", None, optional(http_url), "`HF_ENDPOINT`: a Hub mirror."),
    Setting(
        "hf_token",
        None,
        optional(pattern(r"[A-Za-z0-9._~+/=-]{8,256}", "8-256 of letters, digits and ._~+/=-")),
        "Hub token for gated or private repositories; read it from the environment.",
    ),
    Setting(
        "model_source",
        "hub",
        choice("hub", "controller"),
        "`hub`: each host downloads (Hub or mirror); `controller`: the controller downloads "
        "once and pushes it (hosts without internet).",
    ),
    Setting(
        "model_disk_margin_mib",
        2048,
        integer(0, 1 << 22),
        "Free space kept spare on the model filesystem after a download.",
    ),
    Setting(
        "model_download_overlap",
        True,
        boolean,
        "Download in the background while the driver and llama.cpp build (the service start "
        "waits for it); false: download after the build.",
    ),
    Setting("hf_venv", "/opt/llamahost/hf-venv", owned_dir, "Venv with huggingface_hub."),
    Setting(
        "hf_hub_version",
        PINNED_HF_HUB_VERSION,
        pattern(r"[0-9]+(?:\.[0-9]+){1,3}", "a version like 2.4.0"),
        "huggingface_hub version on the host.",
    ),
    # llama.cpp
    Setting(
        "cpp_commit",
        PINNED_LLAMA_CPP_COMMIT,
        pattern(r"[0-9a-f]{40}", "a 40-digit commit"),
        "llama.cpp commit to build.",
    ),
    Setting(
        "cpp_source",
        "upstream",
        choice("upstream", "archive"),
        "`upstream`: download the commit's archive on the host; `archive`: upload one.",
    ),
    Setting(
        "cpp_source_url",
        "https://github.com/ggml-org/llama.cpp/archive/{commit}.tar.gz",
        http_url,
        "Where `upstream` downloads from; `{commit}` is replaced.",
    ),
    Setting(
        "cpp_archive",
        None,
        optional(pattern(r"[^\x00-\x1f\x7f]+", "a path")),
        "Controller path of a .tar.gz of the commit's tree (`archive`).",
    ),
    Setting("cpp_archive_sha256", None, optional(sha256_hex), "Expected sha256 of the archive."),
    Setting("cpp_cmake_args", (), cmake_args, "Extra CMake `-D` arguments."),
    Setting("cpp_prefix", "/opt/llama.cpp", owned_dir, "Source, builds and `current` link."),
    Setting(
        "cpp_build_jobs",
        "auto",
        either(choice("auto"), integer(1, 1024), "'auto' or 1-1024"),
        "Parallel build jobs; `auto` = online CPUs.",
    ),
    Setting(
        "cpp_build_cache",
        None,
        optional(pattern(r"[^\x00-\x1f\x7f]+", "a path")),
        "Controller directory of built trees (relative: to the repository); unset: "
        "`.cache/builds`.",
    ),
    Setting(
        "cpp_prune_builds",
        True,
        boolean,
        "Delete a host's build directories other than `current` and `previous`.",
    ),
    # Service
    Setting(
        "service_user",
        "llama",
        pattern(r"(?!root$)[a-z_][a-z0-9_-]{0,31}", "a system user name other than root"),
        "System user (no shell) the server runs as.",
    ),
    Setting(
        "api_key",
        None,
        optional(api_key),
        "API key; generated on the host when unset. Read it from the environment.",
    ),
    Setting(
        "api_key_file",
        "/etc/llama-server/api-key",
        owned_file,
        "Key file on the host, in a directory of its own (0750 root:<service user>).",
    ),
    Setting(
        "server_extra_args",
        (),
        server_extra_args,
        "Further llama-server arguments, one token per item (e.g. `--rope-scaling`, "
        "`yarn`); flags the toolkit sets, secrets and `--sleep-idle-seconds` are refused.",
    ),
    Setting(
        "instances",
        "per-gpu",
        either(choice("per-gpu"), integer(1, 16), "'per-gpu' or 1-16"),
        "llama-servers on the host: `per-gpu`, one per GPU (one on a CPU or one-GPU host), "
        "or a number; several are `llama-server@N` on ports `llama_port + N` "
        "(see docs/instances.md).",
    ),
    Setting(
        "start_timeout",
        1800,
        integer(30, 86400),
        "Seconds for the start to reach `/health` 200 (model load).",
    ),
)

BY_KEY = {s.key: s for s in SETTINGS}
PROFILE_KEYS = tuple(s.key for s in SETTINGS if s.default is PROFILE)


@dataclass(frozen=True)
class Profile:
    name: str
    context: int
    parallel: int
    batch: int
    micro_batch: int
    kv_cache_type_k: str
    kv_cache_type_v: str
    flash_attn: str
    gpu_layers: int | None
    device: str | None
    cache_reuse: int
    kv_unified: bool
    alias: str
    host: str
    port: int
    threads: int | str
    threads_http: int
    metrics: bool
    slots: bool
    chat_template: str
    fit: bool
    sampling: str
    temp: float
    top_p: float
    top_k: int
    min_p: float
    repeat_last_n: int
    repeat_penalty: float
    thinking_budget: int
    reasoning_format: str

    @property
    def uses_gpu(self) -> bool:
        return self.gpu_layers is not None


@dataclass(frozen=True)
class HostConfig:
    host_name: str
    profile: Profile
    model_repo: str
    model_file: str
    model_revision: str
    model_sha256: str | None
    model_dir: str
    model_lock: str | None
    gpu_memory_mib: int
    vram_reserve_mib: int
    hf_endpoint: str | None
    hf_token: str | None
    model_source: str
    model_disk_margin_mib: int
    model_download_overlap: bool
    hf_venv: str
    hf_hub_version: str
    cpp_commit: str
    cpp_source: str
    cpp_source_url: str
    cpp_archive: str | None
    cpp_archive_sha256: str | None
    cpp_cmake_args: tuple[str, ...]
    cpp_prefix: str
    cpp_build_jobs: int | str
    cpp_build_cache: str | None
    cpp_prune_builds: bool
    service_user: str
    api_key: str | None
    api_key_file: str
    server_extra_args: tuple[str, ...]
    instances: int | str
    start_timeout: int

    @property
    def model_path(self) -> str:
        """Where the served file lives: one directory per repository and revision."""
        owner, name = self.model_repo.split("/")
        return f"{self.model_dir}/{owner}--{name}/{self.model_revision}/{self.model_file}"


def cross_checks(p: dict[str, Any], c: dict[str, Any]) -> list[FieldError]:
    errs = []
    if p["micro_batch"] > p["batch"]:
        errs.append(
            FieldError(
                PREFIX + "micro_batch",
                p["micro_batch"],
                f"must be at most llama_batch ({p['batch']})",
            )
        )
    per_slot = p["context"] // p["parallel"]
    if per_slot < MIN_SLOT_CONTEXT:
        errs.append(
            FieldError(
                PREFIX + "parallel",
                p["parallel"],
                f"gives each conversation {per_slot} tokens (llama_context {p['context']} over "
                f"{p['parallel']} slots); at least {MIN_SLOT_CONTEXT} are needed: fewer slots "
                "or a larger context",
            )
        )
    if p["kv_cache_type_v"] not in ("f32", "f16", "bf16") and p["flash_attn"] == "off":
        errs.append(
            FieldError(
                PREFIX + "kv_cache_type_v",
                p["kv_cache_type_v"],
                "a quantized V cache needs llama_flash_attn 'on' or 'auto'",
            )
        )
    if (p["gpu_layers"] is None) != (p["device"] is None):
        errs.append(
            FieldError(
                PREFIX + "device",
                p["device"],
                "set llama_gpu_layers and llama_device together, or neither",
            )
        )
    if p["thinking_budget"] != -1 and p["chat_template"] != "embedded":
        errs.append(
            FieldError(
                PREFIX + "thinking_budget",
                p["thinking_budget"],
                "a thinking budget is a variable of the model's own (Jinja) template: set "
                f"-1 with llama_chat_template {p['chat_template']!r}, or use 'embedded'",
            )
        )
    n = c["instances"]
    if isinstance(n, int) and n > 1 and p["device"] is not None and "," in p["device"]:
        errs.append(
            FieldError(
                PREFIX + "instances",
                n,
                f"llama_device {p['device']!r} spreads one server over several GPUs; several "
                "instances each take one GPU: set llama_instances 1 (or per-gpu) with a "
                "device list, or a single llama_device with several instances",
            )
        )
    if isinstance(n, int) and p["port"] + n - 1 > 65535:
        errs.append(
            FieldError(
                PREFIX + "instances",
                n,
                f"instances take ports llama_port to llama_port + {n - 1}, past 65535 with "
                f"llama_port {p['port']}: a lower llama_port or fewer instances",
            )
        )
    key = c["api_key_file"]
    for field in ("model_dir", "cpp_prefix", "hf_venv"):
        if key.startswith(c[field].rstrip("/") + "/"):
            errs.append(
                FieldError(
                    PREFIX + "api_key_file",
                    key,
                    f"must not be inside llama_{field} ({c[field]}): the key gets a "
                    "directory of its own",
                )
            )
    if c["cpp_source"] == "archive" and not c["cpp_archive"]:
        errs.append(
            FieldError(
                PREFIX + "cpp_archive",
                c["cpp_archive"],
                "must name a .tar.gz on the controller when llama_cpp_source is 'archive'",
            )
        )
    return errs


def core_values(
    data: Mapping[str, Any], errors: list[FieldError]
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """The profile name, the profile's fields and the other core values, each from data or
    its default (profile fields default to the chosen profile's); failures go to errors."""

    def get(setting: Setting, default: Any) -> Any:
        value = data.get(PREFIX + setting.key, default)
        try:
            return setting.check(value)
        except Invalid as e:
            errors.append(FieldError(PREFIX + setting.key, value, str(e)))
            return None

    profile_name = get(BY_KEY["profile"], DEFAULT_PROFILE)
    base = PROFILES.get(profile_name or "")
    preset = data.get(PREFIX + "sampling")
    if base is not None and isinstance(preset, str) and preset in SAMPLING_PRESETS:
        base = {**base, **SAMPLING_PRESETS[preset]}  # a bad preset is reported below
    if base is None:  # unknown profile, already reported: check only what is set
        prof = {k: get(BY_KEY[k], None) for k in PROFILE_KEYS if PREFIX + k in data}
    else:
        prof = {k: get(BY_KEY[k], base[k]) for k in PROFILE_KEYS}
    other = {
        s.key: get(s, s.default)
        for s in SETTINGS
        if s.default is not PROFILE and s.key != "profile"
    }
    return profile_name, prof, other


assert {f.name for f in fields(Profile)} == {"name", *PROFILE_KEYS}
