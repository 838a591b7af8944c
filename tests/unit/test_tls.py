"""A supplied gateway certificate and key, checked on the controller before any change
(llamahost/gateway/tls.py), with real certificates made by openssl: a good pair and a
complete chain pass; a pair that does not match, an encrypted key, an expired certificate
and a chain missing its intermediate are refused, by the inventory's validation, naming the
host, the setting and what is wrong. And what the gateway does with a certificate: the
check configuration points at the staged file, which ``haproxy -c`` must accept; the
expiry textfile for the node exporter."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llamahost import layout
from llamahost.checks import ConfigError
from llamahost.gateway import haproxy as hx
from llamahost.gateway import tls
from llamahost.monitoring import exporters as ex
from llamahost.spec import resolve_host
from tasks import gateway as gateway_tasks
from tests.unit.test_gateway import HAPROXY, gateway_data, local_config, render

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

CA_EXT = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
CA_CONFIG = """[ca]
default_ca = d
[d]
database = index.txt
new_certs_dir = .
default_md = sha256
policy = p
unique_subject = no
rand_serial = yes
[p]
commonName = supplied
"""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pki:
    d: Path

    def p(self, name: str) -> Path:
        return self.d / name

    def chain(self, name: str, *parts: str) -> Path:
        out = self.d / name
        out.write_text("".join(self.p(x).read_text() for x in parts))
        return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A root CA, an intermediate, a leaf it signs; a self-signed certificate; one expired
    in 2020; an encrypted copy of the leaf's key."""
    d = tmp_path_factory.mktemp("pki")
    (d / "ca.ext").write_text(CA_EXT)
    (d / "leaf.ext").write_text("subjectAltName=DNS:gw.example\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            "-subj", "/CN=Test Root", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", "root.key", "-out", "root.crt", cwd=d)  # fmt: skip
    for name, subject, issuer, ext in (
        ("int", "/CN=Test Intermediate", "root", "ca.ext"),
        ("leaf", "/CN=gw.example", "int", "leaf.ext"),
    ):
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.crt",
                "-CAkey", f"{issuer}.key", "-CAcreateserial", "-days", "30",
                "-extfile", ext, "-out", f"{name}.crt", cwd=d)  # fmt: skip
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj",
            "/CN=gw.example", "-keyout", "self.key", "-out", "self.crt", cwd=d)  # fmt: skip
    # `req -x509` makes no certificate in the past: `ca` takes the dates as given.
    (d / "ca.cnf").write_text(CA_CONFIG)
    (d / "index.txt").write_text("")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=old.example",
            "-keyout", "old.key", "-out", "old.csr", cwd=d)  # fmt: skip
    openssl("ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "old.key",
            "-in", "old.csr", "-out", "old.crt", "-notext",
            "-startdate", "20200101000000Z", "-enddate", "20200201000000Z", cwd=d)  # fmt: skip
    openssl("pkey", "-in", "leaf.key", "-aes256", "-passout", "pass:secret",
            "-out", "leaf-encrypted.key", cwd=d)  # fmt: skip
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Pki(d)


