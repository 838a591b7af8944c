"""llama.cpp: fetch the pinned source, build llama-server, switch `current` to it.

Layout under llama_cpp_prefix (llamahost.layout):
  src/llama.cpp-<commit>.tar.gz   the source archive (downloaded or uploaded)
  builds/<build id>/bin/          one directory per (commit, CMake arguments)
  current -> builds/<build id>    what the service runs

A build id names what went into a build, so a rerun with the same commit and flags finds
the build present and does nothing; a failed build never moves `current`.
"""

import shlex

from pyinfra.api.operation import OperationMeta
from pyinfra.context import host
from pyinfra.facts.files import File
from pyinfra.operations import files, server

from llamahost import layout
from llamahost.config import HostConfig
from llamahost.render import BUILD_TARGETS, build_id, cmake_args


def build(cfg: HostConfig, jobs: int, gpu_cmake_args: tuple[str, ...] = ()) -> OperationMeta:
    """Ensure the build for this commit and these flags is current; return the link op."""
    prefix = cfg.cpp_prefix
    archive = layout.cpp_archive(prefix, cfg.cpp_commit)
    cmake = cmake_args(cfg, gpu_cmake_args)
    build_root = layout.cpp_build_root(prefix, build_id(cfg.cpp_commit, cmake))

    files.directory(name="llama.cpp directories", path=f"{prefix}/src", mode="0755")
    files.directory(path=f"{prefix}/builds", mode="0755")
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
    files.put(
        name="Install the build script",
        src="files/llama-build.sh",
        dest=layout.BUILD_SCRIPT,
        mode="0755",
    )
    # The fact is read before the run: a build that exists is never redone.
    if not host.get_fact(File, path=f"{build_root}/bin/llama-server"):
        server.shell(
            name=f"Build llama-server ({cfg.cpp_commit[:12]}, {jobs} jobs)",
            commands=[
                shlex.join(
                    [layout.BUILD_SCRIPT, archive, build_root, str(jobs), *BUILD_TARGETS, *cmake]
                )
            ],
        )
    return files.link(
        name="Point llama.cpp `current` at the build",
        path=layout.cpp_current(prefix),
        target=build_root,
    )
