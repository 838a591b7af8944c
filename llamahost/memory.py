"""How much GPU memory a profile needs, from the model's own metadata.

Three parts, the ones llama-server reports at load (`-lv 4`):

* weights: the sum of the tensors' sizes from the GGUF tensor table (exact); with every
  layer offloaded, all but the token embedding live on the GPU (llama.cpp keeps the input
  embedding in host memory);
* KV cache: n_ctx cells x layers x KV heads x (K head dim x bytes(K type) + V head dim x
  bytes(V type)) (exact); `-c` is the total over all slots, unified or not;
* compute buffer: reserved for the worst micro-batch, measured to grow linearly with `-ub`:
  per token, the attention mask (2 bytes per KV cell a slot sees with flash attention),
  the logits (4 bytes per vocabulary entry) and the feed-forward activations
  (4 x (2 x n_ff + n_embd) bytes). Calibrated against llama-server's own reports on the CPU
  (tests/e2e/test_plan_calibration.py); on CUDA it is an estimate (README, "Planning").

Plus a fixed reserve for the CUDA context and cuBLAS workspace (`llama_vram_reserve_mib`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf

from llamahost.gguf_header import Header

MIB = 1 << 20


def bytes_per_element(type_name: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    return size / block


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from a GGUF header; stored in the model lock."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    weights_bytes: int
    token_embd_bytes: int

    @classmethod
    def from_header(cls, h: Header) -> ModelShape:
        n_embd = int(h.arch_value("embedding_length"))
        n_head = int(h.arch_value("attention.head_count"))
        n_head_kv = h.arch_value("attention.head_count_kv", n_head)
        if isinstance(n_head_kv, list):  # per-layer counts: the KV cache follows the largest
            n_head_kv = max(n_head_kv)
        n_ff = h.arch_value("feed_forward_length", 0)
        if isinstance(n_ff, list):
            n_ff = max(n_ff)
        head_dim_k = int(h.arch_value("attention.key_length", n_embd // n_head))
        embd = [t.nbytes for t in h.tensors if t.name == "token_embd.weight"]
        return cls(
            arch=h.arch,
            n_layer=int(h.arch_value("block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(n_head_kv),
            head_dim_k=head_dim_k,
            head_dim_v=int(h.arch_value("attention.value_length", head_dim_k)),
            n_ff=int(n_ff),
            n_vocab=h.n_vocab,
            n_ctx_train=int(h.arch_value("context_length", 0)),
            weights_bytes=sum(t.nbytes for t in h.tensors),
            token_embd_bytes=embd[0] if embd else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


# When neither a lock nor the Hub is at hand: the architecture of Seed-OSS-36B-Instruct
# (its config.json: 64 layers, hidden 5120, 80 heads, 8 KV heads, head_dim 128, n_ff 27648,
# vocab 155136, native context 524288) and the UD-Q5_K_XL file's size, about 26 GB, with the
# token embedding assumed at Q6_K. An estimate, labelled as such wherever it is used.
REFERENCE_SHAPES = {
    "unsloth/Seed-OSS-36B-Instruct-GGUF": ModelShape(
        arch="seed_oss",
        n_layer=64,
        n_embd=5120,
        n_head=80,
        n_head_kv=8,
        head_dim_k=128,
        head_dim_v=128,
        n_ff=27648,
        n_vocab=155136,
        n_ctx_train=524288,
        weights_bytes=26_000_000_000,
        token_embd_bytes=155136 * 5120 * 210 // 256,  # Q6_K: 210 bytes per 256 weights
    ),
}


@dataclass(frozen=True)
class Estimate:
    weights_gpu: int
    weights_host: int
    kv: int
    compute: int
    reserve: int

    @property
    def total_gpu(self) -> int:
        return self.weights_gpu + self.kv + self.compute + self.reserve


def kv_bytes(m: ModelShape, n_ctx: int, type_k: str, type_v: str) -> int:
    per_cell = m.n_head_kv * (
        m.head_dim_k * bytes_per_element(type_k) + m.head_dim_v * bytes_per_element(type_v)
    )
    return int(n_ctx * m.n_layer * per_cell)


def cells_per_slot(n_ctx: int, parallel: int, unified: bool) -> int:
    """KV cells one slot attends over: its share, or the whole pool when unified."""
    return n_ctx if unified else n_ctx // parallel


def compute_bytes(m: ModelShape, micro_batch: int, kv_cells_seen: int, flash_attn: bool) -> int:
    mask = (2 if flash_attn else 4) * kv_cells_seen
    if not flash_attn:
        # Without flash attention the KQ matrix is materialised for every head.
        mask += 4 * kv_cells_seen * m.n_head
    logits = 4 * m.n_vocab
    ffn = 4 * (2 * m.n_ff + m.n_embd)
    return micro_batch * (mask + logits + ffn)


def estimate(
    m: ModelShape,
    *,
    n_ctx: int,
    parallel: int,
    micro_batch: int,
    type_k: str,
    type_v: str,
    flash_attn: bool,
    kv_unified: bool,
    offload: bool,
    reserve_mib: int,
) -> Estimate:
    kv = kv_bytes(m, n_ctx, type_k, type_v)
    compute = compute_bytes(m, micro_batch, cells_per_slot(n_ctx, parallel, kv_unified), flash_attn)
    if offload:
        return Estimate(
            weights_gpu=m.weights_bytes - m.token_embd_bytes,
            weights_host=m.token_embd_bytes,
            kv=kv,
            compute=compute,
            reserve=reserve_mib * MIB,
        )
    return Estimate(0, m.weights_bytes, kv, compute, 0)
