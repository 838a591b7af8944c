"""What a bench sends to a host: a workload per profile, from what the profile promises.

* ``low-latency`` (the guide's A: internal chat, short and medium requests, few users):
  short chat, 512-token prompts, 256 tokens out.
* ``balanced`` (B: longer context and/or more concurrent slots): 12k-token prompts (the
  middle of 8-16k), 512 out.
* ``long-context`` (C: 32k documents): 32000-token prompts, 512 out.
* ``cpu-demo`` (the tiny test model): 128 in, 32 out.

Every level of the sweep sends the same prompt and output lengths (no spread), the output
length is forced (``ignore_eos``: llama-server generates exactly ``max_tokens``), and the
prompts come from a fixed seed, so two runs compare. A prompt never asks for more than a
conversation is guaranteed at that concurrency: with a split KV cache every slot has
``context / parallel``; with a unified pool (``--kv-unified``) each of the busy slots has
``context / min(concurrency, parallel)``. Where the profile's length would not fit, the
level's prompt is shortened to fit, and the report says so (``isl`` per level).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llamahost.config import Profile

# Tokens kept free in a slot beside the prompt and the output: the chat template's turn
# markers and the generation prompt (a few tokens with Seed-OSS's template; 64 covers its
# system line too).
TEMPLATE_MARGIN = 64
# The fewest prompt tokens a level may be cut to before it is refused.
MIN_ISL = 16
DEFAULT_SEED = 20251130
# Requests per level: ROUNDS waves of `concurrency` requests, at least MIN_REQUESTS.
ROUNDS = 3
MIN_REQUESTS = 8


class WorkloadError(ValueError):
    """A bad bench setting, with the field named."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"{field}={value!r}: {why}")
        self.field = field


@dataclass(frozen=True)
class Shape:
    """What the profile is for, in tokens."""

    purpose: str
    isl: int  # prompt tokens
    osl: int  # output tokens, forced


SHAPES: dict[str, Shape] = {
    "low-latency": Shape("short chat, time to first token first", 512, 256),
    "balanced": Shape("8-16k prompts, many concurrent conversations", 12288, 512),
    "long-context": Shape("32k documents", 32000, 512),
    "cpu-demo": Shape("the tiny test model, small requests", 128, 32),
}


@dataclass(frozen=True)
class Level:
    concurrency: int
    isl: int
    osl: int
    requests: int
    warmup: int
    note: str = ""  # why the prompt is shorter than the profile's


@dataclass(frozen=True)
class Workload:
    profile: str
    purpose: str
    seed: int
    levels: tuple[Level, ...]


def sweep(parallel: int) -> tuple[int, ...]:
    """1, 2, 4, ... below twice the slots, plus the slot count and twice it."""
    top = 2 * parallel
    levels = {parallel, top}
    c = 1
    while c < top:
        levels.add(c)
        c *= 2
    return tuple(sorted(levels))


def per_conversation(profile: Profile, concurrency: int) -> int:
    """Context cells one conversation is sure of when `concurrency` requests are sent."""
    if profile.kv_unified:
        return profile.context // min(concurrency, profile.parallel)
    return profile.context // profile.parallel


def parse_levels(text: str) -> tuple[int, ...]:
    """``--concurrency 1,2,4``: positive integers, each once."""
    out: list[int] = []
    for part in text.split(","):
        try:
            c = int(part.strip())
        except ValueError:
            raise WorkloadError("concurrency", part.strip(), "must be a whole number") from None
        if c < 1:
            raise WorkloadError("concurrency", c, "must be 1 or more")
        if c not in out:
            out.append(c)
    if not out:
        raise WorkloadError("concurrency", text, "names no level")
    return tuple(sorted(out))


def _positive(field: str, v: int | None) -> None:
    if v is not None and v < 1:
        raise WorkloadError(field, v, "must be 1 or more")


def workload_for(
    profile: Profile,
    *,
    levels: tuple[int, ...] | None = None,
    isl: int | None = None,
    osl: int | None = None,
    requests: int | None = None,
    seed: int = DEFAULT_SEED,
) -> Workload:
    """The profile's workload; ``levels``, ``isl``, ``osl``, ``requests`` override it."""
    for field, v in (("isl", isl), ("osl", osl), ("requests", requests)):
        _positive(field, v)
    for c in levels or ():
        _positive("concurrency", c)
    shape = SHAPES.get(profile.name)
    if shape is None:
        raise WorkloadError("profile", profile.name, f"has no workload; known: {sorted(SHAPES)}")
    if isl is not None or osl is not None:
        shape = replace(shape, isl=isl or shape.isl, osl=osl or shape.osl)
    out = []
    for c in levels or sweep(profile.parallel):
        room = per_conversation(profile, c) - shape.osl - TEMPLATE_MARGIN
        level_isl, note = shape.isl, ""
        if room < level_isl:
            if room < MIN_ISL:
                raise WorkloadError(
                    "osl" if osl else "concurrency",
                    osl or c,
                    f"leaves {room} prompt tokens per conversation "
                    f"({per_conversation(profile, c)} cells at concurrency {c})",
                )
            level_isl = room
            note = f"prompt cut to {room}: {per_conversation(profile, c)} cells per conversation"
        n = requests or max(MIN_REQUESTS, ROUNDS * c)
        out.append(Level(c, level_isl, shape.osl, n, warmup=1, note=note))
    return Workload(profile.name, shape.purpose, seed, tuple(out))
