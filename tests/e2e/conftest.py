"""A fresh Debian 12 host with real systemd, a local Hub endpoint and the tiny model.

Session-scoped: the host is created once (seconds, from a cached debootstrap tree), the
real deploy runs against it over SSH through `inventory/local.py`, and the host is removed
at the end of the session. Its first deploy compiles llama.cpp into the session's build
cache (`build_cache`), which the fleet (tests/e2e/fleet.py) then receives from: one compile
per session for the default build id.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import testhost
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive, seed_oss_template
from tests.support.tinygguf import write as write_tiny

REPO = testhost.REPO
REPORTS = REPO / "reports"
MODEL_REPO = "llamahost/tiny-seed-oss-GGUF"
MODEL_FILE = "tiny-seed-oss.gguf"
# The same tiny model with Seed-OSS's own chat template (tools, thinking budget).
TOOLS_REPO = "llamahost/tiny-seed-oss-tools-GGUF"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def why(self) -> str:
        """What a failed run said about its failure: each error line with the lines after
        it (the run's tail alone can hide a host that failed early)."""
        lines = self.output.splitlines()
        keep: list[str] = []
        for i, line in enumerate(lines):
            if "rror" in line or "Traceback" in line or "stops here" in line:
                keep += lines[i : i + 6]
        return "\n".join(keep[:120]) + "\n...\n" + self.output[-3000:]

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.stdout)
        return out

    def changed_operations(self) -> list[str]:
        ops = self.results()["results"]["operations"]
        return [op["name"] for op in ops if op["success"]]

    def failed_operations(self) -> list[str]:
        ops = self.results()["results"]["operations"]
        return [op["name"] for op in ops if op["error"]]

    def stopped_at(self) -> str:
        """The operation a failed run stopped at (pyinfra prints no JSON results then)."""
        assert self.rc != 0
        last = self.stderr.rsplit("--> Starting operation: ", 1)
        assert len(last) == 2, self.stderr[-2000:]
        name, _, rest = last[1].partition("\n")
        assert "Error" in rest, rest[-2000:]
        return name.strip()


