"""Client keys: the gateway's own list, one per client or team, read from a controller file.

Format: one ``NAME KEY`` per line; blank lines and ``#`` comments ignored. Names label the
client in HAProxy's logs and rate limits; keys are what clients send as bearer tokens. A
name may be listed twice: the overlap window of a key rotation (old and new key both valid,
one client, one rate limit), closed by removing the old line (docs/operations.md).
Nothing here ever puts a key in an exception message.

On the gateway a key is never kept in clear: the map file holds each key's sha256 (upper-case
hex, as HAProxy's ``sha2(256),hex`` computes it from the request's header) and the client's
name. A client key has at least ``MIN_CLIENT_KEY`` characters, so that its hash cannot be
reversed by trying keys (``openssl rand -base64 32`` makes one of 44).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from llamahost.checks import API_KEY_RE, Invalid
from llamahost.secret import Secret

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The shape llamahost.config accepts for an API key: safe in an HAProxy map file.
KEY = re.compile(API_KEY_RE)
MAX_KEYS_PER_CLIENT = 2  # its key and, while it rotates, the next one
MIN_CLIENT_KEY = 32  # characters; shorter keys are refused, new or existing


@dataclass(frozen=True)
class ClientKey:
    name: str
    key: Secret

    def __repr__(self) -> str:
        return f"ClientKey({self.name!r}, <hidden>)"

    def token(self) -> str:
        """The bare key, as a client sends it (the Secret holds it as a file's line)."""
        return self.key.reveal().rstrip("\n")


def parse_client_keys(text: str) -> list[ClientKey]:
    """The clients of a keys file; Invalid names the line, never the key."""
    clients: list[ClientKey] = []
    names: list[str] = []
    keys: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise Invalid(f"line {n}: must be `NAME KEY` (two words)")
        name, key = parts
        if not NAME.fullmatch(name):
            raise Invalid(f"line {n}: the client name must be 1-64 of A-Z a-z 0-9 . _ -")
        if not KEY.fullmatch(key):
            raise Invalid(f"line {n} ({name}): the key must be 16-256 of A-Z a-z 0-9 . _ ~ + / = -")
        if len(key) < MIN_CLIENT_KEY:
            raise Invalid(
                f"line {n} ({name}): a client key must have at least {MIN_CLIENT_KEY} "
                f"characters (this one has {len(key)}); make one with `openssl rand -base64 32`"
            )
        if names.count(name) == MAX_KEYS_PER_CLIENT:
            raise Invalid(
                f"line {n}: client {name!r} is listed {MAX_KEYS_PER_CLIENT + 1} times; a "
                f"client has at most {MAX_KEYS_PER_CLIENT} keys (its old and its new one "
                "while it rotates)"
            )
        if key in keys:
            raise Invalid(f"line {n} ({name}): the same key is given to another client")
        names.append(name)
        keys.add(key)
        clients.append(ClientKey(name, Secret(key)))
    if not clients:
        raise Invalid("lists no client: every request would get 401")
    return clients


def read_client_keys(path: Path) -> list[ClientKey]:
    try:
        text = path.read_text()
    except OSError as e:
        raise Invalid(f"cannot be read ({e.strerror})") from None
    return parse_client_keys(text)


def digest(key: str) -> str:
    """A key as the gateway keeps it: sha256, upper-case hex (HAProxy's ``sha2(256),hex``)."""
    return hashlib.sha256(key.encode()).hexdigest().upper()


def client_map(clients: list[ClientKey]) -> Secret:
    """HAProxy map file: sha256 of the key → client name (the key itself is never there)."""
    return Secret("".join(f"{digest(c.token())} {c.name}\n" for c in clients))
