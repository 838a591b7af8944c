#!/usr/bin/env bash
# Compile llama.cpp's llama-server with CUDA for sm_80 (A100) on a machine without a GPU,
# then check that the binary carries the CUDA backend and links the CUDA libraries.
#
# usage: tests/cuda_build/run.sh [--configure-only]
#
# The CMake arguments are the ones a GPU host builds with: llamahost.render's static
# Release set plus llamahost.gpu's CUDA arguments for architecture 80, except
#   - nvcc is this machine's copy (below) instead of /usr/local/cuda-13.0/bin/nvcc;
#   - -DGGML_CUDA_NO_VMM=ON: without it ggml-cuda links the driver library (libcuda),
#     which a GPU host has and this machine has not, not even as a stub.
#
# Inputs (docs/facts.md, "llama.cpp at the pinned commit"):
#   - nvcc 13.0 from $CUDA_SRC (default /usr/local/cuda-13.0), assembled from PyPI wheels,
#     without cuBLAS. cuBLAS comes from the PyPI wheel nvidia-cublas==13.0.2.14 (it matches
#     CUDA 13.0); both are merged into a private copy under .cache/, the system tree is
#     never modified.
#   - the pinned source archive .cache/llama.cpp-<commit>.tar.gz; made by
#     `python -m tests.support.llama_src` when missing.
# Linking needs the cuBLAS directory on LD_LIBRARY_PATH: libcublas.so.13 needs
# libcublasLt.so.13, and ld finds it only there (or with -rpath-link).
#
# The full build takes about 22 minutes on 2 cores (5-6 on 8): run it on purpose, not in
# `make test`. JOBS (default: all cores) and WORK (default .cache/cuda-build) override.
set -euo pipefail

configure_only=false
case "${1:-}" in
--configure-only) configure_only=true ;;
"") ;;
*)
    echo "usage: $0 [--configure-only]" >&2
    exit 2
    ;;
esac

started=$(date +%s)
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${LLAMAHOST_CACHE:-$repo/.cache}
py=$repo/.venv/bin/python
cuda_src=${CUDA_SRC:-/usr/local/cuda-13.0}
cublas_version=13.0.2.14
jobs=${JOBS:-$(nproc)}
work=${WORK:-$cache/cuda-build}
cd "$repo"

commit=$("$py" -c 'from llamahost.config import PINNED_LLAMA_CPP_COMMIT as c; print(c)')
archive=$cache/llama.cpp-$commit.tar.gz
[ -f "$archive" ] || "$py" -m tests.support.llama_src >/dev/null

# ---------------------------------------------------------------- CUDA 13.0 with cuBLAS
cuda=$cache/cuda-13.0-cublas-$cublas_version
if [ ! -e "$cuda/.complete" ]; then
    echo "== CUDA tree with cuBLAS $cublas_version: $cuda"
    rm -rf "$cuda" "$cuda.partial"
    mkdir -p "$cuda.partial" "$cache/wheels"
    cp -a "$cuda_src/." "$cuda.partial/"
    "$py" -m pip download -q --no-deps --only-binary :all: --dest "$cache/wheels" \
        "nvidia-cublas==$cublas_version"
    wheel=$(ls "$cache/wheels"/nvidia_cublas-"$cublas_version"-*.whl)
    unpacked=$cuda.partial/.wheel
    "$py" -m zipfile -e "$wheel" "$unpacked"
    libdir=$(dirname "$(find "$unpacked" -name 'libcublas.so.*' | head -n 1)")
    incdir=$(dirname "$(find "$unpacked" -name 'cublas_v2.h' | head -n 1)")
    # lib and lib64 may be two directories in this image: fill both.
    for d in lib64 lib; do
        [ -d "$cuda.partial/$d" ] || continue
        cp "$libdir"/lib*.so.* "$cuda.partial/$d/"
        # A wheel holds no symlinks; CMake's FindCUDAToolkit looks for libcublas.so.
        for so in "$libdir"/lib*.so.*; do
            base=$(basename "$so")
            ln -sf "$base" "$cuda.partial/$d/${base%%.so.*}.so"
        done
    done
    cp -r "$incdir"/. "$cuda.partial/include/"
    rm -rf "$unpacked"
    touch "$cuda.partial/.complete"
    mv "$cuda.partial" "$cuda"
