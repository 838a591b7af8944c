"""A random-weight GGUF with Seed-OSS-36B-Instruct's tensor shapes and a UD-Q5_K_XL type mix.

Decode and prompt speed depend on the tensors' shapes and quantisation types, not on their
values, so the blocks are random bytes whose fp16 scale fields are set to a small finite value
(every dequantised weight is finite and below 1 in magnitude).

No recorded tensor table of the real `Seed-OSS-36B-Instruct-UD-Q5_K_XL.gguf` exists in this
repository (the Hub is not reachable from the build machine; docs/facts.md). The table is
DERIVED:

* shapes from the model's published config (docs/facts.md, llamahost/memory.py's reference
  card): 64 layers, hidden 5120, 80 query heads, 8 KV heads, head_dim 128, n_ff 27648,
  vocabulary 155136, native context 524288, rope theta 1e7, QKV bias, untied output; tensor
  names and orientation as llama.cpp's src/models/seed-oss.cpp at the pin creates them;
* types from llama.cpp's Q5_K_M rule set with the upgrades Unsloth's "UD" mixes apply to the
  sensitive tensors: attn_q/attn_k/attn_output/ffn_gate/ffn_up Q5_K; attn_v and ffn_down Q6_K;
  token_embd and output Q6_K (the same assumption as the planner's reference card); norms and
  biases F32. This gives about 26.3 GB, the real file's reported size ("roughly 26 GB"). When
  `make lock` or a machine with Hub access can read the real header, replace TYPE_MIX with it.

Written with a small GGUF v3 writer (standard library + numpy, nothing else, so it runs on the
lent machine without the toolkit's virtualenv); tests/unit/test_gpu_check.py reads a small file
back with the `gguf` package.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# ggml types used here: (ggml type id, elements per block, bytes per block, fp16 field offsets
# inside a block). Offsets from ggml-common.h: block_q5_K {d, dmin, scales[12], qh[32],
# qs[128]}, block_q6_K {ql[128], qh[64], scales[16], d}, block_q4_K {d, dmin, scales[12],
# qs[128]}, block_q8_0 {d, qs[32]}.
GGML_TYPES: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "F32": (0, 1, 4, ()),
    "Q8_0": (8, 32, 34, (0,)),
    "Q4_K": (12, 256, 144, (0, 2)),
    "Q5_K": (13, 256, 176, (0, 2)),
    "Q6_K": (14, 256, 210, (208,)),
}

ALIGNMENT = 32
SCALE = 1e-4  # every fp16 d / dmin: a normal fp16 value; weights stay well below 1


@dataclass(frozen=True)
class Config:
    n_layer: int = 64
    n_embd: int = 5120
    n_head: int = 80
    n_head_kv: int = 8
    head_dim: int = 128
    n_ff: int = 27648
    n_vocab: int = 155136
    n_ctx_train: int = 524288
    rope_theta: float = 1e7


SEED_OSS_36B = Config()

# Tensor role -> type (see the module docstring: derived, not read from the real file).
TYPE_MIX: dict[str, str] = {
    "token_embd.weight": "Q6_K",
    "output.weight": "Q6_K",
    "output_norm.weight": "F32",
    "attn_q.weight": "Q5_K",
    "attn_k.weight": "Q5_K",
    "attn_v.weight": "Q6_K",
    "attn_output.weight": "Q5_K",
    "attn_q.bias": "F32",
    "attn_k.bias": "F32",
    "attn_v.bias": "F32",
    "attn_norm.weight": "F32",
    "post_attention_norm.weight": "F32",
    "ffn_gate.weight": "Q5_K",
    "ffn_up.weight": "Q5_K",
    "ffn_down.weight": "Q6_K",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # GGUF order: ne0 (contiguous row length) first
    type_name: str

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        _, block, size, _ = GGML_TYPES[self.type_name]
        if self.dims[0] % block:
            raise ValueError(f"{self.name}: row of {self.dims[0]} not a multiple of {block}")
        return self.n_elements // block * size


def tensor_table(c: Config = SEED_OSS_36B) -> list[TensorSpec]:
    """Every tensor, in the order the file holds them."""
    q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim

    def t(name: str, role: str, *dims: int) -> TensorSpec:
        return TensorSpec(name, dims, TYPE_MIX[role])

    out = [t("token_embd.weight", "token_embd.weight", c.n_embd, c.n_vocab)]
    for i in range(c.n_layer):
        b = f"blk.{i}."
        out += [
            t(b + "attn_norm.weight", "attn_norm.weight", c.n_embd),
            t(b + "attn_q.weight", "attn_q.weight", c.n_embd, q),
            t(b + "attn_k.weight", "attn_k.weight", c.n_embd, kv),
            t(b + "attn_v.weight", "attn_v.weight", c.n_embd, kv),
            t(b + "attn_q.bias", "attn_q.bias", q),
            t(b + "attn_k.bias", "attn_k.bias", kv),
            t(b + "attn_v.bias", "attn_v.bias", kv),
            t(b + "attn_output.weight", "attn_output.weight", q, c.n_embd),
            t(b + "post_attention_norm.weight", "post_attention_norm.weight", c.n_embd),
            t(b + "ffn_gate.weight", "ffn_gate.weight", c.n_embd, c.n_ff),
            t(b + "ffn_up.weight", "ffn_up.weight", c.n_embd, c.n_ff),
            t(b + "ffn_down.weight", "ffn_down.weight", c.n_ff, c.n_embd),
        ]
    out += [
        t("output_norm.weight", "output_norm.weight", c.n_embd),
        t("output.weight", "output.weight", c.n_embd, c.n_vocab),
    ]
    return out


# Seed-OSS's turn format (as tests/support/tinygguf.py; kept here so the device side needs no
# toolkit import; the unit test checks they are the same).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<seed:bos>{{ message['role'] }}\n{{ message['content'] }}<seed:eos>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<seed:bos>assistant\\n' }}{%- endif -%}"
)
N_SPECIAL = 3 + 256  # <unk>, <seed:bos>, <seed:eos>, the 256 byte tokens


def vocabulary(n_vocab: int) -> tuple[list[str], list[int]]:
    """SPM tokens: the tiny model's specials and bytes, then distinct filler pieces."""
    tokens = ["<unk>", "<seed:bos>", "<seed:eos>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE
    extra = n_vocab - len(tokens)
    if extra < 0:
        raise ValueError(f"n_vocab {n_vocab} is below the {len(tokens)} special tokens")
    tokens += [f"\u2581t{i}" for i in range(extra)]
    types += [1] * extra  # NORMAL
    return tokens, types


def metadata(c: Config) -> list[tuple[str, str, Any]]:
    """(key, GGUF value kind, value), in file order."""
    tokens, types = vocabulary(c.n_vocab)
    a = "seed_oss"
    return [
        ("general.architecture", "str", a),
        ("general.name", "str", "Seed-OSS-36B random weights (GPU check)"),
        ("general.alignment", "u32", ALIGNMENT),
        (f"{a}.context_length", "u32", c.n_ctx_train),
        (f"{a}.embedding_length", "u32", c.n_embd),
        (f"{a}.block_count", "u32", c.n_layer),
        (f"{a}.feed_forward_length", "u32", c.n_ff),
        (f"{a}.attention.head_count", "u32", c.n_head),
        (f"{a}.attention.head_count_kv", "u32", c.n_head_kv),
        (f"{a}.attention.key_length", "u32", c.head_dim),
        (f"{a}.attention.value_length", "u32", c.head_dim),
        (f"{a}.attention.layer_norm_rms_epsilon", "f32", 1e-6),
        (f"{a}.rope.freq_base", "f32", c.rope_theta),
        ("tokenizer.ggml.model", "str", "llama"),
        ("tokenizer.ggml.tokens", "str[]", tokens),
        ("tokenizer.ggml.scores", "f32[]", [0.0] * N_SPECIAL + [-1.0] * (len(tokens) - N_SPECIAL)),
        ("tokenizer.ggml.token_type", "i32[]", types),
        ("tokenizer.ggml.bos_token_id", "u32", 1),
        ("tokenizer.ggml.eos_token_id", "u32", 2),
        ("tokenizer.ggml.unknown_token_id", "u32", 0),
        ("tokenizer.ggml.add_bos_token", "bool", False),
        ("tokenizer.chat_template", "str", CHAT_TEMPLATE),
    ]


# GGUF value type ids (gguf.GGUFValueType).
_VT = {"u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8, "array": 9}
_FMT = {"u32": "<I", "i32": "<i", "f32": "<f", "bool": "<?"}


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, kind: str, value: Any) -> bytes:
    out = _s(key)
    if kind.endswith("[]"):
        elem = kind[:-2]
        out += struct.pack("<IIQ", _VT["array"], _VT[elem], len(value))
        if elem == "str":
            return out + b"".join(_s(v) for v in value)
        dtype = {"f32": "<f4", "i32": "<i4", "u32": "<u4"}[elem]
        return out + np.asarray(value, dtype=dtype).tobytes()
    out += struct.pack("<I", _VT[kind])
    return out + (_s(value) if kind == "str" else struct.pack(_FMT[kind], value))


def _pad(n: int) -> int:
    return (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT


def block_pool(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """n_blocks random blocks of a quantised type, every fp16 scale set to SCALE."""
    _, _, size, halves = GGML_TYPES[type_name]
    pool = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(SCALE).tobytes(), dtype=np.uint8)
    for off in halves:
        pool[:, off : off + 2] = scale
    return pool.reshape(-1)


def _chunks(spec: TensorSpec, pools: dict[str, np.ndarray[Any, Any]]) -> Iterator[bytes]:
    if spec.type_name == "F32":
        is_norm = spec.name.endswith("norm.weight")
        yield np.full(spec.n_elements, 1.0 if is_norm else 0.0, dtype="<f4").tobytes()
        return
    pool = pools[spec.type_name]
    left = spec.nbytes
    while left:
        n = min(left, pool.size)
        yield pool[:n].tobytes()
        left -= n


def write(path: str | Path, c: Config = SEED_OSS_36B, seed: int = 0) -> int:
    """Write the file; returns its size in bytes."""
    table = tensor_table(c)
    meta = metadata(c)
    rng = np.random.default_rng(seed)
    # ~8 MiB of blocks per quantised type, repeated: rows differ (the pool is no multiple of a
    # row), values are irrelevant to speed.
    pools = {
        name: block_pool(name, (8 << 20) // GGML_TYPES[name][2], rng)
        for name in {t.type_name for t in table}
        if name != "F32"
    }
    head = b"GGUF" + struct.pack("<IQQ", 3, len(table), len(meta))
    head += b"".join(_kv(*kv) for kv in meta)
    offset = 0
    for t in table:
        head += _s(t.name) + struct.pack("<I", len(t.dims))
        head += struct.pack(f"<{len(t.dims)}Q", *t.dims)
        head += struct.pack("<IQ", GGML_TYPES[t.type_name][0], offset)
        offset += t.nbytes + _pad(t.nbytes)
    head += bytes(_pad(len(head)))
    out: BinaryIO
    with open(path, "wb") as out:
        out.write(head)
        for t in table:
            for chunk in _chunks(t, pools):
                out.write(chunk)
            out.write(bytes(_pad(t.nbytes)))
        return out.tell()


def expected_size(c: Config = SEED_OSS_36B) -> int:
    """The data section's size (the file is this plus its header)."""
    return sum(t.nbytes + _pad(t.nbytes) for t in tensor_table(c))
