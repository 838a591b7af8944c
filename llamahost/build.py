"""llama.cpp builds: what identifies one, who in a fleet compiles it, how a finished build
travels (archive naming and verification), and the controller's cache of them.

A build id names everything that decides whether a built tree runs on a host: the commit,
the targets, the CMake arguments (static or shared, CUDA on or off, the CUDA compiler's
version directory and the architectures are all among them on the GPU path) and the
platform (distribution, release and CPU architecture: the binary links against that
release's libc, libstdc++ and libgomp). Two hosts with the same id can run each other's
build, so one of them compiles and the controller copies the result to the rest.

Pure: no pyinfra. The tasks (tasks/llama_cpp.py), `python -m llamahost builds` and the
tests use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamahost import layout
from llamahost.config import HostConfig
from llamahost.gpu import toolkit_package

# The targets the service needs; nothing else is compiled.
BUILD_TARGETS = ("llama-server",)

# A static build: one self-contained binary, swapped in with one symlink.
BASE_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    # No -march=native: the binary must not depend on the CPU of the build's moment, nor
    # on the CPU of the host that happened to compile it for the fleet.
    "-DGGML_NATIVE=OFF",
)

ARCHIVE_SUFFIX = ".tar.gz"
SHA256_SUFFIX = ".sha256"
INFO_SUFFIX = ".json"
_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]{12}")
_SHA256_LINE = re.compile(r"([0-9a-f]{64})  (\S+)\n?")


class BadArchive(Exception):
    """A cached or received build archive that must not be used."""


def cmake_args(cfg: HostConfig, extra: tuple[str, ...] = ()) -> list[str]:
    return [*BASE_CMAKE_ARGS, *extra, *cfg.cpp_cmake_args]


def platform(dist_id: str, version_id: str, deb_arch: str) -> str:
    """Where a build runs: e.g. `debian-12-amd64`."""
    return f"{dist_id}-{version_id}-{deb_arch}"


def build_id(commit: str, cmake: list[str], platform: str) -> str:
    """Names a build by what went into it and where it runs: a new commit, new flags or
    another distribution, release or architecture → a new build."""
    text = "\n".join([commit, platform, *BUILD_TARGETS, *cmake])
    return f"{commit[:12]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def info(commit: str, cmake: list[str], platform: str, built_by: str) -> dict[str, Any]:
    """What the cache records beside an archive (shown by `python -m llamahost builds`)."""
    return {
        "build_id": build_id(commit, cmake, platform),
        "commit": commit,
        "platform": platform,
        "cmake_args": cmake,
        "targets": list(BUILD_TARGETS),
        "built_by": built_by,
    }


def cuda_packages(cuda: str, compiles: bool) -> list[str]:
    """What a GPU host needs from NVIDIA's CUDA repository for its build: the toolkit
    (`cuda-toolkit-13-0`: nvcc, headers) where it compiles, only the CUDA runtime and
    cuBLAS where it receives: `cuda-cudart-13-0` (libcudart.so.13) and `libcublas-13-0`
    (libcublas.so.13, libcublasLt.so.13), the libraries the CUDA build links besides
    libcuda, which comes with the driver (docs/build.md). The names are the same in
    NVIDIA's debian12, ubuntu2204 and ubuntu2404 repositories."""
    if compiles:
        return [toolkit_package(cuda)]
    v = cuda.replace(".", "-")
    return [f"cuda-cudart-{v}", f"libcublas-{v}"]


# ---------------------------------------------------------------- who compiles
@dataclass(frozen=True)
class Role:
    """One host's part for its build id in this run."""

    compiles: bool  # it builds from source (the first host of its id that needs it)
    provides: bool  # it packs its build and the controller fetches it into the cache
    receives: bool  # the controller pushes the cached archive to it

    @property
    def label(self) -> str:
        return {
            (True, True, False): "compiles it and the controller caches it",
            (False, True, False): "has it; the controller caches it",
            (False, False, True): "receives it from the controller's cache",
        }.get((self.compiles, self.provides, self.receives), "has it")


