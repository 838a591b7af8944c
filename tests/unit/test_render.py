from __future__ import annotations

import pytest

from llamahost.render import exec_line, systemd_quote


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("plain-1.0", "plain-1.0"),
        ("/var/lib/x.gguf", "/var/lib/x.gguf"),
        ("100%", '"100%%"'),
        ("$HOME", '"$$HOME"'),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
    ],
)
def test_systemd_quote(arg: str, quoted: str) -> None:
    assert systemd_quote(arg) == quoted


@pytest.mark.parametrize("arg", ["a\nb", "a\rb", "tab\there", "nul\x00"])
def test_systemd_quote_refuses_control_characters(arg: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        systemd_quote(arg)


def test_exec_line_is_one_line() -> None:
    line = exec_line("/opt/llama.cpp/current/bin/llama-server", ["-m", "/m.gguf", "--alias", "x"])
    assert line == "/opt/llama.cpp/current/bin/llama-server -m /m.gguf --alias x"
