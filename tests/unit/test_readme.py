"""Every knob has a row in the README's variables table, and every row is a knob."""

from __future__ import annotations

import re
from pathlib import Path

from llamahost.spec import setting_keys

README = Path(__file__).resolve().parents[2] / "README.md"


def test_variables_table_matches_the_settings() -> None:
    text = README.read_text()
    section = text.split("## Variables", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(llama_[a-z0-9_]+)` \|", section, re.M)
    assert rows == setting_keys()


def test_the_readme_is_a_contract_of_at_most_20_kib() -> None:
    """What a user decides with, the depth in docs/; the variables table in its first half."""
    text = README.read_bytes()
    assert len(text) <= 20 * 1024
    assert text.index(b"\n## Variables\n") < len(text) // 2
