"""The fetch script (files/llama_fetch_model.py) against a local Hub endpoint: fast, no test
host. Dropped connections are ridden out within one run, resumed from the bytes already
received, and the file is still promoted only once its size and sha256 are verified.

The same script on the real test host, installed by the deploy: tests/e2e/test_download.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hubserver import HubServer

SCRIPT = Path(__file__).resolve().parents[2] / "files" / "llama_fetch_model.py"
REPO = "fetch/m"
NAME = "big.gguf"
KEY = f"{REPO}/{NAME}"
MIB = 1 << 20


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    (tmp_path / "hub" / REPO).mkdir(parents=True)
    with HubServer(tmp_path / "hub") as server:
        yield server


def _publish(hub: HubServer, size: int, repo: str = REPO) -> bytes:
    data = os.urandom(size)
    d = hub.hub.root / repo
    d.mkdir(parents=True, exist_ok=True)
    (d / NAME).write_bytes(data)
    return data


def _fetch(
    hub: HubServer, dest: Path, *extra: str, repo: str = REPO
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(dest.parent / "hf")}
    env.pop("HF_TOKEN", None)
    argv = [sys.executable, str(SCRIPT), "--repo", repo, "--file", NAME, "--revision", "main",
            "--dest", str(dest), "--margin-mib", "0", "--every", "0.2",
            "--retry-wait", "0.05", *extra]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def _verified(dest: Path, data: bytes) -> bool:
    digest = hashlib.sha256(data).hexdigest()
    sidecar = Path(f"{dest}.sha256").read_text().splitlines()
    return dest.read_bytes() == data and sidecar[0] == digest


def test_two_dropped_connections_are_ridden_out_in_one_run(hub: HubServer, tmp_path: Path) -> None:
    data = _publish(hub, 24 * MIB)
    hub.hub.drop_after[KEY] = 5 * MIB + 12345  # mid-read: not on a chunk boundary
    hub.hub.drop_times[KEY] = 2
    dest = tmp_path / "models" / NAME
    run = _fetch(hub, dest)
    assert run.returncode == 0, run.stderr
    lost = [line for line in run.stdout.splitlines() if line.startswith("connection lost")]
    assert len(lost) == 2, run.stdout
    # Each attempt brought more than a read: the count of retries in a row starts again.
    assert all(line.endswith("retry 1 of 8 in 0.05s") for line in lost), lost
    assert _verified(dest, data)
    # Resumed, never started again: one whole-file GET, then Range requests from the bytes
    # that had arrived. (A connection reset rather than closed could cost the read under
    # way, 1 MiB at most.)
    assert hub.hub.full_downloads[KEY] == 1
    assert hub.hub.served_bytes[KEY] == len(data)
    assert os.listdir(dest.parent / ".partial") == []


def test_retries_in_a_row_without_progress_stop_the_run_and_the_next_run_resumes(
    hub: HubServer, tmp_path: Path
) -> None:
    data = _publish(hub, 16 * MIB)
    drop = 100_000  # less than a read: no progress worth the name
    hub.hub.drop_after[KEY] = drop
    hub.hub.drop_times[KEY] = 4
    dest = tmp_path / "models" / NAME
    first = _fetch(hub, dest, "--retries", "2")
    assert first.returncode == 6, first.stderr
    assert "retry 2 of 2" in first.stdout
    assert "the next run continues from there" in first.stderr
    assert not dest.exists()  # a partial download never becomes the model
    (part,) = (dest.parent / ".partial").iterdir()
    assert part.read_bytes() == data[: 3 * drop]  # three attempts, every byte kept

    served = hub.hub.served_bytes.pop(KEY)
    again = _fetch(hub, dest)  # the fourth drop is still due: ridden out
    assert again.returncode == 0, again.stderr
    assert f"resuming {NAME} at {3 * drop} of {len(data)} bytes" in again.stdout
    assert "retry 1 of 8" in again.stdout
    assert _verified(dest, data)
    assert served + hub.hub.served_bytes[KEY] == len(data)  # not one byte fetched twice


def test_flipped_bytes_are_never_promoted(hub: HubServer, tmp_path: Path) -> None:
    _publish(hub, 4 * MIB)
    hub.hub.corrupt.add(KEY)
    hub.hub.drop_after[KEY] = 2 * MIB  # and a retry on the way
    dest = tmp_path / "models" / NAME
    run = _fetch(hub, dest)
    assert run.returncode == 3, run.stderr
    assert "not promoted" in run.stderr
    assert not dest.exists()
    assert os.listdir(dest.parent / ".partial") == []  # and not resumed either


def test_the_cdn_redirect_never_gets_the_token(hub: HubServer, tmp_path: Path) -> None:
    # The Hub sends a file's bytes from its CDN; the token is for the Hub alone.
    repo = "gated/m"
    data = _publish(hub, 6 * MIB, repo=repo)
    token = "hf_" + os.urandom(8).hex()
    hub.hub.tokens["gated"] = token
    hub.hub.cdn.add(f"{repo}/{NAME}")
    hub.hub.drop_after[f"{repo}/{NAME}"] = 2 * MIB  # a retry goes through the Hub again
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    dest = tmp_path / "models" / NAME
    run = _fetch(hub, dest, "--token-file", str(token_file), repo=repo)
    assert run.returncode == 0, run.stderr
    assert _verified(dest, data)
    assert hub.hub.cdn_auth_refused == 0
    assert not token_file.exists()  # read once, deleted
    assert token not in run.stdout + run.stderr


def test_a_refused_token_is_not_retried(hub: HubServer, tmp_path: Path) -> None:
    _publish(hub, MIB, repo="gated/m")
    hub.hub.tokens["gated"] = "hf_the-right-one"
    dest = tmp_path / "models" / NAME
    run = _fetch(hub, dest, repo="gated/m")
    assert run.returncode != 0
    assert "connection lost" not in run.stdout
    assert not dest.exists()


def _self_signed(d: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost (the endpoint and its "CDN")."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llamahost test hub")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = d / "cert.pem", d / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_over_https_with_the_cdn_redirect_and_a_drop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real Hub: TLS, the token for the Hub only, the bytes from the CDN.
    cert, key = _self_signed(tmp_path)
    (tmp_path / "hub" / REPO).mkdir(parents=True)
    with HubServer(tmp_path / "hub", tls=(cert, key)) as hub:
        data = _publish(hub, 3 * MIB)
        hub.hub.cdn.add(KEY)
        hub.hub.drop_after[KEY] = MIB + 1
        token_file = tmp_path / "token"
        token_file.write_text("hf_" + os.urandom(8).hex() + "\n")
        dest = tmp_path / "models" / NAME
        # Trusted as a host trusts the CA that signed the Hub's certificate.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        run = _fetch(hub, dest, "--token-file", str(token_file))
        assert run.returncode == 0, run.stderr
        assert "connection lost" in run.stdout
        assert _verified(dest, data)
        assert hub.hub.cdn_auth_refused == 0


def _module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The script, imported."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llama_fetch_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    fetch = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "llama_fetch_model", fetch)  # (its dataclasses need it)
    spec.loader.exec_module(fetch)
    return fetch


def test_buffers_reach_the_file_in_small_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8 MiB buffer goes to the page cache in writes of at most WRITE bytes (one write
    of it measured 2-3 s per GiB slower in a VM: the script's comment at WRITE), every
    byte written once and hashed, in order."""
    fetch = _module(monkeypatch)
    writes: list[int] = []
    got = bytearray()

    class File:
        name = "partial"

        def write(self, b: memoryview) -> int:
            k = len(b) if writes else 1000  # a short write happens: the rest follows
            writes.append(k)
            got.extend(b[:k])
            return k

    h = hashlib.sha256()
    sink = fetch.Sink(File(), h)
    data = os.urandom(fetch.BUFFER + 3 * MIB + 5)
    for start in range(0, len(data), fetch.BUFFER):
        buf = sink.buffer()
        n = len(data[start : start + fetch.BUFFER])
        buf[:n] = data[start : start + fetch.BUFFER]
        sink.put(buf, n)
    assert sink.close() is None
    assert got == data and h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert max(writes) <= fetch.WRITE < fetch.BUFFER
    assert len(writes) >= len(data) // fetch.WRITE


def test_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    fetch = _module(monkeypatch)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("https_proxy", "http://u:p%40ss@proxy.example:3128")
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "mirror.internal")

    # HTTPS: a CONNECT tunnel through the proxy, its credentials on the CONNECT only.
    conn, target, extra = fetch._connection("https://huggingface.co/a/b/resolve/main/f?x=1")
    assert (conn.host, conn.port, target, extra) == (
        "proxy.example",
        3128,
        "/a/b/resolve/main/f?x=1",
        {},
    )
    assert conn._tunnel_host == "huggingface.co" and conn._tunnel_port == 443
    assert conn._tunnel_headers["Proxy-Authorization"] == "Basic dTpwQHNz"  # u:p@ss
    # HTTP: the absolute URL to the proxy.
    conn, target, extra = fetch._connection("http://hub.example/a")
    assert (conn.host, target, extra) == ("proxy.example", "http://hub.example/a", {})
    # no_proxy: straight to the host.
    conn, target, _ = fetch._connection("http://mirror.internal:8080/a")
    assert (conn.host, conn.port, target) == ("mirror.internal", 8080, "/a")
