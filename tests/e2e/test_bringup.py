"""The real bring-up on a fresh Debian 12 systemd host: `pyinfra -y inventory/local.py deploy.py`.

Tests run in file order and share one host: bad input first (on the fresh host), then the
first deploy, the rerun, a profile switch, a template switch and a failing build.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Run, Site

pytestmark = pytest.mark.e2e

RESTART_OP = "Restart llama-server.service (its configuration changed)"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SEED_OSS_PROMPT = "<seed:bos>user\nhi<seed:eos><seed:bos>assistant\n"

BAD_INPUT = [
    ("llama_profile=turbo", "llama_profile = 'turbo': must be one of: low-latency"),
    ("llama_micro_batch=8192", "llama_micro_batch = 8192: must be at most llama_batch (2048)"),
    ("llama_context=0", "llama_context = 0: must be an integer from 256"),
    ("llama_port=70000", "llama_port = 70000: must be an integer from 1024 to 65535"),
    # A privileged port: the unprivileged, capability-less server could not bind it.
    ("llama_port=80", "llama_port = 80: must be from 1024 to 65535: llama-server runs as an"),
    ("llama_model_file=", "llama_model_file = '': must be a non-empty GGUF file name"),
    (
        "llama_alias=x\nExecStartPre=/bin/touch /pwned",
        "llama_alias = 'x\\nExecStartPre=/bin/touch /pwned': must be 1-128 of letters",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUT, ids=[b[0][:24] for b in BAD_INPUT])
def test_bad_input_stops_the_run_before_any_change(site: Site, override: str, message: str) -> None:
    before = site.fingerprint()
    run = site.deploy("--data", override)
    assert run.rc != 0
    assert f"host '{site.host.name}': invalid inventory data (nothing was changed)" in run.stderr
    assert message in run.stderr
    assert "Starting operation" not in run.stderr
    assert site.fingerprint() == before


def test_first_run_brings_up_a_serving_llama_server(site: Site, deployed: Run) -> None:
    assert deployed.failed_operations() == []
    assert any(
        op.startswith("Build llama-server (0c1e57098bba") for op in deployed.changed_operations()
    )
    assert site.service("ActiveState", "UnitFileState", "User") == {
        "ActiveState": "active",
        "UnitFileState": "enabled",
        "User": "llama",
    }
    assert site.get("/health").status_code == 200


def test_chat_needs_the_key(site: Site, deployed: Run) -> None:
    key = site.key()
    ok = site.post("/v1/chat/completions", CHAT, key=key)
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert site.post("/v1/chat/completions", CHAT).status_code == 401
    assert site.post("/v1/chat/completions", CHAT, key=key + "x").status_code == 401


def test_chat_prompt_is_in_seed_oss_format(site: Site, deployed: Run) -> None:
    r = site.post("/apply-template", {"messages": CHAT["messages"]}, key=site.key())
    assert r.status_code == 200
    assert r.json()["prompt"] == SEED_OSS_PROMPT


def test_server_runs_unprivileged_with_a_private_key(site: Site, deployed: Run) -> None:
    pid = site.service("MainPID")["MainPID"]
    assert site.sh(f"ps -o user= -p {pid}").strip() == "llama"
    assert site.sh("getent passwd llama | cut -d: -f7").strip() == "/usr/sbin/nologin"
    assert site.sh("stat -c '%a %U %G' /etc/llama-server/api-key").strip() == "640 root llama"
    key = site.key()
    assert len(key) == 48
    # The key is never on a command line, in the unit, in the journal or in the run's output.
    # (Checked outside the assert, so that a failure never prints the key itself.)
    places = {
        "the run's output": deployed.output,
        "the unit": site.sh("cat /etc/systemd/system/llama-server.service"),
        "the process list": site.sh("ps -eo args"),
        "the journal": site.sh("journalctl --no-pager -o cat", check=False),
    }
    leaks = [where for where, text in places.items() if key in text]
    assert leaks == []


def test_second_run_changes_nothing_and_restarts_nothing(site: Site, deployed: Run) -> None:
    before = site.service("ActiveEnterTimestampMonotonic", "MainPID")
    run = site.deploy()
    assert run.rc == 0, run.output[-4000:]
    assert run.changed_operations() == []
    assert site.service("ActiveEnterTimestampMonotonic", "MainPID") == before
    site.timings["second_run_s"] = round(run.seconds, 1)


def _starts_since(site: Site, since: str) -> int:
    log = site.sh(f"journalctl --no-pager -o cat -u llama-server.service --since @{since}")
    return sum(1 for line in log.splitlines() if line.startswith("Started "))


def test_profile_switch_rewrites_the_unit_and_restarts_once(site: Site, deployed: Run) -> None:
    assert len(site.get("/slots", key=site.key()).json()) == 2
    since = site.sh("date +%s").strip()
    run = site.deploy("--data", "llama_parallel=4")
    assert run.rc == 0, run.output[-4000:]
    changed = run.changed_operations()
    assert "Render llama-server.service (profile cpu-demo)" in changed
    assert RESTART_OP in changed
    assert _starts_since(site, since) == 1
    slots = site.get("/slots", key=site.key()).json()
    assert len(slots) == 4
    assert {s["n_ctx"] for s in slots} == {1024}  # -c 4096 split over 4 slots
    again = site.deploy("--data", "llama_parallel=4")
    assert again.changed_operations() == []


def test_builtin_template_renders_the_same_format(site: Site, deployed: Run) -> None:
    run = site.deploy("--data", "llama_chat_template=seed_oss")
    assert run.rc == 0, run.output[-4000:]
    assert "--no-jinja --chat-template seed_oss" in site.sh(
        "grep ^ExecStart= /etc/systemd/system/llama-server.service"
    )
    r = site.post("/apply-template", {"messages": CHAT["messages"]}, key=site.key())
    assert r.json()["prompt"] == SEED_OSS_PROMPT
    # The built-in template has no tool format: the server refuses tools rather than guess
    # (docs/serving.md, "Tools").
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    r = site.post("/v1/chat/completions", {**CHAT, "tools": [tool]}, key=site.key())
    assert r.status_code >= 400 and "requires --jinja" in r.text, (r.status_code, r.text[:300])


def test_failed_build_keeps_the_served_binary(site: Site, deployed: Run) -> None:
    current = site.sh("readlink /opt/llama.cpp/current").strip()
    before = site.service("ActiveEnterTimestampMonotonic", "MainPID")
    run = site.deploy("--data", 'llama_cpp_cmake_args=["-DCMAKE_CXX_COMPILER=/nonexistent/c++"]')
    assert run.rc != 0
    assert run.stopped_at().startswith("Build llama-server")
    assert "/nonexistent/c++" in run.stderr  # the configure error is shown
    assert site.sh("readlink /opt/llama.cpp/current").strip() == current
    assert site.service("ActiveEnterTimestampMonotonic", "MainPID") == before
    assert site.get("/health").status_code == 200
    # Back to the inventory's own settings: nothing to do but what the last test changed.
    restore = site.deploy()
    assert restore.rc == 0, restore.output[-4000:]
