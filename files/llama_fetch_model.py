"""Download one GGUF from the Hub (or HF_ENDPOINT) and promote it only once verified.

Runs on the host, in the venv that holds huggingface_hub. The file is downloaded into a
staging directory on the same filesystem as its destination, its size is checked against
the Hub's metadata and its sha256 against the expected one (given, or else the Hub's LFS
sha256), and only then is it renamed into place: a partial or wrong file is never served.
A token, when needed, comes from HF_TOKEN in the environment, never from the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.hf_api import RepoFile


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--revision", required=True)
    ap.add_argument("--dest", required=True, help="final path of the model file")
    ap.add_argument("--sha256", default=None, help="expected sha256 (default: the Hub's)")
    ap.add_argument("--group", default=None, help="group that may read the file")
    a = ap.parse_args()

    info = HfApi().get_paths_info(a.repo, [a.file], revision=a.revision)
    if not info:
        print(f"{a.repo}@{a.revision} has no file {a.file}", file=sys.stderr)
        return 2
    meta = info[0]
    if not isinstance(meta, RepoFile):
        print(f"{a.repo}@{a.revision}: {a.file} is a folder", file=sys.stderr)
        return 2
    expected = a.sha256 or (meta.lfs.sha256 if meta.lfs else None)

    dest_dir = os.path.dirname(a.dest)
    os.makedirs(dest_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=dest_dir)
    try:
        got = hf_hub_download(a.repo, a.file, revision=a.revision, local_dir=staging)
        size = os.path.getsize(got)
        if meta.size is not None and size != meta.size:
            print(f"size {size} != {meta.size} expected; not promoted", file=sys.stderr)
            return 3
        digest = sha256_of(got)
        if expected and digest != expected:
            print(f"sha256 {digest} != {expected} expected; not promoted", file=sys.stderr)
            return 3
        if a.group:
            shutil.chown(got, group=a.group)
        os.chmod(got, 0o640)
        # The sidecar says "verified, with this sha256". It is renamed after the model, so a
        # crash in between leaves a model without it, which a pinned deploy fetches again.
        with open(a.dest + ".sha256.tmp", "w") as f:
            f.write(digest + "\n")
        os.chmod(a.dest + ".sha256.tmp", 0o644)
        os.replace(got, a.dest)
        os.replace(a.dest + ".sha256.tmp", a.dest + ".sha256")
        print(f"{a.dest}: {size} bytes, sha256 {digest}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
