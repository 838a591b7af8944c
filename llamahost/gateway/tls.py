"""A certificate and key supplied for the gateway (``llama_gateway_tls_cert`` and
``llama_gateway_tls_key``), checked on the controller before any change, with the
``openssl`` command-line tool (no Python dependency). Pure: no pyinfra.

What HAProxy needs to start, and clients to trust it, each refused with the reason:

- the key is one openssl reads without a passphrase (an encrypted key would make HAProxy ask
  for it at every start, and fail unattended);
- the certificate file's first certificate (the one HAProxy serves) holds the key's public
  key: the pair belongs together;
- every certificate of the file is valid now: not expired, not valid only from a later date;
- the chain is complete: each certificate is issued by the next one in the file (names and
  signature), and the last one is either self-signed (a root, which the file may include)
  or issued by a CA of the controller's own trust store (openssl's default). A private CA's
  root must therefore be the file's last certificate.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CERT = "gateway_tls_cert"
KEY = "gateway_tls_key"

# The self-signed certificate's key (openssl req arguments): ECDSA P-256. A client that opens
# a new connection per request pays a full handshake each time, and the server's signature
# is most of it: measured with the sync openai SDK, which drops its connection after every
# stream, ECDSA P-256 against RSA 3072 (docs/gateway.md#overhead).
SELF_SIGNED_KEY_ARGS = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)
_ENCRYPTED = ("-----BEGIN ENCRYPTED PRIVATE KEY-----", "Proc-Type: 4,ENCRYPTED")
_MONTHS = {m: i for i, m in enumerate(calendar.month_abbr) if m}
# openssl's date: "Jan  1 00:00:00 2030 GMT" (always GMT for certificates).
_DATE = re.compile(r"([A-Z][a-z]{2}) +(\d{1,2}) (\d{2}):(\d{2}):(\d{2}) (\d{4}) GMT")


@dataclass(frozen=True)
class Problem:
    """What is wrong, and with which of the two settings (``CERT`` or ``KEY``)."""

    key: str
    why: str


@dataclass(frozen=True)
class Validity:
    subject: str
    issuer: str
    not_before: int  # seconds since the epoch
    not_after: int


class OpensslError(Exception):
    pass


def _openssl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    if exe is None:
        raise OpensslError(
            "the `openssl` command is not found on the controller (needed to check the "
            "certificate and key before any change; apt-get install openssl)"
        )
    return subprocess.run(
        [exe, *args],
        input=stdin if stdin is not None else "",  # never a terminal: never a prompt
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LC_ALL": "C"},
    )


def epoch(openssl_date: str) -> int:
    """openssl's ``notAfter=`` date ("Jan  1 00:00:00 2030 GMT") in seconds since the epoch."""
    m = _DATE.fullmatch(openssl_date.strip())
    if m is None or m.group(1) not in _MONTHS:
        raise ValueError(f"not an openssl date: {openssl_date!r}")
    mon, day, hh, mm, ss, year = m.groups()
    return calendar.timegm((int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss), 0, 0, 0))


def certificates(text: str) -> list[str]:
    """The PEM certificates of a file, in order."""
    return [m.group(0) + "\n" for m in _PEM_CERT.finditer(text)]


def validity(pem: str) -> Validity:
    r = _openssl(
        "x509", "-noout", "-subject", "-issuer", "-startdate", "-enddate",
        "-nameopt", "RFC2253", stdin=pem,
    )  # fmt: skip
    if r.returncode != 0:
        raise OpensslError("openssl cannot read it as a certificate")
    fields = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return Validity(
        subject=fields.get("subject", "").strip(),
        issuer=fields.get("issuer", "").strip(),
        not_before=epoch(fields["notBefore"]),
        not_after=epoch(fields["notAfter"]),
    )


def _public_key_of_cert(pem: str) -> str:
    r = _openssl("x509", "-noout", "-pubkey", stdin=pem)
    if r.returncode != 0:
        raise OpensslError("openssl cannot read the certificate's public key")
    return r.stdout.strip()


