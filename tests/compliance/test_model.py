"""The model: the server serves the file the inventory pins, and its bytes are the pinned
bytes."""

from __future__ import annotations

from typing import Any

from huggingface_hub.hf_api import RepoFile

from llamahost import hub, layout
from llamahost.config import HostConfig
from tests.compliance.live import Server


def expected_sha256(cfg: HostConfig, host: Any) -> tuple[str, str]:
    """(sha256, where it came from), in this order:

    1. the inventory's pin: llama_model_sha256, or the model lock, which sets it;
    2. the sha256 recorded at download: the fetch script writes `<model>.sha256` after it
       verified the file against the Hub, so a file changed later no longer matches it;
    3. without either, what the Hub reports now for the revision, from the endpoint the
       deploy downloaded from (llama_hf_endpoint): a revision that moved shows as a mismatch.
    """
    if cfg.model_sha256:
        return cfg.model_sha256, "the pinned sha256 (llama_model_sha256 / model lock)"
    recorded = host.file(layout.model_sidecar(cfg.model_path))
    if recorded.exists:
        # First line: the sha256; the second records the size and mtime it was checked at.
        digest = recorded.content_string.splitlines()[0].strip()
        return digest, f"the sha256 recorded at download ({recorded.path})"
    endpoint = cfg.hf_endpoint or "https://huggingface.co"
    (info,) = hub.api(cfg).get_paths_info(
        cfg.model_repo, [cfg.model_file], revision=cfg.model_revision
    )
    assert isinstance(info, RepoFile) and info.lfs is not None, (
        f"{cfg.model_repo}/{cfg.model_file}@{cfg.model_revision}: no LFS sha256 on {endpoint}"
    )
    return info.lfs.sha256, f"the Hub's LFS sha256 ({endpoint}, revision {cfg.model_revision})"


def test_serves_the_pinned_model(server: Server, host: Any) -> None:
    """The served model's sha256 equals the pinned one.

    The running processes (each instance's) and their /props name the inventory's model
    path, the file is 0640
    root:<service group>, and it hashes to the pin (llama_model_sha256 or the lock), else
    to the sha256 recorded at download, else to the Hub's for the revision; the failure
    message says which.
    """
    cfg = server.cfg
    for s in server.each():
        assert s.arg("-m", "--model") == cfg.model_path, (
            f"{s.name} runs {s.arg('-m', '--model')}, the inventory's model is {cfg.model_path}"
        )
        props = s.get("/props")
        assert props.status == 200, f"{s.name}: /props answered {props.status}"
        assert props.json()["model_path"] == cfg.model_path, s.name
    f = host.file(cfg.model_path)
    assert (oct(f.mode), f.user, f.group) == (oct(0o640), "root", cfg.service_user), (
        f"{cfg.model_path} is {oct(f.mode)} {f.user}:{f.group}"
    )
    want, source = expected_sha256(cfg, host)
    got = host.check_output("sha256sum %s", cfg.model_path).split()[0]
    assert got == want, f"{cfg.model_path} has sha256 {got}; {source} is {want}"
