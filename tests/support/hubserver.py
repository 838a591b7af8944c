"""A local HTTP endpoint that speaks enough of the Hugging Face Hub API for huggingface_hub.

The real client runs against it through HF_ENDPOINT; only the server is local. It serves
files laid out as ROOT/<owner>/<name>/<file> at one commit per repository, and answers:

  HEAD/GET /<owner>/<name>/resolve/<revision>/<file>      (Range honoured)
  POST     /api/models/<owner>/<name>/paths-info/<revision>
  GET      /api/models/<owner>/<name>/revision/<revision>

Tests inject faults through the Hub object: a connection closed after N bytes (K times),
flipped bytes, a required token, a paced link, a redirect of the bytes to a stand-in CDN
(another host name, where `?cdn=1` plays the signed URL); HubServer(tls=...) serves HTTPS.

Run standalone: python -m tests.support.hubserver ROOT --port N
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RESOLVE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_API = re.compile(r"^/api/models/([^/]+)/([^/]+)/(paths-info|revision)/([^/]+)$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Hub:
    def __init__(self, root: Path):
        self.root = root
        self._sha: dict[Path, tuple[float, str]] = {}
        # Fault injection and accounting, set by tests (keys: "owner/name/file").
        self.served_bytes: dict[str, int] = {}
        # Whole-file GETs (a download), as opposed to Range reads (a header, a resume).
        self.full_downloads: dict[str, int] = {}
        self.drop_after: dict[str, int] = {}  # close the connection after N bytes, once...
        self.drop_times: dict[str, int] = {}  # ...or this many times (one per GET)
        # Send GETs of these files to "the CDN": a redirect to the same server under
        # another host name (localhost), which refuses an Authorization header, as a
        # signed CDN URL does; counts the requests that carried one anyway.
        self.cdn: set[str] = set()
        self.cdn_auth_refused = 0
        self.scheme = "http"
        self._lock = threading.Lock()
        self.corrupt: set[str] = set()  # serve the bytes with one flipped
        self.tokens: dict[str, str] = {}  # owner -> the bearer token its repos require
        self.rate: float | None = None  # bytes per second per connection, to interrupt
        # Bytes per second for whole-file GETs only (a slow link for the download, while the
        # plan's header reads stay fast).
        self.full_rate: float | None = None

    def take_drop(self, key: str) -> int | None:
        """The byte count after which this GET's connection is closed, if one is due."""
        with self._lock:
            if key not in self.drop_after:
                return None
            left = self.drop_times.pop(key, 1) - 1
            if left > 0:
                self.drop_times[key] = left
                return self.drop_after[key]
            return self.drop_after.pop(key)

    def repo_dir(self, owner: str, name: str) -> Path | None:
        d = self.root / owner / name
        return d if d.is_dir() else None

    def commit(self, repo: Path) -> str:
        # One commit per repository content: file names, sizes and mtimes.
        h = hashlib.sha1(usedforsecurity=False)
        for f in sorted(p for p in repo.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(repo)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def sha256(self, path: Path) -> str:
        mtime = path.stat().st_mtime
        cached = self._sha.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, sha256_file(path))
            self._sha[path] = cached
        return cached[1]

    def file_info(self, repo: Path, rel: str) -> dict[str, Any] | None:
        p = repo / rel
        if not p.is_file() or ".." in Path(rel).parts:
            return None
        size = p.stat().st_size
        digest = self.sha256(p)
        return {
            "type": "file",
            "path": rel,
            "size": size,
            "oid": hashlib.sha1(digest.encode(), usedforsecurity=False).hexdigest(),
            "lfs": {"oid": digest, "size": size, "pointerSize": 134},
        }


