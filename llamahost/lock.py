"""The model lock: exactly which bytes every host serves.

`make lock INVENTORY=inventory/prod.py` resolves each host's model (repository, file or
quantisation tag, revision) through the Hub API to the file name, the revision's commit,
the size and the LFS sha256, reads the memory-relevant metadata from the GGUF header (range
requests, not the weights), and writes them to `<inventory>.lock.json`. Hosts then download
exactly that commit and verify that sha256; `plan` reads the shape from here offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from llamahost import hub
from llamahost.config import HostConfig
from llamahost.memory import ModelShape

VERSION = 1


class LockError(Exception):
    pass


def lock_path(inventory: str | os.PathLike[str]) -> Path:
    return Path(inventory).with_suffix(".lock.json")


def key(cfg: HostConfig) -> str:
    return f"{cfg.model_repo}/{cfg.model_file}@{cfg.model_revision}"


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        return {}
    data = json.loads(p.read_text())
    if data.get("version") != VERSION:
        raise LockError(f"{p}: unknown lock version {data.get('version')!r}")
    models: dict[str, Any] = data["models"]
    return models


def save(path: str | os.PathLike[str], models: dict[str, Any]) -> None:
    p = Path(path)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"version": VERSION, "models": models}, indent=2, sort_keys=True) + "\n"
    )
    tmp.replace(p)


def entry_for(cfg: HostConfig, models: dict[str, Any]) -> dict[str, Any] | None:
    e = models.get(key(cfg))
    return e if isinstance(e, dict) else None


def apply(cfg: HostConfig, entry: dict[str, Any]) -> HostConfig:
    """The host's configuration pinned to the locked file, commit and sha256 (a
    conflicting llama_model_sha256 is refused by llamahost.spec before this)."""
    return dataclasses.replace(
        cfg,
        model_file=entry["file"],
        model_revision=entry["commit"],
        model_sha256=entry["sha256"],
    )


_QUANT_TAG = re.compile(r"[A-Za-z0-9_]+")


def pick_file(files: list[str], wanted: str) -> str:
    """A file name as is, or a quantisation tag (the guide's `:Q5_K_XL`) → the one GGUF.

    unsloth names its dynamic quants `…-UD-<tag>.gguf`; a plain `…-<tag>.gguf` is taken
    when there is no UD file. Split files (`-00001-of-000NN`) are not supported here.
    """
    if wanted.endswith(".gguf"):
        if wanted not in files:
            raise LockError(f"no file {wanted} in the repository")
        return wanted
    tag = wanted.upper()
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    for suffix in (f"-UD-{tag}.GGUF", f"-{tag}.GGUF"):
        hits = [f for f in ggufs if f.upper().endswith(suffix)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise LockError(f"tag {wanted} matches several files: {', '.join(sorted(hits))}")
    raise LockError(f"no GGUF for tag {wanted}; files: {', '.join(sorted(ggufs)) or 'none'}")


def resolve(cfg: HostConfig) -> dict[str, Any]:
    """Ask the Hub what cfg's model is, exactly (llamahost.hub's token and endpoint)."""
    from huggingface_hub.hf_api import RepoFile

    from llamahost.gguf_header import read_url

    api = hub.api(cfg)
    info = api.model_info(cfg.model_repo, revision=cfg.model_revision)
    files = [s.rfilename for s in info.siblings or []]
    name = pick_file(files, cfg.model_file)
    commit = info.sha
    if not commit:
        raise LockError(f"{cfg.model_repo}@{cfg.model_revision}: the Hub gave no commit")
    (meta,) = api.get_paths_info(cfg.model_repo, [name], revision=commit)
    if not isinstance(meta, RepoFile) or meta.lfs is None:
        raise LockError(f"{name}: not an LFS file, no sha256 to pin")
    shape = ModelShape.from_header(
        read_url(hub.file_url(cfg, name, commit), headers=hub.auth_headers(cfg))
    )
    return {
        "repo": cfg.model_repo,
        "file": name,
        "revision_requested": cfg.model_revision,
        "commit": commit,
        "size": meta.size,
        "sha256": meta.lfs.sha256,
        "shape": shape.to_dict(),
    }
