#!/usr/bin/python3
"""ExecStartPost of llama-server.service: wait until GET URL answers 200.

llama-server answers 503 while it loads the model and 200 once it can serve. systemd's
TimeoutStartSec bounds the wait; this script only polls. Exits non-zero if the server
answers something other than 200/503 (e.g. a crash-loop returns connection refused only
while starting, so refused connections are retried).
"""

import sys
import time
import urllib.error
import urllib.request


def main() -> int:
    url = sys.argv[1]
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
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


if __name__ == "__main__":
    sys.exit(main())
