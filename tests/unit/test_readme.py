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