def whys(problems: list[tls.Problem]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in problems:
        out[p.key] = (out.get(p.key, "") + " | " + p.why).strip(" |")
    return out


def test_a_self_signed_pair_passes(pki: Pki) -> None:
    assert tls.check(pki.p("self.crt"), pki.p("self.key")) == []


def test_a_complete_chain_passes(pki: Pki) -> None:
    full = pki.chain("full.pem", "leaf.crt", "int.crt", "root.crt")
    assert tls.check(full, pki.p("leaf.key")) == []


def test_a_pair_that_does_not_match_is_refused(pki: Pki) -> None:
    full = pki.chain("full.pem", "leaf.crt", "int.crt", "root.crt")
    why = whys(tls.check(full, pki.p("self.key")))
    assert set(why) == {tls.CERT}
    assert "does not hold the public key of llama_gateway_tls_key" in why[tls.CERT]


def test_an_encrypted_key_is_refused(pki: Pki) -> None:
    full = pki.chain("full.pem", "leaf.crt", "int.crt", "root.crt")
    why = whys(tls.check(full, pki.p("leaf-encrypted.key")))
    assert set(why) == {tls.KEY}
    assert "the key is encrypted" in why[tls.KEY]


def test_an_expired_certificate_is_refused(pki: Pki) -> None:
    why = whys(tls.check(pki.p("old.crt"), pki.p("old.key")))
    assert why == {tls.CERT: "the certificate (CN=old.example) expired on 2020-02-01 00:00 UTC"}


def test_a_certificate_not_yet_valid_is_refused(pki: Pki) -> None:
    earlier = time.time() - 7 * 86400  # a week before it was made: as a clock behind
    why = whys(tls.check(pki.p("self.crt"), pki.p("self.key"), now=earlier))
    assert "is valid only from" in why[tls.CERT]


def test_a_chain_missing_its_intermediate_is_refused(pki: Pki) -> None:
    missing = pki.chain("missing.pem", "leaf.crt", "root.crt")
    why = whys(tls.check(missing, pki.p("leaf.key")))
    assert set(why) == {tls.CERT}
    assert "the chain is incomplete" in why[tls.CERT]
    assert "issued by 'CN=Test Intermediate'" in why[tls.CERT]
    # The leaf alone: its issuer is neither in the file nor a CA the controller trusts.
    alone = whys(tls.check(pki.p("leaf.crt"), pki.p("leaf.key")))
    assert "neither in the file nor a CA this controller trusts" in alone[tls.CERT]
    # Without the private root at the end: the same.
    no_root = pki.chain("no-root.pem", "leaf.crt", "int.crt")
    why = whys(tls.check(no_root, pki.p("leaf.key")))
    assert "'CN=Test Root', which is neither" in why[tls.CERT]


def test_a_forged_intermediate_is_refused(pki: Pki, tmp_path: Path) -> None:
    """Names in order are not enough: each signature is verified."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            "-subj", "/CN=Test Intermediate", "-addext", "basicConstraints=critical,CA:TRUE",
            "-keyout", "fake.key", "-out", "fake.crt", cwd=tmp_path)  # fmt: skip
    forged = tmp_path / "forged.pem"
    forged.write_text(pki.p("leaf.crt").read_text() + (tmp_path / "fake.crt").read_text())
    why = whys(tls.check(forged, pki.p("leaf.key")))
    assert "does not verify" in why[tls.CERT]


def test_files_that_hold_no_pem_are_refused(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_text("not a certificate\n")
    assert "holds no PEM certificate" in whys(tls.check(junk, pki.p("leaf.key")))[tls.CERT]
    assert "holds no PEM private key" in whys(tls.check(pki.p("leaf.crt"), junk))[tls.KEY]


def test_openssl_dates() -> None:
    assert tls.epoch("Feb  1 00:00:00 2020 GMT") == 1580515200
    assert tls.epoch("Dec 31 23:59:59 2030 GMT") == 1924991999
    with pytest.raises(ValueError):
        tls.epoch("2020-02-01")


# ---------------------------------------------------------------- in the validation
def _gateway(keys: Path, cert: Path, key: Path) -> dict[str, Any]:
    return gateway_data(keys, llama_gateway_tls_cert=str(cert), llama_gateway_tls_key=str(key))


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "clients"
    p.write_text("alice alice-key-0123456789abcdef0123456789\n")
    p.chmod(0o600)
    return p


def test_validation_refuses_a_bad_pair_naming_host_field_and_why(pki: Pki, keys_file: Path) -> None:
    """resolve_host is what `make plan` and the deploy's preflight validate each host
    with: the refusal comes before any change."""
    full = pki.chain("full.pem", "leaf.crt", "int.crt", "root.crt")
    assert resolve_host("gw1", _gateway(keys_file, full, pki.p("leaf.key")), is_gateway=True)
    with pytest.raises(ConfigError) as e:
        resolve_host("gw1", _gateway(keys_file, full, pki.p("self.key")), is_gateway=True)
    assert e.value.host == "gw1"
    (err,) = e.value.errors
    assert err.key == "llama_gateway_tls_cert" and err.value == str(full)
    assert "the certificate and the key do not belong together" in err.allowed
    message = str(e.value)
    assert "gw1" in message and "llama_gateway_tls_cert" in message

    encrypted = _gateway(keys_file, full, pki.p("leaf-encrypted.key"))
    with pytest.raises(ConfigError) as e:
        resolve_host("gw1", encrypted, is_gateway=True)
    (err,) = e.value.errors
    assert err.key == "llama_gateway_tls_key" and "encrypted" in err.allowed

    with pytest.raises(ConfigError) as e:
        resolve_host("gw1", _gateway(keys_file, pki.p("old.crt"), pki.p("old.key")),
                     is_gateway=True)  # fmt: skip
    assert "expired on 2020-02-01" in e.value.errors[0].allowed


def test_validation_refuses_an_incomplete_chain_in_plan(
    pki: Pki, keys_file: Path, tmp_path: Path
) -> None:
    """`python -m llamahost plan` refuses it, naming the host and the field."""
    missing = pki.chain("missing.pem", "leaf.crt", "root.crt")
    served = {"ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo"}
    gw = {**_gateway(keys_file, missing, pki.p("leaf.key")), "llama_serve": False}
    inv = tmp_path / "inv.py"
    inv.write_text(f"gateway = [('gw-bad-chain', {gw!r})]\nhosts = [('a', {served!r})]\n")
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-m", "llamahost",
                        "plan", str(inv)], cwd=root, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "REFUSED host 'gw-bad-chain': invalid inventory data" in p.stdout
    (line,) = [ln for ln in p.stdout.splitlines() if "llama_gateway_tls_cert" in ln]
    assert "the chain is incomplete" in line and "intermediate" in line


# ---------------------------------------------------------------- on the gateway
def test_the_check_configuration_points_at_the_staged_file(keys_file: Path) -> None:
    cfg = render(keys_file)
    check = gateway_tasks._pem_check_config(cfg)
    assert f"ssl crt {layout.GATEWAY_STAGED_PEM} " in check
    assert f"ssl crt {layout.GATEWAY_PEM} " not in check
    # Everything else is the configuration itself.
    assert check.replace(layout.GATEWAY_STAGED_PEM, layout.GATEWAY_PEM) == cfg
    assert layout.parent(layout.GATEWAY_STAGED_PEM) == layout.GATEWAY_DIR


@HAPROXY
def test_haproxy_checks_the_staged_certificate(pki: Pki, keys_file: Path, tmp_path: Path) -> None:
    """What the deploy runs before the rename: a good staged pair passes ``haproxy -c``; a
    certificate without its key (or with another's) fails it, and the live one stays."""
    path = local_config(gateway_tasks._pem_check_config(render(keys_file)), tmp_path)
    staged = tmp_path / "tls.pem.staged"
    assert str(staged) in path.read_text()
    staged.write_text(pki.p("self.crt").read_text() + pki.p("self.key").read_text())
    ok = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    staged.write_text(pki.p("self.crt").read_text() + pki.p("leaf.key").read_text())
    bad = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "BEGIN" not in bad.stdout + bad.stderr  # names the file, never its content


def test_the_install_command_renames_only_after_the_check() -> None:
    cmd = gateway_tasks._install_staged_command()
    check, _, rest = cmd.partition(";")
    assert check.startswith(f"if haproxy -c -f {layout.GATEWAY_PEM_CHECK_CONFIG}")
    assert rest.strip().startswith(f"then mv -f {layout.GATEWAY_STAGED_PEM} {layout.GATEWAY_PEM}")
    assert f"else rm -f {layout.GATEWAY_STAGED_PEM}" in cmd and "exit 1" in cmd


def test_the_expiry_fact_reads_the_end_date_not_the_key() -> None:
    fact = gateway_tasks.CertificateExpiry()
    cmd = fact.command(layout.GATEWAY_PEM, gateway_tasks.RENEW_WITHIN_S)
    assert "openssl x509 -noout -enddate" in cmd and "-checkend 2592000" in cmd
    assert "pkey" not in cmd and "cat " not in cmd
    assert fact.process([]) is None
    kept = fact.process(["notAfter=Jan  1 00:00:00 2030 GMT", "keep"])
    assert kept == gateway_tasks.Expiry("Jan  1 00:00:00 2030 GMT", renew=False)
    assert fact.process(["notAfter=Jan  1 00:00:00 2020 GMT", "renew"]).renew  # type: ignore[union-attr]
    assert fact.process(["renew"]) == gateway_tasks.Expiry(None, renew=True)  # unreadable


def test_the_expiry_fact_command_on_real_certificates(pki: Pki, tmp_path: Path) -> None:
    """The fact's command as the gateway runs it: renew within 30 days, keep beyond."""
    fact = gateway_tasks.CertificateExpiry()

    def run(path: Path, within: int) -> gateway_tasks.Expiry | None:
        cmd = fact.command(str(path), within)
        out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True)
        return fact.process(out.stdout.splitlines())

    pem = tmp_path / "tls.pem"
    assert run(pem, gateway_tasks.RENEW_WITHIN_S) is None
    pem.write_text(pki.p("self.crt").read_text() + pki.p("self.key").read_text())
    # self.crt lasts 30 days: within 31 it ends, within 1 it does not.
    assert run(pem, 31 * 86400) == gateway_tasks.Expiry(
        run(pem, 86400).not_after,  # type: ignore[union-attr]
        renew=True,
    )
    assert run(pem, 86400).renew is False  # type: ignore[union-attr]
    pem.write_text(pki.p("old.crt").read_text() + pki.p("old.key").read_text())
    assert run(pem, 0) == gateway_tasks.Expiry("Feb  1 00:00:00 2020 GMT", renew=True)


def test_the_expiry_textfile(pki: Pki, tmp_path: Path) -> None:
    pem = tmp_path / "tls.pem"
    out = tmp_path / "llamahost-tls.prom"
    script = tmp_path / "export"
    script.write_text(ex.tls_expiry_script(str(pem), str(out)))
    pem.write_text(pki.p("old.crt").read_text() + pki.p("old.key").read_text())
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    lines = out.read_text().splitlines()
    assert lines[-1] == f'{ex.TLS_EXPIRY_METRIC}{{path="{pem}"}} 1580515200'
    assert f"# TYPE {ex.TLS_EXPIRY_METRIC} gauge" in lines
    assert list(tmp_path.glob("llamahost-tls.prom.*")) == []  # no leftover temporary file
    pem.unlink()
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert r.returncode == 0 and not out.exists()


def test_served_host_servers_exist_for_the_check(keys_file: Path) -> None:
    """The check configuration is the gateway's own: its servers included."""
    served = resolve_host("a", {"ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo"})
    gw = resolve_host("gw", gateway_data(keys_file), is_gateway=True)
    cfg = hx.haproxy_cfg("gw", gw.gateway, hx.servers("gw", [served]))
    assert "server a " in gateway_tasks._pem_check_config(cfg)
