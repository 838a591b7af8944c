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
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from typing import IO

CHUNK = 1 << 20  # at most this much is lost when the connection drops
MIB = 1 << 20


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--revision", required=True)
    ap.add_argument("--dest", required=True, help="final path of the model file")
    ap.add_argument("--sha256", default=None, help="expected sha256 (default: the Hub's)")
    ap.add_argument("--group", default=None, help="group that may read the file")
    ap.add_argument("--token-file", default=None, help="file holding a Hub token")
    ap.add_argument("--margin-mib", type=int, default=1024, help="free space kept spare")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--log", default=None, help="also append progress here")
    ap.add_argument("--from-file", default=None, help="verify and promote this pushed file")
    ap.add_argument("--size", type=int, default=None, help="expected size (--from-file)")
    a = ap.parse_args()
    if a.from_file:
        return promote_pushed(a)

    # Here, not at the top: a pushed file (--from-file) is promoted by the system python of a
    # host that has no venv and no internet.
    from huggingface_hub import HfApi, constants, get_session, hf_hub_url
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils._headers import build_hf_headers

    token = None
    if a.token_file:
        with open(a.token_file) as f:
            token = f.read().strip() or None
        os.unlink(a.token_file)  # used once, by this process only

    infos = HfApi(token=token).get_paths_info(a.repo, [a.file], revision=a.revision)
    meta = infos[0] if infos else None
    if not isinstance(meta, RepoFile):
        print(f"{a.repo}@{a.revision} has no file {a.file}", file=sys.stderr)
        return 2
    size = meta.size
    expected = a.sha256 or (meta.lfs.sha256 if meta.lfs else None)
    if verify_in_place(a.dest, expected):
        print(f"{a.dest}: already there, sha256 {expected} verified again")
        return 0

    dest_dir = os.path.dirname(a.dest)
    partial_dir = os.path.join(dest_dir, ".partial")
    os.makedirs(partial_dir, mode=0o750, exist_ok=True)
    tag = (expected or a.revision)[:16]
    part = os.path.join(partial_dir, f"{os.path.basename(a.dest)}.{tag}.part")
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if have > size:
        os.unlink(part)
        have = 0

    # Before any byte moves: room for the rest of the file and the margin.
    free = shutil.disk_usage(partial_dir).free
    need = size - have + a.margin_mib * MIB
    if free < need:
        print(
            f"not enough space in {partial_dir}: {free} bytes free, {need} needed "
            f"({size - have} still to download + {a.margin_mib} MiB margin); nothing downloaded",
            file=sys.stderr,
        )
        return 4

    log = open(a.log, "a") if a.log else None  # noqa: SIM115  (open for the whole run)
    progress = Progress(size, have, a.every, log)
    h, hashed = sha256_prefix(part) if have else (hashlib.sha256(), 0)
    assert hashed == have
    url = hf_hub_url(a.repo, a.file, revision=a.revision, endpoint=constants.ENDPOINT)
    headers = build_hf_headers(token=token)
    if have:
        headers["Range"] = f"bytes={have}-"
        progress.say(f"resuming {a.file} at {have} of {size} bytes")
    transferred = 0
    if have < size:
        try:
            # huggingface_hub's own HTTP client: its proxies, retries and user agent.
            with get_session().stream("GET", url, headers=headers, timeout=60) as r:
                r.raise_for_status()
                if have and r.status_code != 206:
                    print(f"{url}: the server ignored the Range request", file=sys.stderr)
                    return 5
                with open(part, "ab") as out:
                    for chunk in r.iter_bytes(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        transferred += len(chunk)
                        progress.update(have)
                    out.flush()
                    os.fsync(out.fileno())
        except Exception as e:  # any transfer failure: keep what arrived
            progress.say(f"transferred {transferred} bytes in this run")
            print(
                f"download of {a.file} stopped at {have} of {size} bytes ({e}); "
                "the next run continues from there",
                file=sys.stderr,
            )
            return 6
    progress.update(have, final=True)
    progress.say(f"transferred {transferred} bytes in this run")

    digest = h.hexdigest()
    if have != size or (expected and digest != expected):
        os.unlink(part)  # a wrong file is never resumed either
        print(
            f"{a.file}: size {have} (expected {size}), sha256 {digest} (expected {expected}); "
            "not promoted",
            file=sys.stderr,
        )
        return 3
    promote(part, a.dest, digest, a.group)
    progress.say(f"{a.dest}: {size} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
