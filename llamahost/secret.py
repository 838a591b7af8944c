"""Secrets (the API key, the Hub token) on their way to a host. Pure: no pyinfra.

pyinfra prints a file's content when ``files.put`` creates or changes it under ``--diff``
(``--dry --diff`` included), a fact's output at ``-vvv``, and ``repr()`` of a Python
callback's arguments; with ``_sudo`` its uploads go through ``/tmp`` created by the login
user's SFTP server (mode 0644 under the usual umask) and a new destination gets that mode.
So a secret goes another way (tasks/secret.py): planning compares a sha256, never the
content; the content travels as the standard input of the command below, with output off,
and lands in a file that is private from its first byte.
"""

from __future__ import annotations

import hashlib
import re
import shlex

_MODE = re.compile(r"0?[0-7]{3}")


class Secret:
    """A value that never shows in ``repr()`` or ``str()`` (an operation's arguments, a
    traceback, a debug dump): only ``reveal()`` gives it, to the one call that sends it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        # pyinfra ends the standard input it sends with a newline; the file holds exactly
        # what is sent, so the digest compared while planning is the digest of the file.
        self._value = value if value.endswith("\n") else value + "\n"

    def reveal(self) -> str:
        return self._value

    @property
    def digest(self) -> str:
        return hashlib.sha256(self._value.encode()).hexdigest()

    def mask(self, text: str) -> str:
        """``text`` with the secret (and its first line) replaced, for an error message."""
        for value in {self._value, self._value.strip()}:
            if value:
                text = text.replace(value, "<secret>")
        return text

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__


def writer(path: str, user: str, group: str, mode: str) -> str:
    """A shell command that puts its standard input in ``path``, owned ``user:group`` with
    ``mode``, all or nothing.

    The bytes go to a temporary file that mktemp creates 0600 (under umask 077) in the
    destination's own directory, so they are never readable by anyone but root (or the
    sudo target), not even for an instant; the owner and mode are set before the rename,
    which replaces the old file at once. Nothing is printed: the secret is not on the
    command line, and the command echoes nothing.
    """
    if not path.startswith("/") or path.endswith("/"):
        raise ValueError(f"not an absolute file path: {path!r}")
    if not _MODE.fullmatch(mode):
        raise ValueError(f"not an octal mode: {mode!r}")
    directory, _, name = path.rpartition("/")
    dest = shlex.quote(path)
    template = shlex.quote(f"{directory}/.{name}.XXXXXX")
    steps = " && ".join(
        [
            'cat >"$tmp"',
            f'chown {shlex.quote(f"{user}:{group}")} "$tmp"',
            f'chmod {mode} "$tmp"',
            'sync "$tmp"',
            f'mv -f "$tmp" {dest}',
        ]
    )
    return (
        f"umask 077 && tmp=$(mktemp {template}) && "
        f'if {steps}; then :; else rm -f "$tmp"; exit 1; fi'
    )


def digest_command(path: str) -> str:
    """A file's sha256, never its bytes (facts are printed at -vvv); nothing when absent."""
    p = shlex.quote(path)
    return f"if [ -f {p} ]; then sha256sum <{p}; fi"
