"""Read a GGUF file's header (metadata and tensor table) without its weights.

Works on a local file or over HTTP range requests (the Hub, a mirror, the local test
endpoint), fetching only the bytes the header spans: a few MB of a 26 GB model. Types and
block sizes come from the gguf package, so any architecture and quantisation it knows is
understood.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf

# GGUF value types (gguf.GGUFValueType) → struct formats of the scalars.
_SCALAR = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


class HeaderError(ValueError):
    pass


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type_name: str
    nbytes: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    tensors: tuple[Tensor, ...]
    header_bytes: int

    @property
    def arch(self) -> str:
        return str(self.metadata["general.architecture"])

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    @property
    def n_vocab(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, LongArray):
            return tokens.count
        if isinstance(tokens, list):
            return len(tokens)
        embd = next((t for t in self.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise HeaderError("no vocabulary size in the header")
        return embd.shape[1]


Fetch = Callable[[int, int], bytes]  # (offset, length) -> bytes (may be shorter at EOF)


class _Cursor:
    """Sequential reads over a fetch function, pulling ever larger chunks as needed."""

    def __init__(self, fetch: Fetch, first_chunk: int = 1 << 20):
        self.fetch = fetch
        self.buf = b""
        self.pos = 0
        self.chunk = first_chunk

    def take(self, n: int) -> bytes:
        while len(self.buf) < self.pos + n:
            more = self.fetch(len(self.buf), max(self.chunk, self.pos + n - len(self.buf)))
            if not more:
                raise HeaderError("file ends inside the GGUF header")
            self.buf += more
            self.chunk = min(self.chunk * 2, 64 << 20)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        return self.take(n).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class LongArray:
    """A long array (the vocabulary, its scores): only its length is kept."""

    count: int


def _value(c: _Cursor, vtype: int) -> Any:
    t = gguf.GGUFValueType(vtype)
    if t in _SCALAR:
        return c.unpack(_SCALAR[t])
    if t == gguf.GGUFValueType.STRING:
        return c.string()
    if t == gguf.GGUFValueType.ARRAY:
        etype = c.unpack("<I")
        count = c.unpack("<Q")
        et = gguf.GGUFValueType(etype)
        if et in _SCALAR:
            fmt = _SCALAR[et]
            raw = c.take(struct.calcsize(fmt) * count)
            return LongArray(count) if count > 64 else list(struct.unpack(f"<{count}{fmt[1]}", raw))
        items = [_value(c, etype) for _ in range(count)]
        return LongArray(count) if count > 64 else items
    raise HeaderError(f"unknown GGUF value type {vtype}")


def parse(fetch: Fetch) -> Header:
    c = _Cursor(fetch)
    if c.take(4) != b"GGUF":
        raise HeaderError("not a GGUF file (bad magic)")
    version = c.unpack("<I")
    if version not in (2, 3):
        raise HeaderError(f"unsupported GGUF version {version}")
    n_tensors = c.unpack("<Q")
    n_kv = c.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = _value(c, c.unpack("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.unpack("<I")
        shape = tuple(c.unpack("<Q") for _ in range(n_dims))
        qtype = gguf.GGMLQuantizationType(c.unpack("<I"))
        c.unpack("<Q")  # offset in the data section
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for d in shape:
            n *= d
        tensors.append(Tensor(name, shape, qtype.name, n // block * type_size))
    return Header(meta, tuple(tensors), c.pos)


def read_file(path: str | os.PathLike[str]) -> Header:
    with open(path, "rb") as f:

        def fetch(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return parse(fetch)


def read_url(url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> Header:
    """Over HTTP range requests; the Hub's redirects are followed."""
    import requests

    session = requests.Session()

    def fetch(offset: int, length: int) -> bytes:
        r = session.get(
            url,
            headers={**(headers or {}), "Range": f"bytes={offset}-{offset + length - 1}"},
            timeout=timeout,
        )
        if r.status_code == 416:
            return b""
        r.raise_for_status()
        if r.status_code != 206 and offset:
            raise HeaderError(f"{url}: the server ignores Range requests")
        return r.content[:length] if r.status_code == 200 else r.content

    return parse(fetch)
