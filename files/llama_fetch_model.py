"""Download one GGUF from the Hub (or HF_ENDPOINT) and promote it only once verified.

Runs on the host, in the venv that holds huggingface_hub. huggingface_hub resolves the file
(size, LFS sha256), builds the URL and the authentication headers; the bytes are fetched
here, because since 1.18 the library deletes a partial file on failure and a 26 GB download
cut at 90% would start again from zero. Here:

* the partial file lives in DEST_DIR/.partial/ (same filesystem as the destination) and a
  rerun continues it with an HTTP Range request;
* a dropped connection, a stall or a 5xx is retried within the run (--retries, backoff from
  --retry-wait seconds, doubling, at most 30 s), resuming with a Range request from the
  bytes already received; the count starts again whenever an attempt brought at least
  1 MiB, so a flaky link never fails a long download that keeps progressing;
* free space for the rest of the file plus a margin is checked before any byte moves;
* size and sha256 (the pinned one, or the Hub's) are checked before the file is renamed
  into place; a wrong file is deleted, never promoted;
* progress (bytes, rate, time left) goes to stdout and to --log every --every seconds;
* a token, when needed, is read from --token-file, never from the command line.

The transfer uses the standard library's http.client, not huggingface_hub's httpx client:
its reads land straight in large preallocated buffers, with no per-64 KiB parsing, copying
and re-chunking (docs/download.md, Throughput, has the measurements). It follows redirects
as the Hub's CDN needs (the Authorization header is never sent to another host) and honours
http_proxy, https_proxy, all_proxy and no_proxy as huggingface_hub does.

The deploy runs it in the background so that the download overlaps the driver and the
build: ``--start`` checks what can be checked at once (the repository and file, the token,
free space) and hands the transfer to a transient systemd unit, which outlives the SSH
session; ``--wait`` follows that unit's progress log until it ends, starts it again if it
is gone with the file still missing (a reboot into a new driver kills it), and exits 0 only
for a verified file.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import os
import queue
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import IO

# One read from the connection fills one buffer (in C, without a Python step per packet:
# 1 MiB reads measured slower), which the writer thread then writes and hashes at once. A
# connection that is closed mid-read loses nothing; one reset mid-read loses that read.
BUFFER = 8 << 20
# Each buffer reaches the page cache in writes of this size (curl writes 16 KiB at most),
# not in one. The build machine, a VM (Linux 6.18, ext4), hands freed memory back to its
# hypervisor in 2 MiB blocks (virtio-balloon free page reporting); a page-cache block made
# of such memory is faulted in again on first write, seen as system time in the copy into
# the page cache (perf: copy_folio_from_iter_atomic), and larger writes get larger blocks.
# One GiB with sha256 and fsync, 24 downloads each: 256 KiB writes took 1.47-1.55 s in 10
# and 1.76-2.98 s in 14; 16 KiB writes 1.40-2.04 s, median 1.63 (8 MiB writes, another
# day: 2-3 s more in 9 of 15). docs/download.md, Throughput.
WRITE = 16 << 10
PROGRESS = 1 << 20  # an attempt that brought this much starts the count of retries again
BUFFERS = 6  # buffers in flight: one being received, the others written or hashed
MIB = 1 << 20
TIMEOUT = 60.0  # seconds without a byte before a connection counts as lost
MAX_REDIRECTS = 10
MAX_RETRY_WAIT = 30.0
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
POLL = 2.0  # seconds between looks at the background unit
# Passed on to the background unit (systemd-run copies their values through D-Bus). Never
# HF_TOKEN: a unit's environment is readable by anyone through `systemctl show`.
PASS_ENV = ("HF_ENDPOINT", "HF_HUB_DISABLE_TELEMETRY", "HF_HOME", "HF_HUB_CACHE")
PASS_ENV_PROXY = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


class Progress:
    def __init__(self, total: int, start: int, every: float, log: IO[str] | None):
        self.total, self.start, self.every, self.log = total, start, every, log
        self.t0 = self.last = time.monotonic()

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.log:
            self.log.write(time.strftime("%Y-%m-%dT%H:%M:%S ") + text + "\n")
            self.log.flush()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every:
            return
        self.last = now
        moved = done - self.start
        rate = moved / max(now - self.t0, 1e-6)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        self.say(
            f"downloaded {done // MIB} of {self.total // MIB} MiB "
            f"({100 * done // max(self.total, 1)}%), {rate / MIB:.1f} MiB/s, {eta} left"
        )


class Sink:
    """Where received buffers go: written to the partial file on one thread and hashed on
    another, in order, while the connection fills the next buffer; both release the GIL.
    The receiver takes a free buffer (buffer()), fills it straight from the socket and
    hands it over (put()): nothing is copied on the way.

    A third thread has the written bytes reach the disk every FLUSH bytes, while the
    transfer goes on: the fsync before promotion then waits for the last stretch only, and
    a long download never piles up gigabytes of unwritten pages.

    Measured on 2 cores (docs/download.md, Throughput): writing and hashing on one thread
    was slower, and so was one fsync at the end instead of the third thread.
    """

    FLUSH = 256 << 20

    def __init__(self, out: IO[bytes], h: hashlib._Hash):
        self.out, self.h = out, h
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(BUFFERS):
            self.free.put(bytearray(BUFFER))
        self.to_write: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self.to_hash: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self.to_flush: queue.Queue[bool] = queue.Queue()
        self.written = self.hashed = self.unflushed = 0
        self.error: Exception | None = None
        self.threads = [
            threading.Thread(target=self._write, daemon=True),
            threading.Thread(target=self._hash, daemon=True),
            threading.Thread(target=self._flush, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def buffer(self) -> bytearray:
        if self.error is not None:
            raise self.error
        return self.free.get()

    def put(self, buf: bytearray, n: int) -> None:
        """Write and hash buf[:n]; buf returns to the free buffers afterwards."""
        self.to_write.put((buf, n))

    def _write(self) -> None:
        while (item := self.to_write.get()) is not None:
            buf, n = item
            try:
                if self.error is None:  # after an error: drain, so put() never blocks
                    view = memoryview(buf)[:n]
                    while view:
                        wrote = self.out.write(view[:WRITE])
                        if not wrote:
                            raise OSError(f"could not write to {self.out.name}")
                        view = view[wrote:]
                    self.written += n
                    self.unflushed += n
                    if self.unflushed >= self.FLUSH:
                        self.unflushed = 0
                        self.to_flush.put(True)
            except Exception as e:  # a full disk: reported by buffer() or close()
                self.error = e
                n = 0  # hashed: only what was written
            self.to_hash.put((buf, n))
        self.to_hash.put(None)
        self.to_flush.put(False)

    def _hash(self) -> None:
        while (item := self.to_hash.get()) is not None:
            buf, n = item
            self.h.update(memoryview(buf)[:n])
            self.hashed += n
            self.free.put(buf)

    def _flush(self) -> None:
        while self.to_flush.get():
            try:
                os.fdatasync(self.out.fileno())
            except OSError as e:
                self.error = self.error or e

    def close(self) -> Exception | None:
        """Wait for everything handed over; the error that stopped the writing, if any."""
        self.to_write.put(None)
        for t in self.threads:
            t.join()
        return self.error


class Retry(Exception):
    """A transfer failure worth another attempt: a dropped or stalled connection, a 5xx."""


class Fatal(Exception):
    """A transfer failure another attempt would repeat (a 404, an ignored Range)."""

    def __init__(self, message: str, code: int = 6):
        super().__init__(message)
        self.code = code


def _connection(url: str) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
    """A connection for url, through the proxy the environment names (as huggingface_hub
    does: http_proxy, https_proxy, no_proxy), the request target and the proxy's headers."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise Fatal(f"cannot download from {url!r}")
    https = u.scheme == "https"
    port = u.port or (443 if https else 80)
    target = urllib.parse.urlunsplit(("", "", u.path or "/", u.query, ""))
    context = ssl.create_default_context() if https else None
    proxies = urllib.request.getproxies()
    proxy = None
    if not urllib.request.proxy_bypass(u.hostname):
        proxy = proxies.get(u.scheme) or proxies.get("all")
    if not proxy:
        if https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                u.hostname, port, timeout=TIMEOUT, context=context
            )
        else:
            conn = http.client.HTTPConnection(u.hostname, port, timeout=TIMEOUT)
        return conn, target, {}
    p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    auth = {}
    if p.username:
        pair = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
        auth["Proxy-Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    if https:  # a CONNECT tunnel through the proxy, TLS to the host inside it
        conn = http.client.HTTPSConnection(
            p.hostname or "", p.port or 80, timeout=TIMEOUT, context=context
        )
        conn.set_tunnel(u.hostname, port, headers=auth)
        return conn, target, {}
    return http.client.HTTPConnection(p.hostname or "", p.port or 80, timeout=TIMEOUT), url, auth


def open_range(
    url: str, headers: dict[str, str], start: int
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET url from byte start, following redirects (the Hub sends files to its CDN). The
    Authorization header goes to the first host only: a redirect elsewhere carries its own
    (signed) credentials, and a CDN may refuse two."""
    host = urllib.parse.urlsplit(url).netloc
    for _ in range(MAX_REDIRECTS + 1):
        conn, target, extra = _connection(url)
        sent = {**headers, **extra}
        if urllib.parse.urlsplit(url).netloc != host:
            sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
        if start:
            sent["Range"] = f"bytes={start}-"
        try:
            conn.request("GET", target, headers=sent)
            r = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise Retry(_describe(e)) from e
        location = r.getheader("Location")
        if r.status in (301, 302, 303, 307, 308) and location:
            conn.close()
            url = urllib.parse.urljoin(url, location)
            continue
        if r.status in RETRY_STATUS:
            conn.close()
            raise Retry(f"HTTP {r.status} {r.reason}")
        if r.status not in (200, 206):
            conn.close()
            gated = r.status in (401, 403)
            hint = " (a gated or private repository needs a token)" if gated else ""
            raise Fatal(f"HTTP {r.status} {r.reason}{hint}")
        return conn, r
    raise Fatal(f"more than {MAX_REDIRECTS} redirects")


@dataclass
class Position:
    """Bytes of the file handed to the sink so far: where the next attempt starts."""

    have: int


def receive(
    url: str, headers: dict[str, str], pos: Position, size: int, sink: Sink, progress: Progress
) -> None:
    """One attempt: the file from pos.have on, into the sink. What arrived before a failure
    is kept (pos.have counts it) and the next attempt asks for what follows."""
    start = pos.have
    conn, r = open_range(url, headers, start)
    try:
        if start and r.status != 206:
            raise Fatal(f"{url}: the server ignored the Range request", code=5)
        span = r.getheader("Content-Range", "")
        if start and not span.startswith(f"bytes {start}-"):
            raise Fatal(f"{url}: asked for bytes {start}-, got {span!r}")
        length = r.getheader("Content-Length")
        if length is not None and int(length) != size - start:
            raise Fatal(f"{url}: {int(length) + start} bytes, the Hub said {size}")
        while pos.have < size:
            buf = sink.buffer()
            view, n = memoryview(buf), 0
            try:
                while n < BUFFER and pos.have + n < size:
                    k = r.readinto(view[n : min(BUFFER, size - pos.have)])
                    if not k:
                        raise Retry(f"connection closed at byte {pos.have + n}")
                    n += k
            except (OSError, http.client.HTTPException) as e:
                raise Retry(_describe(e)) from e
            finally:
                sink.put(buf, n)
                pos.have += n
                progress.update(pos.have)
    finally:
        conn.close()


def transfer(
    a: argparse.Namespace, url: str, headers: dict[str, str], pos: Position, size: int,
    sink: Sink, progress: Progress,
) -> tuple[Exception | None, int]:  # fmt: skip
    """Attempts until the file is complete, or until --retries attempts in a row brought
    less than PROGRESS each; returns the error that ended it and an exit code for it."""
    failures, wait = 0, a.retry_wait
    while pos.have < size:
        before = pos.have
        try:
            receive(url, headers, pos, size, sink, progress)
        except Retry as e:
            if pos.have - before >= PROGRESS:  # the link works, only not for long
                failures, wait = 0, a.retry_wait
            failures += 1
            if failures > a.retries:
                return e, 6
            progress.say(
                f"connection lost at {pos.have} of {size} bytes ({e}); retry {failures} of "
                f"{a.retries} in {wait:g}s"
            )
            time.sleep(wait)
            wait = min(wait * 2, MAX_RETRY_WAIT)
        except Fatal as e:
            return e, e.code
        except Exception as e:  # the sink's (a full disk): no retry helps
            return e, 6
    return None, 0


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def sha256_prefix(path: str) -> tuple[hashlib._Hash, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(BUFFER):
            h.update(chunk)
            n += len(chunk)
    return h, n


def write_sidecar(dest: str, digest: str) -> None:
    """DEST.sha256: the verified sha256, then the size and mtime it was verified at.

    The deploy compares size and mtime with the file's (a stat, not a 26 GB hash): a file
    changed in place since is verified again, and fetched again if it is wrong.
    """
    st = os.stat(dest)
    with open(dest + ".sha256.tmp", "w") as f:
        f.write(f"{digest}\nsize={st.st_size} mtime={int(st.st_mtime)}\n")
    os.chmod(dest + ".sha256.tmp", 0o644)
    os.replace(dest + ".sha256.tmp", dest + ".sha256")


def promote(part: str, dest: str, digest: str, group: str | None) -> None:
    if group:
        shutil.chown(part, group=group)
    os.chmod(part, 0o640)
    # The sidecar is written after the model, so a crash in between leaves a model without
    # it, which the deploy verifies again.
    os.replace(part, dest)
    write_sidecar(dest, digest)


def verify_in_place(dest: str, expected: str | None) -> bool:
    """An existing file (touched since its verification) that is still right: keep it."""
    if not expected or not os.path.exists(dest):
        return False
    h, _ = sha256_prefix(dest)
    if h.hexdigest() != expected:
        return False
    write_sidecar(dest, expected)
    return True


def promote_pushed(a: argparse.Namespace) -> int:
    """The air-gapped route: the controller pushed the file; check it arrived whole."""
    if not a.sha256 or a.size is None:
        print("--from-file needs --sha256 and --size", file=sys.stderr)
        return 2
    size = os.path.getsize(a.from_file)
    h, _ = sha256_prefix(a.from_file)
    digest = h.hexdigest()
    if size != a.size or digest != a.sha256:
        os.unlink(a.from_file)
        print(
            f"{a.from_file}: size {size} (expected {a.size}), sha256 {digest} "
            f"(expected {a.sha256}); not promoted",
            file=sys.stderr,
        )
        return 3
    promote(a.from_file, a.dest, digest, a.group)
    print(f"{a.dest}: {size} bytes, sha256 {digest} (pushed from the controller)")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo")
    ap.add_argument("--file")
    ap.add_argument("--revision")
    ap.add_argument("--dest", required=True, help="final path of the model file")
    ap.add_argument("--sha256", default=None, help="expected sha256 (default: the Hub's)")
    ap.add_argument("--group", default=None, help="group that may read the file")
    ap.add_argument("--token-file", default=None, help="file holding a Hub token")
    ap.add_argument("--margin-mib", type=int, default=1024, help="free space kept spare")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--log", default=None, help="also append progress here")
    ap.add_argument(
        "--retries", type=int, default=8, help="attempts in a row without progress, after the first"
    )
    ap.add_argument(
        "--retry-wait", type=float, default=1.0, help="seconds before the first retry (doubling)"
    )
    ap.add_argument("--from-file", default=None, help="verify and promote this pushed file")
    ap.add_argument("--size", type=int, default=None, help="expected size (--from-file)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--start", action="store_true", help="check, then download in a unit")
    mode.add_argument("--wait", action="store_true", help="wait for that unit; verify")
    mode.add_argument("--check", action="store_true", help="is --dest the verified file?")
    a = ap.parse_args(argv)
    if not a.check and not (a.repo and a.file and a.revision):
        ap.error("--repo, --file and --revision are required (except with --check)")
    return a


@dataclass
class Transfer:
    token: str | None
    size: int
    expected: str | None  # sha256
    part: str  # the partial file in DEST_DIR/.partial/
    have: int  # bytes of it already there


def resolve(a: argparse.Namespace, consume_token: bool) -> Transfer | int:
    """What to fetch and whether there is room for it; an exit code when not."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    token = None
    if a.token_file:
        with open(a.token_file) as f:
            token = f.read().strip() or None
        if consume_token:
            os.unlink(a.token_file)  # used once, by this process only

    infos = HfApi(token=token).get_paths_info(a.repo, [a.file], revision=a.revision)
    meta = infos[0] if infos else None
    if not isinstance(meta, RepoFile):
        print(f"{a.repo}@{a.revision} has no file {a.file}", file=sys.stderr)
        return 2
    expected = a.sha256 or (meta.lfs.sha256 if meta.lfs else None)
    partial_dir = os.path.join(os.path.dirname(a.dest), ".partial")
    os.makedirs(partial_dir, mode=0o750, exist_ok=True)
    tag = (expected or a.revision)[:16]
    part = os.path.join(partial_dir, f"{os.path.basename(a.dest)}.{tag}.part")
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if have > meta.size:
        os.unlink(part)
        have = 0

    # Before any byte moves: room for the rest of the file and the margin.
    free = shutil.disk_usage(partial_dir).free
    need = meta.size - have + a.margin_mib * MIB
    if free < need:
        print(
            f"not enough space in {partial_dir}: {free} bytes free, {need} needed "
            f"({meta.size - have} still to download + {a.margin_mib} MiB margin); "
            "nothing downloaded",
            file=sys.stderr,
        )
        return 4
    return Transfer(token, meta.size, expected, part, have)


def download(a: argparse.Namespace) -> int:
    """The transfer itself (in the foreground, or as the background unit's process)."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils._headers import build_hf_headers

    t = resolve(a, consume_token=True)
    if isinstance(t, int):
        return t
    if verify_in_place(a.dest, t.expected):
        print(f"{a.dest}: already there, sha256 {t.expected} verified again")
        return 0
    size, have, part = t.size, t.have, t.part

    log = open(a.log, "a") if a.log else None  # noqa: SIM115  (open for the whole run)
    progress = Progress(size, have, a.every, log)
    h, hashed = sha256_prefix(part) if have else (hashlib.sha256(), 0)
    assert hashed == have
    url = hf_hub_url(a.repo, a.file, revision=a.revision, endpoint=constants.ENDPOINT)
    # The user agent and, with a token, the Authorization header, as huggingface_hub sends
    # them; no compression (http.client asks for the identity encoding).
    headers = dict(build_hf_headers(token=t.token))
    if have:
        progress.say(f"resuming {a.file} at {have} of {size} bytes")
    transferred = 0
    if have < size:
        code, error = 0, None
        with open(part, "ab", buffering=0) as out:
            sink = Sink(out, h)
            try:
                error, code = transfer(a, url, headers, Position(have), size, sink, progress)
            finally:
                # Everything received is written and hashed (or the write's error raised)
                # before the partial file's length is trusted.
                write_error = sink.close()
            if write_error is not None:
                error, code = write_error, 6
            transferred = sink.written
            have += transferred
            try:
                os.fsync(out.fileno())
            except OSError as e:
                error, code = error or e, code or 6
        if error is not None:
            progress.say(f"transferred {transferred} bytes in this run")
            if code == 5:
                print(str(error), file=sys.stderr)
                return 5
            print(
                f"download of {a.file} stopped at {have} of {size} bytes ({error}); "
                "the next run continues from there",
                file=sys.stderr,
            )
            return code
    progress.update(have, final=True)
    progress.say(f"transferred {transferred} bytes in this run")

    digest = h.hexdigest()
    if have != size or (t.expected and digest != t.expected):
        os.unlink(part)  # a wrong file is never resumed either
        print(
            f"{a.file}: size {have} (expected {size}), sha256 {digest} (expected {t.expected}); "
            "not promoted",
            file=sys.stderr,
        )
        return 3
    promote(part, a.dest, digest, a.group)
    progress.say(f"{a.dest}: {size} bytes, sha256 {digest}")
    return 0


# ---------------------------------------------------------------- in the background
def unit_name(dest: str) -> str:
    """One unit per destination: a rerun finds its own download, not another file's."""
    return "llamahost-model-download-" + hashlib.sha256(dest.encode()).hexdigest()[:12]


def unit_state(unit: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", unit, "-p", "ActiveState,Result,ExecMainStatus,InvocationID"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def running(state: dict[str, str]) -> bool:
    return state.get("ActiveState") in ("active", "activating", "deactivating", "reloading")


def start(a: argparse.Namespace, argv: list[str]) -> int:
    """Check at once what can fail at once; then the transfer, in a transient unit."""
    unit = unit_name(a.dest)
    if running(unit_state(unit)):
        print(f"{unit} is already downloading {a.file}")
        return 0
    t = resolve(a, consume_token=False)  # the unit's process reads and deletes the token
    if isinstance(t, int):
        drop_token(a)
        return t
    # A failed unit of an earlier run keeps its name until reset.
    subprocess.run(["systemctl", "reset-failed", unit], capture_output=True, check=False)
    env = [k for k in (*PASS_ENV, *PASS_ENV_PROXY) if k in os.environ]
    env += [k.upper() for k in PASS_ENV_PROXY if k.upper() in os.environ]
    child = [arg for arg in argv if arg not in ("--start", "--wait")]
    cmd = [
        "systemd-run",
        f"--unit={unit}",
        f"--description=llamahost: download {a.repo}/{a.file}",
        "--property=Type=exec",
        "--quiet",
        *[f"--setenv={k}" for k in env],
        "--",
        sys.executable,
        os.path.abspath(__file__),
        *child,
    ]
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
        drop_token(a)
    else:
        where = f"; progress: {a.log}" if a.log else ""
        print(f"downloading {a.file} in the background ({unit}{where})")
    return rc


def verified(dest: str, pinned: str | None) -> bool:
    return unverified_because(dest, pinned) is None


def unverified_because(dest: str, pinned: str | None) -> str | None:
    """Why DEST is not the file verified at download (None: it is). A stat, not a hash: the
    sidecar written after verification must still describe the file."""
    try:
        st = os.stat(dest)
    except OSError as e:
        return f"no model file ({e.strerror})"
    try:
        with open(dest + ".sha256") as f:
            digest, stamp = f.readline().strip(), f.readline().split()
    except OSError:
        return "never verified (no .sha256 beside it)"
    if pinned and digest != pinned:
        return f"verified as sha256 {digest}, the configuration pins {pinned}"
    if stamp != [f"size={st.st_size}", f"mtime={int(st.st_mtime)}"]:
        return (
            f"changed since it was verified (then {' '.join(stamp)}, now size={st.st_size} "
            f"mtime={int(st.st_mtime)})"
        )
    return None


def check(a: argparse.Namespace) -> int:
    """The service's ExecStartPre: never serve a file other than the verified one."""
    why = unverified_because(a.dest, a.sha256)
    if why is None:
        print(f"{a.dest}: the verified model")
        return 0
    print(
        f"{a.dest}: {why}; not serving it. Run the deploy again: it verifies the file and "
        "fetches it again if it is wrong.",
        file=sys.stderr,
    )
    return 1


def wait(a: argparse.Namespace, argv: list[str]) -> int:
    """Follow the unit until it ends; exit 0 only for a verified file."""
    unit = unit_name(a.dest)
    try:
        state = unit_state(unit)
        if not running(state) and state.get("ActiveState") != "failed":
            if verified(a.dest, a.sha256):
                print(f"{a.dest}: downloaded and verified")
                return 0
            # Gone with the file still missing (a reboot since --start): again, resumed.
            rc = start(a, argv)
            if rc:
                return rc
        offset = os.path.getsize(a.log) if a.log and os.path.exists(a.log) else 0
        while True:
            state = unit_state(unit)
            offset = follow(a.log, offset)
            if not running(state):
                break
            time.sleep(POLL)
        if state.get("ActiveState") == "failed":
            journal = subprocess.run(
                ["journalctl", "--no-pager", "-o", "cat", "-n", "40",
                 f"_SYSTEMD_INVOCATION_ID={state.get('InvocationID', '')}"],
                capture_output=True, text=True, check=False,
            ).stdout  # fmt: skip
            subprocess.run(["systemctl", "reset-failed", unit], capture_output=True, check=False)
            sys.stderr.write(journal)
            print(f"{unit} failed ({state.get('Result')})", file=sys.stderr)
            return int(state.get("ExecMainStatus") or 1) or 1
        if not verified(a.dest, a.sha256):
            print(f"{unit} ended without a verified {a.dest}", file=sys.stderr)
            return 1
        print(f"{a.dest}: downloaded and verified")
        return 0
    finally:
        # Placed again for a restart after a reboot: not left behind either way.
        drop_token(a)


def drop_token(a: argparse.Namespace) -> None:
    if a.token_file and os.path.exists(a.token_file):
        os.unlink(a.token_file)


def follow(log: str | None, offset: int) -> int:
    """Print what the progress log gained since offset; return the new offset."""
    if not log or not os.path.exists(log):
        return offset
    with open(log) as f:
        f.seek(offset)
        sys.stdout.write(f.read())
        sys.stdout.flush()
        return f.tell()


def main() -> int:
    argv = sys.argv[1:]
    a = parse_args(argv)
    if a.from_file:
        # The air-gapped route needs no huggingface_hub: the system python of a host with
        # no venv and no internet runs it.
        return promote_pushed(a)
    if a.check:
        return check(a)
    if a.start:
        return start(a, argv)
    if a.wait:
        return wait(a, argv)
    return download(a)


if __name__ == "__main__":
    sys.exit(main())
