"""Plan before change: does each host's profile fit its GPU, and what does it give?

For every host: the profile, the full llama-server command line, the context each
conversation is guaranteed and can reach, the KV cache, weights and compute buffer against
the GPU's memory, and, when it does not fit, the guide's OOM ladder (lower -ub, then
--parallel, then -c; keep q8_0) with the numbers each step gives.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from llamahost import hub
from llamahost import instances as inst
from llamahost import lock as locks
from llamahost.config import HostConfig, Profile
from llamahost.memory import (
    MIB,
    REFERENCE_SHAPES,
    Estimate,
    ModelShape,
    cells_per_slot,
    estimate,
)
from llamahost.render import server_args
from llamahost.spec import HostSpec


@dataclass
class HostPlan:
    cfg: HostConfig
    shape: ModelShape | None
    est: Estimate | None
    fits: bool
    lock_state: str
    shape_source: str
    problems: list[str] = field(default_factory=list)
    ladder: list[str] = field(default_factory=list)
    instances: tuple[inst.Instance, ...] = ()
    topology_known: bool = False  # the host's GPUs were read (else per-gpu counts one)


def _estimate(m: ModelShape, cfg: HostConfig, p: Profile) -> Estimate:
    return estimate(
        m,
        n_ctx=p.context,
        parallel=p.parallel,
        micro_batch=p.micro_batch,
        type_k=p.kv_cache_type_k,
        type_v=p.kv_cache_type_v,
        flash_attn=p.flash_attn != "off",
        kv_unified=p.kv_unified,
        offload=p.uses_gpu,
        reserve_mib=cfg.vram_reserve_mib,
    )


def _fits(e: Estimate, cfg: HostConfig, p: Profile) -> bool:
    return not p.uses_gpu or e.total_gpu <= cfg.gpu_memory_mib * MIB


# Flags that extend the context past the trained length (given as extra arguments).
ROPE_FLAGS = frozenset({"--rope-scaling", "--rope-scale", "--rope-freq-scale", "--yarn-orig-ctx"})


def check_context(cfg: HostConfig, m: ModelShape) -> list[str]:
    """Refusals that need the model's metadata."""
    p = cfg.profile
    out = []
    seen = cells_per_slot(p.context, p.parallel, p.kv_unified)
    rope = any(a.split("=", 1)[0] in ROPE_FLAGS for a in cfg.server_extra_args)
    if m.n_ctx_train and seen > m.n_ctx_train and not rope:
        out.append(
            f"llama_context = {p.context}: a slot would see {seen} tokens, more than the "
            f"model's trained context ({m.n_ctx_train}); that needs RoPE scaling, e.g. "
            "llama_server_extra_args = ['--rope-scaling', 'yarn', '--rope-scale', 'N']"
        )
    for kind, dim in (("k", m.head_dim_k), ("v", m.head_dim_v)):
        t = getattr(p, f"kv_cache_type_{kind}")
        if t not in ("f32", "f16", "bf16") and dim % 32:
            out.append(
                f"llama_kv_cache_type_{kind} = {t!r}: needs a head dimension divisible by 32 "
                f"(this model's is {dim})"
            )
    return out


