"""System packages the bring-up needs: a C/C++ toolchain, CMake, and Python venvs."""

from pyinfra.operations import apt

BUILD_PACKAGES = [
    "build-essential",
    "cmake",
    "curl",  # files.download on the host
    "ca-certificates",
    "python3",
    "python3-venv",  # the huggingface_hub venv
]


def install() -> None:
    apt.packages(
        name="Install build dependencies",
        packages=BUILD_PACKAGES,
        update=True,
        cache_time=24 * 3600,
        no_recommends=True,
    )
