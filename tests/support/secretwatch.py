"""Runs ON a test host, as an unprivileged user that is neither the SSH login nor root: reads
every file it can, the moment it appears, where a deploy's uploads could pass.

    python3 secretwatch.py OUTDIR DIR...

Each DIR is watched with inotify (a file created, written, closed or moved in) and also
scanned every 20 ms, one level of subdirectories deep, so that a file that lives a few
milliseconds is still opened. Every file this user could read is copied, by content
(OUTDIR/captures/<sha256>), and listed in OUTDIR/report.json with its mode and owner; a
directory it may not list is reported as such. Stops on SIGTERM (systemctl stop), writing
the report. Standard library only: the host's python3.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import select
import signal
import stat
import struct
import sys
from pathlib import Path

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_NONBLOCK = 0o4000
EVENT = struct.Struct("iIII")
LIMIT = 1 << 20  # bytes read of one file: a secret is short


class Watch:
    def __init__(self, out: Path, dirs: list[str]):
        self.out = out
        self.dirs = dirs
        self.files: dict[str, dict[str, object]] = {}
        self.denied: set[str] = set()
        self.events = 0
        (out / "captures").mkdir(parents=True, exist_ok=True)

    def read(self, path: str) -> None:
        if path.startswith(str(self.out)):
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            try:
                st = os.lstat(path)
            except OSError:
                return
            if stat.S_ISREG(st.st_mode):
                self.files.setdefault(
                    path, {"mode": oct(st.st_mode & 0o7777), "uid": st.st_uid, "read": False}
                )
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            data = os.read(fd, LIMIT)
        except OSError:
            return
        finally:
            os.close(fd)
        digest = hashlib.sha256(data).hexdigest()
        capture = self.out / "captures" / digest
        if not capture.exists():
            capture.write_bytes(data)
        seen = self.files.setdefault(path, {"read": True, "contents": []})
        seen.update({"mode": oct(st.st_mode & 0o7777), "uid": st.st_uid, "read": True})
        contents = seen.setdefault("contents", [])
        assert isinstance(contents, list)
        if digest not in contents:
            contents.append(digest)

    def scan(self) -> None:
        for d in self.dirs:
            try:
                entries = list(os.scandir(d))
            except PermissionError:
                self.denied.add(d)
                continue
            except OSError:  # not there (yet)
                continue
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        try:
                            for sub in os.scandir(e.path):
                                if sub.is_file(follow_symlinks=False):
                                    self.read(sub.path)
                        except PermissionError:
                            self.denied.add(e.path)
                    elif e.is_file(follow_symlinks=False):
                        self.read(e.path)
                except OSError:
                    continue

    def report(self) -> None:
        (self.out / "report.json").write_text(
            json.dumps(
                {"files": self.files, "denied": sorted(self.denied), "events": self.events},
                indent=1,
            )
        )


def main() -> int:
    out = Path(sys.argv[1])
    dirs = sys.argv[2:]
    w = Watch(out, dirs)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = libc.inotify_init1(IN_NONBLOCK)
    watched: dict[int, str] = {}
    for d in dirs:
        wd = libc.inotify_add_watch(
            fd, d.encode(), IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO
        )
        if wd >= 0:
            watched[wd] = d
        elif ctypes.get_errno() == 13:  # EACCES; a directory not there yet is scanned
            w.denied.add(d)
    (out / "ready").write_text(json.dumps(sorted(watched.values())))
    while not stop:
        try:
            ready, _, _ = select.select([fd], [], [], 0.02)
        except InterruptedError:
            continue
        if ready:
            try:
                buf = os.read(fd, 65536)
            except BlockingIOError:
                buf = b""
            i = 0
            while i + EVENT.size <= len(buf):
                wd, _mask, _cookie, length = EVENT.unpack_from(buf, i)
                name = buf[i + EVENT.size : i + EVENT.size + length].rstrip(b"\0").decode()
                i += EVENT.size + length
                w.events += 1
                if wd in watched and name:
                    w.read(os.path.join(watched[wd], name))
        w.scan()
    w.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
