"""Benchmark, not a test: the fetch script's throughput against curl's, same file, same endpoint.

    python -m tests.bench.download [--mib 256] [--rounds 3] [--script OTHER_FETCH_SCRIPT]

Serves a random file from the local Hub endpoint and downloads it alternately with `curl`
and with files/llama_fetch_model.py (which also hashes and promotes it), each `--rounds`
times; prints the median seconds and the ratio fetch/curl measured in this one run.
--script compares another version of the script (`git show REV:files/llama_fetch_model.py`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.hubserver import HubServer

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--script", default=str(REPO / "files" / "llama_fetch_model.py"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hub"
        (root / "bench" / "m").mkdir(parents=True)
        with open(root / "bench" / "m" / "big.gguf", "wb") as out:
            for _ in range(a.mib):
                out.write(os.urandom(1 << 20))
        with HubServer(root) as hub:
            url = f"{hub.url}/bench/m/resolve/main/big.gguf"
            env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": f"{tmp}/hf"}
            curl, fetch = [], []
            for i in range(a.rounds):
                t0 = time.monotonic()
                subprocess.run(["curl", "-sSfo", f"{tmp}/c{i}", url], check=True)
                curl.append(time.monotonic() - t0)
                os.unlink(f"{tmp}/c{i}")
                t0 = time.monotonic()
                subprocess.run(
                    [sys.executable, a.script,
                     "--repo", "bench/m", "--file", "big.gguf", "--revision", "main",
                     "--dest", f"{tmp}/f{i}/big.gguf", "--margin-mib", "0", "--every", "3600"],
                    env=env, check=True, stdout=subprocess.DEVNULL,
                )  # fmt: skip
                fetch.append(time.monotonic() - t0)
                os.unlink(f"{tmp}/f{i}/big.gguf")
    c, f = statistics.median(curl), statistics.median(fetch)
    print(
        f"{a.mib} MiB, median of {a.rounds}: curl {c:.2f} s ({a.mib / c:.0f} MiB/s), "
        f"fetch {f:.2f} s ({a.mib / f:.0f} MiB/s, sha256 and promotion included); "
        f"fetch/curl time ratio {f / c:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