def role(
    providers: MutableMapping[str, str], bid: str, host: str, present: bool, cached: bool
) -> Role:
    """Decide, while planning, what `host` does for build `bid`.

    `providers` maps each build id to the host that puts it into the cache in this run; it
    is shared by every host of the run. pyinfra plans hosts concurrently, but this
    function does no I/O, so exactly one host claims each id: the first whose planning
    gets here compiles an uncached id (or provides it, if it has it), every later one
    receives it. `present`: the host
    already has the build; `cached`: the controller's cache has its archive.
    """
    if cached:
        return Role(compiles=False, provides=False, receives=not present)
    if bid not in providers:
        providers[bid] = host
        return Role(compiles=not present, provides=True, receives=False)
    if present:
        return Role(compiles=False, provides=False, receives=False)
    return Role(compiles=False, provides=False, receives=True)


# ---------------------------------------------------------------- archives
def archive_name(bid: str) -> str:
    return f"llama.cpp-{bid}{ARCHIVE_SUFFIX}"


def sha256_line(digest: str, name: str) -> str:
    """sha256sum's format, so `sha256sum -c` reads it."""
    return f"{digest}  {name}\n"


def parse_sha256(text: str, name: str) -> str:
    m = _SHA256_LINE.fullmatch(text)
    if not m or m.group(2) != name:
        raise BadArchive(f"{name}: its sha256 record is not `<sha256>  {name}`")
    return m.group(1)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """One cached build on the controller: `<cache>/llama.cpp-<id>.tar.gz` with its
    `.sha256` and `.json` beside it."""

    cache: Path
    build_id: str

    @property
    def archive(self) -> Path:
        return self.cache / archive_name(self.build_id)

    @property
    def sha256_file(self) -> Path:
        return self.archive.with_name(self.archive.name + SHA256_SUFFIX)

    @property
    def info_file(self) -> Path:
        return self.cache / f"llama.cpp-{self.build_id}{INFO_SUFFIX}"

    def complete(self) -> bool:
        """Archive and record both there: the fetch writes the record last."""
        return self.archive.is_file() and self.sha256_file.is_file()

    def expected_sha256(self) -> str:
        return parse_sha256(self.sha256_file.read_text(), self.archive.name)

    def info(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.info_file.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def used(self) -> float:
        """When a run last fetched or pushed it (the record's mtime)."""
        return self.sha256_file.stat().st_mtime

    def files(self) -> list[Path]:
        return [self.archive, self.sha256_file, self.info_file]


def cache_dir(setting: str | None) -> Path:
    """The controller's cache: the setting (relative: to the repository) or .cache/builds."""
    if setting is None:
        return layout.BUILD_CACHE
    p = Path(setting)
    return p if p.is_absolute() else layout.REPO / p


def cache_entries(cache: Path) -> list[CacheEntry]:
    """Complete cached builds, most recently used first."""
    if not cache.is_dir():
        return []
    found = []
    for p in cache.glob(f"llama.cpp-*{ARCHIVE_SUFFIX}"):
        bid = p.name[len("llama.cpp-") : -len(ARCHIVE_SUFFIX)]
        entry = CacheEntry(cache, bid)
        if _ID.fullmatch(bid) and entry.complete():
            found.append(entry)
    return sorted(found, key=lambda e: (-e.used(), e.build_id))


def cache_to_prune(entries: list[CacheEntry], keep: int) -> list[CacheEntry]:
    """All but the `keep` most recently used (entries as cache_entries orders them)."""
    return entries[keep:]


# ---------------------------------------------------------------- builds on a host
def host_builds_to_prune(present: Iterable[str], keep: Iterable[str | None]) -> list[str]:
    """Build directories to delete on a host: every one but those kept (`current` after
    this run and `previous`, the rollback)."""
    kept = set(keep)
    return sorted(b for b in set(present) if b not in kept)