@dataclass
class Site:
    host: testhost.TestHost
    hub: HubServer
    port: int
    timings: dict[str, float] = field(default_factory=dict)
    # The deploy's SSH login: "root", or the host's sudo user (the cloud-image path).
    ssh_user: str = "root"
    # The session's build cache, shared with the fleet (None: the host's own, as in the demo).
    build_cache: Path | None = None

    def env(self) -> dict[str, str]:
        """The environment that points inventory/local.py at this host."""
        return {
            **os.environ,
            "LLAMAHOST_LOCAL_HOST": self.host.name,
            "LLAMAHOST_LOCAL_SSH_PORT": str(self.host.ssh_port),
            "LLAMAHOST_LOCAL_PORT": str(self.port),
            "LLAMAHOST_LOCAL_HUB": self.hub.url,
            "LLAMAHOST_LOCAL_SSH_USER": self.ssh_user,
            **({"LLAMAHOST_LOCAL_BUILD_CACHE": str(self.build_cache)} if self.build_cache else {}),
        }

    def deploy(
        self,
        *extra: str,
        inventory: str = "inventory/local.py",
        env: dict[str, str] | None = None,
        deploy_file: str = "deploy.py",
    ) -> Run:
        env = env or self.env()
        argv = [sys.executable, "-m", "pyinfra", "-y", "--json", inventory, deploy_file, *extra]
        t0 = time.monotonic()
        p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
        return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)

    def sh(self, command: str, check: bool = True) -> str:
        return self.host.run(command, check=check).stdout

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def key(self) -> str:
        return self.sh("cat /etc/llama-server/api-key").strip()

    def get(self, path: str, key: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.get(self.url(path), headers=headers, timeout=30)

    def post(self, path: str, body: dict[str, Any], key: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(self.url(path), json=body, headers=headers, timeout=60)

    def service(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show llama-server.service -p {','.join(props)}", check=False)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def fingerprint(self) -> str:
        """What a deploy would change: files it writes, packages, the service's start."""
        return self.sh(
            "set +e; for p in /etc/systemd/system/llama-server.service /etc/llama-server"
            " /opt/llama.cpp /opt/llamahost /var/lib/llama-models; do"
            " find $p -printf '%p %M %u %g %s %T@\\n' 2>/dev/null; done | sort;"
            " dpkg-query -W -f '${Package} ${Version}\\n' | md5sum;"
            " systemctl show llama-server.service -p ActiveEnterTimestampMonotonic,NRestarts",
            check=False,
        )


def run_compliance(inventory: Path, modules: list[str], junit: Path) -> dict[str, tuple[str, str]]:
    """tests/compliance/<module> over ``inventory``, as a user runs it: each check's JUnit
    name (``test_x[host]``) → (outcome, message): passed, failure, error or skipped."""
    argv = [sys.executable, "-m", "pytest", *(f"tests/compliance/{m}" for m in modules),
            "--inventory", str(inventory), "-p", "no:cacheprovider",
            "--junitxml", str(junit)]  # fmt: skip
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert junit.exists(), (p.stdout + p.stderr)[-4000:]
    out = {}
    for tc in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = tc.find(kind)
            if found is not None:
                outcome, message = kind, found.get("message", "")
        out[tc.get("name", "")] = (outcome, message)
    return out


def require_prerequisites(what: str, *tools: str) -> None:
    """Skip (fail in CI) where this machine cannot make test hosts."""
    missing = None
    if os.geteuid() != 0:
        missing = "needs root (debootstrap, systemd-nspawn)"
    for tool in ("debootstrap", "systemd-nspawn", "ssh", "ssh-keygen", *tools):
        if missing is None and shutil.which(tool) is None:
            missing = f"needs {tool} (make sysdeps installs it)"
    if missing and os.environ.get("CI"):
        pytest.fail(f"{what} cannot run in CI: {missing}")
    if missing:
        pytest.skip(f"{what} skipped: {missing}")


def tiny_hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hub endpoint's root serving the tiny model."""
    root = tmp_path_factory.mktemp("hub")
    (root / MODEL_REPO).mkdir(parents=True)
    write_tiny(str(root / MODEL_REPO / MODEL_FILE))
    (root / TOOLS_REPO).mkdir(parents=True)
    write_tiny(str(root / TOOLS_REPO / MODEL_FILE), chat_template=seed_oss_template())
    return root


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The controller's build cache of this session, shared by the site host and the fleet
    (a fresh one per session, so the session's first deploy compiles);
    LLAMAHOST_TEST_BUILD_CACHE (development only) reuses built trees across sessions."""
    given = os.environ.get("LLAMAHOST_TEST_BUILD_CACHE")
    return Path(given) if given else tmp_path_factory.mktemp("build-cache")


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory, build_cache: Path) -> Iterator[Site]:
    require_prerequisites("end-to-end tests")
    archive()
    hub_root = tiny_hub_root(tmp_path_factory)
    name = f"e2e-{os.getpid()}"
    with HubServer(hub_root) as hub:
        host = testhost.create(name, free_port())
        # The deploy logs in as the host's unprivileged user and uses sudo, as on a cloud
        # image (inventory/prod.py); the tests' own checks log in as root (site.sh).
        # LLAMAHOST_E2E_SSH_USER=root deploys as root instead.
        user = os.environ.get("LLAMAHOST_E2E_SSH_USER") or host.user
        s = Site(host=host, hub=hub, port=free_port(), build_cache=build_cache, ssh_user=user)
        try:
            yield s
        finally:
            testhost.destroy(name)
            REPORTS.mkdir(exist_ok=True)
            (REPORTS / "e2e-timings.json").write_text(json.dumps(s.timings, indent=2) + "\n")


@pytest.fixture(scope="session")
def deployed(site: Site) -> Run:
    """The first deploy of the fresh host."""
    run = site.deploy()
    assert run.rc == 0, run.output[-4000:]
    site.timings["first_run_s"] = round(run.seconds, 1)
    build = site.sh("cat /opt/llama.cpp/current/logs/build-seconds", check=False).strip()
    if build:
        site.timings["llama_cpp_build_s"] = float(build)
    return run


# The multi-host fleet (session-scoped, one compile), shared by test_fleet and test_gateway.
from tests.e2e.fleet import first, fleet  # noqa: E402, F401
