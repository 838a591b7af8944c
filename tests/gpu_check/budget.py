"""The check's time budget: every step asks for its time; what does not fit is skipped or
shortened, and recorded."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

TOTAL_S = 570.0  # of the 600 s a device command may run: 30 s for writing the JSON and exit

# Planned seconds per step (budgeted from docs/facts.md's build times: 5-6 min on 8 cores for
# the whole CUDA build; the check builds two targets on 16).
DOWNLOAD_S = 30.0  # the download benchmark, first, on an idle machine (tests/bench/download.py)
DOWNLOAD_MIN_S = 15.0
BUILD_S = 330.0  # the most the build may take; it is stopped past this
PROFILE_S = 70.0  # load (26 GB from the page cache), warm-up, prompt, decode sweep
PROFILE_MIN_S = 40.0  # a profile gets at least this or is skipped
INSTANCES_S = 60.0  # two instances of the smallest profile on the one GPU, when it holds both
INSTANCES_MIN_S = 45.0  # both loads (page cache) and one request each, or skipped
BENCH_S = 45.0  # llama-bench, last and optional


@dataclass
class Budget:
    total_s: float = TOTAL_S
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=-1.0)
    skipped: list[str] = field(default_factory=list)
    spent: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return max(0.0, self.total_s - self.elapsed())

    def grant(self, step: str, want_s: float, min_s: float = 0.0, keep_s: float = 0.0) -> float:
        """Seconds step may use: want_s, or what is left after keeping keep_s for later steps;
        0 (and the step recorded as skipped) when that is under min_s."""
        got = min(want_s, self.left() - keep_s)
        if got < max(min_s, 1.0):
            self.skipped.append(f"{step}: {self.left():.0f} s left, needs {max(min_s, 1.0):.0f}")
            return 0.0
        return got

    def note(self, step: str, seconds: float) -> None:
        self.spent[step] = round(seconds, 1)


def decode_plan(slots: int, seconds: float) -> tuple[list[int], int]:
    """Concurrency levels and tokens per request for a decode sweep in about `seconds`.

    Full sweep 1..slots at 64 tokens when there is time; then 32 tokens; then only 1 and
    slots (single-stream and full aggregate, the two figures the anchors compare).
    """
    full = list(range(1, slots + 1))
    ends = sorted({1, slots})
    # about 1.5 s per level at 64 tokens (single-stream ~50-100 tok/s, plus HTTP and prompt)
    if seconds >= 1.5 * len(full) + 5:
        return full, 64
    if seconds >= 0.8 * len(full) + 5:
        return full, 32
    return ends, 32
