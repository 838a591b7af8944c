#!/bin/sh
# Build llama-server from a source archive into BUILD_ROOT/bin, atomically.
#
# usage: llama-build.sh ARCHIVE BUILD_ROOT JOBS TARGET [CMAKE_ARG...]
#
# The binary lands in BUILD_ROOT/bin only after the build succeeded and the binary ran
# (--version); a failed build leaves no BUILD_ROOT/bin and never touches the `current`
# link, so the binary being served stays. Why a script and not pyinfra operations: the
# extract-configure-build-check-promote sequence must stop at the first failure and
# promote nothing, which one shell process with `set -e` expresses directly.
set -eu

archive=$1 build_root=$2 jobs=$3 target=$4
shift 4

work="$build_root.partial"
rm -rf "$work"
mkdir -p "$work/src"
started=$(date +%s)
tar -xzf "$archive" -C "$work/src" --strip-components=1 --no-same-owner

cmake -S "$work/src" -B "$work/build" "$@" >"$work/configure.log" 2>&1 || {
    tail -n 50 "$work/configure.log" >&2
    exit 1
}
cmake --build "$work/build" --target "$target" -j "$jobs" >"$work/build.log" 2>&1 || {
    tail -n 80 "$work/build.log" >&2
    exit 1
}

mkdir -p "$work/bin"
cp "$work/build/bin/$target" "$work/bin/$target"
"$work/bin/$target" --version >"$work/version.txt" 2>&1 || {
    cat "$work/version.txt" >&2
    exit 1
}

# Keep the logs and the version, drop the 1-2 GB of objects and sources.
mkdir -p "$work/logs"
mv "$work/configure.log" "$work/build.log" "$work/version.txt" "$work/logs/"
echo $(($(date +%s) - started)) >"$work/logs/build-seconds"
rm -rf "$work/build" "$work/src"
rm -rf "$build_root"
mv "$work" "$build_root"
cat "$build_root/logs/version.txt"
