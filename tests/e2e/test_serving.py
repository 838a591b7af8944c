"""Serving Seed-OSS on the test host: sampling defaults, the thinking budget and tools.

The host serves the tiny model carrying Seed-OSS's own chat template (the repository
TOOLS_REPO of the local Hub). What the tiny random weights cannot show (a meaningful tool
call, a thinking that keeps to its budget) is left to the real model; what does not depend
on the weights is proved here: the rendered prompt carries the tool block and the budget,
the server takes `tools` and streams to a clean end through the `openai` SDK, /props
reports the configured sampling, and sampling changes restart the server once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import TOOLS_REPO, Run, Site

pytestmark = pytest.mark.e2e

SERVING = ["--data", f"llama_model_repo={TOOLS_REPO}", "--data", "llama_thinking_budget=1024"]
SERVING += ["--data", "llama_temp=0.7", "--data", "llama_top_k=25"]
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city."}},
            "required": ["city"],
        },
    },
}
HELLO: Any = [{"role": "user", "content": "What is the weather in Hanoi?"}]


@pytest.fixture(scope="module")
def serving(site: Site, deployed: Run) -> Iterator[Run]:
    run = site.deploy(*SERVING)
    assert run.rc == 0, run.output[-4000:]
    try:
        yield run
    finally:
        # The other modules' host: the plain demo configuration again.
        restored = site.deploy()
        assert restored.rc == 0, restored.output[-4000:]


def _prompt(site: Site, body: dict[str, Any]) -> str:
    r = site.post("/apply-template", body, key=site.key())
    assert r.status_code == 200, r.text[:500]
    prompt: str = r.json()["prompt"]
    return prompt


def test_props_report_the_configured_sampling(site: Site, serving: Run) -> None:
    params = site.get("/props", key=site.key()).json()["default_generation_settings"]["params"]
    assert abs(params["temperature"] - 0.7) < 1e-6
    assert params["top_k"] == 25
    assert abs(params["top_p"] - 0.95) < 1e-6 and abs(params["repeat_penalty"] - 1.05) < 1e-6


def test_the_prompt_carries_the_tool_block_and_the_thinking_budget(
    site: Site, serving: Run
) -> None:
    prompt = _prompt(site, {"messages": HELLO, "tools": [WEATHER]})
    assert "<seed:bos>system" in prompt
    assert "get_weather" in prompt and "<seed:tool_call>" in prompt  # the tool block
    assert "the thinking budget, which is 1024" in prompt  # the server's default
    assert prompt.rstrip().endswith("<seed:bos>assistant")
    # A request's own budget wins over the server's default.
    direct = _prompt(site, {"messages": HELLO, "chat_template_kwargs": {"thinking_budget": 0}})
    assert "thinking budget, which is" not in direct and "<seed:bos>system" in direct
    # Without tools, no tool block.
    assert "<seed:tool_call>" not in _prompt(site, {"messages": HELLO})


def test_tools_stream_to_a_clean_end_through_the_openai_sdk(site: Site, serving: Run) -> None:
    client = openai.OpenAI(base_url=site.url("/v1"), api_key=site.key(), timeout=120)
    stream = client.chat.completions.create(
        model="seed-oss-tiny",
        messages=HELLO,
        tools=[WEATHER],
        tool_choice="auto",
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=16,
        temperature=0.0,
    )
    finish, usage, chunks = None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert chunks > 1 and finish in ("length", "stop", "tool_calls")
    assert usage is not None and usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=site.url("/v1"), api_key="wrong-key-123456").models.list()


def test_a_rerun_changes_nothing_and_a_sampling_change_restarts_once(
    site: Site, serving: Run
) -> None:
    before = site.fingerprint()
    again = site.deploy(*SERVING)
    assert again.rc == 0, again.output[-4000:]
    assert again.changed_operations() == [] and site.fingerprint() == before
    since = site.sh("date +%s").strip()
    changed = site.deploy(*SERVING[:-2], "--data", "llama_top_k=30")
    assert changed.rc == 0, changed.output[-4000:]
    restarts = [n for n in changed.changed_operations() if n.startswith("Restart llama-server")]
    assert restarts == ["Restart llama-server.service (its configuration changed)"]
    log = site.sh(f"journalctl --no-pager -o cat -u llama-server.service --since @{since}")
    assert sum(1 for line in log.splitlines() if line.startswith("Started ")) == 1
    assert "--top-k 30" in site.sh("grep ^ExecStart= /etc/systemd/system/llama-server.service")
    assert (
        site.get("/props", key=site.key()).json()["default_generation_settings"]["params"]["top_k"]
        == 30
    )
