"""The GPU check, device side: build, generate, serve each GPU profile, measure, write JSON.

Runs on the lent machine with the standard library and numpy only (no toolkit virtualenv):

    python3 -m tests.gpu_check.check --prepared .cache/gpu_check --out $OUT/gpu_check.json

Steps, each within llamahost-free budget.Budget (570 s in all):
 1. nvidia-smi: name, compute capability, memory, driver;
 2. unpack the prepared source; configure with the production static arguments plus
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=<compute_cap>; build llama-server and
    llama-bench (stopped past BUILD_S); meanwhile, in a thread, write the random-weight GGUF;
 3. per profile (low-latency, balanced, long-context), the arguments the deploy renders plus
    `-lv 4`: load, the log's offload and buffer lines against the plan, a warm-up, prompt
    tokens/s, decode tokens/s single-stream and aggregate at 1..slots; then stop the server;
 4. two instances of low-latency on the one GPU, when its memory holds both;
 5. llama-bench if time is left.
Before all of them, on the still idle machine: the download benchmark (tests/bench/download.py,
the fetch script against curl, with the prepared pylib/ holding huggingface_hub).
The JSON is written after every step, so a run stopped from outside still leaves one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.gpu_check import budget as B
from tests.gpu_check import logparse, seedgguf

SCHEMA = 1
PORT = 18080
API_KEY = "gpu-check-key"
PROMPT_TOKENS = 2048
DOWNLOAD_MIB = 512  # three rounds of it fit DOWNLOAD_S even on a slow disk (fsync included)
DOWNLOAD_ROUNDS = 3
DOWNLOAD_GOAL = 0.8  # the fetch script's throughput over curl's, whole run (docs/download.md)
REPO = Path(__file__).resolve().parents[2]
DECODE_PROMPT_TOKENS = 16


def result_skeleton() -> dict[str, Any]:
    """The JSON's shape; every key is present whatever happens (tested)."""
    return {
        "schema": SCHEMA,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "finished": False,
        "gpu": {},
        "build": {"ok": False},
        "model": {"ok": False},
        "profiles": {},
        "download": None,
        "bench": None,
        "skipped": [],
        "errors": [],
        "seconds": {},
    }


def profile_skeleton(name: str, slots: int) -> dict[str, Any]:
    return {
        "profile": name,
        "slots": slots,
        "args": [],
        "loaded": False,
        "load_s": None,
        "offloaded": None,  # "N/M"
        "all_layers_offloaded": False,
        "cuda_mib": {},  # kind -> MiB on CUDA buffers, from the log
        "host_mib": {},  # kind -> MiB on CPU buffers
        "plan_mib": {},  # the plan's estimate (prepare.py)
        "measured_over_plan": {},  # kind -> ratio
        "a100_40gb_fits_measured": None,
        "prompt": None,  # {"tokens", "tok_s"}
        # [{"concurrency", "tokens_per_request", "single_stream_tok_s", "aggregate_tok_s"}]
        "decode": [],
        "skipped": [],
        "log_tail": [],
    }


def compare(report: logparse.LoadReport, plan: dict[str, Any], gpu_mib: int) -> dict[str, Any]:
    """The log's CUDA buffers against the plan's estimate."""
    cuda = report.cuda_mib()
    ratios = {k: round(cuda[k] / plan[k], 3) if plan.get(k) else None for k in logparse.KINDS}
    used = sum(cuda.values()) + plan.get("reserve", 0.0)
    return {
        "cuda_mib": cuda,
        "host_mib": report.host_mib(),
        "measured_over_plan": ratios,
        "a100_40gb_fits_measured": bool(used <= gpu_mib) if report.all_offloaded else None,
    }


def fill_args(args: list[str], model: str, api_key_file: str, threads: int) -> list[str]:
    """The rendered arguments with this machine's values, plus `-lv 4` (the buffer lines)."""
    values = {
        "{model}": model,
        "{port}": str(PORT),
        **{f"{{port+{i}}}": str(PORT + i) for i in range(8)},
        "{api_key_file}": api_key_file,
        "{threads}": str(threads),
    }
    return [values.get(a, a) for a in args] + ["-lv", "4"]