def _sibling(hub: Hub, repo: Path, rel: str) -> dict[str, Any]:
    """A file as model_info lists it: the LFS part carries "sha256", not "oid"."""
    info = hub.file_info(repo, rel) or {}
    out: dict[str, Any] = {"rfilename": rel, "size": info.get("size")}
    if "lfs" in info:
        lfs = info["lfs"]
        out["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
    return out


def make_handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY, as production HTTP servers (nginx, HAProxy) set it: otherwise a small
        # answer's body waits for the client's delayed ACK of its headers (40 ms on Linux):
        # 0.04 s of the fetch script's 0.33 s start in tests/bench/download.py.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _json(self, obj: object, status: int = 200) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self, what: str) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", what)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _resolve(self, head: bool) -> None:
            path, _, query = self.path.partition("?")
            m = _RESOLVE.match(urllib.parse.unquote(path))
            if not m:
                return self._not_found("no such route")
            owner, name, revision, rel = m.groups()
            cdn = query == "cdn=1"
            if cdn and self.headers.get("Authorization"):
                hub.cdn_auth_refused += 1
                self.send_response(400)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not cdn and not self._authorised(owner):
                return
            if not head and not cdn and f"{owner}/{name}/{rel}" in hub.cdn:
                port = self.headers.get("Host", "").rpartition(":")[2]
                self.send_response(302)
                self.send_header("Location", f"{hub.scheme}://localhost:{port}{path}?cdn=1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            repo = hub.repo_dir(owner, name)
            if repo is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            commit = hub.commit(repo)
            if revision not in ("main", commit):
                self.send_response(404)
                self.send_header("X-Error-Code", "RevisionNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            info = hub.file_info(repo, rel)
            if info is None:
                return self._not_found(rel)
            size = info["size"]
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            status = 200
            if rng:
                rm = re.match(r"bytes=(\d+)-(\d*)", rng)
                if rm:
                    start = int(rm.group(1))
                    end = min(int(rm.group(2)) if rm.group(2) else size - 1, size - 1)
                    status = 206
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
            length = max(0, end - start + 1)
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{info["lfs"]["oid"]}"')
            self.send_header("X-Linked-Etag", f'"{info["lfs"]["oid"]}"')
            self.send_header("X-Linked-Size", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            key = f"{owner}/{name}/{rel}"
            if status == 200:
                hub.full_downloads[key] = hub.full_downloads.get(key, 0) + 1
            drop = hub.take_drop(key)
            with (repo / rel).open("rb") as f:
                f.seek(start)
                left, sent = length, 0
                while left > 0:
                    chunk = f.read(min(1 << 16, left))
                    if not chunk:
                        break
                    if key in hub.corrupt and sent == 0:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    if drop is not None and sent + len(chunk) > drop:
                        chunk = chunk[: drop - sent]
                    self.wfile.write(chunk)
                    rate = hub.full_rate if status == 200 and hub.full_rate else hub.rate
                    if rate:
                        time.sleep(len(chunk) / rate)
                    sent += len(chunk)
                    left -= len(chunk)
                    hub.served_bytes[key] = hub.served_bytes.get(key, 0) + len(chunk)
                    if drop is not None and sent >= drop:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # a dropped connection, mid-file
                        return

        def _authorised(self, owner: str) -> bool:
            need = hub.tokens.get(owner)
            if need is None or self.headers.get("Authorization") == f"Bearer {need}":
                return True
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to this repository is restricted.")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False

        def do_HEAD(self) -> None:
            self._resolve(head=True)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            m = _API.match(path)
            if m and m.group(3) == "revision":
                owner, name, _, _revision = m.groups()
                if not self._authorised(owner):
                    return
                repo = hub.repo_dir(owner, name)
                if repo is None:
                    return self._not_found("repo")
                files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
                return self._json(
                    {
                        "id": f"{owner}/{name}",
                        "modelId": f"{owner}/{name}",
                        "sha": hub.commit(repo),
                        "private": False,
                        "siblings": [_sibling(hub, repo, f) for f in files],
                    }
                )
            self._resolve(head=False)

        def do_POST(self) -> None:
            m = _API.match(self.path.split("?")[0])
            if not m or m.group(3) != "paths-info":
                return self._not_found("no such route")
            owner, name, _, _revision = m.groups()
            repo = hub.repo_dir(owner, name)
            if repo is None:
                return self._not_found("repo")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(body).get("paths", [])
            else:
                paths = urllib.parse.parse_qs(body).get("paths", [])
            out = [i for i in (hub.file_info(repo, p) for p in paths) if i]
            self._json(out)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-file (the interruption tests) is not an error here.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class HubServer:
    """Threaded server on 127.0.0.1; use as a context manager or start()/stop().

    tls: (certificate, key) files: HTTPS, as the real Hub (the client must trust the
    certificate, e.g. through SSL_CERT_FILE)."""

    def __init__(self, root: Path, port: int = 0, tls: tuple[Path, Path] | None = None):
        self.hub = Hub(Path(root))
        self.httpd = _Server(("127.0.0.1", port), make_handler(self.hub))
        self.port = self.httpd.server_address[1]
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.hub.scheme = "https"
        self.url = f"{self.hub.scheme}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    srv = HubServer(Path(a.root), a.port)
    print(f"serving {os.path.abspath(a.root)} at {srv.url}", flush=True)
    srv.httpd.serve_forever()


if __name__ == "__main__":
    main()
