"""Model download faults on the real test host against the local Hub endpoint.

The fetch script is the one the deploy installs (/opt/llamahost/bin/llama-fetch-model),
run in the deploy's venv on the host; the Hub endpoint injects the faults (a connection
dropped mid-file, flipped bytes, a gated repository) and counts the bytes it serves.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import MODEL_FILE, MODEL_REPO, Run, Site

pytestmark = pytest.mark.e2e

BIG = "big.gguf"  # not a model: bytes to interrupt, fetched by the script alone
FETCH = "/opt/llamahost/hf-venv/bin/python /opt/llamahost/bin/llama-fetch-model"


def _add(site: Site, repo: str, name: str, data: bytes) -> Path:
    d = site.hub.hub.root / repo
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    return d / name


def _fetch(
    site: Site, repo: str, name: str, dest: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return site.host.run(
        f"HF_ENDPOINT={site.hub.url} {FETCH} --repo {repo} --file {name} --revision main"
        f" --dest {dest} --margin-mib 0 --every 0.2 {' '.join(extra)}",
        check=False,
    )


def test_interrupted_download_is_completed_by_the_next_run(site: Site, deployed: Run) -> None:
    data = os.urandom(48 << 20)
    _add(site, MODEL_REPO, BIG, data)
    key = f"{MODEL_REPO}/{BIG}"
    dest = "/var/lib/llama-models/interrupt/big.gguf"
    site.hub.hub.served_bytes.pop(key, None)
    site.hub.hub.drop_after[key] = 40 << 20  # late: at 83%
    # No retry within the run (they ride out a drop: tests/fetch/): as if the run had died.
    first = _fetch(site, MODEL_REPO, BIG, dest, "--retries", "0")
    assert first.returncode == 6, first.stderr
    assert "the next run continues from there" in first.stderr
    assert site.sh(f"test -e {dest} || echo absent").strip() == "absent"  # nothing promoted
    served_first = site.hub.hub.served_bytes.pop(key)

    second = _fetch(site, MODEL_REPO, BIG, dest)
    assert second.returncode == 0, second.stderr
    assert "resuming big.gguf at" in second.stdout
    rerun = site.hub.hub.served_bytes.pop(key)
    assert rerun <= len(data) - served_first + (2 << 20)  # the rest, plus at most a chunk
    assert site.sh(f"sha256sum {dest}").split()[0] == hashlib.sha256(data).hexdigest()
    assert "MiB/s" in second.stdout and "left" in second.stdout  # progress lines
    site.timings["interrupted_at_bytes"] = served_first
    site.timings["rerun_transferred_bytes"] = rerun
    site.sh("rm -rf /var/lib/llama-models/interrupt")


def test_first_deploy_downloads_while_llama_cpp_builds(site: Site, deployed: Run) -> None:
    # The transient unit started before the build ended: the two overlapped (without the
    # overlap the download starts after the build's last step).
    started = site.sh(
        "journalctl --no-pager -o short-unix -u 'llamahost-model-download-*' | grep -m1 Started"
    )
    built = float(site.sh("stat -c %Y /opt/llama.cpp/current/logs/build-seconds"))
    build_s = float(site.sh("cat /opt/llama.cpp/current/logs/build-seconds"))
    assert float(started.split()[0]) < built - build_s / 2, (started, built, build_s)
    ops = [op for op in deployed.changed_operations() if op.startswith(f"Download {MODEL_REPO}/")]
    assert len(ops) == 2, ops
    assert "(in the background; progress: /var/log/llamahost/" in ops[0]
    assert ops[1].endswith(": wait for it and verify")


def test_wait_starts_a_download_that_is_not_running(site: Site, deployed: Run) -> None:
    # What a reboot into a new driver leaves: no unit, no file. --wait starts the transfer
    # in its unit, follows its log and succeeds only for the verified file.
    data = os.urandom(3 << 20)
    _add(site, "wait/repo", "w.gguf", data)
    dest = "/var/lib/llama-models/wait/w.gguf"
    site.sh("mkdir -p /var/lib/llama-models/wait")
    run = _fetch(site, "wait/repo", "w.gguf", dest, "--wait", "--log", "/tmp/w.log")
    assert run.returncode == 0, run.stderr
    assert "downloading w.gguf in the background (llamahost-model-download-" in run.stdout
    assert f"{dest}: downloaded and verified" in run.stdout
    assert "transferred 3145728 bytes in this run" in run.stdout  # followed from the log
    assert site.sh(f"sha256sum {dest}").split()[0] == hashlib.sha256(data).hexdigest()
    # A failing transfer: the unit's own error, its exit code, nothing promoted.
    site.hub.hub.corrupt.add("wait/repo/w2.gguf")
    _add(site, "wait/repo", "w2.gguf", data)
    bad = _fetch(site, "wait/repo", "w2.gguf", dest + "2", "--wait")
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert "not promoted" in bad.stderr and "failed (exit-code)" in bad.stderr
    assert site.sh(f"test -e {dest}2 || echo absent").strip() == "absent"


def test_corrupted_bytes_are_refused_and_the_old_model_still_served(
    site: Site, deployed: Run
) -> None:
    good = (site.hub.hub.root / MODEL_REPO / MODEL_FILE).read_bytes()
    _add(site, MODEL_REPO, "tiny-b.gguf", good)
    site.hub.hub.corrupt.add(f"{MODEL_REPO}/tiny-b.gguf")
    before = site.service("ActiveEnterTimestampMonotonic", "MainPID")
    unit = site.sh("cat /etc/systemd/system/llama-server.service")
    run = site.deploy("--data", "llama_model_file=tiny-b.gguf")
    site.hub.hub.corrupt.discard(f"{MODEL_REPO}/tiny-b.gguf")
    assert run.rc != 0
    assert run.stopped_at().startswith("Download ")
    assert "not promoted" in run.stderr
    assert site.sh("find /var/lib/llama-models -name 'tiny-b.gguf*'").strip() == ""
    assert site.sh("cat /etc/systemd/system/llama-server.service") == unit
    assert site.service("ActiveEnterTimestampMonotonic", "MainPID") == before
    assert site.get("/health").status_code == 200


def test_too_small_a_filesystem_fails_before_the_transfer(site: Site, deployed: Run) -> None:
    site.sh("mkdir -p /srv/small && mount -t tmpfs -o size=256k tmpfs /srv/small")
    key = f"{MODEL_REPO}/{MODEL_FILE}"
    downloads = site.hub.hub.full_downloads.get(key, 0)
    try:
        run = site.deploy(
            # A directory below the mount point: the toolkit takes over only what it creates.
            "--data",
            "llama_model_dir=/srv/small/models",
            "--data",
            "llama_model_disk_margin_mib=0",
        )
        assert run.rc != 0
        assert run.stopped_at().startswith("Download ")
        assert "not enough space in /srv/small/" in run.stderr
        assert "nothing downloaded" in run.stderr
        key = f"{MODEL_REPO}/{MODEL_FILE}"
        assert site.sh("find /srv/small -type f").strip() == ""
        # Not one download (the plan's header read is a Range request of its own).
        assert site.hub.hub.full_downloads.get(key, 0) == downloads
    finally:
        site.sh("umount /srv/small; rmdir /srv/small", check=False)


def test_gated_repository_token_is_never_visible(site: Site, deployed: Run) -> None:
    token = "hf_" + os.urandom(16).hex()
    repo = "gated/tiny-seed-oss-GGUF"
    _add(site, repo, MODEL_FILE, (site.hub.hub.root / MODEL_REPO / MODEL_FILE).read_bytes())
    site.hub.hub.tokens["gated"] = token
    try:
        refused = site.deploy("--data", f"llama_model_repo={repo}")
        assert refused.rc != 0 and refused.stopped_at().startswith("Download ")
        assert "401" in refused.stderr or "Gated" in refused.stderr

        env = {**site.env(), "LLAMAHOST_LOCAL_HF_TOKEN": token}
        # -vvv prints every command pyinfra runs: the token is on none of them.
        run = site.deploy("-vvv", "--data", f"llama_model_repo={repo}", env=env)
        assert run.rc == 0, run.output[-4000:]
        assert "gated--tiny-seed-oss-GGUF" in site.sh(
            "grep ^ExecStart= /etc/systemd/system/llama-server.service"
        )
    finally:
        site.hub.hub.tokens.pop("gated", None)
    places = {
        "the run's output (-vvv)": run.output,
        "the unit": site.sh("cat /etc/systemd/system/llama-server.service"),
        "the journal": site.sh("journalctl --no-pager -o cat", check=False),
        "the download log": site.sh("cat /var/log/llamahost/model-download.log"),
        "the process list": site.sh("ps -eo args"),
    }
    leaks = [where for where, text in places.items() if token in text]  # never printed
    assert leaks == []
    assert site.sh("test -e /run/llamahost/hf-token || echo gone").strip() == "gone"
    assert site.deploy().rc == 0  # back to the inventory's model


def test_air_gapped_host_gets_the_model_pushed_from_the_controller(
    site: Site, deployed: Run, tmp_path: Path
) -> None:
    name = "tiny-c.gguf"
    good = (site.hub.hub.root / MODEL_REPO / MODEL_FILE).read_bytes()
    _add(site, MODEL_REPO, name, good)
    key = f"{MODEL_REPO}/{name}"
    # The host's endpoint answers nothing; only the controller (HF_ENDPOINT) reaches the Hub.
    env = {
        **site.env(),
        "LLAMAHOST_LOCAL_HUB": "http://127.0.0.1:9",
        "HF_ENDPOINT": site.hub.url,
        "HF_HOME": str(tmp_path / "controller-hf"),
    }
    args = ("--data", "llama_model_source=controller", "--data", f"llama_model_file={name}")
    run = site.deploy(*args, env=env)
    assert run.rc == 0, run.output[-4000:]
    assert any(op.startswith(f"Push {name} from the controller") for op in run.changed_operations())
    assert site.hub.hub.full_downloads.get(key) == 1  # once, to the controller
    path = site.sh(f"find /var/lib/llama-models -name {name}").strip()
    assert path and site.sh(f"head -n 1 {path}.sha256").strip() == hashlib.sha256(good).hexdigest()
    assert f"-m {path}" in site.sh("grep ^ExecStart= /etc/systemd/system/llama-server.service")
    assert site.get("/health").status_code == 200
    again = site.deploy(*args, env=env)
    assert again.changed_operations() == []
    assert site.hub.hub.full_downloads.get(key) == 1
    assert site.deploy().rc == 0  # back to the inventory's model


def test_a_model_changed_on_disk_is_refused_by_the_service_and_repaired_by_a_rerun(
    site: Site, deployed: Run
) -> None:
    path = f"/var/lib/llama-models/{MODEL_REPO.replace('/', '--')}/main/{MODEL_FILE}"
    assert f"-m {path}" in site.sh("grep ^ExecStart= /etc/systemd/system/llama-server.service")
    good = site.sh(f"sha256sum {path}").split()[0]
    site.sh(f"printf x | dd of={path} bs=1 seek=4096 conv=notrunc status=none")  # in place
    refused = site.host.run("systemctl restart llama-server", check=False)
    assert refused.returncode != 0
    journal = site.sh("journalctl -u llama-server --no-pager -o cat -n 30")
    assert f"{path}: changed since it was verified" in journal, journal
    assert "not serving it" in journal
    assert site.service("ActiveState")["ActiveState"] != "active"

    run = site.deploy()
    assert run.rc == 0, run.output[-4000:]
    changed = run.changed_operations()
    assert any(op.endswith(": wait for it and verify") for op in changed), changed
    assert site.sh(f"sha256sum {path}").split()[0] == good
    assert site.get("/health").status_code == 200
    assert site.deploy().changed_operations() == []
