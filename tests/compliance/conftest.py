"""Compliance checks: does every host of an inventory still match the bring-up checklist?

    tests/compliance/run.sh inventory/prod.py
    pytest tests/compliance --inventory inventory/prod.py      (or LLAMAHOST_INVENTORY=...)

Hosts and the expected values come from the pyinfra inventory the deploy used
(inventory.py); every check runs once per host, with the host's name as its test id, over
SSH (testinfra) and HTTP from this machine. A check that needs a GPU is skipped, with the
reason, on hosts whose profile uses none.

Collected by a plain `pytest` (make test), the host checks are deselected and only the
host-free tests beside them (test_gpu_parse.py, test_gpu_checks.py) run: no host is
contacted unless this directory (or a check module) is named or --inventory is given.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import testinfra

from tests.compliance import inventory
from tests.compliance.inventory import Target
from tests.compliance.live import Server

HERE = Path(__file__).resolve().parent
UNIT_TESTS = {"test_gpu_parse.py", "test_gpu_checks.py"}  # host-free, beside the checks

TARGETS = pytest.StashKey[list[Target]]()
INVENTORY = pytest.StashKey[str]()
SERVERS = pytest.StashKey[dict[str, Server]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("llamahost compliance").addoption(
        "--inventory",
        default=None,
        help="pyinfra inventory whose hosts to check "
        "(default: $LLAMAHOST_INVENTORY, else inventory/prod.py)",
    )


def _named_paths(config: pytest.Config) -> list[Path]:
    base = config.invocation_params.dir
    return [(base / a.split("::", 1)[0]).resolve() for a in config.args]


def _requested_inventory(config: pytest.Config) -> str | None:
    """--inventory; else, when this suite was named, $LLAMAHOST_INVENTORY or prod.py."""
    option = config.getoption("inventory", default=None)
    if option:
        return str(option)
    for p in _named_paths(config):
        if p == HERE or (p.parent == HERE and p.name not in UNIT_TESTS):
            return os.environ.get("LLAMAHOST_INVENTORY") or inventory.DEFAULT_INVENTORY
    return None


def pytest_configure(config: pytest.Config) -> None:
    # testinfra logs every command's full output at DEBUG, and one command reads the key.
    logging.getLogger("testinfra").setLevel(logging.INFO)
    requested = _requested_inventory(config)
    if requested is None:
        config.stash[TARGETS] = []
        return
    try:
        config.stash[TARGETS] = inventory.load(requested)
    except inventory.InventoryError as e:
        raise pytest.UsageError(f"inventory {requested}: {e}") from None
    config.stash[INVENTORY] = requested
    config.stash[SERVERS] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target" not in metafunc.fixturenames:
        return
    targets = metafunc.config.stash.get(TARGETS, [])
    if targets:
        metafunc.parametrize("target", targets, ids=[t.name for t in targets], scope="module")
    else:  # deselected below: no inventory was asked for
        metafunc.parametrize("target", [None], ids=["no-inventory"])


def _is_host_check(item: pytest.Item) -> bool:
    return "target" in getattr(item, "fixturenames", ())


def proves(item: pytest.Item) -> str:
    """A check's first docstring line: the checklist line or promise it proves."""
    doc = getattr(getattr(item, "function", None), "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else item.name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    compliance_run = bool(config.stash.get(TARGETS, []))
    named = set(_named_paths(config))
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        if _is_host_check(item):
            ok = compliance_run
        else:
            # A compliance run reports on hosts only, unless a unit test was named.
            ok = not compliance_run or item.path.resolve() in named
        (keep if ok else drop).append(item)
        if ok and _is_host_check(item):
            callspec = item.callspec  # type: ignore[attr-defined]
            name = callspec.params["target"].name
            variant = callspec.id.replace(name, "", 1).strip("-")
            label = proves(item) + (f" [{variant}]" if variant else "")
            item.user_properties.append(("host", name))
            item.user_properties.append(("proves", label))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# ------------------------------------------------------------------ fixtures
# Checks of a role a host may have without serving (llama_serve: false); every other
# module checks a llama-server.
ROLE_MODULES = {"test_gateway"}


@pytest.fixture(autouse=True)
def _served_hosts_only(request: pytest.FixtureRequest) -> None:
    if "target" not in request.fixturenames:
        return
    target = request.getfixturevalue("target")
    module = request.module.__name__.rsplit(".", 1)[-1]
    if target is not None and not target.spec.serves and module not in ROLE_MODULES:
        pytest.skip(f"{target.name} serves no llama-server (llama_serve: false)")


@pytest.fixture
def host(target: Target) -> Any:
    """testinfra's Host for the target, over OpenSSH with the inventory's connection data."""
    return testinfra.get_host(target.testinfra_spec(), **target.testinfra_kwargs())


@pytest.fixture
def server(request: pytest.FixtureRequest, target: Target, host: Any) -> Server:
    servers = request.config.stash[SERVERS]
    if target.name not in servers:
        servers[target.name] = Server(target, host)
    return servers[target.name]


@pytest.fixture
def gpu_server(server: Server) -> Server:
    p = server.cfg.profile
    if not p.uses_gpu:
        pytest.skip(
            f"{server.target.name}: profile {p.name} uses no GPU "
            "(llama_gpu_layers unset), so this GPU check does not apply"
        )
    return server


# ------------------------------------------------------------------ the per-host summary
def _reason(report: pytest.TestReport) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple):  # a skip: (path, line, "Skipped: why")
        return str(lr[2]).removeprefix("Skipped: ")
    crash = getattr(lr, "reprcrash", None)
    text = crash.message if crash is not None else str(lr)
    return text.strip().splitlines()[0][:220] if text.strip() else ""


# In the order the checks ran: the summary lists each host's checks as the run did.
_REPORTS: list[pytest.TestReport] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.user_properties:
        _REPORTS.append(report)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not config.stash.get(TARGETS, []):
        return
    rows: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    for r in _REPORTS:
        if r.when != "call" and not (r.failed or r.skipped):
            continue  # a passed setup or teardown is not a result
        info = {str(k): str(v) for k, v in r.user_properties}
        if "host" not in info:
            continue
        if r.passed:
            word = "PASS"
        elif r.skipped:
            word = "SKIP"
        else:
            word = "FAIL" if r.when == "call" else "ERROR"
        concern = Path(r.nodeid.split("::", 1)[0]).stem.removeprefix("test_")
        rows[info["host"]].append((word, concern, info["proves"], "" if r.passed else _reason(r)))
    tr = terminalreporter
    for name in sorted(rows):
        tr.write_sep("=", f"compliance: {name} ({config.stash[INVENTORY]})")
        counts: dict[str, int] = defaultdict(int)
        for word, concern, what, detail in rows[name]:
            counts[word] += 1
            tr.write_line(f"{word:<5} {concern:<8} {what}")
            if detail:
                tr.write_line(f"{'':14}-> {detail}")
        tr.write_line(
            f"{name}: {counts['PASS']} passed, {counts['FAIL'] + counts['ERROR']} failed, "
            f"{counts['SKIP']} skipped"
        )
