"""The tokenizer aiperf counts with: a local directory, never the Hub at run time.

aiperf's ``builtin`` tokenizer downloads data when it runs and fails offline, and its
offline mode (``HF_HUB_OFFLINE``) rejects a plain directory; a directory given as
``tokenizer.name`` works. So the Seed-OSS tokenizer files are fetched once, through the
same rule as the model (llamahost.hub: the host's mirror on the hub route, the controller's
own ``HF_ENDPOINT`` on the controller route, ``llama_hf_token`` else ``HF_TOKEN``), pinned
to a commit, into ``<cache>/tokenizers/<owner>--<repo>/<commit>/``, and reused from there.

The revision is resolved to a commit on the first fetch and that commit is written to
``<cache>/tokenizers/<owner>--<repo>/pinned``; later runs use the pinned commit and never
ask the Hub again. ``--tokenizer DIR`` bypasses all of this (the tests pass the tiny
model's).
"""

from __future__ import annotations

from pathlib import Path

from llamahost import hub
from llamahost.config import HostConfig

# The GGUF repository has no tokenizer.json: the original model's repository has.
TOKENIZER_REPO = "ByteDance-Seed/Seed-OSS-36B-Instruct"
TOKENIZER_REVISION = "main"
FILES = ("tokenizer.json", "tokenizer_config.json")


class TokenizerError(Exception):
    pass


def repo_dir(cache: Path, repo: str = TOKENIZER_REPO) -> Path:
    return cache / "tokenizers" / repo.replace("/", "--")


def pinned(cache: Path, repo: str = TOKENIZER_REPO) -> Path | None:
    """The pinned copy, when a previous run fetched it complete."""
    pin = repo_dir(cache, repo) / "pinned"
    if not pin.exists():
        return None
    d = repo_dir(cache, repo) / pin.read_text().strip()
    return d if all((d / f).is_file() for f in FILES) else None


def fetch(
    cfg: HostConfig,
    cache: Path,
    repo: str = TOKENIZER_REPO,
    revision: str = TOKENIZER_REVISION,
) -> Path:
    """The tokenizer directory, fetched under the Hub rule on the first call only."""
    have = pinned(cache, repo)
    if have is not None:
        return have
    from huggingface_hub import hf_hub_download

    try:
        commit = hub.api(cfg).repo_info(repo, revision=revision).sha
    except Exception as e:  # the Hub's errors are many; the message says which
        raise TokenizerError(
            f"cannot resolve {repo}@{revision} (endpoint {hub.endpoint(cfg) or 'default'}): "
            f"{e}; pass --tokenizer DIR with {', '.join(FILES)}"
        ) from None
    if not commit:
        raise TokenizerError(f"{repo}@{revision}: the Hub gave no commit")
    dest = repo_dir(cache, repo) / commit
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        hf_hub_download(
            repo,
            name,
            revision=commit,
            token=hub.token(cfg),
            endpoint=hub.endpoint(cfg),
            local_dir=dest,
        )
    (repo_dir(cache, repo) / "pinned").write_text(commit + "\n")
    return dest