def _save(res: dict[str, Any], out: Path, budget: B.Budget) -> None:
    res["skipped"] = list(budget.skipped)
    res["seconds"] = {**budget.spent, "total": round(budget.elapsed(), 1)}
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(out)


def _run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def download(
    prepared: Path,
    work: Path,
    seconds: float,
    mib: int = DOWNLOAD_MIB,
    rounds: int = DOWNLOAD_ROUNDS,
    python: str = sys.executable,
) -> dict[str, Any]:
    """The download benchmark with this interpreter and the prepared pylib/ (huggingface_hub
    and what it needs, at the toolkit's pins): the fetch script's throughput against curl's,
    same file, same local endpoint, and whether it meets the goal."""
    lib = prepared / "pylib"
    if not (lib / "huggingface_hub").is_dir():
        return {"ok": False, "error": f"no {lib}/huggingface_hub: rerun the prepare step"}
    out = work / "download.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib), str(REPO)])}
    cmd = [python, "-m", "tests.bench.download", "--mib", str(mib),
           "--rounds", str(rounds), "--json", str(out)]  # fmt: skip
    try:
        p = _run(cmd, seconds, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"stopped after {seconds:.0f} s"}
    if p.returncode != 0 or not out.exists():
        return {"ok": False, "error": (p.stderr or p.stdout)[-2000:]}
    fig = json.loads(out.read_text())
    return {
        "ok": True,
        **fig,
        "goal": DOWNLOAD_GOAL,
        "goal_met": fig["throughput_ratio"] >= DOWNLOAD_GOAL,
        "python": _run(
            [python, "-c", "import sys; print(sys.version.split()[0])"], 30
        ).stdout.strip(),
        "cpus": os.cpu_count(),
    }


def gpu_info() -> dict[str, Any]:
    q = "name,compute_cap,memory.total,driver_version"
    p = _run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits"], 30)
    name, cap, mem, driver = [x.strip() for x in p.stdout.splitlines()[0].split(",")]
    return {
        "name": name,
        "compute_cap": cap,
        "arch": cap.replace(".", ""),
        "memory_mib": int(mem),
        "driver": driver,
    }


def build(
    prepared: Path, work: Path, plan: dict[str, Any], arch: str, seconds: float
) -> dict[str, Any]:
    src, bld = work / "src", work / "build"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    tar = ["tar", "-xzf", str(prepared / "llama.cpp-src.tar.gz"), "-C", str(src)]
    x = _run([*tar, "--strip-components=1", "--no-same-owner"], 60)
    if x.returncode:
        return {"ok": False, "error": "unpack failed: " + x.stderr[-2000:]}
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    args = [
        *plan["cmake_args"],
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
    ]
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.monotonic()
    c = _run(["cmake", "-S", str(src), "-B", str(bld), *gen, *args], min(120.0, seconds))
    out: dict[str, Any] = {"ok": False, "cmake_args": args, "nvcc": nvcc}
    if c.returncode:
        out["error"] = "configure failed: " + (c.stdout + c.stderr)[-3000:]
        return out
    left = seconds - (time.monotonic() - t0)
    cmd = [
        "cmake",
        "--build",
        str(bld),
        "-j",
        str(os.cpu_count() or 16),
        "--target",
        *plan["targets"],
    ]
    try:
        b = _run(cmd, left)
    except subprocess.TimeoutExpired:
        out["error"] = f"build stopped after {seconds:.0f} s"
        return out
    out["seconds"] = round(time.monotonic() - t0, 1)
    if b.returncode:
        out["error"] = "build failed: " + (b.stdout + b.stderr)[-3000:]
        return out
    out["ok"] = (bld / "bin" / "llama-server").exists()
    out["bin"] = str(bld / "bin")
    return out


