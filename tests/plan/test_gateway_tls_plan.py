"""The gateway's certificate step (tasks/gateway._certificate) planned against pyinfra's
@fake connector: a new certificate goes to the staged file, is checked with ``haproxy -c``
against a configuration naming the staged file, and only then is renamed over the live one;
the same certificate again changes nothing; a self-signed one is renewed only when it ends
within 30 days; the key never appears in a command."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.command import FunctionCommand
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State
from pyinfra.connectors.util import CommandOutput
from pyinfra.context import ctx_host, ctx_inventory, ctx_state

from llamahost import layout
from llamahost.gateway import haproxy as hx
from llamahost.secret import Secret
from llamahost.spec import resolve_host
from tasks import gateway as gateway_tasks
from tasks import preflight
from tests.plan.fakehost import REPO, _present_dir, _stat

KEY_MARK = "PRIVATE KEY"


def _pki(d: Path) -> tuple[Path, Path]:
    import subprocess

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                    "-subj", "/CN=gw", "-keyout", str(d / "gw.key"), "-out", str(d / "gw.crt")],
                   check=True, capture_output=True)  # fmt: skip
    (d / "gw.key").chmod(0o600)
    return d / "gw.crt", d / "gw.key"


def plan_certificate(
    tmp_path: Path, responses: dict[Any, Any], **data: Any
) -> list[tuple[str, list[Any]]]:
    """Each operation of the step with the commands it would run (in order)."""
    keys = tmp_path / "clients"
    keys.write_text("app client-key-0123456789abcdef0123456789\n")
    keys.chmod(0o600)
    gw_data = {"fake_responses": responses, "fake_delay": 0, "fake_delay_jitter": 0,
               "ssh_hostname": "10.0.0.1", "llama_serve": False,
               "llama_gateway_client_keys_file": str(keys), **data}  # fmt: skip
    inventory = Inventory(([("@fake/gw", gw_data)], {}), gateway=(["@fake/gw"], {}))  # type: ignore[no-untyped-call]
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    state.cwd = str(REPO)
    connect_all(state)
    served = resolve_host("a", {"ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo"})

    def deploy() -> None:
        spec = preflight.validated_spec()
        gateway_tasks._certificate(spec.gateway, spec, hx.servers("@fake/gw", [served]))

    add_deploy(state, deploy)
    fake = inventory.get_host("@fake/gw")
    out = []
    with ctx_state.use(state), ctx_host.use(fake):
        for op_hash in state.get_op_order():  # type: ignore[no-untyped-call]
            op = state.get_op_data_for_host(fake, op_hash)
            (name,) = state.op_meta[op_hash].names
            commands = list(op.command_generator())
            op.operation_meta.set_complete(True, commands, CommandOutput([]))
            out.append((name, commands))
    return out


def _shell(commands: list[Any]) -> list[str]:
    return [str(c) for c in commands if not isinstance(c, FunctionCommand)]


def test_a_supplied_certificate_goes_through_the_staged_file(tmp_path: Path) -> None:
    cert, key = _pki(tmp_path)
    ops = plan_certificate(tmp_path, {}, llama_gateway_tls_cert=str(cert),
                           llama_gateway_tls_key=str(key))  # fmt: skip
    ((name, commands),) = ops
    assert name.startswith("Gateway TLS certificate and key (supplied")
    stage, check_config, install = commands
    assert isinstance(stage, FunctionCommand) and isinstance(check_config, FunctionCommand)
    assert stage.kwargs["path"] == layout.GATEWAY_STAGED_PEM
    assert (stage.kwargs["user"], stage.kwargs["group"],
            stage.kwargs["mode"]) == ("root", "haproxy", "0640")  # fmt: skip
    assert KEY_MARK in stage.kwargs["secret"].reveal()
    assert check_config.kwargs["path"] == layout.GATEWAY_PEM_CHECK_CONFIG
    cfg = check_config.kwargs["secret"].reveal()
    assert f"ssl crt {layout.GATEWAY_STAGED_PEM} " in cfg
    assert f"ssl crt {layout.GATEWAY_PEM} " not in cfg
    text = str(install)
    assert re.search(
        rf"haproxy -c -f {re.escape(layout.GATEWAY_PEM_CHECK_CONFIG)} .*then mv -f "
        rf"{re.escape(layout.GATEWAY_STAGED_PEM)} {re.escape(layout.GATEWAY_PEM)}",
        text,
    )
    assert KEY_MARK not in text and KEY_MARK not in repr(stage)


def test_the_same_certificate_again_changes_nothing(tmp_path: Path) -> None:
    cert, key = _pki(tmp_path)
    pem = Secret(cert.read_text().rstrip("\n") + "\n" + key.read_text())
    live = {f"sha256sum <{layout.GATEWAY_PEM}": f"{pem.digest}  -"}
    ops = plan_certificate(tmp_path, live, llama_gateway_tls_cert=str(cert),
                           llama_gateway_tls_key=str(key))  # fmt: skip
    assert [(n, c) for n, c in ops if c] == []


@pytest.mark.parametrize(
    ("fact", "made"),
    [
        ([], True),  # no certificate yet
        (["notAfter=Jan  1 00:00:00 2030 GMT", "keep"], False),
        (["notAfter=Jan 20 00:00:00 2027 GMT", "renew"], True),  # within 30 days
    ],
)
def test_a_self_signed_certificate_is_made_or_renewed(
    tmp_path: Path, fact: list[str], made: bool
) -> None:
    pem = layout.GATEWAY_PEM
    live = {re.compile(r"^! \(test -e " + re.escape(pem) + r" \|\|"): _stat(pem, "-rw-r-----"),
            **_present_dir(layout.GATEWAY_DIR)} if fact else {}  # fmt: skip
    ops = plan_certificate(tmp_path, {"-checkend 2592000": fact, **live})
    changes = [(n, c) for n, c in ops if c]
    if not made:
        assert changes == []
        return
    ((name, commands),) = changes
    assert name.startswith("Gateway TLS certificate (self-signed")
    make, install = _shell(commands)
    assert "openssl req -x509" in make and f"-out {layout.GATEWAY_STAGED_PEM}.crt" in make
    assert f"chmod 0640 {layout.GATEWAY_STAGED_PEM}" in make
    assert layout.GATEWAY_PEM + " " not in make  # the live file only by the rename
    assert f"then mv -f {layout.GATEWAY_STAGED_PEM} {layout.GATEWAY_PEM}" in install


def test_a_gateway_that_serves_nothing_exports_its_certificates_end_date(tmp_path: Path) -> None:
    """With a `monitoring` group: the node exporter and the hourly timer on the gateway, no
    model filesystem textfile, no GPU exporter."""
    from tasks import monitoring

    keys = tmp_path / "clients"
    keys.write_text("app client-key-0123456789abcdef0123456789\n")
    keys.chmod(0o600)
    fake = {"fake_delay": 0, "fake_delay_jitter": 0}
    hosts = [
        ("@fake/gw", {**fake, "ssh_hostname": "10.0.0.1", "llama_serve": False,
                      "llama_gateway_client_keys_file": str(keys)}),
        ("@fake/mon", {**fake, "ssh_hostname": "10.0.0.3", "llama_serve": False}),
        ("@fake/a", {**fake, "ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo"}),
    ]  # fmt: skip
    inventory = Inventory(  # type: ignore[no-untyped-call]
        (hosts, {}), gateway=(["@fake/gw"], {}), monitoring=(["@fake/mon"], {})
    )
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    state.cwd = str(REPO)
    connect_all(state)

    def deploy() -> None:
        spec = preflight.validated_spec()
        if spec.is_gateway:
            monitoring.exporters(spec)

    with ctx_inventory.use(inventory):  # tasks/monitoring reads the inventory's groups
        add_deploy(state, deploy)
    names = [state.op_meta[h].names for h in state.get_op_order()]  # type: ignore[no-untyped-call]
    flat = [n for ns in names for n in ns]
    assert "Install the node exporter" in flat
    assert f"Enable and start {layout.TLS_EXPIRY_TIMER}" in flat
    assert "Script that exports the gateway certificate's end date" in flat
    assert "Name the model filesystem for the alerts" not in flat
    assert not [n for n in flat if "GPU exporter" in n]
