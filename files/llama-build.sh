#!/bin/sh
# Build llama-server, pack a build for the controller's cache, or receive one from it;
# always into BUILD_ROOT atomically.
#
# usage: llama-build.sh build ARCHIVE BUILD_ROOT JOBS BUILT_BY TARGET [CMAKE_ARG...]
#        llama-build.sh pack BUILD_ROOT OUT              (prints OUT's sha256)
#        llama-build.sh receive ARCHIVE SHA256 BUILD_ROOT [--list-devices]
#
# A tree lands in BUILD_ROOT only after its binary ran (--version; --list-devices must
# name a CUDA device when asked); a failed build or a refused archive leaves no BUILD_ROOT
# and never touches the `current` link, so the binary being served stays. Why a script and
# not pyinfra operations: each sequence must stop at the first failure and promote
# nothing, which one shell process with `set -e` expresses directly.
set -eu

mode=$1
shift

promote() { # WORK BUILD_ROOT
    rm -rf "$2"
    mv "$1" "$2"
}

build() {
    archive=$1 build_root=$2 jobs=$3 built_by=$4 target=$5
    shift 5
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

    # Keep the logs and the version, drop the 1-2 GB of objects and sources. built-by
    # travels with the tree: every host of the build id says which host compiled it.
    mkdir -p "$work/logs"
    mv "$work/configure.log" "$work/build.log" "$work/version.txt" "$work/logs/"
    echo $(($(date +%s) - started)) >"$work/logs/build-seconds"
    echo "$built_by" >"$work/logs/built-by"
    rm -rf "$work/build" "$work/src"
    promote "$work" "$build_root"
    cat "$build_root/logs/version.txt"
}

pack() {
    build_root=$1 out=$2
    mkdir -p -m 0700 "$(dirname "$out")"
    tar -czf "$out.partial" -C "$(dirname "$build_root")" "$(basename "$build_root")"
    mv "$out.partial" "$out"
    sha256sum "$out" | cut -d' ' -f1
}

receive() {
    archive=$1 sha256=$2 build_root=$3 devices=${4:-}
    work="$build_root.partial"
    refuse() {
        echo "$*" >&2
        rm -rf "$work"
        exit 1
    }
    # The pushed archive never stays, accepted or not.
    trap 'rm -f "$archive"' EXIT
    rm -rf "$work"
    echo "$sha256  $archive" | sha256sum -c --status ||
        refuse "archive refused: its sha256 is $(sha256sum "$archive" | cut -d' ' -f1)," \
            "the controller's cache records $sha256 (truncated or corrupted)"
    mkdir -p "$work"
    tar -xzf "$archive" -C "$work" --strip-components=1 --no-same-owner 2>"$work.tar-errors" || {
        err=$(cat "$work.tar-errors")
        rm -f "$work.tar-errors"
        refuse "archive refused: it does not unpack: $err"
    }
    rm -f "$work.tar-errors"
    [ -x "$work/bin/llama-server" ] || refuse "archive refused: no bin/llama-server in it"
    mkdir -p "$work/logs"
    "$work/bin/llama-server" --version >"$work/logs/received-version.txt" 2>&1 ||
        refuse "received llama-server does not run here: $(cat "$work/logs/received-version.txt")"
    if [ "$devices" = "--list-devices" ]; then
        "$work/bin/llama-server" --list-devices >"$work/logs/devices.txt" 2>&1 &&
            grep -q CUDA0 "$work/logs/devices.txt" ||
            refuse "received llama-server lists no CUDA device: $(cat "$work/logs/devices.txt")"
    fi
    echo "received $(date -u +%FT%TZ), sha256 $sha256, compiled by" \
        "$(cat "$work/logs/built-by" 2>/dev/null || echo unknown)" >"$work/logs/received"
    promote "$work" "$build_root"
    cat "$build_root/logs/received-version.txt"
}

case $mode in
build | pack | receive) "$mode" "$@" ;;
*)
    echo "usage: llama-build.sh build|pack|receive ..." >&2
    exit 2
    ;;
esac