def _post(path: str, body: dict[str, Any], timeout: float, port: int = PORT) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def _ready(timeout: float, proc: subprocess.Popen[bytes], port: int = PORT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _ids(n: int, rng: random.Random, n_vocab: int) -> list[int]:
    return [rng.randrange(seedgguf.N_SPECIAL, n_vocab) for _ in range(n)]


def decode_level(
    concurrency: int, tokens: int, rng: random.Random, n_vocab: int, timeout: float
) -> dict[str, Any]:
    bodies = [
        {
            "prompt": _ids(DECODE_PROMPT_TOKENS, rng, n_vocab),
            "n_predict": tokens,
            "ignore_eos": True,
            "cache_prompt": False,
        }
        for _ in range(concurrency)
    ]
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        docs = list(pool.map(lambda b: _post("/completion", b, timeout), bodies))
    wall = time.monotonic() - t0
    per = [float(d["timings"]["predicted_per_second"]) for d in docs]
    made = sum(int(d["timings"]["predicted_n"]) for d in docs)
    return {
        "concurrency": concurrency,
        "tokens_per_request": tokens,
        "single_stream_tok_s": round(sum(per) / len(per), 2),  # mean per-request decode rate
        "aggregate_tok_s": round(made / wall, 2),  # all tokens over the wall time
        "wall_s": round(wall, 2),
    }


def serve_profile(
    name: str,
    pp: dict[str, Any],
    bin_dir: Path,
    model: Path,
    work: Path,
    gpu_mib_plan: int,
    granted: float,
    n_vocab: int,
) -> dict[str, Any]:
    r = profile_skeleton(name, int(pp["slots"]))
    r["plan_mib"] = pp["plan_mib"]
    key = work / "api-key"
    key.write_text(API_KEY + "\n")
    args = fill_args(pp["args"], str(model), str(key), os.cpu_count() or 16)
    r["args"] = args
    log_path = work / f"server-{name}.log"
    end = time.monotonic() + granted
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(bin_dir / "llama-server"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        r["loaded"] = _ready(max(5.0, min(90.0, end - time.monotonic() - 10)), proc)
        r["load_s"] = round(time.monotonic() - t0, 1)
        text = log_path.read_text(errors="replace")
        rep = logparse.parse(text)
        if rep.offloaded is not None:
            r["offloaded"] = f"{rep.offloaded}/{rep.total_layers}"
        r["all_layers_offloaded"] = rep.all_offloaded
        r.update(compare(rep, pp["plan_mib"], gpu_mib_plan))
        if not r["loaded"]:
            r["skipped"].append("measurements: the server did not become ready")
            return r
        rng = random.Random(0)  # noqa: S311  (token ids, not secrets)
        _post(
            "/completion",
            {"prompt": _ids(64, rng, n_vocab), "n_predict": 8, "cache_prompt": False},
            60,
        )
        best = 0.0
        for _ in range(2):
            if end - time.monotonic() < 10:
                r["skipped"].append("second prompt run: time")
                break
            d = _post(
                "/completion",
                {
                    "prompt": _ids(PROMPT_TOKENS, rng, n_vocab),
                    "n_predict": 1,
                    "cache_prompt": False,
                },
                60,
            )
            best = max(best, float(d["timings"]["prompt_per_second"]))
        r["prompt"] = {"tokens": PROMPT_TOKENS, "tok_s": round(best, 1)}
        levels, tokens = B.decode_plan(r["slots"], end - time.monotonic() - 5)
        if len(levels) < r["slots"]:
            r["skipped"].append(f"decode levels other than {levels}: time")
        for c in levels:
            if end - time.monotonic() < 3:
                r["skipped"].append(f"decode at concurrency {c} and above: time")
                break
            r["decode"].append(decode_level(c, tokens, rng, n_vocab, 60))
    except Exception as e:  # recorded, and the next profile still runs
        r["skipped"].append(f"error: {type(e).__name__}: {e}")
    finally:
        _stop(proc)
        r["log_tail"] = log_path.read_text(errors="replace").splitlines()[-25:]
    return r


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve_instances(
    ip: dict[str, Any],
    bin_dir: Path,
    model: Path,
    work: Path,
    gpu_memory_mib: int,
    granted: float,
    n_vocab: int,
) -> dict[str, Any]:
    """Two llama-servers on the one lent GPU, each with the arguments and environment the
    deploy renders for an instance of a host with ``llama_instances: 2`` (its own port,
    the GPU as CUDA0 under CUDA_VISIBLE_DEVICES): both loaded, one request on each at the
    same time. Only when the GPU's memory holds both plans."""
    r: dict[str, Any] = {
        "profile": ip["profile"],
        "plan_total_mib": ip["plan_total_mib"],
        "needs_mib": ip["needs_mib"],
        "gpu_memory_mib": gpu_memory_mib,
        "served": False,
        "instances": [],
        "skipped": [],
    }
    if gpu_memory_mib < ip["needs_mib"]:
        r["skipped"].append(
            f"the GPU's {gpu_memory_mib} MiB hold fewer than {len(ip['instances'])} x "
            f"{ip['plan_total_mib']} MiB"
        )
        return r
    key = work / "api-key"
    key.write_text(API_KEY + "\n")
    threads = max(1, (os.cpu_count() or 16) // len(ip["instances"]))
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    end = time.monotonic() + granted
    procs = []
    try:
        for x in ip["instances"]:
            args = fill_args(x["args"], str(model), str(key), threads)
            log_path = work / f"server-instance-{x['index']}.log"
            with open(log_path, "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [str(bin_dir / "llama-server"), *args],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env={**env, "CUDA_VISIBLE_DEVICES": str(x["gpu"])},
                    )
                )
            r["instances"].append({"index": x["index"], "port": PORT + x["index"], "args": args})
        t0 = time.monotonic()
        for x, proc in zip(r["instances"], procs, strict=True):
            x["loaded"] = _ready(max(5.0, end - time.monotonic() - 15), proc, x["port"])
        r["load_s"] = round(time.monotonic() - t0, 1)
        for x in r["instances"]:
            text = (work / f"server-instance-{x['index']}.log").read_text(errors="replace")
            rep = logparse.parse(text)
            x["offloaded"] = f"{rep.offloaded}/{rep.total_layers}" if rep.offloaded else None
            x["cuda_mib"] = rep.cuda_mib()
        smi = _run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], 10)
        r["gpu_memory_used_mib"] = smi.stdout.strip().splitlines()[0] if smi.stdout else None
        if not all(x["loaded"] for x in r["instances"]):
            r["skipped"].append("requests: an instance did not become ready")
            return r
        rng = random.Random(1)  # noqa: S311  (token ids, not secrets)
        body = {"n_predict": 64, "ignore_eos": True, "cache_prompt": False}
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(procs)) as pool:
            docs = list(
                pool.map(
                    lambda x: _post(
                        "/completion",
                        {**body, "prompt": _ids(DECODE_PROMPT_TOKENS, rng, n_vocab)},
                        60,
                        x["port"],
                    ),
                    r["instances"],
                )
            )
        wall = time.monotonic() - t0
        for x, d in zip(r["instances"], docs, strict=True):
            x["decode_tok_s"] = round(float(d["timings"]["predicted_per_second"]), 2)
        made = sum(int(d["timings"]["predicted_n"]) for d in docs)
        r["aggregate_tok_s"] = round(made / wall, 2)
        r["served"] = True
    except Exception as e:  # recorded; llama-bench still runs
        r["skipped"].append(f"error: {type(e).__name__}: {e}")
    finally:
        for proc in procs:
            _stop(proc)
    return r


