"""Secrets onto hosts without pyinfra printing them, in any mode (issue 15).

``files.put`` prints what it writes under ``--diff`` (and ``--dry --diff``), and with
``_sudo`` uploads through ``/tmp``, world-readable for a moment. Here instead:

* planning reads a sha256 of the file (a fact, printed at -vvv: a hash, never the bytes)
  and plans a write only when it differs, so a rerun changes nothing and the operation
  reports a change exactly when the content changed (the service restarts on it);
* the write runs when the run executes, as a Python callback: the content is the standard
  input of one shell command (llamahost.secret.writer) run with its output off, so it is
  on no command line, in no log, in no diff, and no temporary copy is made outside the
  destination's own directory, where the file is 0600 from its first byte.

Its failures are reported without the content (masked, should a tool ever echo it).
"""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import Any

from pyinfra import logger
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.facts import FactBase
from pyinfra.api.host import Host
from pyinfra.api.operation import operation
from pyinfra.api.state import State
from pyinfra.context import host

from llamahost.checks import API_KEY_RE
from llamahost.secret import Secret, digest_command, writer

_API_KEY = re.compile(API_KEY_RE)

__all__ = ["Secret", "SecretDigest", "connector_args", "file", "read_api_key", "write"]


class SecretDigest(FactBase[str | None]):
    """sha256 of a file's bytes; None when there is no file. Never the bytes themselves."""

    def command(self, path: str) -> str:
        return digest_command(path)

    def process(self, output: list[str]) -> str | None:
        return output[0].split()[0] if output else None


def read_api_key(state: State, host_name: str, path: str) -> str:
    """Runs while a run executes: the API key in ``path`` on another host of the inventory
    (e.g. one the bring-up generated there), read over that host's connection with output
    off and checked for the key's shape. Used by the monitoring and the gateway hosts."""
    other = state.inventory.get_host(host_name)
    if not other.connected:
        other.connect(reason="to read its API key", raise_exceptions=True)
    ok, out = other.run_shell_command(
        StringCommand("cat", "--", path),
        print_output=False,
        print_input=state.print_input,  # the command, which holds no secret
        **connector_args(state, other),
    )
    key = "".join(out.stdout_lines).strip() if ok else ""
    if not _API_KEY.fullmatch(key):
        raise PyinfraError(f"{host_name}: could not read an API key from {path}")
    return key


def connector_args(state: State, target: Host) -> dict[str, Any]:
    """The connector arguments (sudo and the like) that target's data and the command line
    ask for, for a command a callback runs itself."""
    arguments, _ = pop_global_arguments(state, target, {})
    return {k: v for k, v in arguments.items() if k in CONNECTOR_ARGUMENT_KEYS}


@operation()
def file(
    path: str, secret: Secret, user: str, group: str, mode: str
) -> Generator[FunctionCommand, None, None]:
    """``secret`` in ``path``, ``user:group`` and ``mode`` from the first byte; written only
    when the file's sha256 differs (checked while planning and again as the run executes).
    The directory must exist. The content is never printed, whatever the run's flags."""
    if host.get_fact(SecretDigest, path=path) == secret.digest:
        host.noop(f"{path} holds it already")
        return
    yield FunctionCommand(
        write, (), {"path": path, "secret": secret, "user": user, "group": group, "mode": mode}
    )


def write(
    state: State, host: Host, path: str, secret: Secret, user: str, group: str, mode: str
) -> bool:
    """Runs while the run executes: the secret as standard input, output off. Also used
    for a key read from another host (tasks/monitoring.py)."""
    ok, out = host.run_shell_command(
        StringCommand(writer(path, user, group, mode)),
        print_output=False,
        print_input=state.print_input,  # the command, which holds no secret
        **{
            **connector_args(state, host),
            "_stdin": secret.reveal(),
            # A terminal would echo the standard input back into the output.
            "_get_pty": False,
        },
    )
    if not ok:
        why = secret.mask(" ".join(line.strip() for line in out.stderr_lines)) or "no message"
        host.log_styled(f"could not write {path}: {why}", fg="red", log_func=logger.error)
        return False
    return True
