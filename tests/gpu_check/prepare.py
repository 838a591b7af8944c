"""Prepare what the GPU check carries to the lent machine (run here, where the toolkit is
installed and the pinned source archive is cached):

* PREPARED/llama.cpp-src.tar.gz: the pinned llama.cpp (from the llama-cpp-python 0.3.36
  sdist, tests/support/llama_src.py) without what the llama-server and llama-bench targets
  never read: models/, docs/, media/, tests/, examples/, pocs/, benches/ and the other ggml
  backends (all behind CMake options that are off: LLAMA_BUILD_TESTS/EXAMPLES OFF, no
  GGML_<backend>);
* PREPARED/pylib/: huggingface_hub and the pure-Python part of what it requires, copied file
  by file from this virtualenv (the pinned versions), for the download benchmark on the
  device, whose Python is not the virtualenv's: hf_xet (compiled only) stays here, and PyYAML
  travels without its C extension (it falls back to pure Python, `yaml.__with_libyaml__`);
* PREPARED/plan.json: for each GPU profile, the llama-server arguments the deploy renders
  (llamahost.render.server_args, the spec of a host with that profile) and the plan's memory
  estimate for the generated model (llamahost.plan.plan_host on the generated file's tensor
  table), plus the build's CMake arguments (llamahost.build / llamahost.gpu).

usage: python -m tests.gpu_check.prepare [PREPARED]   (default .cache/gpu_check)
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata as md
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

from llamahost import instances as inst
from llamahost.build import BASE_CMAKE_ARGS, BUILD_TARGETS
from llamahost.config import PINNED_LLAMA_CPP_COMMIT
from llamahost.gguf_header import Header, LongArray, Tensor
from llamahost.memory import MIB, ModelShape
from llamahost.plan import plan_host
from llamahost.profiles import GPU_PROFILES, PROFILES
from llamahost.render import server_args
from llamahost.spec import resolve_host
from tests.gpu_check import seedgguf

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / ".cache" / "gpu_check"
SOURCE_NAME = "llama.cpp-src.tar.gz"
PYLIB_NAME = "pylib"
PYLIB_ROOT = "huggingface_hub"  # what files/llama_fetch_model.py imports beyond the stdlib
PURE_FALLBACK = {"pyyaml"}  # compiled parts optional: copied without them
LIMIT_BYTES = 60_000_000

# Top-level folders of the source the two targets never read, and ggml backends left off.
DROP_TOP = ("models", "docs", "media", "tests", "examples", "pocs", "benches", "gguf-py", "ci")
DROP_BACKENDS = (
    "cann",
    "et",
    "hexagon",
    "hip",
    "metal",
    "musa",
    "opencl",
    "openvino",
    "sycl",
    "virtgpu",
    "vulkan",
    "webgpu",
    "zdnn",
    "zendnn",
)
DROP_NESTED = ("tools/ui/tests",)

# The profiles in the order the check serves them.
ORDER = ("low-latency", "balanced", "long-context")

# Placeholders the device side fills in.
PLACEHOLDERS = {"-m": "{model}", "--port": "{port}", "--api-key-file": "{api_key_file}"}


def keep(member: str) -> bool:
    """Whether a path inside the archive (under its one top folder) is carried."""
    parts = member.split("/", 1)
    if len(parts) < 2 or not parts[1]:
        return True
    rel = parts[1]
    top = rel.split("/", 1)[0]
    if top in DROP_TOP:
        return False
    if any(
        rel == f"ggml/src/ggml-{b}" or rel.startswith(f"ggml/src/ggml-{b}/") for b in DROP_BACKENDS
    ):
        return False
    return not any(rel == d or rel.startswith(d + "/") for d in DROP_NESTED)


def trim(archive: Path, out: Path) -> dict[str, int]:
    """Copy the archive's kept members into out (a reproducible .tar.gz)."""
    kept = dropped = size = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    with (
        tarfile.open(archive) as src,
        gzip.GzipFile(partial, "wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for m in src:
            if not keep(m.name):
                dropped += 1
                continue
            kept += 1
            size += m.size if m.isfile() else 0
            f = src.extractfile(m) if m.isfile() else None
            dst.addfile(m, io.BytesIO(f.read()) if f is not None else None)
    partial.rename(out)
    return {
        "files_kept": kept,
        "files_dropped": dropped,
        "bytes_unpacked": size,
        "bytes_archive": out.stat().st_size,
    }


def generated_shape(c: seedgguf.Config = seedgguf.SEED_OSS_36B) -> ModelShape:
    """The planner's shape of the generated file, from its tensor table and metadata, read the
    same way as a real header (llamahost.memory.ModelShape.from_header)."""
    meta: dict[str, Any] = {}
    for key, _kind, value in seedgguf.metadata(c):
        meta[key] = LongArray(len(value)) if isinstance(value, list) else value
    tensors = tuple(Tensor(t.name, t.dims, t.type_name, t.nbytes) for t in seedgguf.tensor_table(c))
    return ModelShape.from_header(Header(meta, tensors, 0))


def profile_plan(name: str, shape: ModelShape) -> dict[str, Any]:
    spec = resolve_host("gpu-check", {"llama_profile": name})
    args = server_args(spec.cfg, cpu_count=0)
    for flag, placeholder in PLACEHOLDERS.items():
        args[args.index(flag) + 1] = placeholder
    args[args.index("--threads") + 1] = "{threads}"
    hp = plan_host(spec, shape, "generated GGUF tensor table")
    assert hp.est is not None
    e = hp.est
    p = spec.cfg.profile
    return {
        "args": args,
        "slots": p.parallel,
        "context": p.context,
        "micro_batch": p.micro_batch,
        "kv_unified": p.kv_unified,
        "plan_fits_a100": hp.fits,
        "plan_gpu_memory_mib": spec.cfg.gpu_memory_mib,
        "plan_mib": {
            "model": round(e.weights_gpu / MIB, 2),
            "model_host": round(e.weights_host / MIB, 2),
            "KV": round(e.kv / MIB, 2),
            "compute": round(e.compute / MIB, 2),
            "reserve": round(e.reserve / MIB, 2),
            "total": round(e.total_gpu / MIB, 2),
        },
    }


INSTANCES_PROFILE = "low-latency"  # the smallest plan: two of it fit an 80 GB GPU


def instances_plan(shape: ModelShape, n: int = 2) -> dict[str, Any]:
    """Two instances of the smallest profile on the lent GPU, as the deploy renders a host
    with ``llama_instances: 2`` and one GPU (llamahost/instances.py): each its own port
    ({port} + N on the device), the GPU as CUDA0 under CUDA_VISIBLE_DEVICES, threads shared.
    Served only where the GPU's memory holds ``n`` times the plan's total."""
    spec = resolve_host("gpu-check", {"llama_profile": INSTANCES_PROFILE, "llama_instances": n})
    one_gpu = inst.Topology((inst.GpuTopo("0000:00:00.0", "0000", None, ()),), 1)
    spec = dataclasses.replace(spec, topology=one_gpu)
    args = []
    for x in spec.instances:
        a = server_args(spec.cfg, 0, x)
        for flag, placeholder in PLACEHOLDERS.items():
            a[a.index(flag) + 1] = placeholder
        a[a.index("--port") + 1] = f"{{port+{x.index}}}"
        a[a.index("--threads") + 1] = "{threads}"
        args.append({"index": x.index, "gpu": x.gpu, "args": a})
    hp = plan_host(spec, shape, "generated GGUF tensor table")
    assert hp.est is not None
    return {
        "profile": INSTANCES_PROFILE,
        "instances": args,
        "plan_total_mib": round(hp.est.total_gpu / MIB, 2),
        "needs_mib": round(n * hp.est.total_gpu / MIB, 2),
    }


def _requires(dist: md.Distribution) -> list[str]:
    """The names dist requires on this interpreter, extras left out."""
    from packaging.requirements import Requirement

    names = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def pylib(out: Path, root: str = PYLIB_ROOT) -> dict[str, Any]:
    """Copy root's distribution and those it requires, each file its RECORD lists, into out
    (a folder for PYTHONPATH). A distribution with compiled files is left out and named,
    but for those with a pure-Python fallback, copied without those files."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    todo, seen = [root], set()
    copied: dict[str, str] = {}
    compiled: list[str] = []
    size = 0
    while todo:
        name = todo.pop()
        dist = md.distribution(name)
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        files = [f for f in dist.files or [] if not str(f).startswith("..")]
        native = [f for f in files if str(f).endswith((".so", ".pyd"))]
        if native:
            compiled.append(f"{key}=={dist.version}")
            if key not in PURE_FALLBACK:
                continue
        for f in files:
            src = Path(str(f.locate()))
            if "__pycache__" in f.parts or f in native or not src.is_file():
                continue
            dst = out / str(f)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            size += src.stat().st_size
        copied[key] = dist.version
        todo.extend(_requires(dist))
    return {
        "dists": dict(sorted(copied.items())),
        "compiled_left_out": sorted(compiled),
        "bytes": size,
    }


def plan() -> dict[str, Any]:
    shape = generated_shape()
    assert set(ORDER) == set(GPU_PROFILES), "the check serves every GPU profile"
    return {
        "commit": PINNED_LLAMA_CPP_COMMIT,
        "targets": [*BUILD_TARGETS, "llama-bench"],
        # the production static set; GGML_CUDA, the architecture and nvcc come on the device
        "cmake_args": list(BASE_CMAKE_ARGS),
        "shape": shape.to_dict(),
        "profiles": {name: profile_plan(name, shape) for name in ORDER if name in PROFILES},
        "instances": instances_plan(shape),
    }


def main(argv: list[str]) -> int:
    from tests.support.llama_src import archive

    out_dir = Path(argv[0]) if argv else DEFAULT_DIR
    src = trim(archive(), out_dir / SOURCE_NAME)
    if src["bytes_unpacked"] >= LIMIT_BYTES:
        print(
            f"trimmed source is {src['bytes_unpacked']} bytes, over {LIMIT_BYTES}", file=sys.stderr
        )
        return 1
    doc = {**plan(), "source": src, "pylib": pylib(out_dir / PYLIB_NAME)}
    (out_dir / "plan.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"dir": str(out_dir), **src}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
