"""The llama.cpp build: the server runs the current build of the pinned commit."""

from __future__ import annotations

from typing import Any

from llamahost.layout import server_binary
from tests.compliance.live import Server


def test_runs_the_current_build_of_the_pinned_commit(server: Server, host: Any) -> None:
    """llama-server runs the current build of the pinned llama.cpp commit.

    /proc/<MainPID>/exe is `current`'s binary and `current` is a build of llama_cpp_commit
    that ran --version (README: a build is switched in only after it ran).
    """
    cfg = server.cfg
    running = host.check_output("readlink -f /proc/%s/exe", str(server.main_pid))
    current = host.check_output("readlink -f %s", server_binary(cfg.cpp_prefix))
    assert running == current, f"llama-server runs {running}, but current is {current}"
    build_dir = current.removesuffix("/bin/llama-server")
    assert build_dir.startswith(f"{cfg.cpp_prefix}/builds/{cfg.cpp_commit[:12]}-"), (
        f"current is {build_dir}, not a build of {cfg.cpp_commit}"
    )
    assert host.file(f"{build_dir}/logs/version.txt").contains("version:"), (
        f"{build_dir} has no version.txt: it never ran --version"
    )
