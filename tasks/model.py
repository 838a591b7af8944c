"""The model: pre-downloaded with huggingface_hub, in a venv on the host.

The file lives at a path made of repository, revision and file name, so a change of any of
them is a new path (a new unit, a restart) and an existing, verified path is never
downloaded again. The fetch script (files/llama_fetch_model.py) resumes an interrupted
transfer, checks free space first, and promotes only a verified file.

The download starts early and runs in the background (a transient systemd unit) while the
driver and llama.cpp build; the service start waits for it (start() and finish()).
"""

import shlex
from dataclasses import dataclass
from datetime import timezone
from typing import Any

from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operation import OperationMeta
from pyinfra.context import host
from pyinfra.facts.files import File, FileContents
from pyinfra.operations import files, pip, server

from llamahost import controller_fetch, hub, layout
from llamahost.config import HostConfig
from llamahost.layout import DOWNLOAD_LOG, FETCH_SCRIPT, TOKEN_FILE
from tasks import secret


def verified_intact(cfg: HostConfig, stat: Any) -> bool:
    if not stat:
        return False
    sidecar = host.get_fact(FileContents, path=layout.model_sidecar(cfg.model_path)) or []
    if len(sidecar) < 2:
        return False
    digest, stamp = sidecar[0].strip(), sidecar[1].split()
    if cfg.model_sha256 is not None and digest != cfg.model_sha256:
        return False
    mtime = int(stat["mtime"].replace(tzinfo=timezone.utc).timestamp())
    return bool(stamp == [f"size={stat['size']}", f"mtime={mtime}"])


@dataclass(frozen=True)
class Download:
    """What start() planned, for finish() to complete."""

    cfg: HostConfig
    argv: tuple[str, ...] | None  # the fetch script's command; None: nothing to download
    pushed: OperationMeta | None  # the controller route, completed by start()


def start(cfg: HostConfig) -> Download:
    """Plan the model: nothing when it is present and verified; otherwise its download,
    started in the background (llama_model_download_overlap) so that it runs while the
    driver and llama.cpp build, or the controller's push."""
    if cfg.model_source == "hub":
        pip.venv(name="huggingface_hub venv", path=cfg.hf_venv, python="python3")
        pip.packages(
            name=f"huggingface_hub {cfg.hf_hub_version}",
            packages=[f"huggingface_hub=={cfg.hf_hub_version}"],
            virtualenv=cfg.hf_venv,
        )
    files.put(
        name="Install the model fetch script",
        src="files/llama_fetch_model.py",
        dest=FETCH_SCRIPT,
        mode="0755",
    )
    # The service reads the models; nobody else needs to list them.
    files.directory(
        name="Model directory",
        path=cfg.model_dir,
        user="root",
        group=cfg.service_user,
        mode="0750",
    )
    # Present and verified, and not changed since (the fetch script writes the sidecar after
    # checking the sha256, with the size and mtime it checked): nothing to do. Otherwise the
    # fetch script verifies the file again and fetches it only if it is wrong.
    if verified_intact(cfg, host.get_fact(File, path=cfg.model_path)):
        return Download(cfg, None, None)
    if cfg.model_source == "controller":
        return Download(cfg, None, push_from_controller(cfg))
    files.directory(name="Download log directory", path=layout.LOG_DIR, mode="0750")
    argv = [
        *_fetch_command(cfg, f"{cfg.hf_venv}/bin/python"),
        "--margin-mib", str(cfg.model_disk_margin_mib),
        "--every", "30",
        "--log", DOWNLOAD_LOG,
    ]  # fmt: skip
    if cfg.model_sha256:
        argv += ["--sha256", cfg.model_sha256]
    if hub.token(cfg):
        argv += ["--token-file", TOKEN_FILE]
    download = Download(cfg, tuple(argv), None)
    if cfg.model_download_overlap:
        _launch(download)
    return download


def finish(download: Download) -> OperationMeta | None:
    """Wait for the download and verify it; return the operation that brought a new file."""
    if download.pushed or download.argv is None:
        return download.pushed
    if not download.cfg.model_download_overlap:
        _launch(download)
    # Again: if a reboot into the new driver killed the download, --wait starts it again.
    _place_token(download.cfg)
    return server.shell(
        name=f"{_title(download.cfg)}: wait for it and verify",
        commands=[shlex.join([*download.argv, "--wait"])],
        _env=hub.host_environment(download.cfg),
    )


def _launch(download: Download) -> None:
    """--start: repository, file, token and free space checked now (a clear error before
    anything is fetched); the transfer goes on in a transient unit."""
    assert download.argv is not None
    _place_token(download.cfg)
    server.shell(
        name=f"{_title(download.cfg)} (in the background; progress: {DOWNLOAD_LOG})",
        commands=[shlex.join([*download.argv, "--start"])],
        _env=hub.host_environment(download.cfg),
    )


def _fetch_command(cfg: HostConfig, python: str) -> list[str]:
    """The fetch script and the file it is about, before the route's own options."""
    return [
        python,
        FETCH_SCRIPT,
        "--repo", cfg.model_repo,
        "--file", cfg.model_file,
        "--revision", cfg.model_revision,
        "--dest", cfg.model_path,
        "--group", cfg.service_user,
    ]  # fmt: skip


def _title(cfg: HostConfig) -> str:
    return f"Download {cfg.model_repo}/{cfg.model_file}@{cfg.model_revision}"


def _place_token(cfg: HostConfig) -> None:
    """The token reaches the host as a root-only file that the fetch script reads and
    deletes: never on a command line (pyinfra's _env would put it there), in a unit, a log
    or pyinfra's output (not even with --diff or -vvv: tasks/secret.py), and never
    readable by the service user."""
    token = hub.token(cfg)
    if not token:
        return
    files.directory(
        name="Runtime directory", path=layout.RUNTIME_DIR, user="root", group="root", mode="0700"
    )
    secret.file(
        name="Hub token for this download",
        path=TOKEN_FILE,
        secret=secret.Secret(token),
        user="root",
        group="root",
        mode="0600",
    )


def push_from_controller(cfg: HostConfig) -> OperationMeta:
    """Hosts without internet: the controller's verified copy, pushed and checked again."""
    try:
        got = controller_fetch.fetch(cfg)
    except controller_fetch.ControllerFetchError as e:
        raise PyinfraError(f"host {host.name!r}: {e}") from None
    model_dir = layout.parent(cfg.model_path)
    pushed = f"{model_dir}/.partial/{cfg.model_file}.pushed"
    files.put(
        name=f"Push {cfg.model_file} from the controller ({got.size / (1 << 20):.1f} MiB)",
        src=got.path,
        dest=pushed,
        mode="0600",
    )
    # The system python: a host without internet has no huggingface_hub venv.
    argv = [
        *_fetch_command(cfg, "/usr/bin/python3"),
        "--from-file", pushed,
        "--sha256", got.sha256,
        "--size", str(got.size),
    ]  # fmt: skip
    return server.shell(
        name=f"Verify and promote the pushed {cfg.model_file}", commands=[shlex.join(argv)]
    )
