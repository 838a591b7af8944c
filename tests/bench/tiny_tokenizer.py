"""A Hugging Face tokenizer directory for the tiny test model (tests/support/tinygguf.py).

The tiny GGUF's vocabulary is llama.cpp's SPM with nothing but byte-fallback pieces:
``<unk>``, ``<seed:bos>``, ``<seed:eos>``, then ``<0x00>`` … ``<0xFF>``: the server makes
one token of every UTF-8 byte, after SPM turns each space into "▁" (3 bytes) and puts one
"▁" in front. This tokenizer has the same ids, one per byte (a BPE model with no merges
and byte fallback, the layout of Llama's fast tokenizers), without the "▁" rewriting:
aiperf builds prompts by decoding windows of tokens and re-encoding them, and a 3-byte
"▁" cut in two decodes to U+FFFD, which grows on every round until the prompt is nothing
else. So a prompt counted n tokens here is n + 2 x spaces + 3 on the server; the bench
reports the server's own counts (``use_server_token_count``). Written as JSON: making it
needs no tokenizer library (aiperf's ``transformers`` reads it).

  python -m tests.bench.tiny_tokenizer DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPECIAL = ["<unk>", "<seed:bos>", "<seed:eos>"]
SPACE = "\u2581"


def vocab() -> list[str]:
    """The tiny GGUF's token list, in its order (ids are positions)."""
    return SPECIAL + [f"<0x{i:02X}>" for i in range(256)]


def tokenizer_json() -> dict[str, Any]:
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(vocab())},
            "merges": [],
        },
    }


def server_count(text: str) -> int:
    """Tokens llama.cpp makes of `text` with the tiny vocabulary (its rule, in Python)."""
    return len((SPACE + text.replace(" ", SPACE)).encode())


def write(directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "bos_token": "<seed:bos>",
                "eos_token": "<seed:eos>",
                "add_bos_token": False,
                "model_max_length": 8192,
            }
        )
    )
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("directory")
    print(write(ap.parse_args().directory))


if __name__ == "__main__":
    main()
