"""System packages: what every host needs at run time, and the build tools that only the
host compiling llama.cpp for its build id installs (tasks/llama_cpp.py)."""

from pyinfra.operations import apt

RUNTIME_PACKAGES = [
    "curl",  # files.download on the host
    "ca-certificates",
    "python3",
    "python3-venv",  # the huggingface_hub venv
    # The static llama-server still links the compiler's OpenMP runtime dynamically
    # (ldd on a build; docs/build.md): a host that only receives a build needs it.
    "libgomp1",
]

BUILD_PACKAGES = ["build-essential", "cmake"]


def install() -> None:
    apt.packages(
        name="Install run-time dependencies",
        packages=RUNTIME_PACKAGES,
        update=True,
        cache_time=24 * 3600,
        no_recommends=True,
    )


def build_tools() -> None:
    """A C/C++ toolchain and CMake: planned only on the host that compiles."""
    apt.packages(
        name="Install build dependencies",
        packages=BUILD_PACKAGES,
        update=True,
        cache_time=24 * 3600,
        no_recommends=True,
    )