fi
export LD_LIBRARY_PATH=$cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# ---------------------------------------------------------------- the production arguments
mapfile -t cmake_args < <("$py" - "$cuda/bin/nvcc" <<'EOF'
import sys

from llamahost.gpu import cuda_cmake_args
from llamahost.render import BASE_CMAKE_ARGS

for arg in (*BASE_CMAKE_ARGS, *cuda_cmake_args("80", "13.0")):
    if arg.startswith("-DCMAKE_CUDA_COMPILER="):
        arg = "-DCMAKE_CUDA_COMPILER=" + sys.argv[1]
    print(arg)
print("-DGGML_CUDA_NO_VMM=ON")
print("-DCUDAToolkit_ROOT=" + sys.argv[1].rsplit("/bin/", 1)[0])
EOF
)
printf '== CMake arguments:\n'
printf '   %s\n' "${cmake_args[@]}"

rm -rf "$work"
mkdir -p "$work/src"
tar -xzf "$archive" -C "$work/src" --strip-components=1 --no-same-owner

echo "== configure"
cmake -S "$work/src" -B "$work/build" "${cmake_args[@]}" >"$work/configure.log" 2>&1 || {
    tail -n 60 "$work/configure.log" >&2
    exit 1
}
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
cache_value() { sed -n "s/^$1:[A-Z]*=//p" "$work/build/CMakeCache.txt"; }
[ "$(cache_value GGML_CUDA)" = ON ] || fail "GGML_CUDA is not ON"
[ "$(cache_value CMAKE_CUDA_ARCHITECTURES)" = 80 ] ||
    fail "CMAKE_CUDA_ARCHITECTURES is $(cache_value CMAKE_CUDA_ARCHITECTURES)"
cublas=$(cache_value CUDA_cublas_LIBRARY)
case "$cublas" in
"$cuda"/*) ;;
*) fail "cuBLAS not found in $cuda (CUDA_cublas_LIBRARY=$cublas)" ;;
esac
grep -q "CUDA Toolkit found" "$work/configure.log" || fail "ggml did not find the CUDA toolkit"
echo "   GGML_CUDA=ON, CMAKE_CUDA_ARCHITECTURES=80, cuBLAS $cublas"
echo "   configured in $(($(date +%s) - started)) s"
if $configure_only; then
    exit 0
fi

echo "== build llama-server, $jobs jobs"
build_started=$(date +%s)
cmake --build "$work/build" --target llama-server -j "$jobs" >"$work/build.log" 2>&1 || {
    tail -n 80 "$work/build.log" >&2
    exit 1
}
build_seconds=$(($(date +%s) - build_started))

echo "== check the binary"
bin=$work/build/bin/llama-server
linked=$(ldd "$bin")
grep -q "libcudart.so.13 => $cuda/" <<<"$linked" || fail "llama-server does not link libcudart.so.13"
grep -q "libcublas.so.13 => $cuda/" <<<"$linked" || fail "llama-server does not link libcublas.so.13"
# Through a file: `nm | grep -q` under pipefail fails when grep stops reading early.
nm "$bin" >"$work/symbols.txt"
grep -q " T ggml_backend_cuda_reg$" "$work/symbols.txt" || fail "no ggml-cuda backend in llama-server"
"$bin" --version >"$work/version.txt" 2>&1 || fail "llama-server --version: $(cat "$work/version.txt")"
# No GPU and no driver here: the CUDA backend loads, finds no driver and says so.
"$bin" --list-devices >"$work/devices.txt" 2>&1 || true
grep -qi "cuda" "$work/devices.txt" || fail "llama-server --list-devices never mentions CUDA"

echo "PASS: llama-server links the CUDA backend (sm_80): libcudart.so.13, libcublas.so.13"
echo "   build ${build_seconds} s with $jobs jobs; total $(($(date +%s) - started)) s"
echo "   $(head -n 1 "$work/version.txt")"
