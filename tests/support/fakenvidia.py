"""A stand-in for NVIDIA's CUDA repository for Debian 12, built at test time.

NVIDIA's repository cannot be reached from the build machine, so the GPU stack's real run
(tests/e2e/test_gpu_stack.py) is pointed at this one instead, without the toolkit knowing:
the test host resolves developer.download.nvidia.com to a loopback address where an HTTPS
server answers with a certificate from a throwaway CA that only the test host trusts. The
deploy downloads the real keyring URL and apt reads the real repository URL.

What it serves, at https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/:

* cuda-keyring_1.1-1_all.deb, shaped like NVIDIA's: it installs
  /usr/share/keyrings/cuda-archive-keyring.gpg (here the test's own signing key) and
  /etc/apt/sources.list.d/cuda-debian12-x86_64.list (``deb [signed-by=…] <repository> /``);
* a flat repository (Packages, Packages.gz, Release, InRelease, Release.gpg) signed by a key
  generated for the run, holding empty packages under the names and versions NVIDIA uses:
  nvidia-driver-cuda, nvidia-kernel-open-dkms, nvidia-kernel-dkms and nvidia-persistenced
  on branch 580 *and* on a newer branch 590, each branch with its
  nvidia-driver-pinning-<branch> package (an apt preference), so that only the pinning
  package, installed first, keeps the driver on 580, and a move to 590 can be run; and
  cuda-toolkit-13-0 (no nvcc in it: nothing can be compiled with it);
* linux-headers-<running kernel> (and its flavour's metapackage): the build machine's kernel
  is not Debian's, so Debian has no headers for it; here they are empty packages too.

nvidia-persistenced's package ships a unit shaped like Ubuntu's (``--no-persistence-mode``)
and a /usr/bin/nvidia-persistenced that only sleeps, so the drop-in's effect can be seen.
"""

from __future__ import annotations

import gzip
import hashlib
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from llamahost import gpu
from tests.support.testhost import TestHost

# NVIDIA's layout, written out rather than taken from llamahost.gpu: a wrong URL in the
# toolkit must fail the test, as it would fail against NVIDIA.
HOST = "developer.download.nvidia.com"
REPO_PATH = "/compute/cuda/repos/debian12/x86_64/"
REPO_URL = f"https://{HOST}{REPO_PATH}"
KEYRING = "/usr/share/keyrings/cuda-archive-keyring.gpg"
SOURCES_LIST = "/etc/apt/sources.list.d/cuda-debian12-x86_64.list"
SOURCES_LINE = f"deb [signed-by={KEYRING}] {REPO_URL} /"
ADDRESS = "127.0.0.77"  # loopback, used by nothing else on this machine

BRANCH_VERSION = "580.105.08-1"
NEWER_BRANCH_VERSION = "590.44.01-1"  # what apt would take without the pinning package
DRIVER_PACKAGES = (
    "nvidia-driver-cuda",
    "nvidia-kernel-open-dkms",
    "nvidia-kernel-dkms",
    "nvidia-persistenced",
)
PINNING_PACKAGE = "nvidia-driver-pinning-580"
# One branch's pin at a time: each pinning package replaces the other (the fake's
# assumption; NVIDIA's packages are not reachable from here to check).
PINNING_RELATIONS = "Provides: nvidia-driver-pinning\nConflicts: nvidia-driver-pinning\n"
PINNING_RELATIONS += "Replaces: nvidia-driver-pinning\n"
TOOLKIT = ("cuda-toolkit-13-0", "13.0.2-1")

PERSISTENCED_UNIT = """\
[Unit]
Description=NVIDIA Persistence Daemon (llamahost test stand-in)
Wants=syslog.target

[Service]
ExecStart=/usr/bin/nvidia-persistenced --user nvidia-persistenced --no-persistence-mode --verbose
ExecStopPost=/bin/rm -rf /var/run/nvidia-persistenced

[Install]
WantedBy=multi-user.target
"""
# Accepts any arguments and does nothing: the unit may start without a GPU.
PERSISTENCED_BINARY = "#!/bin/sh\nexec sleep infinity\n"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str = "amd64"
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # path: (content, mode)
    relations: str = ""  # control lines such as Conflicts:

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_{self.arch}.deb"

    def control(self) -> str:
        return (
            f"Package: {self.name}\nVersion: {self.version}\nArchitecture: {self.arch}\n"
            "Maintainer: llamahost tests <tests@llamahost.invalid>\n"
            "Section: misc\nPriority: optional\n"
            f"{self.relations}"
            f"Description: stand-in for {self.name} (llamahost tests, contains no driver)\n"
        )


