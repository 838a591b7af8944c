"""The compliance suite (tests/compliance) against the real local host, as CI's proof.

The suite runs as its own pytest process, through inventory/local.py with the site's
environment, exactly as `tests/compliance/run.sh inventory/local.py` would. After a deploy
every non-GPU check passes and every GPU check is skipped with its reason; then each
deliberate breakage fails the check that covers it, and rerunning deploy.py repairs it.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, Run, Site

pytestmark = pytest.mark.e2e

UNIT = "/etc/systemd/system/llama-server.service"
KEY = "/etc/llama-server/api-key"
# The host reads this "model" and blocks in open() until a writer comes: llama-server
# has started its HTTP server by then and answers /health 503 "Loading model" for good.
STUCK_MODEL = "/var/lib/llama-models/compliance-drill.fifo"
# The served model's path, from the unit's ExecStart (the lock may pin a commit in it).
MODEL = f"$(sed -n -E 's/^ExecStart=.* -m ([^ ]+) .*/\\1/p' {UNIT})"


@dataclass
class Compliance:
    rc: int
    output: str
    passed: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """The per-host summary the suite prints, else the tail of its output."""
        start = self.output.find("= compliance:")
        return self.output[start if start >= 0 else -6000 :][-6000:]


def check_id(testcase: ET.Element, host: str) -> str:
    """tests.compliance.test_api / test_x[host-variant] → test_api::test_x[variant]."""
    module = testcase.get("classname", "").rsplit(".", 1)[-1]
    name = testcase.get("name", "")
    func, _, params = name.partition("[")
    variant = params.rstrip("]").replace(host, "", 1).strip("-")
    return f"{module}::{func}" + (f"[{variant}]" if variant else "")


def shows_the_key(site: Site, *texts: str) -> bool:
    # A function of its own, so that no failing frame holds the key for pytest to print.
    key = site.key()
    return any(key in text for text in texts)


def run_compliance(site: Site, tmp_path: Path) -> Compliance:
    junit = tmp_path / f"compliance-{len(list(tmp_path.glob('*.xml')))}.xml"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "tests/compliance",
        "--inventory",
        "inventory/local.py",
        "-p",
        "no:cacheprovider",
        "-rA",
        "--junitxml",
        str(junit),
    ]
    p = subprocess.run(argv, cwd=REPO, env=site.env(), capture_output=True, text=True, timeout=900)
    result = Compliance(p.returncode, p.stdout + p.stderr)
    assert junit.exists(), result.output[-4000:]
    # The key is read and used, never shown: not in the report, not in the JUnit file.
    assert not shows_the_key(site, result.output, junit.read_text()), "the API key was printed"
    for tc in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314
        cid = check_id(tc, site.host.name)
        failure = tc.find("failure")
        if failure is None:
            failure = tc.find("error")
        skipped = tc.find("skipped")
        if failure is not None:
            result.failed[cid] = failure.get("message", "")
        elif skipped is not None:
            result.skipped[cid] = skipped.get("message", "")
        else:
            result.passed.add(cid)
    return result


def deploy(site: Site) -> Run:
    run = site.deploy()
    assert run.rc == 0, run.output[-4000:]
    return run


def assert_all_pass(c: Compliance) -> None:
    """Every non-GPU check passed; every GPU check was skipped, saying why, and so was every
    gateway check (the test host is in no group `gateway`) and every firewall check
    (llama_firewall is off)."""
    assert c.rc == 0 and not c.failed, c.summary()
    gpu = {k: v for k, v in c.skipped.items() if k.startswith("test_gpu::")}
    gateway = {k: v for k, v in c.skipped.items() if k.startswith("test_gateway::")}
    fw = {k: v for k, v in c.skipped.items() if k.startswith("test_firewall::")}
    # The GPU instances' device and pinning check: this host runs one CPU llama-server.
    inst = {k: v for k, v in c.skipped.items()
            if k == "test_service::test_each_instance_on_its_gpu_and_cpus"
            and "runs no GPU instances" in v}  # fmt: skip
    assert {**gpu, **gateway, **fw, **inst} == c.skipped, (
        f"checks skipped: {set(c.skipped) - set(gpu) - set(gateway) - set(fw)}"
    )
    assert all("is not in group 'gateway'" in why for why in gateway.values()), gateway
    assert len(fw) == 2 and all("llama_firewall is off" in why for why in fw.values()), fw
    assert len(gpu) >= 7, c.summary()
    assert all("uses no GPU" in why for why in gpu.values()), gpu
    assert not any(k.startswith("test_gpu::") for k in c.passed)
    assert len(c.passed) >= 15, c.summary()  # the suite ran its host checks, not nothing


def restore(site: Site) -> None:
    site.sh(f"rm -f {STUCK_MODEL}", check=False)
    deploy(site)


@pytest.fixture(scope="module")
def baseline(
    site: Site, deployed: Run, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Compliance]:
    """The host as the inventory says (earlier tests change it), checked once."""
    deploy(site)
    yield run_compliance(site, tmp_path_factory.mktemp("compliance"))
    restore(site)


def test_every_non_gpu_check_passes_after_a_deploy(baseline: Compliance) -> None:
    assert_all_pass(baseline)
    assert "compliance: " in baseline.output  # the per-host summary was printed


@dataclass(frozen=True)
class Breakage:
    name: str
    command: str
    check: str  # the check that must fail, test_module::function


def edit_unit(sed: str) -> str:
    return f"sed -i -E {sed} {UNIT} && systemctl daemon-reload && systemctl restart llama-server"


BREAKAGES = [
    Breakage(
        "service-stopped",
        "systemctl stop llama-server",
        "test_service::test_enabled_active_not_crash_looping",
    ),
    Breakage(
        "key-world-readable",
        f"chmod 0644 {KEY}",
        "test_api::test_key_file_is_private",
    ),
    Breakage(
        # inventory/local.py's profile, cpu-demo, has -c 4096: each of the 2 slots then
        # gets 4096 instead of 2048.
        "context-edited-by-hand",
        edit_unit("'s/ -c [0-9]+ / -c 8192 /'"),
        "test_tuning::test_slots_and_context_read_back_from_the_live_server",
    ),
    Breakage(
        "metrics-removed",
        edit_unit("'s/ --metrics / /'"),
        "test_tuning::test_metrics_on_and_answering_with_the_key",
    ),
    Breakage(
        "user-root",
        edit_unit("'s/^User=.*/User=root/'"),
        "test_service::test_runs_as_the_service_user_not_root",
    ),
    Breakage(
        # A server stuck loading its model: systemd sees it running, /health says 503.
        # The start check is dropped too, or the restart would wait for a 200 that never comes.
        "health-503",
        f"mkfifo -m 0640 {STUCK_MODEL} && chgrp llama {STUCK_MODEL} && "
        + edit_unit(f"'s# -m [^ ]+ # -m {STUCK_MODEL} #; /^ExecStartPost=/d'"),
        "test_api::test_health_answers_200",
    ),
    Breakage(
        "model-corrupted",
        # Bytes in the tensor data, past the header: the server keeps serving, the file's
        # sha256 is no longer the one downloaded and verified.
        f'm="{MODEL}" && printf CORRUPTED | dd of="$m" bs=1 conv=notrunc status=none'
        ' seek=$(( $(stat -c %s "$m") - 64 ))',
        "test_model::test_serves_the_pinned_model",
    ),
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=[b.name for b in BREAKAGES])
def test_breakage_fails_its_check_and_a_deploy_repairs_it(
    site: Site, baseline: Compliance, tmp_path: Path, breakage: Breakage
) -> None:
    assert_all_pass(baseline)
    repaired = False
    try:
        site.sh(breakage.command)
        broken = run_compliance(site, tmp_path)
        assert broken.rc != 0, broken.summary()
        assert breakage.check in broken.failed, (
            f"{breakage.name}: {breakage.check} did not fail; failed: {sorted(broken.failed)}\n"
            + broken.summary()
        )
        assert "FAIL " in broken.output  # and the per-host summary says so

        deploy(site)
        assert_all_pass(run_compliance(site, tmp_path))
        repaired = True
    finally:
        if repaired:  # the deploy put the host back; only the drill's stray file is left
            site.sh(f"rm -f {STUCK_MODEL}", check=False)
        else:
            restore(site)
