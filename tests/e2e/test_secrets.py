"""Secrets never printed (issue 15): the API key (on the served host and on the monitoring
host) and the Hub token, through the deploy in every mode an operator reviews or debugs it.

One host (the session's) and four runs, each with a supplied key, a Hub token for a gated
repository and monitoring on:

1. ``-y --diff``: on a fresh host, the bring-up itself (after other modules: a model change);
2. ``--dry --diff`` without ``-y`` (how a change is reviewed), with a new key and a model not
   yet downloaded, so that every secret is planned: nothing may change;
3. ``-y -vvv --debug`` with that key, logged in as a user with sudo (``--sudo``): the key is
   rewritten, the token placed, the model downloaded, llama-server restarted once;
4. ``-y --diff -vvv`` again: nothing changes, nothing restarts.

Then no secret is in any run's output, the journal, the unit, ``ps -eo args`` or any file on
the host except the key files themselves (whose modes and owners are checked). Checked
outside the asserts, so that a failure names where a secret was found, never the secret.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from llamahost.layout import KEYS_DIR
from llamahost.monitoring.scrape import key_file
from tests.e2e.conftest import MODEL_FILE, MODEL_REPO, REPO, Run, Site, free_port

pytestmark = pytest.mark.e2e

OWNER = "vault"  # the gated repository's owner: the local Hub wants the token for it
REPO_GATED = f"{OWNER}/tiny-seed-oss-GGUF"
FILE_B = "tiny-seed-oss-b.gguf"  # same bytes, another path: a second download
SUDOER = "deployer"  # the login of run 3, root through sudo
KEY_FILE = "/etc/llama-server/api-key"
RESTART_OP = "Restart llama-server.service (its configuration changed)"


def _tail(run: Run, *hidden: str) -> str:
    """The end of a failed run's output for the assert message, secrets masked."""
    text = "\n".join(run.output.splitlines()[-60:])
    for value in hidden:
        text = text.replace(value, "<secret>")
    return text


@dataclass
class Secrets:
    site: Site
    env: dict[str, str]
    key1: str
    key2: str
    token: str
    runs: dict[str, Run]


def _pyinfra(site: Site, env: dict[str, str], *args: str) -> Run:
    """pyinfra as an operator runs it (Site.deploy always adds -y and --json)."""
    argv = [sys.executable, "-m", "pyinfra", "inventory/local.py", "deploy.py", *args]
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def _digest(site: Site, path: str) -> str:
    return site.sh(f"sha256sum <{path} 2>/dev/null || true").split(" ")[0]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _add_sudoer(site: Site) -> None:
    """A login with passwordless sudo and the key the inventory logs in with (root's, or
    the site's sudo user's): pyinfra's `--sudo` path."""
    keys = "/root/.ssh/authorized_keys"
    if site.ssh_user != "root":
        keys += f" /home/{site.ssh_user}/.ssh/authorized_keys"
    site.sh(
        f"id {SUDOER} >/dev/null 2>&1 || useradd -m -s /bin/bash {SUDOER};"
        f" install -d -m 0700 -o {SUDOER} -g {SUDOER} /home/{SUDOER}/.ssh;"
        f" cat {keys} >/home/{SUDOER}/.ssh/authorized_keys;"
        f" chown {SUDOER}:{SUDOER} /home/{SUDOER}/.ssh/authorized_keys;"
        f" chmod 0600 /home/{SUDOER}/.ssh/authorized_keys;"
        f" echo '{SUDOER} ALL=(ALL) NOPASSWD:ALL' >/etc/sudoers.d/{SUDOER};"
        f" chmod 0440 /etc/sudoers.d/{SUDOER}"
    )


