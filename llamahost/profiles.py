"""Tuning profiles: the guide's three, plus a CPU demo profile. Data only.

Every key is a ``Profile`` field; an inventory overrides one with ``llama_<field>``.
Values are the guide's (section 2; docs/facts.md restates it), with the corrections that the
pinned llama.cpp needs documented in README.md ("Profiles"):

* ``chat_template = "embedded"``: the guide's ``--chat-template seed_oss`` is read as a
  literal Jinja template under the (now default) ``--jinja`` mode and turns every prompt
  into the text "seed_oss". The model's embedded template is used instead.
* ``fit = False``: ``--fit off``, so a profile that does not fit fails loudly instead of
  llama.cpp silently moving layers to the CPU.
* ``threads = "auto"``: the host's real core count, read at deploy time (systemd does not
  run the guide's ``$(nproc)``).
* ``--host`` and ``--port`` are always passed (upstream announced a new default port).
"""

from __future__ import annotations

from typing import Any

# Sampling defaults, as named presets (README, "Profiles"). "guide": the tuning guide's
# section 3 server defaults for the Instruct model, the default: a conservative temperature
# with a mild repetition guard suits a shared API whose clients may not set sampling. Its
# top-k 60 and min-p 0.05 cut the long tail llama.cpp's own defaults (top-k 40, min-p 0.05,
# no repetition penalty) leave slightly different. "authors": the model authors'
# recommendation (temperature 1.1, top-p 0.95) with every other sampler off, for creative
# and open-ended use. A client's own values in a request always win over these.
SAMPLING_PRESETS: dict[str, dict[str, Any]] = {
    "guide": {
        "temp": 0.6,
        "top_p": 0.95,
        "top_k": 60,
        "min_p": 0.05,
        "repeat_last_n": 64,
        "repeat_penalty": 1.05,
    },
    "authors": {
        "temp": 1.1,
        "top_p": 0.95,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_last_n": 64,
        "repeat_penalty": 1.0,
    },
}
DEFAULT_SAMPLING = "guide"

# Shared by the guide's three GPU profiles (its "common to all" line).
_GUIDE_COMMON: dict[str, Any] = {
    "alias": "seed-oss-36b-q5kx",
    "host": "0.0.0.0",  # noqa: S104  (the guide serves the network; use a firewall)
    "port": 8080,
    "flash_attn": "on",
    "gpu_layers": 999,
    "device": "CUDA0",
    "batch": 4096,
    "kv_cache_type_k": "q8_0",
    "kv_cache_type_v": "q8_0",
    "threads": "auto",
    "threads_http": -1,
    "metrics": True,
    "slots": True,
    "cache_reuse": 0,
    "kv_unified": False,
    "chat_template": "embedded",
    "fit": False,
    "sampling": DEFAULT_SAMPLING,
    **SAMPLING_PRESETS[DEFAULT_SAMPLING],
    # llama.cpp's default: the Seed-OSS parser puts <seed:think> text in
    # `reasoning_content` (the OpenAI SDK's shape), the answer in `content`.
    "reasoning_format": "auto",
}

# Context sizes deliver what the guide promises each profile (README, "Profiles"): at the
# pinned llama.cpp `-c` is the total over all slots, so the guide's own values gave every
# conversation 4096 tokens (5461 in long-context). Measured against the memory plan of an
# A100 40GB (`make plan`): each keeps at least 12% of the GPU free.
PROFILES: dict[str, dict[str, Any]] = {
    # A: internal chatbot, short/medium requests, few users; time to first token first.
    # 16k guaranteed to each of 4 conversations: 4 x 16384 cells, split.
    # Thinking budget 0: answer directly; time to first answer token is this profile's
    # promise, and at the A100's ~40 tokens/s decode a 512-token think is ~13 s. A client
    # that wants reasoning sends chat_template_kwargs {"thinking_budget": N}.
    "low-latency": {
        **_GUIDE_COMMON,
        "context": 65536,
        "micro_batch": 1024,
        "parallel": 4,
        "thinking_budget": 0,
    },
    # B: longer context and/or more concurrent slots. The guide's section 2 adds
    # --cache-reuse 1024 here (section 6 omits it); we keep it. One 64k pool shared by 8
    # slots: any conversation can grow past 32k; 8k each when all 8 are full.
    "balanced": {
        **_GUIDE_COMMON,
        "context": 65536,
        "kv_unified": True,
        "micro_batch": 2048,
        "parallel": 8,
        "cache_reuse": 1024,
        # 2048 thinking tokens: bounded (under a minute of decode) yet enough for the
        # multi-step questions a general-purpose endpoint gets.
        "thinking_budget": 2048,
    },
    # C: 32k, stability first, when B runs out of VRAM under many users: the smaller -ub
    # of the guide and 6 slots over one 64k pool: two conversations at 32k at once.
    "long-context": {
        **_GUIDE_COMMON,
        "context": 65536,
        "kv_unified": True,
        "micro_batch": 1024,
        "parallel": 6,
        # Long documents: more room to reason over them, still bounded (the model's
        # trained budgets go in steps of 512; unlimited can run for minutes).
        "thinking_budget": 8192,
    },
    # Not in the guide: the same shape without GPU flags and with a small context, for
    # hosts without a GPU (the demo and the tests, with a tiny model).
    "cpu-demo": {
        **_GUIDE_COMMON,
        "alias": "seed-oss-tiny",
        "gpu_layers": None,
        "device": None,
        "context": 4096,
        "batch": 2048,
        "micro_batch": 512,
        "parallel": 2,
        # Unlimited (the template's own default): the demo and tests see the template
        # exactly as the model ships it.
        "thinking_budget": -1,
    },
}

DEFAULT_PROFILE = "balanced"

# Which profiles need a GPU; the GPU-stack issue uses it to choose the build.
GPU_PROFILES = frozenset(name for name, p in PROFILES.items() if p["gpu_layers"] is not None)
