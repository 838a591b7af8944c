"""Sampling defaults, the thinking budget and extra server arguments: rendered as flags for
every profile, bad values refused with the field named."""

from __future__ import annotations

from typing import Any

import pytest

from llamahost.checks import ConfigError
from llamahost.profiles import PROFILES, SAMPLING_PRESETS
from llamahost.render import server_args, systemd_quote
from llamahost.spec import resolve_host


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_renders_its_sampling_and_thinking_budget(profile: str) -> None:
    cfg = resolve_host("h", {"llama_profile": profile}).cfg
    argv = server_args(cfg, 4)
    guide = SAMPLING_PRESETS["guide"]
    assert float(flag(argv, "--temp") or "nan") == guide["temp"]
    assert float(flag(argv, "--top-p") or "nan") == guide["top_p"]
    assert flag(argv, "--top-k") == str(guide["top_k"])
    assert float(flag(argv, "--min-p") or "nan") == guide["min_p"]
    assert flag(argv, "--repeat-last-n") == str(guide["repeat_last_n"])
    assert float(flag(argv, "--repeat-penalty") or "nan") == guide["repeat_penalty"]
    assert flag(argv, "--reasoning-format") == "auto"
    budget = PROFILES[profile]["thinking_budget"]
    kwargs = flag(argv, "--chat-template-kwargs")
    assert kwargs == (None if budget == -1 else f'{{"thinking_budget":{budget}}}')


def test_the_authors_preset_and_a_host_override() -> None:
    argv = server_args(resolve_host("h", {"llama_sampling": "authors"}).cfg, 4)
    assert (flag(argv, "--temp"), flag(argv, "--top-p"), flag(argv, "--top-k")) == (
        "1.1",
        "0.95",
        "0",
    )
    data = {"llama_sampling": "authors", "llama_temp": 0.7, "llama_thinking_budget": 0}
    argv = server_args(resolve_host("h", data).cfg, 4)
    assert flag(argv, "--temp") == "0.7" and flag(argv, "--top-p") == "0.95"
    assert flag(argv, "--chat-template-kwargs") == '{"thinking_budget":0}'


def test_extra_arguments_come_last_one_token_each_and_quoted_in_the_unit() -> None:
    extra = ["--rope-scaling", "yarn", "--rope-scale", "4", "--numa", "distribute"]
    argv = server_args(resolve_host("h", {"llama_server_extra_args": extra}).cfg, 4)
    assert argv[-len(extra) :] == extra
    spaced = resolve_host("h", {"llama_server_extra_args": ["--override-kv", "a=str:x y"]})
    assert systemd_quote(server_args(spaced.cfg, 4)[-1]) == '"a=str:x y"'


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("temp", -1, "must be a number in [0, 5]"),
        ("top_p", 1.5, "must be a number in (0, 1]"),
        ("top_p", 0, "must be a number in (0, 1]"),
        ("top_k", -3, "must be an integer from 0 to 1000"),
        ("repeat_penalty", 0, "must be a number in (0, 10]"),
        ("min_p", float("nan"), "must be a number in [0, 1]"),
        ("temp", True, "must be a number"),
        ("thinking_budget", 100, "a multiple of 512"),
        ("thinking_budget", -2, "a multiple of 512"),
        ("sampling", "creative", "must be one of: guide, authors"),
        ("server_extra_args", ["--numa", "distribute\n--port 1"], "without control characters"),
        ("server_extra_args", ["--port", "9000"], "--port is set by the toolkit"),
        ("server_extra_args", ["--ctx-size=8192"], "--ctx-size is set by the toolkit"),
        ("server_extra_args", ["--api-key", "k" * 20], "puts a secret on the command line"),
        ("server_extra_args", ["--sleep-idle-seconds", "60"], "its /health answers 200"),
        ("server_extra_args", "--numa distribute", "must be a list of strings"),
    ],
)
def test_bad_values_are_refused_naming_the_field(key: str, value: Any, allowed: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_host("gpu-7", {f"llama_{key}": value})
    message = str(exc.value)
    assert "host 'gpu-7'" in message
    (line,) = [ln for ln in message.splitlines() if ln.strip().startswith(f"llama_{key} = ")]
    assert allowed in line


def test_a_thinking_budget_needs_the_models_own_template() -> None:
    with pytest.raises(ConfigError, match="llama_thinking_budget = 2048: a thinking budget"):
        resolve_host("h", {"llama_chat_template": "seed_oss"})
    cfg = resolve_host("h", {"llama_chat_template": "seed_oss", "llama_thinking_budget": -1}).cfg
    assert "--chat-template-kwargs" not in server_args(cfg, 4)
