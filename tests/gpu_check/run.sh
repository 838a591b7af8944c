#!/usr/bin/env bash
# The GPU check on a lent machine (README.md here). Needs the prepared folder, made on the
# build machine with `python -m tests.gpu_check.prepare` and carried to the device:
#   run(command="bash tests/gpu_check/run.sh", carry=[".cache/gpu_check"], timeout_s=600)
# Writes $OUT/gpu_check.json (or ./gpu_check.json without $OUT). Standard library + numpy, and
# the prepared pylib/ (huggingface_hub) for the download benchmark.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
out=${OUT:-$repo}/gpu_check.json
prepared=${PREPARED:-$repo/.cache/gpu_check}
[ -f "$prepared/plan.json" ] || {
    echo "no $prepared/plan.json: run python -m tests.gpu_check.prepare here first and carry it" >&2
    exit 2
}
# nvcc is not always on PATH (the toolkit does not put itself there)
if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-13*/bin; do
        [ -x "$d/nvcc" ] && export PATH=$d:$PATH && break
    done
fi
py=python3
command -v "$py" >/dev/null || py=python
"$py" -m tests.gpu_check.check --prepared "$prepared" --work "${WORK:-/tmp/gpu_check_work}" --out "$out"
rc=$?
echo "== $out (rc $rc)"
"$py" - "$out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("gpu:", d["gpu"], "build ok:", d["build"].get("ok"), "model ok:", d["model"].get("ok"))
dl = d.get("download") or {}
print("download:", {k: dl.get(k) for k in ("ok", "mib", "curl_mib_s", "fetch_mib_s",
      "throughput_ratio", "transfer_ratio", "goal_met", "error") if k in dl})
for name, p in d["profiles"].items():
    one = next((x["single_stream_tok_s"] for x in p["decode"] if x["concurrency"] == 1), None)
    agg = max((x["aggregate_tok_s"] for x in p["decode"]), default=None)
    print(f"{name}: offloaded {p['offloaded']}, cuda {p['cuda_mib']}, plan {p['plan_mib']}, "
          f"prompt {p['prompt']}, decode 1-stream {one} tok/s, best aggregate {agg} tok/s")
print("skipped:", d["skipped"], "errors:", d["errors"], "seconds:", d["seconds"])
PY
exit $rc