def bench(bin_dir: Path, model: Path, seconds: float) -> dict[str, Any]:
    cmd = [
        str(bin_dir / "llama-bench"),
        "-m",
        str(model),
        "-ngl",
        "999",
        "-fa",
        "1",
        "-ctk",
        "q8_0",
        "-ctv",
        "q8_0",
        "-p",
        "512",
        "-n",
        "64",
        "-r",
        "2",
        "-o",
        "json",
    ]
    try:
        p = _run(cmd, seconds)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"stopped after {seconds:.0f} s"}
    if p.returncode:
        return {"ok": False, "error": p.stderr[-2000:]}
    rows = json.loads(p.stdout)
    return {
        "ok": True,
        "rows": [
            {k: row.get(k) for k in ("n_prompt", "n_gen", "avg_ts", "stddev_ts")} for row in rows
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", type=Path, default=Path(".cache/gpu_check"))
    ap.add_argument("--work", type=Path, default=Path(".cache/gpu_check_work"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--total-s", type=float, default=B.TOTAL_S)
    a = ap.parse_args(argv)
    budget = B.Budget(total_s=a.total_s)
    res = result_skeleton()
    plan = json.loads((a.prepared / "plan.json").read_text())
    res["plan_source"] = {"commit": plan["commit"], "source": plan["source"]}
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)

    t = time.monotonic()
    try:
        res["gpu"] = gpu_info()
    except Exception as e:
        res["errors"].append(f"nvidia-smi: {type(e).__name__}: {e}")
        _save(res, a.out, budget)
        return 1
    budget.note("gpu_info", time.monotonic() - t)

    # The download benchmark first, while nothing else runs (the build takes every core).
    granted = budget.grant(
        "download", B.DOWNLOAD_S, min_s=B.DOWNLOAD_MIN_S, keep_s=B.BUILD_S + B.PROFILE_MIN_S
    )
    if granted:
        t = time.monotonic()
        res["download"] = download(a.prepared, a.work, granted)
        budget.note("download", time.monotonic() - t)
        _save(res, a.out, budget)

    # The model is written while the build runs (disk and one core against nvcc's 15).
    model = a.work / "seed-oss-36b-random-ud-q5_k_xl.gguf"

    def generate() -> None:
        t0 = time.monotonic()
        try:
            size = seedgguf.write(model)
            res["model"] = {
                "ok": True,
                "path": str(model),
                "bytes": size,
                "data_bytes": seedgguf.expected_size(),
                "weights_bytes_plan": plan["shape"]["weights_bytes"],
                "seconds": round(time.monotonic() - t0, 1),
            }
        except Exception as e:
            res["model"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}

    gen = threading.Thread(target=generate, daemon=True)
    gen.start()
    keep = B.PROFILE_MIN_S  # at least one profile must fit after the build
    t = time.monotonic()
    granted = budget.grant("build", B.BUILD_S, min_s=60, keep_s=keep)
    if granted:
        try:
            res["build"] = build(a.prepared, a.work, plan, res["gpu"]["arch"], granted)
        except Exception as e:
            res["build"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    budget.note("build", time.monotonic() - t)
    t = time.monotonic()
    if res["build"].get("ok"):  # no build: nothing to wait for
        gen.join(max(1.0, budget.left() - keep))
    budget.note("generate_wait", time.monotonic() - t)
    _save(res, a.out, budget)
    if not res["build"].get("ok") or not res["model"].get("ok") or gen.is_alive():
        res["errors"].append("no build or no model: nothing served")
        budget.skipped.append("every profile: no build or no model")
        _save(res, a.out, budget)
        return 1

    bin_dir = Path(res["build"]["bin"])
    names = list(plan["profiles"])
    for i, name in enumerate(names):
        pp = plan["profiles"][name]
        # share what is left fairly among the profiles still to run, bench last
        share = (budget.left() - 5) / (len(names) - i)
        granted = budget.grant(f"profile {name}", min(B.PROFILE_S, share), min_s=B.PROFILE_MIN_S)
        if not granted:
            continue
        t = time.monotonic()
        res["profiles"][name] = serve_profile(
            name,
            pp,
            bin_dir,
            model,
            a.work,
            int(pp["plan_gpu_memory_mib"]),
            granted,
            int(plan["shape"]["n_vocab"]),
        )
        budget.note(f"profile {name}", time.monotonic() - t)
        _save(res, a.out, budget)

    ip = plan.get("instances")
    granted = budget.grant("two instances", B.INSTANCES_S, min_s=B.INSTANCES_MIN_S) if ip else 0
    if granted:
        t = time.monotonic()
        res["instances"] = serve_instances(
            ip, bin_dir, model, a.work, int(res["gpu"]["memory_mib"]), granted,
            int(plan["shape"]["n_vocab"]),
        )  # fmt: skip
        budget.note("two instances", time.monotonic() - t)
        _save(res, a.out, budget)

    granted = budget.grant("llama-bench", B.BENCH_S, min_s=30)
    if granted and (bin_dir / "llama-bench").exists():
        t = time.monotonic()
        res["bench"] = bench(bin_dir, model, granted)
        budget.note("llama-bench", time.monotonic() - t)
    res["finished"] = True
    _save(res, a.out, budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
