"""Build identity, who compiles in a fleet, archive records, the cache and host pruning
(llamahost.build)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamahost import build as builds
from llamahost.spec import resolve_host

DEBIAN = builds.platform("debian", "12", "amd64")


def test_build_id_changes_with_commit_flags_and_platform_only() -> None:
    cfg = resolve_host("h", {}).cfg
    base = builds.build_id(cfg.cpp_commit, builds.cmake_args(cfg), DEBIAN)
    assert base == builds.build_id(cfg.cpp_commit, builds.cmake_args(cfg), DEBIAN)
    # Per-host settings that do not change the binary leave the id alone.
    other = resolve_host("h2", {"llama_parallel": 1, "llama_port": 9000}).cfg
    assert base == builds.build_id(other.cpp_commit, builds.cmake_args(other), DEBIAN)
    assert base != builds.build_id("f" * 40, builds.cmake_args(cfg), DEBIAN)
    cuda = builds.cmake_args(cfg, ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=80"))
    assert base != builds.build_id(cfg.cpp_commit, cuda, DEBIAN)
    archs = builds.cmake_args(cfg, ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"))
    assert builds.build_id(cfg.cpp_commit, cuda, DEBIAN) != builds.build_id(
        cfg.cpp_commit, archs, DEBIAN
    )
    extra = resolve_host("h", {"llama_cpp_cmake_args": ["-DGGML_AVX512=OFF"]}).cfg
    assert base != builds.build_id(cfg.cpp_commit, builds.cmake_args(extra), DEBIAN)
    for where in ("ubuntu-22.04-amd64", "ubuntu-24.04-amd64", "debian-12-arm64"):
        assert base != builds.build_id(cfg.cpp_commit, builds.cmake_args(cfg), where)
    assert base.startswith(cfg.cpp_commit[:12])


def test_build_is_static_and_release() -> None:
    args = builds.cmake_args(resolve_host("h", {}).cfg)
    assert "-DBUILD_SHARED_LIBS=OFF" in args and "-DCMAKE_BUILD_TYPE=Release" in args
    assert "-DGGML_NATIVE=OFF" in args


def plan_roles(hosts: list[tuple[str, str, bool]], cached: set[str]) -> dict[str, builds.Role]:
    """Hosts (name, build id, has it) in the order their planning reaches step 4."""
    providers: dict[str, str] = {}
    return {n: builds.role(providers, b, n, has, b in cached) for n, b, has in hosts}


def test_the_first_host_of_an_uncached_id_compiles_the_others_receive() -> None:
    roles = plan_roles([("a", "X", False), ("b", "X", False), ("c", "X", False)], set())
    assert [r.compiles for r in roles.values()] == [True, False, False]
    assert [r.provides for r in roles.values()] == [True, False, False]
    assert [r.receives for r in roles.values()] == [False, True, True]


def test_a_host_with_other_cmake_arguments_compiles_its_own() -> None:
    cfg = resolve_host("a", {}).cfg
    other = resolve_host("c", {"llama_cpp_cmake_args": ["-DGGML_AVX512=OFF"]}).cfg
    x = builds.build_id(cfg.cpp_commit, builds.cmake_args(cfg), DEBIAN)
    y = builds.build_id(other.cpp_commit, builds.cmake_args(other), DEBIAN)
    roles = plan_roles([("a", x, False), ("b", x, False), ("c", y, False), ("d", y, False)], set())
    assert {n for n, r in roles.items() if r.compiles} == {"a", "c"}
    assert {n for n, r in roles.items() if r.receives} == {"b", "d"}
    # The next run finds both in the cache: nobody compiles, a new host receives.
    again = plan_roles([("a", x, True), ("c", y, True), ("e", y, False)], {x, y})
    assert not any(r.compiles or r.provides for r in again.values())
    assert [r.receives for r in again.values()] == [False, False, True]


def test_a_cached_id_never_compiles_and_a_present_build_fills_the_cache() -> None:
    roles = plan_roles([("a", "X", False), ("b", "X", True)], {"X"})
    assert roles["a"] == builds.Role(compiles=False, provides=False, receives=True)
    assert roles["b"] == builds.Role(compiles=False, provides=False, receives=False)
    # Cache lost, host a still has the build: it provides it, nobody compiles.
    roles = plan_roles([("a", "X", True), ("b", "X", False)], set())
    assert roles["a"] == builds.Role(compiles=False, provides=True, receives=False)
    assert roles["b"].receives and not roles["b"].compiles


@pytest.mark.parametrize(
    "text",
    ["", "abc  llama.cpp-x.tar.gz\n", "0" * 64 + " llama.cpp-x.tar.gz\n", "0" * 64 + "  other\n"],
)
def test_a_bad_sha256_record_is_refused(text: str) -> None:
    with pytest.raises(builds.BadArchive):
        builds.parse_sha256(text, "llama.cpp-x.tar.gz")


def test_sha256_record_round_trip() -> None:
    line = builds.sha256_line("a" * 64, "llama.cpp-x.tar.gz")
    assert line == "a" * 64 + "  llama.cpp-x.tar.gz\n"  # sha256sum -c reads it
    assert builds.parse_sha256(line, "llama.cpp-x.tar.gz") == "a" * 64


def _cache(tmp_path: Path, bid: str, used: float, record: bool = True) -> builds.CacheEntry:
    e = builds.CacheEntry(tmp_path, bid)
    e.archive.write_bytes(b"tree")
    if record:
        e.sha256_file.write_text(builds.sha256_line("0" * 64, e.archive.name))
        os.utime(e.sha256_file, (used, used))
    return e


def test_cache_lists_complete_entries_by_last_use_and_prunes_the_oldest(tmp_path: Path) -> None:
    old = _cache(tmp_path, "0c1e57098bba-aaaaaaaaaaaa", 1000)
    new = _cache(tmp_path, "0c1e57098bba-bbbbbbbbbbbb", 3000)
    mid = _cache(tmp_path, "0c1e57098bba-cccccccccccc", 2000)
    _cache(tmp_path, "0c1e57098bba-dddddddddddd", 4000, record=False)  # a fetch cut short
    entries = builds.cache_entries(tmp_path)
    assert entries == [new, mid, old]
    assert builds.cache_to_prune(entries, 2) == [old]
    assert builds.cache_to_prune(entries, 0) == entries
    assert builds.cache_entries(tmp_path / "none") == []


def test_cache_dir_default_and_relative_to_the_repository() -> None:
    from llamahost import layout

    assert builds.cache_dir(None) == layout.REPO / ".cache" / "builds"
    assert builds.cache_dir("x/builds") == layout.REPO / "x" / "builds"
    assert builds.cache_dir("/srv/builds") == Path("/srv/builds")


def test_host_keeps_current_and_previous_only() -> None:
    present = ["A", "B", "C", "D"]
    assert builds.host_builds_to_prune(present, ["D", "C"]) == ["A", "B"]
    assert builds.host_builds_to_prune(present, ["D", None]) == ["A", "B", "C"]
    assert builds.host_builds_to_prune(["D"], ["D", "C"]) == []
