"""Benchmark, not a test: a fresh host's bring-up with the download overlapping the build,
against the download after the build.

    python -m tests.bench.bringup [--download-s 240]

For each mode (`llama_model_download_overlap` false, then true) a fresh Debian 12 test host
is created and `pyinfra -y inventory/local.py deploy.py` brings it up from nothing: build
dependencies, the llama.cpp build, the model, the service. The local Hub endpoint serves the
tiny model's download at a rate that makes it last about --download-s seconds (a 26 GB
model at 100 MB/s takes 260 s, about this machine's CPU build), so the two modes differ
only in whether the download waits for the build. Prints each wall time, the build's, and
the ratio overlap/sequential measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.conftest import MODEL_FILE, MODEL_REPO, free_port
from tests.support import testhost
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive
from tests.support.tinygguf import write as write_tiny

REPO = Path(__file__).resolve().parents[2]


def bring_up(hub_root: Path, overlap: bool, download_s: float) -> tuple[float, float]:
    """Wall seconds of the first deploy of a fresh host, and of its llama.cpp build."""
    name = f"bench-{'overlap' if overlap else 'seq'}-{os.getpid()}"
    size = (hub_root / MODEL_REPO / MODEL_FILE).stat().st_size
    with HubServer(hub_root) as hub:
        hub.hub.full_rate = size / download_s
        host = testhost.create(name, free_port())
        try:
            env = {
                **os.environ,
                "LLAMAHOST_LOCAL_HOST": name,
                "LLAMAHOST_LOCAL_SSH_PORT": str(host.ssh_port),
                "LLAMAHOST_LOCAL_PORT": str(free_port()),
                "LLAMAHOST_LOCAL_HUB": hub.url,
            }
            argv = [sys.executable, "-m", "pyinfra", "-y", "inventory/local.py", "deploy.py",
                    "--data", f"llama_model_download_overlap={str(overlap).lower()}"]  # fmt: skip
            t0 = time.monotonic()
            subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True)
            wall = time.monotonic() - t0
            build = host.run("cat /opt/llama.cpp/current/logs/build-seconds").stdout
            return wall, float(build)
        finally:
            testhost.destroy(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--download-s", type=float, default=240.0)
    a = ap.parse_args()
    archive()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / MODEL_REPO).mkdir(parents=True)
        write_tiny(str(root / MODEL_REPO / MODEL_FILE))
        seq, seq_build = bring_up(root, False, a.download_s)
        print(f"sequential: {seq:.0f} s (llama.cpp build {seq_build:.0f} s)", flush=True)
        ovl, ovl_build = bring_up(root, True, a.download_s)
        print(f"overlap:    {ovl:.0f} s (llama.cpp build {ovl_build:.0f} s)", flush=True)
    print(
        f"download ~{a.download_s:.0f} s; bring-up overlap/sequential ratio {ovl / seq:.2f} "
        f"(time saved {seq - ovl:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
