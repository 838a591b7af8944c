"""The secret writer (llamahost.secret.writer), run here with a real shell: the file is
private from its first byte, complete or absent, and nothing is printed. Fast: no host.

The end-to-end proof through pyinfra, in every output mode, is tests/e2e/test_secrets.py.
"""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from llamahost.secret import Secret, digest_command, writer

VALUE = "s3cret-" + os.urandom(8).hex()
GROUP = grp.getgrgid(os.getgid()).gr_name
OWNER = str(os.getuid())  # chown to oneself: runs as any user


def _run(cmd: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", cmd], input=stdin, capture_output=True, text=True)


def test_writes_exactly_the_secret_with_the_mode_and_prints_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "key"
    s = Secret(VALUE)
    r = _run(writer(str(dest), OWNER, GROUP, "0640"), s.reveal())
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == ("", "")
    assert dest.read_text() == VALUE + "\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["key"]  # no temporary file left
    digest = _run(digest_command(str(dest)), "").stdout.split()[0]
    assert digest == s.digest  # what planning compares: the file's bytes, hashed
    assert VALUE not in writer(str(dest), OWNER, GROUP, "0640")  # not on the command line


def test_the_bytes_are_never_readable_by_others_even_while_written(tmp_path: Path) -> None:
    dest = tmp_path / "key"
    dest.write_text("old\n")
    os.chmod(dest, 0o644)  # a file left too open: replaced, not written into
    p = subprocess.Popen(
        ["sh", "-c", writer(str(dest), OWNER, GROUP, "0640")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdin is not None
    p.stdin.write(VALUE[:5])
    p.stdin.flush()
    deadline = time.monotonic() + 10
    while not [f for f in os.listdir(tmp_path) if f != "key"]:
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.01)
    (tmp,) = [f for f in os.listdir(tmp_path) if f != "key"]
    assert tmp.startswith(".key.")
    assert stat.S_IMODE((tmp_path / tmp).stat().st_mode) == 0o600  # from the first byte
    assert dest.read_text() == "old\n"  # the old file stays whole until the rename
    p.stdin.write(VALUE[5:] + "\n")
    p.stdin.close()
    assert p.wait(10) == 0
    assert dest.read_text() == VALUE + "\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    dest = tmp_path / "key"
    dest.write_text("old\n")
    r = _run(writer(str(dest), OWNER, "no-such-group-xyz", "0640"), VALUE + "\n")
    assert r.returncode != 0
    assert VALUE not in r.stdout + r.stderr
    assert dest.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["key"]
    missing = _run(writer(str(tmp_path / "nodir" / "key"), OWNER, GROUP, "0600"), VALUE)
    assert missing.returncode != 0 and VALUE not in missing.stdout + missing.stderr


def test_a_secret_never_shows_in_repr_str_or_a_mask() -> None:
    s = Secret(VALUE)
    shown = [repr(s), str(s), f"{s}", repr([s]), repr({"secret": s})]
    assert not [text for text in shown if VALUE in text]
    assert s.mask(f"error: {VALUE} was echoed") == "error: <secret> was echoed"
    assert Secret(VALUE + "\n").reveal() == Secret(VALUE).reveal() == VALUE + "\n"


@pytest.mark.parametrize(
    ("path", "mode"), [("relative/key", "0600"), ("/etc/dir/", "0600"), ("/etc/k", "rw")]
)
def test_bad_paths_and_modes_are_refused(path: str, mode: str) -> None:
    with pytest.raises(ValueError):
        writer(path, "root", "root", mode)
