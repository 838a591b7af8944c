"""The distributions this toolkit supports, from /etc/os-release. Pure: no pyinfra here.

The deploy's preflight refuses any other distribution before a change on any host; the GPU
stack takes the ``Distribution`` it found (package names and NVIDIA's repository differ
per release).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass


class Unsupported(Exception):
    """A distribution or architecture this toolkit does not handle; names the host."""


@dataclass(frozen=True)
class Distribution:
    id: str  # os-release ID
    version_id: str
    codename: str
    cuda_repo: str  # directory of NVIDIA's CUDA repository

    @property
    def label(self) -> str:
        return f"{self.id.capitalize()} {self.version_id}"

    @property
    def ubuntu(self) -> bool:
        return self.id == "ubuntu"


SUPPORTED = (
    Distribution("ubuntu", "22.04", "jammy", "ubuntu2204"),
    Distribution("ubuntu", "24.04", "noble", "ubuntu2404"),
    Distribution("debian", "12", "bookworm", "debian12"),
)
# The kernel series each Ubuntu release ships (GA); a newer one is the HWE kernel.
UBUNTU_GA_KERNEL = {"22.04": "5.15", "24.04": "6.8"}
# dpkg --print-architecture → the CUDA repository's directory.
CUDA_REPO_ARCH = {"amd64": "x86_64"}


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): KEY=value lines, values optionally quoted in shell style."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        out[key] = words[0] if words else ""
    return out


def distribution(host: str, os_release: Mapping[str, str]) -> Distribution:
    for d in SUPPORTED:
        if os_release.get("ID") == d.id and os_release.get("VERSION_ID") == d.version_id:
            return d
    found = " ".join(f"{k}={os_release.get(k, '?')}" for k in ("ID", "VERSION_ID"))
    pretty = os_release.get("PRETTY_NAME")
    supported = ", ".join(d.label for d in SUPPORTED)
    raise Unsupported(
        f"host {host!r}: unsupported distribution in /etc/os-release: {found}"
        f"{f' ({pretty})' if pretty else ''}; supported: {supported}. Nothing was changed."
    )


def cuda_repo_arch(host: str, arch: str) -> str:
    """The CUDA repository's directory for ``dpkg --print-architecture``."""
    if arch not in CUDA_REPO_ARCH:
        raise Unsupported(
            f"host {host!r}: architecture {arch or '?'!r} (dpkg --print-architecture) has no "
            f"GPU stack here; supported: {', '.join(CUDA_REPO_ARCH)}. Nothing was changed."
        )
    return CUDA_REPO_ARCH[arch]
