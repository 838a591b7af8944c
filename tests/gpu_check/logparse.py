"""What llama-server's load log (at `-lv 4`) says about memory and offload.

Line formats at the pinned commit (read from its source, vendor/llama.cpp in the
llama-cpp-python 0.3.36 sdist):

* src/llama-model.cpp:  "%s: offloaded %d/%d layers to GPU" and
  "%s: %12s model buffer size = %8.2f MiB" (function load_tensors);
* src/llama-kv-cache.cpp: "%s: %10s KV buffer size = %8.2f MiB";
* src/llama-context.cpp: "%s: %10s compute buffer size = %8.2f MiB" (and an "output buffer"
  line, which is not one of the three parts the planner estimates).

The buffer name is the backend buffer's: "CUDA0", "CUDA_Host", "CPU", "CPU_Mapped".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The same pattern as tests/compliance/gpu_parse.py (the unit test checks they agree).
OFFLOADED = re.compile(r"\b(?:llm_)?load_tensors: offloaded (\d+)/(\d+) layers to GPU")
BUFFER = re.compile(r"\s(\S+) (model|KV|compute) buffer size = +([0-9.]+) MiB")
KINDS = ("model", "KV", "compute")
GPU_BUFFER = re.compile(r"CUDA\d+")


@dataclass
class LoadReport:
    offloaded: int | None = None
    total_layers: int | None = None
    # kind -> buffer name -> MiB, as printed
    buffers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def all_offloaded(self) -> bool:
        return self.offloaded is not None and self.offloaded == self.total_layers

    def on(self, device: bool, kind: str) -> float:
        """MiB of one kind on the GPUs' own buffers ("CUDA0", "CUDA1"...) or, device False,
        on every other buffer (host memory: "CPU", "CPU_Mapped", pinned "CUDA_Host")."""
        per = self.buffers.get(kind, {})
        return round(sum(v for k, v in per.items() if bool(GPU_BUFFER.fullmatch(k)) == device), 2)

    def cuda_mib(self) -> dict[str, float]:
        return {kind: self.on(True, kind) for kind in KINDS}

    def host_mib(self) -> dict[str, float]:
        return {kind: self.on(False, kind) for kind in KINDS}


def parse(log: str) -> LoadReport:
    """The last model load's report: a new `load_tensors` offload line starts a fresh one, so
    a log holding several loads gives the last."""
    r = LoadReport()
    for line in log.splitlines():
        m = OFFLOADED.search(line)
        if m:
            r = LoadReport(int(m.group(1)), int(m.group(2)))
            continue
        b = BUFFER.search(line)
        if b:
            name, kind, mib = b.group(1), b.group(2), float(b.group(3))
            per = r.buffers.setdefault(kind, {})
            per[name] = round(per.get(name, 0.0) + mib, 2)
    return r