def _when(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _name(i: int, n: int, v: Validity) -> str:
    where = "the certificate" if n == 1 else f"certificate {i + 1} of {n}"
    return f"{where} ({v.subject or 'no subject'})"


def check_key(key_text: str) -> tuple[str | None, list[Problem]]:
    """The key's public key (PEM), or the problems that make it unusable."""
    if any(marker in key_text for marker in _ENCRYPTED):
        return None, [
            Problem(
                KEY,
                "the key is encrypted (HAProxy would ask for its passphrase at every start): "
                "give it unencrypted, e.g. `openssl pkey -in KEY -out KEY.plain`, mode 0600",
            )
        ]
    if "PRIVATE KEY-----" not in key_text:
        return None, [Problem(KEY, "holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)")]
    # -passin with an empty passphrase: an encrypted key fails instead of prompting.
    r = _openssl("pkey", "-pubout", "-passin", "pass:", stdin=key_text)
    if r.returncode != 0:
        return None, [Problem(KEY, "openssl cannot read the private key (not a PEM key?)")]
    return r.stdout.strip(), []


def check(cert_file: Path, key_file: Path, now: float | None = None) -> list[Problem]:
    """Every reason HAProxy would refuse the pair or clients would refuse its chain; none
    when it is good. ``now``: seconds since the epoch (default the controller's clock)."""
    try:
        cert_text, key_text = cert_file.read_text(), key_file.read_text()
    except UnicodeDecodeError:
        return [Problem(CERT, "not a PEM file (text)")]
    # The deploy validates the inventory on every host: the same files are checked once
    # per run (a run lasts minutes; expiry is counted in days).
    memo = hashlib.sha256(f"{cert_text}\0{key_text}".encode()).hexdigest()
    if now is None and memo in _checked:
        return _checked[memo]
    try:
        found = _check(cert_text, key_text, time.time() if now is None else now)
    except OpensslError as e:
        found = [Problem(CERT, str(e))]
    if now is None:
        _checked[memo] = found
    return found


_checked: dict[str, list[Problem]] = {}


def _check(cert_text: str, key_text: str, now: float) -> list[Problem]:
    problems: list[Problem] = []
    chain = certificates(cert_text)
    if not chain:
        problems.append(Problem(CERT, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"))
    public, key_problems = check_key(key_text)
    problems += key_problems
    if not chain:
        return problems
    try:
        valid = [validity(pem) for pem in chain]
    except OpensslError as e:
        return [*problems, Problem(CERT, str(e))]
    n = len(valid)
    if public is not None and _public_key_of_cert(chain[0]) != public:
        problems.append(
            Problem(
                CERT,
                "its first certificate (the one served) does not hold the public key of "
                f"llama_{KEY}: the certificate and the key do not belong together",
            )
        )
    for i, v in enumerate(valid):
        if v.not_after <= now:
            problems.append(Problem(CERT, f"{_name(i, n, v)} expired on {_when(v.not_after)}"))
        elif v.not_before > now:
            problems.append(
                Problem(
                    CERT,
                    f"{_name(i, n, v)} is valid only from {_when(v.not_before)} "
                    "(or the controller's clock is wrong)",
                )
            )
    problems += _chain(chain, valid)
    return problems


def _chain(chain: list[str], valid: list[Validity]) -> list[Problem]:
    n = len(chain)
    for i in range(n - 1):
        if valid[i].issuer != valid[i + 1].subject:
            return [
                Problem(
                    CERT,
                    f"the chain is incomplete: {_name(i, n, valid[i])} is issued by "
                    f"{valid[i].issuer!r}, but the next certificate is "
                    f"{valid[i + 1].subject!r}; the file must hold the certificate, then each "
                    "intermediate in order (a missing or misplaced intermediate)",
                )
            ]
    last = valid[-1]
    self_signed = last.issuer == last.subject
    with tempfile.TemporaryDirectory(prefix="llamahost-tls-") as d:
        leaf, untrusted, anchor = Path(d, "leaf.pem"), Path(d, "chain.pem"), Path(d, "root.pem")
        leaf.write_text(chain[0])
        untrusted.write_text("".join(chain[1:-1] if self_signed else chain[1:]))
        args = ["verify", "-no_check_time"]  # time is checked above, with its own message
        if self_signed:
            anchor.write_text(chain[-1])
            args += ["-CAfile", str(anchor)]
        if untrusted.read_text():
            args += ["-untrusted", str(untrusted)]
        r = _openssl(*args, str(leaf))
    if r.returncode == 0:
        return []
    said = " ".join((r.stdout + r.stderr).split())
    why = re.search(r"error \d+ at \d+ depth lookup: ?([^:]+?)(?: error|$|\s+\S+:)", said)
    reason = why.group(1).strip() if why else "openssl verify refuses it"
    if self_signed:
        return [
            Problem(
                CERT,
                f"the chain does not verify up to its last certificate, the self-signed "
                f"{last.subject!r} ({reason})",
            )
        ]
    return [
        Problem(
            CERT,
            f"the chain is incomplete: its last certificate ({last.subject}) is issued by "
            f"{last.issuer!r}, which is neither in the file nor a CA this controller trusts "
            f"({reason}); append the missing intermediate, or the private CA's root",
        )
    ]
