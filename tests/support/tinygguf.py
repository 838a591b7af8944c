"""A tiny random-weight GGUF of architecture seed_oss (about 0.5 MB).

It loads and serves in llama-server at the pinned commit, which proves provisioning, the
API, the key, the slots, the metrics and the chat template; it answers random bytes and
proves nothing about answer quality. Recipe: docs/facts.md, "The tiny Seed-OSS model for tests".
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = 32
N_FF = 128
N_CTX_TRAIN = 8192

# Seed-OSS's turn format: <seed:bos>{role}\n{content}<seed:eos>, generation prompt
# <seed:bos>assistant\n (the same text llama.cpp's built-in "seed_oss" template renders).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<seed:bos>{{ message['role'] }}\n{{ message['content'] }}<seed:eos>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<seed:bos>assistant\\n' }}{%- endif -%}"
)


def write(path: str, seed: int = 0, chat_template: str = CHAT_TEMPLATE) -> None:
    rng = np.random.default_rng(seed)
    arch = "seed_oss"
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)

    tokens = ["<unk>", "<seed:bos>", "<seed:eos>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", len(tokens), N_EMBD)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for i in range(N_LAYER):
        b = f"blk.{i}."
        t(b + "attn_q.weight", N_HEAD * HEAD_DIM, N_EMBD)
        t(b + "attn_k.weight", N_HEAD_KV * HEAD_DIM, N_EMBD)
        t(b + "attn_v.weight", N_HEAD_KV * HEAD_DIM, N_EMBD)
        t(b + "attn_output.weight", N_EMBD, N_HEAD * HEAD_DIM)
        w.add_tensor(b + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(b + "post_attention_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        t(b + "ffn_gate.weight", N_FF, N_EMBD)
        t(b + "ffn_up.weight", N_FF, N_EMBD)
        t(b + "ffn_down.weight", N_EMBD, N_FF)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write(a.path, a.seed)
