"""Which installed packages a change of kernel-module kind replaces, checked against the
package relations rather than asserted by name: over the modelled apt lists
(fixtures/apt-universe-ubuntu-24.04.modelled.Packages, whose relations are read from
Canonical's control data and recorded ``apt-cache show`` output, fixtures/README.md), the
Depends closure of what the plan installs for DKMS (``nvidia-headless-<b>-server[-open]``,
or the full ``nvidia-driver-<b>-server[-open]`` an image ships) and for precompiled modules
(the ABI's ``linux-modules-nvidia-*`` with ``nvidia-headless-no-dkms-*`` and the utilities).

What only DKMS's closure holds is purged on a move to precompiled modules, and the reverse;
what both hold is never purged for a change of kind (``nvidia-kernel-source-*`` is the case
an earlier name rule got wrong: apt refused the purge)."""

from __future__ import annotations

import re

import pytest

from llamahost.gpu.current import _replaced, is_driver_package
from tests.plan.aptsim import UNIVERSE, _stanzas

ABI = "6.14.0-1015-aws"


def _relations() -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """Package → its Depends as groups of alternatives; virtual name → a provider."""
    depends: dict[str, list[list[str]]] = {}
    provides: dict[str, str] = {}
    for name, block in _stanzas(UNIVERSE.read_text()).items():
        m = re.search(r"^Depends: (.*)$", block, re.M)
        groups = [
            [re.sub(r"\s*\(.*?\)", "", alt).strip() for alt in group.split("|")]
            for group in (m[1].split(",") if m else [])
        ]
        depends[name] = groups
        p = re.search(r"^Provides: (.*)$", block, re.M)
        for virtual in p[1].split(",") if p else []:
            provides.setdefault(re.sub(r"\s*\(.*?\)", "", virtual).strip(), name)
    return depends, provides


def closure(roots: list[str]) -> set[str]:
    depends, provides = _relations()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        name = name if name in depends else provides.get(name, name)
        if name in seen or name not in depends:
            continue  # seen, or outside the modelled driver (dkms, the kernel image)
        seen.add(name)
        for group in depends[name]:
            todo.append(next((a for a in group if a in depends or a in provides), group[0]))
    # The driver's packages: dkms itself (a tool other packages may use) is not one.
    return {n for n in seen if is_driver_package(n)}


@pytest.mark.parametrize("branch", ["550", "580", "590"])
@pytest.mark.parametrize("suffix", ["-server-open", "-server"])
@pytest.mark.parametrize("installed_dkms", ["headless", "full"])
def test_the_kind_of_module_decides_what_a_move_replaces_as_the_relations_say(
    branch: str, suffix: str, installed_dkms: str
) -> None:
    utils = f"nvidia-utils-{branch}-server"
    headless = f"nvidia-headless-{branch}{suffix}"
    root = headless if installed_dkms == "headless" else f"nvidia-driver-{branch}{suffix}"
    dkms_installed = closure([root, utils])  # a DKMS host, as the toolkit or an image left it
    dkms_target = closure([headless, utils])  # what the plan installs for DKMS
    precompiled = closure([
        f"linux-modules-nvidia-{branch}{suffix}-aws",
        f"linux-modules-nvidia-{branch}{suffix}-{ABI}",
        f"nvidia-headless-no-dkms-{branch}{suffix}",
        utils,
    ])  # fmt: skip
    assert f"nvidia-dkms-{branch}{suffix}" in dkms_installed
    assert f"linux-objects-nvidia-{branch}{suffix}-{ABI}" in precompiled
    assert f"linux-signatures-nvidia-{ABI}" in precompiled
    # The case apt refused when a name rule purged it: the precompiled path needs it too.
    assert f"nvidia-kernel-source-{branch}{suffix}" in dkms_installed & precompiled
    open_ = suffix.endswith("-open")

    def replaced(name: str, kind: str) -> bool:
        return _replaced(name, True, "canonical", branch, open_, kind)

    # DKMS -> precompiled: what the precompiled path does not need goes, the rest stays.
    for name in sorted(dkms_installed):
        assert replaced(name, "precompiled") == (name not in precompiled), name
    # precompiled -> DKMS: the same the other way.
    for name in sorted(precompiled):
        assert replaced(name, "dkms") == (name not in dkms_target), name
