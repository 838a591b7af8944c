"""The API from the controller: healthy, answering with the key, refusing without it, in
the Seed-OSS chat format; and the key file it reads, private."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.compliance.live import Server

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# Seed-OSS's turn format with the generation prompt (docs/facts.md; tests/e2e/test_bringup.py).
SEED_OSS_PROMPT = "<seed:bos>user\nhi<seed:eos><seed:bos>assistant\n"


def test_health_answers_200(server: Server) -> None:
    """/health answers 200 (on every llama-server of the host).

    No key needed. README: a start counts as done only when /health answers 200; 503
    means the model is (still) loading.
    """
    for s in server.each():
        r = s.get("/health", key=False)
        assert r.status == 200, f"{s.name}: /health answered {r.status}: {r.body[:200]}"
        assert r.json().get("status") == "ok", r.body[:200]


def test_chat_completion_with_the_key_answers_200(server: Server) -> None:
    """A chat completion with the key answers 200 (on every llama-server of the host).

    The key is read from the host's key file over SSH, as the server reads it.
    """
    for s in server.each():
        r = s.post("/v1/chat/completions", CHAT)
        assert r.status == 200, f"{s.name}: /v1/chat/completions answered {r.status}"
        assert r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("GET", "/metrics"), ("GET", "/slots")],
    ids=["completions", "metrics", "slots"],
)
def test_refuses_requests_without_the_key(server: Server, method: str, path: str) -> None:
    """401 without the key.

    On completions, /metrics and /slots: the guide's profiles listen on 0.0.0.0, so the
    toolkit always passes --api-key-file.
    """
    r = server.request(method, path, key=False, body=CHAT if method == "POST" else None)
    assert r.status == 401, f"{method} {path} without a key answered {r.status}"


def test_key_file_is_private(server: Server, host: Any) -> None:
    """The key file is mode 0640, owner root, group the service user.

    README, Production step 3. When the inventory supplies llama_api_key, the file holds
    that key (compared by digest; the key is never printed).
    """
    cfg = server.cfg
    f = host.file(cfg.api_key_file)
    assert f.is_file, f"{cfg.api_key_file} is missing"
    assert (oct(f.mode), f.user, f.group) == (oct(0o640), "root", cfg.service_user), (
        f"{cfg.api_key_file} is {oct(f.mode)} {f.user}:{f.group}, "
        f"expected 0o640 root:{cfg.service_user}"
    )
    if cfg.api_key is not None:
        supplied = hashlib.sha256(cfg.api_key.encode()).hexdigest()
        assert server.api_key.digest() == supplied, (
            f"{cfg.api_key_file} does not hold the key the inventory supplies (llama_api_key)"
        )


def test_chat_prompt_is_in_seed_oss_format(server: Server) -> None:
    """The chat prompt is in Seed-OSS format (POST /apply-template).

    `<seed:bos>user\\nhi<seed:eos><seed:bos>assistant\\n`: the guide's chat template, which
    the toolkit gets from the model's embedded template (or --chat-template seed_oss).
    """
    r = server.post("/apply-template", {"messages": CHAT["messages"]})
    assert r.status == 200, f"/apply-template answered {r.status}: {r.body[:200]}"
    prompt = r.json()["prompt"]
    assert prompt == SEED_OSS_PROMPT, f"prompt {prompt!r}, Seed-OSS format is {SEED_OSS_PROMPT!r}"
