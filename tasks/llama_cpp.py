"""llama.cpp: build llama-server once per build id in the fleet, copy it to every other host
of that id, switch `current` to it.

Layout under llama_cpp_prefix (llamahost.layout):
  src/llama.cpp-<commit>.tar.gz   the source archive (only where this host compiles)
  builds/<build id>/bin/          one directory per build id (llamahost.build)
  incoming/                       a build archive in transit (pack or push), then removed
  current -> builds/<build id>    what the service runs
  previous -> builds/<build id>   what `current` pointed at before: kept for a rollback

Who does what is decided while planning (llamahost.build.role): for an id the controller's
cache lacks, the first host whose planning reaches this step compiles it, then the
controller fetches its tree as an archive; every later host of that id receives the
archive instead. pyinfra runs each operation on every host before the next one, and an
operation all hosts run sits after the fetch and before the push, so the receivers wait
for the builder by construction. A build or a received tree becomes `current` only after
its binary ran.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from pyinfra import logger
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.command import StringCommand
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import State
from pyinfra.context import host
from pyinfra.facts.deb import DebArch
from pyinfra.facts.files import File, FindDirectories, Link
from pyinfra.operations import apt, files, python, server

from llamahost import build as builds
from llamahost import layout
from llamahost.config import HostConfig
from llamahost.distro import Distribution
from tasks import packages

# Per run: build id -> the host that puts it into the controller's cache.
_PROVIDERS: WeakKeyDictionary[State, dict[str, str]] = WeakKeyDictionary()
_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]{12}")


def build(
    cfg: HostConfig,
    dist: Distribution,
    jobs: int,
    gpu_cmake_args: tuple[str, ...] = (),
    check_devices: bool = False,
    cuda_version: str | None = None,
) -> OperationMeta:
    """Ensure this host's build is present and current; return the `current` link op.

    check_devices: a received tree must also list a CUDA device (a GPU host whose driver
    answers in this run). cuda_version: on the GPU path, the CUDA packages the build needs
    here (the toolkit only where this host compiles).
    """
    prefix = cfg.cpp_prefix
    cmake = builds.cmake_args(cfg, gpu_cmake_args)
    where = builds.platform(dist.id, dist.version_id, host.get_fact(DebArch) or "unknown")
    bid = builds.build_id(cfg.cpp_commit, cmake, where)
    root = layout.cpp_build_root(prefix, bid)
    cache = builds.cache_dir(cfg.cpp_build_cache)
    entry = builds.CacheEntry(cache, bid)
    # Facts are read before the run: a build that exists is never redone or re-received.
    present = bool(host.get_fact(File, path=f"{root}/bin/llama-server"))
    providers = _PROVIDERS.setdefault(host.state, {})
    part = builds.role(providers, bid, host.name, present, entry.complete())
    logger.info(f"{host.print_prefix}llama.cpp build {bid} ({where}): {part.label}")

    files.directory(name="llama.cpp directories", path=f"{prefix}/src", mode="0755")
    files.directory(path=layout.cpp_builds(prefix), mode="0755")
    files.put(
        name="Install the build script",
        src="files/llama-build.sh",
        dest=layout.BUILD_SCRIPT,
        mode="0755",
    )
    if cuda_version is not None and (part.compiles or part.receives):
        # The GPU stack (step 3) installs no CUDA package: the toolkit only where this
        # host compiles, the CUDA runtime and cuBLAS where it receives a built tree.
        cuda = builds.cuda_packages(cuda_version, part.compiles)
        what = "toolkit, to compile" if part.compiles else "runtime and cuBLAS, to run"
        apt.packages(
            name=f"CUDA {cuda_version} {what} llama.cpp ({', '.join(cuda)})",
            packages=cuda,
        )
    # 1. The builder compiles (the only host of its id with a compiler).
    if part.compiles:
        _compile(cfg, root, jobs, cmake)
    # 2. The controller fetches the finished tree into its cache.
    if part.provides:
        python.call(
            name=f"Fetch llama.cpp build {bid} into the controller's cache",
            function=_fetch,
            prefix=prefix,
            bid=bid,
            cache=str(cache),
            info=builds.info(cfg.cpp_commit, cmake, where, host.name),
        )
    # The join: pyinfra orders operations by merging each host's own sequence, so an
    # operation only the receivers run is not ordered after one only the builder runs.
    # Every host runs this one, the builder after its fetch and the receivers before
    # their push: no push can start before the fetch has finished.
    files.directory(
        name="llama.cpp incoming directory (after the fetch, before any push)",
        path=layout.parent(layout.cpp_incoming(prefix, "x")),
        mode="0700",
    )
    # 3. Every other host of the id receives it: verified, unpacked, run, then promoted.
    if part.receives:
        python.call(
            name=f"Receive llama.cpp build {bid} from the controller's cache",
            function=_push,
            prefix=prefix,
            bid=bid,
            cache=str(cache),
            builder=providers.get(bid, "an earlier run"),
            check_devices=check_devices,
        )
    link = files.link(
        name="Point llama.cpp `current` at the build",
        path=layout.cpp_current(prefix),
        target=root,
    )
    _keep_previous_and_prune(cfg, bid)
    return link


def _compile(cfg: HostConfig, root: str, jobs: int, cmake: list[str]) -> None:
    """Build dependencies, the source archive and the build, on the builder only."""
    prefix = cfg.cpp_prefix
    archive = layout.cpp_archive(prefix, cfg.cpp_commit)
    packages.build_tools()
    if cfg.cpp_source == "archive":
        assert cfg.cpp_archive is not None  # checked by the config
        files.put(
            name="Upload the llama.cpp source archive",
            src=cfg.cpp_archive,
            dest=archive,
            mode="0644",
        )
    else:
        files.download(
            name="Download the llama.cpp source archive",
            src=cfg.cpp_source_url.replace("{commit}", cfg.cpp_commit),
            dest=archive,
            sha256sum=cfg.cpp_archive_sha256,
            mode="0644",
        )
    server.shell(
        name=f"Build llama-server ({cfg.cpp_commit[:12]}, {jobs} jobs)",
        commands=[
            shlex.join(
                [
                    layout.BUILD_SCRIPT,
                    "build",
                    archive,
                    root,
                    str(jobs),
                    host.name,
                    *builds.BUILD_TARGETS,
                    *cmake,
                ]
            )
        ],
    )


def _keep_previous_and_prune(cfg: HostConfig, bid: str) -> None:
    """`previous` names what `current` pointed at before it moves; with
    llama_cpp_prune_builds every other build directory goes. Planned from facts read
    before the run, so a rerun plans nothing."""
    prefix = cfg.cpp_prefix
    before = _link_id(host.get_fact(Link, path=layout.cpp_current(prefix)))
    previous = _link_id(host.get_fact(Link, path=layout.cpp_previous(prefix)))
    if before is not None and before != bid:
        previous = before
        files.link(
            name="Keep the build `current` pointed at as llama.cpp `previous`",
            path=layout.cpp_previous(prefix),
            target=layout.cpp_build_root(prefix, before),
        )
    if not cfg.cpp_prune_builds:
        return
    found = host.get_fact(FindDirectories, path=layout.cpp_builds(prefix), maxdepth=1) or []
    present = [os.path.basename(p) for p in found if _ID.fullmatch(os.path.basename(p))]
    old = builds.host_builds_to_prune(present, [bid, previous])
    if old:
        server.shell(
            name=f"Remove old llama.cpp builds ({', '.join(old)})",
            commands=[shlex.join(["rm", "-rf", *(layout.cpp_build_root(prefix, b) for b in old)])],
        )


def _link_id(fact: Any) -> str | None:
    if not fact or not fact.get("link_target"):
        return None
    name = os.path.basename(str(fact["link_target"]).rstrip("/"))
    return name if _ID.fullmatch(name) else None


# ---------------------------------------------------------------- at execution time
def _connector_args(state: State, target: Host) -> dict[str, Any]:
    """sudo and the like, as the host's data asks, for commands a callback runs itself."""
    arguments, _ = pop_global_arguments(state, target, {})
    return {k: v for k, v in arguments.items() if k in CONNECTOR_ARGUMENT_KEYS}


