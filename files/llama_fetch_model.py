"""Download one GGUF from the Hub (or HF_ENDPOINT) and promote it only once verified.

Runs on the host, in the venv that holds huggingface_hub. huggingface_hub resolves the file
(size, LFS sha256), builds the URL and the authentication headers; the bytes are fetched
here, because since 1.18 the library deletes a partial file on failure and a 26 GB download
cut at 90% would start again from zero. Here:

* the partial file lives in DEST_DIR/.partial/ (same filesystem as the destination) and a
  rerun continues it with an HTTP Range request;
* free space for the rest of the file plus a margin is checked before any byte moves;
* size and sha256 (the pinned one, or the Hub's) are checked before the file is renamed
  into place; a wrong file is deleted, never promoted;
* progress (bytes, rate, time left) goes to stdout and to --log every --every seconds;
* a token, when needed, is read from --token-file, never from the command line.

The deploy runs it in the background so that the download overlaps the driver and the
build: ``--start`` checks what can be checked at once (the repository and file, the token,
free space) and hands the transfer to a transient systemd unit, which outlives the SSH
session; ``--wait`` follows that unit's progress log until it ends, starts it again if it
is gone with the file still missing (a reboot into a new driver kills it), and exits 0 only
for a verified file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

CHUNK = 1 << 20  # at most this much is lost when the connection drops
MIB = 1 << 20
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


class Sink(threading.Thread):
    """Writes and hashes the received chunks on a thread of its own (both release the GIL),
    so that receiving the next chunk overlaps them. Measured with tests/bench/download.py (a
    1 GiB file from the local endpoint, 2 cores): 4.0-4.1x curl's time before, 2.7-2.8x with
    it (about 260 → 390 MiB/s).
    """

    def __init__(self, out: IO[bytes], h: hashlib._Hash):
        super().__init__(daemon=True)
        self.out, self.h = out, h
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)  # 16 MiB in flight
        self.queued = self.written = 0
        self.error: Exception | None = None

    def put(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.chunks.put(chunk)
        self.queued += len(chunk)

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            if self.error is not None:
                continue  # drain, so that put() never blocks on a dead writer
            try:
                self.out.write(chunk)
                self.h.update(chunk)
                self.written += len(chunk)
            except Exception as e:  # a full disk: reported by put() or close()
                self.error = e

    def close(self) -> Exception | None:
        self.chunks.put(None)
        self.join()
        return self.error


def sha256_prefix(path: str) -> tuple[hashlib._Hash, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
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
    from huggingface_hub import constants, get_session, hf_hub_url
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
    headers = build_hf_headers(token=t.token)
    if have:
        headers["Range"] = f"bytes={have}-"
        progress.say(f"resuming {a.file} at {have} of {size} bytes")
    transferred = 0
    if have < size:
        error: Exception | None = None
        with open(part, "ab") as out:
            sink = Sink(out, h)
            sink.start()
            try:
                # huggingface_hub's own HTTP client: its proxies, retries and user agent.
                with get_session().stream("GET", url, headers=headers, timeout=60) as r:
                    r.raise_for_status()
                    if have and r.status_code != 206:
                        print(f"{url}: the server ignored the Range request", file=sys.stderr)
                        return 5
                    for chunk in r.iter_bytes(CHUNK):
                        sink.put(chunk)
                        progress.update(have + sink.queued)
            except Exception as e:  # any transfer failure: keep what arrived
                error = e
            finally:
                # Everything received is written and hashed (or the write's error raised)
                # before the partial file's length is trusted.
                error = sink.close() or error
            transferred = sink.written
            have += transferred
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                error = error or e
        if error is not None:
            progress.say(f"transferred {transferred} bytes in this run")
            print(
                f"download of {a.file} stopped at {have} of {size} bytes ({error}); "
                "the next run continues from there",
                file=sys.stderr,
            )
            return 6
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
