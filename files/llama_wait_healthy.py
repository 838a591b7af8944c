#!/usr/bin/python3
"""ExecStartPost of llama-server.service: wait until GET URL answers 200.

llama-server answers 503 while it loads the model and 200 once it can serve. systemd's
TimeoutStartSec bounds the wait; this script polls, and gives up at once when the server
process is gone: systemd keeps a start waiting for its ExecStartPost even after the main
process died, so a model that crashes on load would otherwise hold the start (and the
deploy's `systemctl restart`) for the whole start timeout. systemd passes the main
process's id as $MAINPID. Exits non-zero if the server answers something other than
200/503, or exits before it answers 200 (connections refused while it starts are retried).
"""

import os
import sys
import time
import urllib.error
import urllib.request


def running(pid: int | None) -> bool:
    """Whether the main process still runs (unknown pid: assume it does)."""
    if pid is None:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def main() -> int:
    url = sys.argv[1]
    raw = os.environ.get("MAINPID", "")
    pid = int(raw) if raw.isdigit() and int(raw) > 0 else None
    started = time.monotonic()
    delay = 0.2
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    print(f"{url}: 200, ready", flush=True)
                    return 0
        except urllib.error.HTTPError as e:
            if e.code != 503:
                print(f"{url}: unexpected HTTP {e.code}", file=sys.stderr, flush=True)
                return 1
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        if not running(pid):
            waited = time.monotonic() - started
            print(
                f"llama-server (pid {pid}) exited after {waited:.1f}s, before {url} answered"
                " 200: see its last lines above (journalctl -u llama-server)",
                file=sys.stderr,
                flush=True,
            )
            return 1
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


if __name__ == "__main__":
    sys.exit(main())
