"""The one rule for reaching the Hub, used by plan, lock, the controller's download and,
through the token file and HF_ENDPOINT it is given, the host's download.

* Token: ``llama_hf_token``, else the controller's ``HF_TOKEN``, else none. It reaches a
  host only as a root-only file that the fetch script reads and deletes.
* Endpoint: where the bytes of this host's model come from. On the ``hub`` route that is
  the host's ``llama_hf_endpoint`` (a mirror), else huggingface.co. On the ``controller``
  route the controller downloads, so it is the controller's own ``HF_ENDPOINT`` (None:
  huggingface_hub reads it from the environment), never the hosts' mirror.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from llamahost.config import HostConfig

if TYPE_CHECKING:
    from huggingface_hub import HfApi


def token(cfg: HostConfig) -> str | None:
    return cfg.hf_token or os.environ.get("HF_TOKEN") or None


def endpoint(cfg: HostConfig) -> str | None:
    """The endpoint for huggingface_hub's ``endpoint=`` (None: its own default)."""
    return None if cfg.model_source == "controller" else cfg.hf_endpoint


def host_environment(cfg: HostConfig) -> dict[str, str]:
    """The environment of the fetch script on the host (never the token: see above)."""
    env = {"HF_HUB_DISABLE_TELEMETRY": "1"}
    if cfg.hf_endpoint:
        env["HF_ENDPOINT"] = cfg.hf_endpoint
    return env


def auth_headers(cfg: HostConfig) -> dict[str, str] | None:
    """For a plain HTTP range request (the GGUF header) through the same rule."""
    t = token(cfg)
    return {"Authorization": f"Bearer {t}"} if t else None


def api(cfg: HostConfig) -> HfApi:
    """An ``HfApi`` for this host's model under the rule."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(cfg), token=token(cfg))


def file_url(cfg: HostConfig, file: str, revision: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(cfg.model_repo, file, revision=revision, endpoint=endpoint(cfg))