def packages(kernel_release: str, keyring: bytes) -> list[Package]:
    """What the repository holds, for a host running ``kernel_release``."""
    out = [
        Package(
            "cuda-keyring",
            gpu.CUDA_KEYRING_VERSION,
            "all",
            {KEYRING: (keyring, 0o644), SOURCES_LIST: ((SOURCES_LINE + "\n").encode(), 0o644)},
        ),
    ]
    for version in (BRANCH_VERSION, NEWER_BRANCH_VERSION):
        branch = version.split(".")[0]
        pinning = f"nvidia-driver-pinning-{branch}"
        pin = f"Package: {' '.join(DRIVER_PACKAGES)}\nPin: version {branch}.*\nPin-Priority: 1000\n"
        pin_file = {f"/etc/apt/preferences.d/{pinning}": (pin.encode(), 0o644)}
        # Versioned by branch only, as recorded in tests/plan/fixtures (dpkg -l).
        out.append(Package(pinning, f"{branch}-1", "all", pin_file, PINNING_RELATIONS))
        for name in DRIVER_PACKAGES:
            files = {}
            if name == "nvidia-persistenced":
                files = {
                    "/usr/bin/nvidia-persistenced": (PERSISTENCED_BINARY.encode(), 0o755),
                    "/lib/systemd/system/nvidia-persistenced.service": (
                        PERSISTENCED_UNIT.encode(),
                        0o644,
                    ),
                }
            out.append(Package(name, version, files=files))
    out.append(Package(*TOOLKIT))
    headers = [f"linux-headers-{kernel_release}"]
    flavour = gpu.kernel_flavour(kernel_release)
    if flavour:
        headers.append(f"linux-headers-{flavour}")
    out += [Package(h, "0~llamahost1") for h in headers]
    return out


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, capture_output=True, **kwargs)


def build_deb(pkg: Package, work: Path, out_dir: Path) -> Path:
    root = work / f"{pkg.name}_{pkg.version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(pkg.control())
    # Files under /etc are conffiles, as debhelper makes them: a removal keeps them.
    conffiles = [path for path in pkg.files if path.startswith("/etc/")]
    if conffiles:
        (root / "DEBIAN" / "conffiles").write_text("".join(f + "\n" for f in conffiles))
    for path, (content, mode) in pkg.files.items():
        f = root / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content)
        f.chmod(mode)
    deb = out_dir / pkg.filename
    _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)])
    return deb


class Signer:
    """A throwaway OpenPGP key in its own GNUPGHOME; close() stops its gpg-agent."""

    def __init__(self, home: Path):
        self.home = home
        home.mkdir(mode=0o700)
        self._gpg(
            "--passphrase",
            "",
            "--quick-gen-key",
            "llamahost fake NVIDIA repository <fake-nvidia@llamahost.invalid>",
            "ed25519",
            "sign",
            "never",
        )
        listing = self._gpg("--with-colons", "--list-keys").stdout.decode()
        self.fingerprint = next(
            ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:")
        )

    def _gpg(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return _run(["gpg", "--batch", "--yes", "--homedir", str(self.home), *args])

    def public_keyring(self) -> bytes:
        # Binary, like NVIDIA's cuda-archive-keyring.gpg (apt's signed-by reads both).
        return self._gpg("--export", self.fingerprint).stdout

    def sign(self, release: Path) -> None:
        user = ("--local-user", self.fingerprint, "--digest-algo", "SHA512")
        self._gpg(*user, "--clearsign", "-o", str(release.with_name("InRelease")), str(release))
        self._gpg(*user, "-abs", "-o", str(release.with_name("Release.gpg")), str(release))

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], check=False)


