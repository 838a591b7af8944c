"""Feed a planned apt transaction to apt's own resolver (``apt-get -s``) in a throwaway
root, over a modelled package universe and the fake host's dpkg state.

The universe (``fixtures/apt-universe-ubuntu-24.04.modelled.Packages``) carries the
Depends/Conflicts/Replaces/Provides of Canonical's nvidia-graphics-drivers -server
packages as Canonical's debian/control states them (fixtures/README.md cites the file and
says what is modelled and what is not) and NVIDIA's repository packages. The installed
state is the fake host's ``dpkg -l`` lines, turned into a dpkg status file with each
installed package's control fields from the universe and ``hold`` for ``hi`` lines. A plan
apt would refuse (a held package in the way, a conflict left unresolved) fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from llamahost import gpu
from tests.plan.fakehost import FIXTURES

UNIVERSE = FIXTURES / "apt-universe-ubuntu-24.04.modelled.Packages"


def _stanzas(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for block in text.strip().split("\n\n"):
        m = re.search(r"^Package: (\S+)$", block, re.M)
        if m:
            out.setdefault(m[1], block)  # the first: the installed version's relations
    return out


_RELATIONS = ("Architecture", "Depends", "Conflicts", "Replaces", "Provides")


def status_file(dpkg_lines: str, universe: str) -> str:
    """dpkg's status for the ``ii``/``hi`` lines, control fields from the universe."""
    known = _stanzas(universe)
    blocks = []
    for line in dpkg_lines.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] not in ("ii", "hi"):
            continue
        name, version = words[1].split(":")[0], words[2]
        want = "hold" if words[0] == "hi" else "install"
        fields = [f"Package: {name}", f"Status: {want} ok installed", f"Version: {version}"]
        # Relations for the driver's packages only: the base fixtures list a kernel's
        # metapackages without every package they pull in.
        if name in known and gpu.is_driver_package(name):
            for f in known[name].splitlines():
                if f.split(":")[0] in (
                    "Architecture",
                    "Depends",
                    "Conflicts",
                    "Replaces",
                    "Provides",
                ):
                    fields.append(f)
        else:
            fields.append("Architecture: amd64")
        fields.append(f"Description: {name}")
        blocks.append("\n".join(fields) + "\n")
    return "\n".join(blocks)


@dataclass(frozen=True)
class Simulation:
    rc: int
    output: str

    def acts(self, verb: str) -> list[str]:
        """Package names of ``Inst``, ``Remv`` or ``Purg`` lines."""
        return sorted(re.findall(rf"^{verb} (\S+)", self.output, re.M))

    def applied(self, dpkg_lines: str) -> str:
        """The ``dpkg -l`` lines of the host once apt has done what it simulated: the
        purged and removed packages gone, the installed ones there at the version apt
        chose (``Inst name [old] (version ...)``), in the fixtures' columns."""
        gone = set(self.acts("Purg")) | set(self.acts("Remv"))
        added = dict(re.findall(r"^Inst (\S+) (?:\[\S+\] )?\((\S+)", self.output, re.M))
        lines = []
        for line in dpkg_lines.splitlines(True):
            words = line.split()
            name = words[1].split(":")[0] if len(words) > 1 else ""
            if name in gone or name in added:
                continue
            lines.append(line)
        for name, version in sorted(added.items()):
            lines.append(f"ii  {name:<41} {version:<30} amd64        (applied)\n")
        return "".join(lines)


def simulate(root: Path, dpkg_lines: str, shell_command: str, extra: str = "") -> Simulation:
    """Run the ``apt-mark unhold`` and the ``apt-get install`` of a planned command as
    apt would, simulated (``-s``), in ``root``. ``extra``: more stanzas in the lists (a
    newer point release in the archive, say)."""
    universe = UNIVERSE.read_text() + ("\n" + extra.strip() + "\n" if extra else "")
    if root.exists():
        shutil.rmtree(root)
    for d in (
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg",
        "repo",
    ):
        (root / d).mkdir(parents=True)
    (root / "repo/Packages").write_text(universe)
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{root}/repo ./\n")
    status = status_file(dpkg_lines, universe)
    m = re.search(r"apt-mark unhold ([^&]+)&&", shell_command)
    for name in m[1].split() if m else []:
        status = re.sub(
            rf"^(Package: {re.escape(name)}\nStatus: )hold", r"\1install", status, flags=re.M
        )
    (root / "var/lib/dpkg/status").write_text(status)
    opts = [
        "-o", f"Dir={root}",
        "-o", f"Dir::State::status={root}/var/lib/dpkg/status",
        "-o", f"Dir::Etc::Parts={root}/etc/apt/apt.conf.d",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Architecture=amd64",
        "-o", "APT::Architectures::=amd64",
    ]  # fmt: skip
    subprocess.run(["apt-get", *opts, "-qq", "update"], check=True, capture_output=True)
    install = re.search(r"apt-get -y (?:-o \S+ )*install ([^;]+?)(?:;|$)", shell_command)
    assert install, shell_command
    args = install[1].split()
    run = subprocess.run(
        ["apt-get", *opts, "-s", "install", *args], capture_output=True, text=True, check=False
    )
    return Simulation(run.returncode, run.stdout + run.stderr)
