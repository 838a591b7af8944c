"""The server's side of a level: llama-server's /metrics, sampled while aiperf runs.

Names at the pinned llama.cpp (docs/monitoring.md): gauges ``llamacpp:requests_processing``
(busy slots), ``llamacpp:requests_deferred`` (requests waiting for a slot); counters
``llamacpp:prompt_tokens_total`` (prompt tokens computed, cached ones excluded),
``llamacpp:prompt_tokens_cached_total`` (prompt tokens served from the KV cache),
``llamacpp:tokens_predicted_total``. /metrics needs the key.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "llamacpp:"
GAUGES = ("requests_processing", "requests_deferred")
COUNTERS = ("prompt_tokens_total", "prompt_tokens_cached_total", "tokens_predicted_total")


def parse(text: str) -> dict[str, float]:
    """The unlabelled ``llamacpp:`` series of a Prometheus text page, by short name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(PREFIX) or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            out[name[len(PREFIX) :]] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return out


@dataclass(frozen=True)
class ServerStats:
    samples: int
    busy_slots_max: float | None
    busy_slots_mean: float | None
    deferred_max: float | None
    prompt_tokens: float | None  # computed during the level
    prompt_tokens_cached: float | None  # served from the cache during the level
    tokens_predicted: float | None

    @property
    def cached_share(self) -> float | None:
        if self.prompt_tokens is None or self.prompt_tokens_cached is None:
            return None
        total = self.prompt_tokens + self.prompt_tokens_cached
        return self.prompt_tokens_cached / total if total else None


def summarise(samples: list[dict[str, float]]) -> ServerStats:
    """Gauges: peak and mean over the samples; counters: last minus first."""

    def series(name: str) -> list[float]:
        return [s[name] for s in samples if name in s]

    def delta(name: str) -> float | None:
        v = series(name)
        return v[-1] - v[0] if len(v) >= 2 else None

    busy, deferred = series("requests_processing"), series("requests_deferred")
    return ServerStats(
        samples=len(samples),
        busy_slots_max=max(busy) if busy else None,
        busy_slots_mean=sum(busy) / len(busy) if busy else None,
        deferred_max=max(deferred) if deferred else None,
        prompt_tokens=delta("prompt_tokens_total"),
        prompt_tokens_cached=delta("prompt_tokens_cached_total"),
        tokens_predicted=delta("tokens_predicted_total"),
    )


# ---------------------------------------------------------------- the GPU, on GPU hosts
# What the bench asks nvidia-smi on the host, every 500 ms while a level runs (one line per
# GPU per sample: "0, 30712, 40960, 87").
GPU_QUERY = (
    "nvidia-smi --query-gpu=index,memory.used,memory.total,utilization.gpu "
    "--format=csv,noheader,nounits -lms 500"
)


@dataclass(frozen=True)
class GpuStats:
    samples: int  # lines read (one per GPU per sample)
    memory_used_peak_mib: float | None  # the fullest GPU at its fullest
    memory_total_mib: float | None  # that GPU's memory
    util_peak: float | None  # percent
    util_mean: float | None

    @property
    def memory_peak_share(self) -> float | None:
        if self.memory_used_peak_mib is None or not self.memory_total_mib:
            return None
        return self.memory_used_peak_mib / self.memory_total_mib


def parse_gpu(lines: list[str]) -> GpuStats:
    """nvidia-smi's lines (GPU_QUERY) → peak memory and utilisation; lines that are not
    four numbers (a "[N/A]", a message) are skipped."""
    rows = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            rows.append(tuple(float(p) for p in parts))
        except ValueError:
            continue
    if not rows:
        return GpuStats(0, None, None, None, None)
    fullest = max(rows, key=lambda r: r[1])
    utils = [r[3] for r in rows]
    return GpuStats(
        samples=len(rows),
        memory_used_peak_mib=fullest[1],
        memory_total_mib=fullest[2],
        util_peak=max(utils),
        util_mean=sum(utils) / len(utils),
    )
