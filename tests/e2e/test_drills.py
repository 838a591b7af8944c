"""Fault drills on the served session host (issue 15 items 5-7), after the bring-up.

In file order, each leaving the host serving as the inventory says:

1. the cloud-image path: the deploy logs in as the unprivileged `admin` and uses sudo; a
   redeploy with a supplied API key, a Hub token and a new model (so ordinary uploads too)
   runs while another unprivileged user on the host reads every file it can where uploads
   pass: it reads pyinfra's own sudo uploads in /tmp, never a secret;
2. a reboot (pyinfra's server.reboot, the harness starting the host again as a hypervisor
   would): serving again with no manual step, the whole compliance suite green;
3. kill -9 of llama-server: /health 200 again within KILL_BOUND_S;
4. a restart loop: the compliance suite flags it (NRestarts, and the journal window of
   tests/compliance/test_stability.py, which a manual restart does not clear);
5. a model that loads and crashes (valid header, tensor data cut short, its sha256 pinned so
   the download gate passes): the deploy stops at the restart with the journal's reason
   within seconds, the unit gives up within its start limit, and a rerun with the
   inventory's own configuration serves again.

Measured times go to site.timings (reports/e2e-timings.json) and docs/drills.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import gguf
import pytest
import requests

from tests.e2e.conftest import MODEL_FILE, REPO, Run, Site
from tests.e2e.test_compliance import Compliance, check_id, run_compliance
from tests.support import secretwatch
from tests.support.tinygguf import write as write_tiny

pytestmark = pytest.mark.e2e

UNIT = "llama-server.service"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
RESTART_OP = "Restart llama-server.service (its configuration changed)"
# kill -9 to /health 200: RestartSec=10, then the tiny model loads in about a second; the
# rest is slack for a loaded 2-core machine.
KILL_BOUND_S = 30
# A reboot of the container to /health 200 (pyinfra waits 10 s before it reconnects).
REBOOT_BOUND_S = 120
# From the deploy's restart of a model that crashes on load to the deploy's failure: the
# health wait gives up as soon as the main process is gone (it was the whole start
# timeout, 1800 s, before).
CRASH_DETECT_BOUND_S = 30
CRASH_REPO = "llamahost/tiny-crash-GGUF"
# A model no earlier test downloaded: the drill's deploy downloads it, with the token.
SUDO_REPO = "llamahost/tiny-sudo-drill-GGUF"
WATCH = "/srv/secretwatch"
# Where an upload could pass, as another user sees it.
WATCHED = ["/tmp", "/var/tmp", "/dev/shm", "/run", "/home/admin", "/etc/llama-server"]
WATCHED += ["/run/llamahost", "/root"]


# ------------------------------------------------------------------ helpers
def healthy_within(site: Site, bound: float, since: float, old_pid: str | None = None) -> float:
    """Seconds from ``since`` (time.monotonic()) until /health answers 200 (from a new main
    process when ``old_pid`` is given); fails past ``bound``."""
    while True:
        try:
            ok = requests.get(site.url("/health"), timeout=2).status_code == 200
        except requests.RequestException:
            ok = False
        if ok and old_pid is not None:
            ok = site.service("MainPID")["MainPID"] not in (old_pid, "0")
        elapsed = time.monotonic() - since
        if ok:
            return round(elapsed, 1)
        assert elapsed < bound, f"/health not 200 within {bound} s"
        time.sleep(0.2)


def chat_ok(site: Site) -> None:
    r = site.post("/v1/chat/completions", CHAT, key=site.key())
    assert r.status_code == 200, r.text[:300]


def compliance_of(site: Site, tmp_path: Path, *modules: str) -> Compliance:
    """Only the named check modules of tests/compliance, as run_compliance runs them all."""
    junit = tmp_path / f"drill-{len(list(tmp_path.glob('*.xml')))}.xml"
    argv = [sys.executable, "-m", "pytest", *(f"tests/compliance/{m}" for m in modules)]
    argv += ["--inventory", "inventory/local.py", "-p", "no:cacheprovider", "-rA"]
    argv += ["--junitxml", str(junit)]
    p = subprocess.run(argv, cwd=REPO, env=site.env(), capture_output=True, text=True, timeout=600)
    result = Compliance(p.returncode, p.stdout + p.stderr)
    assert junit.exists(), result.output[-4000:]
    for tc in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314
        cid = check_id(tc, site.host.name)
        failure = tc.find("failure")
        if failure is None:
            failure = tc.find("error")
        if failure is not None:
            result.failed[cid] = failure.get("message", "")
        elif tc.find("skipped") is None:
            result.passed.add(cid)
    return result


def assert_green(c: Compliance) -> None:
    """The whole suite: no check failed, and it ran its host checks (skips, e.g. GPU checks
    on a CPU host, are the suite's own business: tests/e2e/test_compliance.py)."""
    assert c.rc == 0 and not c.failed, c.summary()
    assert len(c.passed) >= 15, c.summary()
    assert "test_stability::test_no_restart_loop_in_the_recent_window" in c.passed


LOOP_CHECKS = {
    "test_service::test_enabled_active_not_crash_looping",
    "test_stability::test_no_restart_loop_in_the_recent_window",
}


def kill_and_wait(site: Site) -> float:
    pid = site.service("MainPID")["MainPID"]
    assert pid not in ("", "0")
    t0 = time.monotonic()
    site.sh(f"kill -9 {pid}")
    return healthy_within(site, KILL_BOUND_S, t0, old_pid=pid)


def deployed_ok(run: Run) -> None:
    assert run.rc == 0, run.output[-4000:]


def leaked(values: list[str], texts: list[bytes]) -> int:
    """How many of ``texts`` hold any of ``values`` (kept out of assert expressions, so that
    a failure never prints a secret)."""
    return sum(1 for t in texts if any(v.encode() in t for v in values))


# ------------------------------------------------------------------ 1. the cloud-image path
def test_sudo_login_uploads_no_secret_readable_by_another_user(
    site: Site, deployed: Run, tmp_path: Path
) -> None:
    if site.ssh_user == "root":
        pytest.skip("LLAMAHOST_E2E_SSH_USER=root: the deploy does not use the sudo login")
    # The bring-up (and every deploy since) logged in as the unprivileged user, never root.
    assert site.sh(f"id -u {site.ssh_user}").strip() != "0"
    auth = site.sh("journalctl -q --no-pager -o cat _COMM=sshd", check=False)
    assert f"Accepted publickey for {site.ssh_user} " in auth

    # Another unprivileged user (nobody: not the login, not root, not in group llama)
    # reads every file it can, the moment it appears, where uploads could pass.
    script = base64.b64encode(Path(secretwatch.__file__).read_bytes()).decode()
    site.sh(
        f"rm -rf {WATCH} && install -d -m 0700 -o nobody -g nogroup {WATCH}"
        f" && echo {script} | base64 -d >{WATCH}.py"
        f" && systemd-run -q --unit=secretwatch --collect --uid=nobody --gid=nogroup"
        f" /usr/bin/python3 {WATCH}.py {WATCH} {' '.join(WATCHED)}"
    )
    for _ in range(100):
        if site.sh(f"test -f {WATCH}/ready && echo yes", check=False).strip() == "yes":
            break
        time.sleep(0.1)
    watched = json.loads(site.sh(f"cat {WATCH}/ready"))
    assert "/tmp" in watched, watched

    model = site.hub.hub.root / SUDO_REPO / MODEL_FILE
    model.parent.mkdir(parents=True, exist_ok=True)
    write_tiny(str(model), seed=7)
    key = secrets.token_hex(24)
    token = "hf_" + secrets.token_hex(16)
    env = {**site.env(), "LLAMAHOST_LOCAL_API_KEY": key, "LLAMAHOST_LOCAL_HF_TOKEN": token}
    try:
        # A new model: a download with the token, a new unit (an ordinary files.put through
        # pyinfra's sudo upload), the supplied key: every way a file reaches the host.
        run = site.deploy("--data", f"llama_model_repo={SUDO_REPO}", env=env)
        deployed_ok(run)
        changed = run.changed_operations()
        assert "API key (supplied)" in changed, changed
        assert any(op.startswith("Hub token") for op in changed), changed
        assert any(op.startswith("Render llama-server.service") for op in changed), changed
        site.sh("systemctl stop secretwatch")
        report = json.loads(site.sh(f"cat {WATCH}/report.json"))
        captures = {
            name: base64.b64decode(site.sh(f"base64 -w0 {WATCH}/captures/{name}"))
            for name in site.sh(f"ls {WATCH}/captures").split()
        }
    finally:
        site.sh("systemctl stop secretwatch 2>/dev/null || true", check=False)

    # The watcher works: it read pyinfra's own sudo uploads, the login user's files in
    # /tmp (mode 0644 from the SFTP server), among them the new unit.
    uploads = {p: f for p, f in report["files"].items() if p.startswith("/tmp/pyinfra-")}
    read = [f for f in uploads.values() if f["read"]]
    assert read, f"the watcher saw no pyinfra upload in /tmp: {sorted(report['files'])[:20]}"
    unit_uploads = [
        c for f in read for c in f["contents"] if SUDO_REPO.encode() in captures.get(c, b"")
    ]
    assert unit_uploads, "the new unit's upload through /tmp was not read"
    # The secrets' own directories were closed to it.
    assert {"/etc/llama-server", "/run/llamahost"} <= set(report["denied"]), report["denied"]
    assert f"/home/{site.ssh_user}" in report["denied"], report["denied"]
    # No file it could read, at any moment, held the key or the token.
    assert leaked([key, token], list(captures.values())) == 0, "a secret was readable"
    # Nor the deploy's output; the key file holds the key; nothing left in /tmp.
    assert leaked([key, token], [run.output.encode()]) == 0, "a secret was printed"
    assert site.sh("stat -c '%a %U %G' /etc/llama-server/api-key").strip() == "640 root llama"
    assert leaked([key], [site.key().encode()]) == 1
    assert site.sh("ls /tmp | grep -c '^pyinfra-' || true").strip() == "0"
    assert site.sh("ls /run/llamahost 2>/dev/null | grep -c token || true").strip() == "0"
    chat_ok(site)
    site.timings["sudo_secret_drill_files_read"] = len(read)

    # Back to the inventory's own model (the supplied key stays: nothing generates a new one).
    deployed_ok(site.deploy())


# ------------------------------------------------------------------ 2. reboot
def test_reboot_serves_again_with_no_manual_step(site: Site, deployed: Run, tmp_path: Path) -> None:
    boot = site.host.boot_id()
    assert site.get("/health").status_code == 200
    t0 = time.monotonic()
    run = site.deploy(deploy_file="server.reboot")  # pyinfra's own reboot operation
    deployed_ok(run)
    reconnected = time.monotonic() - t0
    healthy = healthy_within(site, REBOOT_BOUND_S, t0)
    assert site.host.boot_id() != boot, "the host did not reboot"
    assert site.service("ActiveState", "SubState", "NRestarts") == {
        "ActiveState": "active",
        "SubState": "running",
        "NRestarts": "0",
    }
    chat_ok(site)
    site.timings["reboot_reconnect_s"] = round(reconnected, 1)
    site.timings["reboot_to_healthy_s"] = healthy
    assert_green(run_compliance(site, tmp_path))
    # And a deploy after the reboot has nothing to do.
    again = site.deploy()
    deployed_ok(again)
    assert again.changed_operations() == []


# ------------------------------------------------------------------ 3. kill -9
def test_kill_9_serves_again_within_the_bound(site: Site, deployed: Run, tmp_path: Path) -> None:
    site.sh(f"systemctl reset-failed {UNIT}")  # NRestarts and the start limit from zero
    seconds = kill_and_wait(site)
    site.timings["kill9_to_healthy_s"] = seconds
    assert site.service("NRestarts")["NRestarts"] == "1"
    chat_ok(site)
    # One crash is not a loop: both restart checks pass.
    c = compliance_of(site, tmp_path, "test_service.py", "test_stability.py")
    assert not c.failed and c.passed >= LOOP_CHECKS, c.summary()


# ------------------------------------------------------------------ 4. a restart loop
def test_compliance_flags_a_restart_loop(site: Site, deployed: Run, tmp_path: Path) -> None:
    site.sh(f"systemctl reset-failed {UNIT}")
    for _ in range(3):
        kill_and_wait(site)
    assert site.service("NRestarts")["NRestarts"] == "3"
    looping = compliance_of(site, tmp_path, "test_service.py", "test_stability.py")
    assert looping.rc != 0
    assert set(looping.failed) == LOOP_CHECKS, looping.summary()
    assert "restarted itself 3 times" in looping.output

    # An operator restarts it by hand: NRestarts is back to 0, the journal still shows
    # the loop (the start limit is cleared too, for the next drill's starts).
    site.sh(f"systemctl reset-failed {UNIT} && systemctl restart {UNIT}")
    assert site.service("NRestarts")["NRestarts"] == "0"
    after = compliance_of(site, tmp_path, "test_service.py", "test_stability.py")
    assert set(after.failed) == {"test_stability::test_no_restart_loop_in_the_recent_window"}, (
        after.summary()
    )
    assert "test_service::test_enabled_active_not_crash_looping" in after.passed
    chat_ok(site)


# ------------------------------------------------------------------ 5. a model that crashes
def crashing_model(hub_root: Path) -> str:
    """The tiny model with its tensor data cut in half: the header (and so the plan) is
    valid, llama-server fails while it loads the tensors. Returns its sha256."""
    path = hub_root / CRASH_REPO / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny(str(path))
    start = gguf.GGUFReader(str(path)).data_offset
    size = path.stat().st_size
    os.truncate(path, start + (size - start) // 2)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_model_that_crashes_on_load_stops_the_deploy_with_the_reason(
    site: Site, deployed: Run
) -> None:
    sha = crashing_model(site.hub.hub.root)
    before = site.sh("grep ^ExecStart= /etc/systemd/system/llama-server.service")
    since = site.sh("date +%s").strip()
    run = site.deploy(
        "--data", f"llama_model_repo={CRASH_REPO}", "--data", f"llama_model_sha256={sha}"
    )
    assert run.rc != 0
    # Downloaded and verified against the pin: the gate passed, the restart failed.
    assert run.stopped_at() == RESTART_OP, run.stderr[-3000:]
    assert "llama-server.service did not restart; its last journal lines:" in run.stderr
    reason = run.stderr.rsplit("its last journal lines:", 1)[1]
    # llama.cpp's loader names the cut tensor data ("... data is not within the file
    # bounds ...", "error loading model", "failed to load model").
    assert any(
        why in reason for why in ("file bounds", "error loading model", "failed to load model")
    ), reason[-3000:]
    assert "exited after" in reason  # the health wait gave up on the dead process

    # Crash detection: the restart's start to systemd's "Failed to start", from the journal.
    log = site.sh(f"journalctl -u {UNIT} -o short-unix --no-pager --since @{since}")
    starts = [float(x.split()[0]) for x in log.splitlines() if f"Starting {UNIT}" in x]
    fails = [float(x.split()[0]) for x in log.splitlines() if f"Failed to start {UNIT}" in x]
    assert starts and fails, log[-3000:]
    detect = round(fails[0] - starts[0], 1)
    assert detect < CRASH_DETECT_BOUND_S, log[-3000:]
    site.timings["crash_detected_s"] = detect
    site.timings["crash_deploy_s"] = round(run.seconds, 1)

    # The unit gives up within its start limit (StartLimitBurst=5 in 600 s) by itself.
    t0 = time.monotonic()
    while site.service("ActiveState")["ActiveState"] != "failed":
        assert time.monotonic() - t0 < 120, site.service("ActiveState", "SubState", "Result")
        time.sleep(1)
    state = site.service("ActiveState", "Result")
    assert state["Result"] in ("start-limit-hit", "exit-code"), state
    site.timings["crash_to_unit_failed_s"] = round(time.monotonic() - t0 + detect, 1)

    # The inventory's own configuration, rerun: serving again.
    restore = site.deploy()
    deployed_ok(restore)
    assert site.sh("grep ^ExecStart= /etc/systemd/system/llama-server.service") == before
    assert site.get("/health").status_code == 200
    chat_ok(site)
    again = site.deploy()
    deployed_ok(again)
    assert again.changed_operations() == []
