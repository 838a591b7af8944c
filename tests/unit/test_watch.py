"""python -m llamahost watch: a streamed request counts as ok only when its stream ends
with a finish reason; anything else a client would see counts as failed."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import requests

from llamahost import watch

FINISHED = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\ndata: [DONE]\n\n'  # noqa: E501
CUT = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'


class Handler(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, tuple[int, bytes]]] = {}
    seen_keys: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Handler.seen_keys.append(self.headers.get("Authorization", ""))
        status, body = Handler.answers[self.path.split("/v1/")[0]]
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_request_is_ok_only_with_a_finish_reason(server: str) -> None:
    Handler.answers = {"/ok": (200, FINISHED), "/cut": (200, CUT), "/busy": (503, b"{}")}
    s = requests.Session()
    assert watch.one(s, f"{server}/ok/v1/chat/completions", 5) is None
    assert watch.one(s, f"{server}/cut/v1/chat/completions", 5) == (
        "stream ended without a finish reason"
    )
    assert watch.one(s, f"{server}/busy/v1/chat/completions", 5) == "HTTP 503"
    assert watch.one(s, "http://127.0.0.1:1/v1/chat/completions", 5) == "ConnectionError"


def test_watch_counts_and_fails_when_a_request_failed(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "clients"
    keys.write_text("demo the-client-key-0123456789abcdef0123\n")
    Handler.answers = {"/ok": (200, FINISHED), "/busy": (503, b"{}")}
    Handler.seen_keys = []
    argv = ["--key-file", str(keys), "--workers", "2", "--seconds", "1.5"]
    assert watch.main([f"{server}/ok", *argv]) == 0
    out = capsys.readouterr().out
    assert "failed   0" in out and "watch: " in out and ", 0 failed" in out
    assert "the-client-key" not in out
    assert set(Handler.seen_keys) == {"Bearer the-client-key-0123456789abcdef0123"}
    assert watch.main([f"{server}/busy", *argv]) == 1
    assert "(HTTP 503: " in capsys.readouterr().out
