"""A pyinfra inventory read the way pyinfra reads it, without connecting anywhere.

``pyinfra INVENTORY debug-inventory --json`` lists every host with its groups and its data
merged from host, group and group_data/ files, exactly as in a deploy. ``plan``, ``lock``
and the compliance checks read inventories through here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import Any

from llamahost.layout import REPO


class InventoryError(Exception):
    pass


def hosts(inventory: str) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(name, data, groups) of every host, in inventory order."""
    path = os.path.abspath(inventory)  # pyinfra runs in the repository
    argv = [sys.executable, "-m", "pyinfra", path, "debug-inventory", "--json"]
    p = subprocess.run(
        argv, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=120
    )
    if p.returncode != 0:
        raise InventoryError(f"{shlex.join(argv)} failed:\n{p.stderr[-3000:]}")
    try:
        listed = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise InventoryError(f"pyinfra printed no JSON: {p.stdout[:500]!r}") from None
    if not listed:
        raise InventoryError(f"{inventory} lists no host")
    return [(h["name"], h["data"], list(h.get("groups") or [])) for h in listed]