@pytest.fixture(scope="module")
def runs(site: Site) -> Secrets:
    hub_root = site.hub.hub.root
    tiny = (hub_root / MODEL_REPO / MODEL_FILE).read_bytes()
    (hub_root / REPO_GATED).mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, FILE_B):
        (hub_root / REPO_GATED / name).write_bytes(tiny)
    s = Secrets(
        site=site,
        env={},
        key1="k1" + secrets.token_hex(20),
        key2="k2" + secrets.token_hex(20),
        token="hf_" + secrets.token_hex(16),
        runs={},
    )
    site.hub.hub.tokens[OWNER] = s.token
    hidden = (s.key1, s.key2, s.token)
    s.env = {
        **site.env(),
        "LLAMAHOST_LOCAL_HF_TOKEN": s.token,
        "LLAMAHOST_LOCAL_MONITORING": "1",
        "LLAMAHOST_LOCAL_PROMETHEUS_PORT": str(free_port()),
        "LLAMAHOST_LOCAL_NODE_EXPORTER_PORT": str(free_port()),
    }
    model_a = ("--data", f"llama_model_repo={REPO_GATED}")
    model_b = (*model_a, "--data", f"llama_model_file={FILE_B}")
    t0 = time.monotonic()

    first = _pyinfra(site, s.env, "-y", "--json", "--diff", *model_a, "--data",
                     f"llama_api_key={s.key1}")  # fmt: skip
    s.runs["-y --diff (first)"] = first
    assert first.rc == 0, _tail(first, *hidden)
    assert _digest(site, KEY_FILE) == _sha256(s.key1 + "\n")

    before = site.fingerprint()
    dry = _pyinfra(site, s.env, "--dry", "--diff", *model_b, "--data", f"llama_api_key={s.key2}")
    s.runs["--dry --diff"] = dry
    assert dry.rc == 0, _tail(dry, *hidden)
    # Planned, not done: the key, the token and the download are changes in the plan.
    plan = [line for line in dry.stderr.splitlines() if f"1 ({site.host.name})" in line]
    for planned in ("API key (supplied)", "Hub token for this download", f"/{FILE_B}@main"):
        assert any(planned in line for line in plan), (planned, plan)
    assert site.fingerprint() == before

    _add_sudoer(site)
    service = site.service("ActiveEnterTimestampMonotonic", "MainPID")
    changed = _pyinfra(site, s.env, "-y", "--json", "-vvv", "--debug", "--ssh-user", SUDOER,
                       "--sudo", *model_b, "--data", f"llama_api_key={s.key2}")  # fmt: skip
    s.runs["-y -vvv --debug --sudo (a new key)"] = changed
    # (The login cannot write /etc: a run that succeeds wrote every file through sudo.)
    assert changed.rc == 0, _tail(changed, *hidden)
    ops = changed.changed_operations()
    assert "API key (supplied)" in ops
    assert "Hub token for this download" in ops
    assert ops.count(RESTART_OP) == 1, ops
    assert site.service("ActiveEnterTimestampMonotonic", "MainPID") != service
    assert _digest(site, KEY_FILE) == _sha256(s.key2 + "\n")
    assert _digest(site, key_file(site.host.name)) == _sha256(s.key2 + "\n")

    service = site.service("ActiveEnterTimestampMonotonic", "MainPID")
    again = _pyinfra(site, s.env, "-y", "--json", "--diff", "-vvv", *model_b, "--data",
                     f"llama_api_key={s.key2}")  # fmt: skip
    s.runs["-y --diff -vvv (a rerun)"] = again
    assert again.rc == 0, _tail(again, *hidden)
    assert again.changed_operations() == []
    assert site.service("ActiveEnterTimestampMonotonic", "MainPID") == service
    site.hub.hub.tokens.pop(OWNER, None)
    site.timings["secrets_runs_s"] = round(time.monotonic() - t0, 1)
    for i, run in enumerate(s.runs.values(), 1):
        site.timings[f"secrets_run{i}_s"] = round(run.seconds, 1)
    return s


def test_a_new_key_is_written_and_restarts_once_a_rerun_changes_nothing(runs: Secrets) -> None:
    # The asserts are in the fixture (each run depends on the one before); this names them.
    assert list(runs.runs) == [
        "-y --diff (first)",
        "--dry --diff",
        "-y -vvv --debug --sudo (a new key)",
        "-y --diff -vvv (a rerun)",
    ]


def test_no_secret_in_any_output_or_anywhere_on_the_host(runs: Secrets) -> None:
    site = runs.site
    wanted = {"the first key": runs.key1, "the second key": runs.key2, "the Hub token": runs.token}
    places = {f"the output of {name}": run.output for name, run in runs.runs.items()}
    places |= {
        "the journal": site.sh("journalctl --no-pager -o cat", check=False),
        "the unit": site.sh("cat /etc/systemd/system/llama-server.service"),
        "the process list": site.sh("ps -eo args"),
        "the download log": site.sh("cat /var/log/llamahost/model-download.log", check=False),
        "Prometheus's configuration": site.sh("cat /etc/prometheus/prometheus.yml"),
    }
    leaks = [f"{what} in {where}" for where, text in places.items() for what, value in
             wanted.items() if value in text]  # fmt: skip
    assert not leaks, leaks  # names where, never what
    # Anywhere else on the host (temporary files, backups, the journal's own files): the
    # current key only in its two files, the old key and the token nowhere.
    found = {}
    for what, value in wanted.items():
        out = site.sh(
            f"grep -rlsF -e {value} /etc /tmp /var/tmp /run /var/log /var/lib /var/cache /root"
            f" /home /opt --exclude-dir=llama-models || true",
            check=False,
        )
        found[what] = sorted(out.split())
    assert found == {
        "the first key": [],
        "the second key": sorted([KEY_FILE, key_file(site.host.name)]),
        "the Hub token": [],
    }


def test_secret_files_have_tight_modes_and_owners(runs: Secrets) -> None:
    site = runs.site
    stat = site.sh(
        f"stat -c '%n %a %U %G' /etc/llama-server {KEY_FILE} {KEYS_DIR}"
        f" {key_file(site.host.name)} /run/llamahost"
    ).splitlines()
    assert stat == [
        "/etc/llama-server 750 root llama",
        f"{KEY_FILE} 640 root llama",
        f"{KEYS_DIR} 750 root prometheus",
        f"{key_file(site.host.name)} 640 root prometheus",
        "/run/llamahost 700 root root",
    ]
    # Read by the fetch script and deleted: the token is on the host only during a download.
    assert site.sh("ls -A /run/llamahost").strip() == ""
    assert site.get("/health").status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert site.post("/v1/chat/completions", chat, key=runs.key2).status_code == 200