def write_index(repo: Path, debs: list[tuple[Package, Path]], signer: Signer) -> None:
    stanzas = []
    for pkg, deb in debs:
        data = deb.read_bytes()
        stanzas.append(
            pkg.control()
            + f"Filename: ./{deb.name}\nSize: {len(data)}\n"
            + f"MD5sum: {hashlib.md5(data, usedforsecurity=False).hexdigest()}\n"
            + f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    index = "\n".join(stanzas).encode()
    (repo / "Packages").write_bytes(index)
    (repo / "Packages.gz").write_bytes(gzip.compress(index, mtime=0))
    sums = "".join(
        f" {hashlib.sha256((repo / n).read_bytes()).hexdigest()} {(repo / n).stat().st_size} {n}\n"
        for n in ("Packages", "Packages.gz")
    )
    (repo / "Release").write_text(
        "Origin: NVIDIA\nLabel: NVIDIA CUDA (llamahost test stand-in)\n"
        f"Architectures: amd64 all\nDate: {formatdate(usegmt=True)}\nSHA256:\n{sums}"
    )
    signer.sign(repo / "Release")


def make_certificates(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for NVIDIA's host name: (ca.pem, server.pem, key)."""
    (d / "openssl.cnf").write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = llamahost fake NVIDIA CA\n"
        "[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier = hash\n"
        "[server]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n"
        f"extendedKeyUsage = serverAuth\nsubjectAltName = DNS:{HOST}\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
    )
    new_key = "req -config openssl.cnf -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256"
    for command in (
        f"{new_key} -x509 -extensions ca -days 2 -keyout ca.key -out ca.pem",
        f"{new_key} -new -keyout server.key -out server.csr -subj /CN={HOST}",
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial 1 -days 2 "
        "-extfile openssl.cnf -extensions server -out server.pem",
    ):
        _run(["openssl", *command.split()], cwd=d)
    return d / "ca.pem", d / "server.pem", d / "server.key"


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True
    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the request's thread: a slow client cannot stall the rest.
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gives up mid-handshake (apt probing, curl retries) is not news.
        if not isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            super().handle_error(request, client_address)


class FakeNvidia:
    """The repository built and served for one test module; a context manager."""

    def __init__(self, kernel_release: str, address: str = ADDRESS, port: int = 443):
        self.address = address
        self._tmp = Path(tempfile.mkdtemp(prefix="fakenvidia-"))
        self.root = self._tmp / "www"
        self.repo = self.root / REPO_PATH.strip("/")
        self.repo.mkdir(parents=True)
        self.requests: list[str] = []  # "GET /path 200", in order

        self._signer = Signer(self._tmp / "gnupg")
        try:
            self.keyring = self._signer.public_keyring()
            work = self._tmp / "build"
            debs = [
                (p, build_deb(p, work, self.repo)) for p in packages(kernel_release, self.keyring)
            ]
            write_index(self.repo, debs, self._signer)
            self.ca, server_cert, server_key = make_certificates(self._tmp)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(server_cert, server_key)
            self.httpd = _TlsServer((address, port), self._handler())
        except BaseException:
            self._cleanup()
            raise
        self.httpd.context = context
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _handler(self) -> type[SimpleHTTPRequestHandler]:
        root, seen = str(self.root), self.requests

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=root, **kwargs)

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                seen.append(f"{self.command} {self.path} {code}")

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        return Handler

    @property
    def ca_pem(self) -> str:
        return self.ca.read_text()

    def trust_on(self, host: TestHost) -> None:
        """Point the host's name resolution for NVIDIA's host at this server and add the CA
        to its trust store, the Debian way (update-ca-certificates keeps the build
        machine's CAs that testhost.trust_local_cas put in /usr/local/share)."""
        ca_file = "/usr/local/share/ca-certificates/llamahost-fake-nvidia.crt"
        host.run(
            f"echo {shlex.quote(f'{self.address} {HOST}')} >> /etc/hosts && "
            f"printf '%s' {shlex.quote(self.ca_pem)} > {ca_file} && "
            "update-ca-certificates >/dev/null"
        )

    def start(self) -> FakeNvidia:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._cleanup()

    def _cleanup(self) -> None:
        self._signer.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> FakeNvidia:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