def _fail(host: Host, message: str) -> bool:
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


def _fetch(
    state: State, host: Host, prefix: str, bid: str, cache: str, info: dict[str, Any]
) -> bool:
    """Pack the build on the host, copy it to the controller, check the copy's sha256
    against the host's and file it in the cache: archive, info, then the sha256 record
    last (an entry without its record is incomplete and never pushed)."""
    args = _connector_args(state, host)
    name = builds.archive_name(bid)
    remote = layout.cpp_incoming(prefix, name)
    root = layout.cpp_build_root(prefix, bid)
    ok, out = host.run_shell_command(
        StringCommand(layout.BUILD_SCRIPT, "pack", root, remote), **args
    )
    lines = out.stdout_lines
    if not ok or not lines or not re.fullmatch(r"[0-9a-f]{64}", lines[-1].strip()):
        return _fail(host, f"could not pack build {bid}: {' '.join(out.stderr_lines)[-2000:]}")
    digest = lines[-1].strip()
    entry = builds.CacheEntry(Path(cache), bid)
    entry.cache.mkdir(parents=True, exist_ok=True)
    partial = entry.archive.with_name(f"{name}.partial-{os.getpid()}-{host.name}")
    try:
        if not host.get_file(remote, str(partial), **args):
            return _fail(host, f"could not copy build {bid} to the controller")
        got = builds.file_sha256(partial)
        if got != digest:
            return _fail(host, f"build {bid} arrived with sha256 {got}, the host has {digest}")
        entry.info_file.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(partial, entry.archive)
        record = entry.sha256_file.with_name(entry.sha256_file.name + ".partial")
        record.write_text(builds.sha256_line(digest, name))
        os.replace(record, entry.sha256_file)
    finally:
        partial.unlink(missing_ok=True)
        host.run_shell_command(StringCommand("rm", "-f", remote), **args)
    return True


def _push(
    state: State,
    host: Host,
    prefix: str,
    bid: str,
    cache: str,
    builder: str,
    check_devices: bool,
) -> bool:
    """Copy the cached archive to the host and let the build script verify (sha256),
    unpack, run and promote it; anything wrong leaves no build directory behind."""
    args = _connector_args(state, host)
    entry = builds.CacheEntry(Path(cache), bid)
    if not entry.complete():
        return _fail(
            host, f"no archive of build {bid} in {cache}: its builder ({builder}) did not finish"
        )
    try:
        expected = entry.expected_sha256()
    except builds.BadArchive as e:
        return _fail(host, f"build {bid} refused: {e}")
    remote = layout.cpp_incoming(prefix, entry.archive.name)
    if not host.put_file(str(entry.archive), remote, **args):
        return _fail(host, f"could not copy build {bid} to the host")
    command = [layout.BUILD_SCRIPT, "receive", remote, expected, layout.cpp_build_root(prefix, bid)]
    command += ["--list-devices"] if check_devices else []
    ok, out = host.run_shell_command(StringCommand(*command), **args)
    if not ok:
        why = " ".join(out.stderr_lines).strip()[-2000:]
        return _fail(host, f"build {bid} refused, `current` left alone: {why}")
    os.utime(entry.sha256_file)  # used now: `builds prune` keeps the recently used
    return True
