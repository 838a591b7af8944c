"""The air-gapped route: the controller downloads the model once and pyinfra pushes it.

Runs on the machine that runs pyinfra, with huggingface_hub and its cache (HF_HOME), under
llamahost.hub's rule: the controller's own HF_ENDPOINT (llama_hf_endpoint is where hosts
would fetch from, which here they cannot), llama_hf_token else the controller's HF_TOKEN. A second
host, or a second run, takes the file from that cache. The sha256 is
checked here, before anything is pushed, and again on the host before it is promoted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from llamahost import hub
from llamahost.config import HostConfig


class ControllerFetchError(Exception):
    pass


@dataclass(frozen=True)
class Fetched:
    path: str
    size: int
    sha256: str


_DONE: dict[str, Fetched] = {}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(cfg: HostConfig) -> Fetched:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    key = f"{cfg.model_repo}/{cfg.model_file}@{cfg.model_revision}"
    if key in _DONE:
        return _DONE[key]
    infos = hub.api(cfg).get_paths_info(
        cfg.model_repo, [cfg.model_file], revision=cfg.model_revision
    )
    meta = infos[0] if infos else None
    if not isinstance(meta, RepoFile):
        raise ControllerFetchError(f"{key}: no such file on the Hub")
    expected = cfg.model_sha256 or (meta.lfs.sha256 if meta.lfs else None)
    path = hf_hub_download(
        cfg.model_repo,
        cfg.model_file,
        revision=cfg.model_revision,
        token=hub.token(cfg),
        endpoint=hub.endpoint(cfg),
    )
    digest = sha256_of(path)
    if expected and digest != expected:
        raise ControllerFetchError(
            f"{key}: the controller's copy {path} has sha256 {digest}, expected {expected}"
        )
    _DONE[key] = Fetched(path, os.path.getsize(path), digest)
    return _DONE[key]
