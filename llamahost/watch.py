"""python -m llamahost watch URL --key-file FILE [--cacert PEM] [--workers N] [--rate R]

A small streaming client that makes a change visible: N workers stream chat completions
through URL (a gateway, or one llama-server) one after the other, at most R requests a
second in all, and every second one line says how many requests finished and how many
failed in that second, with the totals. Run it while a deploy changes the fleet: behind a
gateway a rolling change fails none. The defaults (2 at a time, 5 a second) stay within a
client key's share on the demo (the gateway's in-flight limit `auto` is half the slots, its
rate limit 600 a minute): a 429 counts as failed, so a load past the key's limits shows
failures that no change caused.

A request counts as failed when the answer is not 200, the stream breaks, or it ends
without a finish reason. The key is read from FILE (its last word on the first line: a
client keys file ``name key`` or a bare key) and sent as a bearer token; it is never printed.
Stops after --seconds, or at Ctrl-C (or SIGTERM); exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

BODY = {
    "messages": [{"role": "user", "content": "Count to a thousand."}],
    "max_tokens": 200,
    "ignore_eos": True,  # llama-server: the whole length, so restarts find streams running
    "stream": True,
}


@dataclass
class Counts:
    ok: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, why: str | None) -> None:
        with self.lock:
            if why is None:
                self.ok += 1
            else:
                self.failed += 1
                self.reasons[why] = self.reasons.get(why, 0) + 1


def read_key(path: str) -> str:
    words = Path(path).read_text().splitlines()[0].split()
    if not words:
        raise SystemExit(f"{path}: no key on its first line")
    return words[-1]


def one(
    session: requests.Session, url: str, timeout: float, verify: str | bool = True
) -> str | None:
    """One streamed chat completion; None when it finished, else why it failed. ``verify``
    per request: a session's own is overridden by REQUESTS_CA_BUNDLE from the environment."""
    try:
        with session.post(url, json=BODY, stream=True, timeout=timeout, verify=verify) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            finish = None
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event: dict[str, Any] = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
            return None if finish else "stream ended without a finish reason"
    except (requests.RequestException, ValueError) as e:
        return type(e).__name__


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llamahost watch", description=__doc__.split("\n\n")[1]
    )
    p.add_argument("url", help="the gateway's (or a llama-server's) base URL")
    p.add_argument("--key-file", required=True, help="a file holding the client key")
    p.add_argument("--cacert", help="the certificate to trust (a self-signed gateway)")
    p.add_argument("--workers", type=int, default=2, help="requests at a time")
    p.add_argument("--rate", type=float, default=5.0, help="requests a second, at most")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    p.add_argument("--timeout", type=float, default=60, help="seconds for one request")
    a = p.parse_args(argv)
    url = a.url.rstrip("/") + "/v1/chat/completions"
    key = read_key(a.key_file)
    stop = threading.Event()
    counts = Counts()

    def worker() -> None:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {key}"
        gap = a.workers / a.rate if a.rate > 0 else 0.0
        while not stop.is_set():
            t0 = time.monotonic()
            counts.add(one(s, url, a.timeout, a.cacert or True))
            stop.wait(max(0.0, gap - (time.monotonic() - t0)))

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.workers)]
    for t in threads:
        t.start()
    start = time.monotonic()
    last_ok = last_failed = 0
    print(f"watching {url} with {a.workers} streaming clients (Ctrl-C stops)", flush=True)
    while not stop.wait(1.0):
        ok, failed = counts.ok, counts.failed
        print(f"{time.strftime('%H:%M:%S')}  ok {ok - last_ok:3d}  failed {failed - last_failed:3d}"
              f"   (total ok {ok}, failed {failed})", flush=True)  # fmt: skip
        last_ok, last_failed = ok, failed
        if a.seconds and time.monotonic() - start >= a.seconds:
            stop.set()
    for t in threads:
        t.join(timeout=a.timeout)
    why = ", ".join(f"{k}: {v}" for k, v in sorted(counts.reasons.items()))
    print(f"watch: {counts.ok} requests ok, {counts.failed} failed" + (f" ({why})" if why else ""))
    return 1 if counts.failed else 0
