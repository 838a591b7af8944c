"""The pinned llama.cpp source as a .tar.gz, from PyPI only (no GitHub here).

llama-cpp-python 0.3.36's sdist vendors llama.cpp at the pinned commit (docs/facts.md). This
repacks its vendor/llama.cpp as llama.cpp-<commit>/ into CACHE/llama.cpp-<commit>.tar.gz,
byte-for-byte reproducibly (sorted names, fixed owners and times), and prints the path.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from llamahost.config import PINNED_LLAMA_CPP_COMMIT
from tests.support.testhost import CACHE

SDIST = "llama-cpp-python==0.3.36"


def archive() -> Path:
    out = CACHE / f"llama.cpp-{PINNED_LLAMA_CPP_COMMIT}.tar.gz"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        t = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(t / "dl"),
                SDIST,
            ],
            check=True,
        )
        (sdist,) = (t / "dl").glob("*.tar.gz")
        subprocess.run(["tar", "-xzf", str(sdist), "-C", str(t)], check=True)
        (vendor,) = t.glob("llama_cpp_python-*/vendor/llama.cpp")
        top = f"llama.cpp-{PINNED_LLAMA_CPP_COMMIT}"
        vendor.rename(t / top)
        partial = out.with_suffix(".partial")
        tar = t / "src.tar"
        subprocess.run(
            [
                "tar",
                "--sort=name",
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-cf",
                str(tar),
                top,
            ],
            check=True,
            cwd=t,
        )
        with tar.open("rb") as src, gzip.GzipFile(partial, "wb", mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        partial.rename(out)
    return out


if __name__ == "__main__":
    print(archive())


SEED_OSS_TEMPLATE = "models/templates/ByteDance-Seed-OSS.jinja"


def seed_oss_template() -> str:
    """Seed-OSS's own chat template (tools, thinking budget), as llama.cpp's source at the
    pinned commit carries it for its template tests; read from the archive, not committed."""
    with tarfile.open(archive()) as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith("/" + SEED_OSS_TEMPLATE)]
        f = tar.extractfile(member)
        assert f is not None
        return f.read().decode()