# Quantised K/V pairs that CUDA's flash-attention kernels cover in a default build
# (docs/facts.md: only matching types); other pairs fall back or fail on the GPU.
CUDA_FA_PAIRS = {("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("bf16", "bf16")}


def check_kv_pair(p: Profile) -> list[str]:
    pair = (p.kv_cache_type_k, p.kv_cache_type_v)
    if p.uses_gpu and p.flash_attn != "off" and pair not in CUDA_FA_PAIRS:
        allowed = ", ".join("/".join(x) for x in sorted(CUDA_FA_PAIRS))
        return [
            f"llama_kv_cache_type_k/llama_kv_cache_type_v = {pair[0]}/{pair[1]}: CUDA "
            f"flash attention covers only {allowed}"
        ]
    return []


def check_gpu_memory(
    cfg: HostConfig,
    reported_mib: tuple[int, ...],
    instances: tuple[inst.Instance, ...] = (),
    total_mib: int | None = None,
) -> list[str]:
    """The plan's GPU memory against what nvidia-smi reports on a host with a driver (each
    GPU's memory.total, in its index order: the PCI bus order). With several instances,
    each GPU on its own: its one instance's plan within its memory, or its ``k`` instances'
    ``k`` times the plan's total (``total_mib``) within it; GPUs of different sizes are each
    checked against their own."""
    if not cfg.profile.uses_gpu or not reported_mib:
        return []
    groups = inst.per_gpu(instances)
    if not groups:
        if min(reported_mib) >= cfg.gpu_memory_mib:
            return []
        return [
            f"llama_gpu_memory_mib = {cfg.gpu_memory_mib}: nvidia-smi reports "
            f"{min(reported_mib)} MiB (memory.total); the plan assumed more memory than the "
            "GPU has: set llama_gpu_memory_mib to it and run `make plan` again"
        ]
    out = []
    for g, xs in sorted(groups.items()):
        names = ", ".join(x.unit for x in xs)
        if g >= len(reported_mib):
            out.append(
                f"{names} planned on GPU {g}, and nvidia-smi reports {len(reported_mib)} GPUs"
            )
            continue
        have = reported_mib[g]
        if len(xs) == 1 and have < cfg.gpu_memory_mib:
            out.append(
                f"llama_gpu_memory_mib = {cfg.gpu_memory_mib}: GPU {g} ({names}) has {have} "
                "MiB (nvidia-smi memory.total); the plan assumed more: set "
                "llama_gpu_memory_mib to the smallest GPU's and run `make plan` again"
            )
        elif len(xs) > 1 and total_mib is not None and len(xs) * total_mib > have:
            out.append(
                f"GPU {g} has {have} MiB (nvidia-smi memory.total) and {len(xs)} instances "
                f"({names}) of {total_mib} MiB each ({len(xs) * total_mib} MiB): fewer "
                "llama_instances, or a smaller profile (the plan's OOM ladder)"
            )
    return out


_PARALLEL_STEPS = (8, 6, 4, 2, 1)


def ladder(cfg: HostConfig, m: ModelShape) -> list[str]:
    """The guide's OOM ladder, cumulative, with the numbers of each step."""
    p = cfg.profile
    steps: list[tuple[str, Profile]] = []
    if p.kv_cache_type_k != "q8_0" or p.kv_cache_type_v != "q8_0":
        p = dataclasses.replace(p, kv_cache_type_k="q8_0", kv_cache_type_v="q8_0")
        steps.append(("KV cache -> q8_0/q8_0 (the guide: keep q8_0 when short of VRAM)", p))
    while p.micro_batch > 512:
        p = dataclasses.replace(p, micro_batch=p.micro_batch // 2)
        steps.append((f"-ub -> {p.micro_batch}", p))
    for n in _PARALLEL_STEPS:
        if n < p.parallel:
            p = dataclasses.replace(p, parallel=n)
            steps.append((f"--parallel -> {n}", p))
    while p.context > 16384:
        p = dataclasses.replace(p, context=p.context // 2)
        steps.append((f"-c -> {p.context}", p))
    lines = []
    for i, (what, q) in enumerate(steps, 1):
        e = _estimate(m, cfg, q)
        fits = e.total_gpu <= cfg.gpu_memory_mib * MIB
        per = q.context // q.parallel
        verdict = (
            f"fits, headroom {(cfg.gpu_memory_mib * MIB - e.total_gpu) // MIB} MiB"
            if fits
            else "does not fit"
        )
        lines.append(
            f"{i}. {what}: total {e.total_gpu // MIB} MiB (KV {e.kv // MIB}, compute "
            f"{e.compute // MIB}), {per} tokens per conversation: {verdict}"
        )
        if fits:
            break
    else:
        lines.append("no step of the ladder fits: a smaller quantisation or a larger GPU is needed")
    return lines


def plan_host(
    spec: HostSpec, shape: ModelShape | None, shape_source: str = "model header"
) -> HostPlan:
    """The plan of a host from its spec (the lock already applied) and the model's shape;
    a locked host's shape is the lock's."""
    cfg = spec.cfg
    if spec.lock.entry is not None:
        shape, shape_source = ModelShape.from_dict(spec.lock.entry["shape"]), "lock"
    hp = HostPlan(cfg, shape, None, True, spec.lock.label, shape_source)
    hp.instances, hp.topology_known = spec.instances, spec.topology is not None
    hp.problems += check_kv_pair(cfg.profile)
    if spec.lock.path is not None and spec.lock.entry is None:
        hp.problems.append(f"no lock entry for {locks.key(cfg)} in {spec.lock.path}")
    if shape is None:
        if cfg.profile.uses_gpu:
            hp.problems.append("no model metadata to plan GPU memory: run `make lock`")
        hp.fits = not hp.problems
        return hp
    hp.problems += check_context(cfg, shape)
    hp.est = _estimate(shape, cfg, cfg.profile)
    hp.fits = _fits(hp.est, cfg, cfg.profile) and not hp.problems
    if not _fits(hp.est, cfg, cfg.profile):
        hp.ladder = ladder(cfg, shape)
    return hp


_LIVE: dict[str, ModelShape | None] = {}


def model_shape(cfg: HostConfig) -> tuple[ModelShape | None, str]:
    """Without a lock: the header from the Hub (or mirror), else the reference card."""
    k = locks.key(cfg)
    if k not in _LIVE:
        _LIVE[k] = None
        if cfg.model_file.endswith(".gguf"):
            from llamahost.gguf_header import read_url

            url = hub.file_url(cfg, cfg.model_file, cfg.model_revision)
            try:
                _LIVE[k] = ModelShape.from_header(
                    read_url(url, headers=hub.auth_headers(cfg), timeout=20)
                )
            except Exception as e:
                # One plain line: the plan goes on with the reference card, if any.
                reason = type(e).__name__
                status = getattr(getattr(e, "response", None), "status_code", None)
                print(
                    f"note: {cfg.host_name}: the model header at {url} could not be read "
                    f"({reason}{f' {status}' if status else ''}); planning without it",
                    file=sys.stderr,
                )
    if _LIVE[k] is not None:
        return _LIVE[k], "model header (Hub)"
    ref = REFERENCE_SHAPES.get(cfg.model_repo)
    if ref is not None:
        return ref, "ESTIMATE: reference card, no lock and no Hub (run `make lock`)"
    return None, "none"


def plan_for(spec: HostSpec) -> HostPlan:
    """The plan of one host: its lock if it has an entry, else the model's header (or card)."""
    if spec.lock.entry is not None:
        return plan_host(spec, None, "lock")
    shape, source = model_shape(spec.cfg)
    return plan_host(spec, shape, source)


def command_line(cfg: HostConfig) -> str:
    args = server_args(cfg, cpu_count=0)
    i = args.index("--threads") + 1
    if cfg.profile.threads == "auto":
        args[i] = "<online CPUs>"
    return " ".join([f"{cfg.cpp_prefix}/current/bin/llama-server", *args])


def render(hp: HostPlan) -> str:
    cfg, p = hp.cfg, hp.cfg.profile
    per = p.context // p.parallel
    reach = cells_per_slot(p.context, p.parallel, p.kv_unified)
    lines = [
        f"host {cfg.host_name}: profile {p.name}",
        f"  model:    {cfg.model_repo}/{cfg.model_file} @ {cfg.model_revision} "
        f"(lock: {hp.lock_state})",
        f"  metadata: {hp.shape_source}",
        f"  command:  {command_line(cfg)}",
        f"  per conversation: {per} tokens guaranteed, up to {reach} "
        f"(-c {p.context} over {p.parallel} slots, KV {'unified' if p.kv_unified else 'split'})",
    ]
    if hp.est is not None:
        e = hp.est
        where = "GPU" if p.uses_gpu else "host memory (no GPU)"
        weights = (
            f"{e.weights_gpu // MIB:>7} MiB  (+{e.weights_host // MIB} MiB token embedding "
            "in host memory)"
            if p.uses_gpu
            else f"{e.weights_host // MIB:>7} MiB"
        )
        lines += [
            f"  memory on the {where}:",
            f"    weights  {weights}",
            f"    KV cache {e.kv // MIB:>7} MiB  ({p.context} cells, "
            f"{p.kv_cache_type_k}/{p.kv_cache_type_v})",
            f"    compute  {e.compute // MIB:>7} MiB  (-ub {p.micro_batch})",
        ]
        if p.uses_gpu:
            head = cfg.gpu_memory_mib * MIB - e.total_gpu
            lines += [
                f"    reserve  {e.reserve // MIB:>7} MiB  (CUDA context, cuBLAS, fragmentation)",
                f"    total    {e.total_gpu // MIB:>7} MiB of {cfg.gpu_memory_mib} MiB: "
                + (
                    f"fits, headroom {head // MIB} MiB "
                    f"({100 * head // (cfg.gpu_memory_mib * MIB)}%)"
                    if head >= 0
                    else f"DOES NOT FIT, {-head // MIB} MiB over"
                ),
            ]
    lines += instance_rows(hp)
    for prob in hp.problems:
        lines.append(f"  REFUSED: {prob}")
    if hp.ladder:
        lines.append("  the guide's OOM ladder, step by step:")
        lines += [f"    {s}" for s in hp.ladder]
    return "\n".join(lines)


def instance_rows(hp: HostPlan) -> list[str]:
    """One row per llama-server instance of a host with several (nothing for one); with
    ``per-gpu`` and the host not read, how the deploy will count them."""
    p = hp.cfg.profile
    if hp.cfg.instances == inst.PER_GPU and p.uses_gpu and not hp.topology_known:
        return [
            "  instances: one per GPU (llama_instances per-gpu): counted by the deploy from "
            "the host's sysfs, each planned against its own GPU's memory"
        ]
    if len(hp.instances) < 2:
        return []
    per = f"{hp.est.total_gpu // MIB} MiB" if hp.est is not None and p.uses_gpu else None
    rows = [f"  instances: {len(hp.instances)} (llama_instances {hp.cfg.instances})"]
    for x in hp.instances:
        where = f"GPU {x.gpu}" if x.gpu is not None else "CPU"
        pin = (
            f", NUMA node {x.numa_node}, CPUs {inst.format_cpulist(x.cpus)}"
            if x.numa_node is not None
            else ""
        )
        if p.threads != "auto":
            threads = f"{p.threads} threads"
        elif x.cpus:
            threads = f"{x.threads(True, 0, 0)} threads"
        else:
            threads = "<online CPUs>" + (f" / {x.share}" if x.share > 1 else "") + " threads"
        plan = f", {per}" if per else ""
        rows.append(f"    {x.unit:<26} port {x.port}  {where}{pin}, {threads}{plan}")
    return rows
