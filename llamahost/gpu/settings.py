"""The GPU stack's settings: rows, their values, and the checks across them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamahost.checks import PREFIX, FieldError, Invalid, Setting, boolean, choice

# Minimum driver branch per CUDA major version (CUDA release notes: 12.x needs >= 525,
# 13.0 shipped with 580.65.06 and needs the 580 branch or newer).
CUDA_MIN_BRANCH = {"12": 525, "13": 580}


# ---------------------------------------------------------------- settings
def driver_branch(v: Any) -> str:
    # An int is what a YAML-minded inventory writes; the packages want the digits.
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not re.fullmatch(r"[1-9][0-9]{2,3}", v):
        raise Invalid('must be a driver branch in digits, e.g. "580" (not "580-server" or "r580")')
    return v


def cuda_version(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[1-9][0-9]?\.[0-9]{1,2}", v):
        raise Invalid('must be a CUDA major.minor version, e.g. "13.0"')
    return v


def cuda_architectures(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not re.fullmatch(r"[1-9][0-9]{1,2}(?:;[1-9][0-9]{1,2})*", v):
        raise Invalid(
            'must be CUDA architectures as numbers, e.g. "80" (A100) or "80;90"; '
            "unset: from the GPU's compute capability"
        )
    return v


GPU_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "gpu_stack",
        "auto",
        choice("auto", "on", "off"),
        "`auto`: driver, persistence mode, CUDA and a CUDA build when an NVIDIA GPU is found; "
        "`on`: also when none is found (staging, tests); `off`: never (CPU build).",
    ),
    Setting(
        "gpu_required",
        False,
        boolean,
        "Stop the run, before any change, when no NVIDIA GPU is found.",
    ),
    Setting(
        "driver_branch",
        "580",
        driver_branch,
        "NVIDIA driver branch, digits only (580: the long-term data-centre branch).",
    ),
    Setting(
        "driver_flavour",
        "open",
        choice("open", "proprietary"),
        "Kernel modules: `open` (NVIDIA's recommendation from Turing on) or `proprietary`.",
    ),
    Setting(
        "driver_source",
        "auto",
        choice("auto", "canonical", "nvidia"),
        "`auto`: on Ubuntu the source of the driver already installed (a host on NVIDIA's "
        "repository stays there), else Canonical's archive; NVIDIA's CUDA repository on "
        "Debian. `canonical` (Ubuntu only) or `nvidia` to choose (a move, one reboot).",
    ),
    Setting(
        "driver_kernel_modules",
        "auto",
        choice("auto", "precompiled", "dkms"),
        "`auto`: the kind the running driver of the pinned branch uses, else Canonical's "
        "precompiled signed modules where apt's lists have them for the running kernel's ABI, "
        "else DKMS (refused under Secure Boot unless it already runs); `precompiled` "
        "(Canonical only) or `dkms` to choose.",
    ),
    Setting(
        "cuda_version",
        "13.0",
        cuda_version,
        "CUDA toolkit for the build (`cuda-toolkit-13-0`, nvcc in /usr/local/cuda-13.0).",
    ),
    Setting(
        "cuda_architectures",
        None,
        cuda_architectures,
        "`CMAKE_CUDA_ARCHITECTURES`, e.g. `80`; unset: from the GPU's compute capability.",
    ),
    Setting(
        "gpu_reboot",
        True,
        boolean,
        "Allow the reboot a new driver or a loaded nouveau needs (never the controller).",
    ),
)


@dataclass(frozen=True)
class GpuSettings:
    gpu_stack: str
    gpu_required: bool
    driver_branch: str
    driver_flavour: str
    driver_source: str
    driver_kernel_modules: str
    cuda_version: str
    cuda_architectures: str | None
    gpu_reboot: bool


def cross_checks(values: Mapping[str, Any]) -> list[FieldError]:
    """Refusals that involve two GPU settings (the rows are checked one by one first)."""
    errors: list[FieldError] = []
    if values["gpu_required"] and values["gpu_stack"] == "off":
        errors.append(
            FieldError(PREFIX + "gpu_required", True, "cannot be true with llama_gpu_stack 'off'")
        )
    if values["driver_kernel_modules"] == "precompiled" and values["driver_source"] == "nvidia":
        errors.append(
            FieldError(
                PREFIX + "driver_kernel_modules",
                "precompiled",
                "precompiled modules come from Canonical: use 'dkms' or 'auto' with "
                "llama_driver_source 'nvidia'",
            )
        )
    need = CUDA_MIN_BRANCH.get(values["cuda_version"].split(".")[0])
    if need is not None and int(values["driver_branch"]) < need:
        errors.append(
            FieldError(
                PREFIX + "driver_branch",
                values["driver_branch"],
                f"CUDA {values['cuda_version']} needs driver branch {need} or newer",
            )
        )
    return errors
