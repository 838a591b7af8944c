"""The settings vocabulary: field errors, setting rows and typed checks.

Every concern (the core in ``config``, the GPU stack in ``gpu.settings``, monitoring in
``monitoring.settings``) declares its knobs as ``Setting`` rows built from these checks;
``llamahost.spec.resolve_host`` validates all of them at once. This module imports nothing
from the package, so any module can use it without an import cycle.

Validation is strict on purpose: a value that ends up in a unit file or a shell command
must be one line of a known shape, so inventory data can never add lines to a unit or
words to a command.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "llama_"


class Invalid(ValueError):
    """A value is not allowed; the message says what is."""


@dataclass(frozen=True)
class FieldError:
    key: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r}: {self.allowed}"


class ConfigError(Exception):
    def __init__(self, host: str, errors: list[FieldError]):
        self.host = host
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"host {host!r}: invalid inventory data (nothing was changed):\n{lines}")


# ---------------------------------------------------------------- value checks
Check = Callable[[Any], Any]


def integer(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise Invalid(f"must be an integer from {lo} to {hi}")
        return v

    return check


def unprivileged_port(who: str) -> Check:
    """A port for a daemon that runs as an unprivileged user without capabilities: ports
    below 1024 would need CAP_NET_BIND_SERVICE, which the toolkit does not grant."""

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            raise Invalid("must be an integer from 1024 to 65535")
        if v < 1024:
            raise Invalid(
                f"must be from 1024 to 65535: {who} runs as an unprivileged user without "
                "capabilities and cannot bind a port below 1024 (a deploy would restart it "
                "into a unit that fails); clients reach port 443 through the gateway"
            )
        return v

    return check


def number(lo: float, hi: float, *, lo_open: bool = False) -> Check:
    """A finite int or float in [lo, hi] (or (lo, hi] with lo_open)."""
    left = "(" if lo_open else "["

    def check(v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN
        if not ok or not (lo < v if lo_open else lo <= v) or not v <= hi:
            raise Invalid(f"must be a number in {left}{lo:g}, {hi:g}]")
        return float(v)

    return check


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Invalid("must be true or false")
    return v


def choice(*options: str) -> Check:
    def check(v: Any) -> str:
        if v not in options:
            raise Invalid("must be one of: " + ", ".join(options))
        return str(v)

    return check


def pattern(regex: str, what: str) -> Check:
    compiled = re.compile(regex)

    def check(v: Any) -> str:
        # fullmatch and no "$": a trailing newline must not slip through.
        if not isinstance(v, str) or not compiled.fullmatch(v):
            raise Invalid(f"must be {what}")
        return v

    return check


def optional(inner: Check) -> Check:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)

    return check


def either(first: Check, second: Check, what: str) -> Check:
    def check(v: Any) -> Any:
        for c in (first, second):
            try:
                return c(v)
            except Invalid:
                pass
        raise Invalid(f"must be {what}")

    return check


def listen_address(v: Any) -> str:
    if isinstance(v, str):
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
    raise Invalid("must be an IPv4 or IPv6 address, e.g. 0.0.0.0 (all) or 127.0.0.1")


abs_path = pattern(
    r"/(?!.*(?:^|/)\.\.(?:/|$))[A-Za-z0-9._+@/-]*",
    "an absolute path of letters, digits and ._+@/- (no '..')",
)
# Directories that belong to the system: a path setting may name a directory below them,
# never one of them (the deploy would re-own or re-mode it), nor anything in the places
# that any user can write to.
SYSTEM_DIRS = frozenset(
    [
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",  # noqa: S108  (a name to refuse, not a file to use)
        "/usr",
        "/var",
        "/usr/bin",
        "/usr/lib",
        "/usr/local",
        "/usr/local/bin",
        "/usr/local/lib",
        "/usr/sbin",
        "/usr/share",
        "/var/cache",
        "/var/lib",
        "/var/log",
        "/var/opt",
        "/var/spool",
        "/var/tmp",  # noqa: S108
        "/etc/ssl",
        "/etc/systemd",
        "/etc/systemd/system",
        "/etc/default",
        "/run/user",
        "/var/mail",
        "/var/backups",
    ]
)
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev", "/run/user", "/proc", "/sys")  # noqa: S108


def owned_dir(v: Any) -> str:
    """A directory the toolkit creates and owns: absolute, no '..', not a system directory,
    not in a place every user can write to."""
    path = str(abs_path(v)).rstrip("/") or "/"
    if path in SYSTEM_DIRS:
        raise Invalid(
            f"must be a directory of its own, not the system directory {path} (the deploy "
            "sets its owner and mode), e.g. /var/lib/llama-models"
        )
    if any(path == d or path.startswith(d + "/") for d in SHARED_WRITABLE):
        raise Invalid(f"must not be under {', '.join(SHARED_WRITABLE)}: other users write there")
    return path


def owned_file(v: Any) -> str:
    """A file in a directory of its own (the deploy owns that directory too)."""
    path = str(abs_path(v))
    parent = path.rsplit("/", 1)[0] or "/"
    if path.endswith("/") or parent in SYSTEM_DIRS:
        raise Invalid(
            f"must be a file in a directory of its own, not in the system directory {parent} "
            "(the deploy sets the directory's owner and mode), e.g. /etc/llama-server/api-key"
        )
    owned_dir(parent)
    return path


# An API key (ours or a client's): safe in a file, a map, an HTTP header.
API_KEY_RE = r"[A-Za-z0-9._~+/=-]{16,256}"
api_key = pattern(API_KEY_RE, "16-256 of letters, digits and ._~+/=-")
http_url = pattern(r"https?://[A-Za-z0-9._~:/?#\[\]@!&'()*+,;=%{}-]+", "an http(s) URL")
sha256_hex = pattern(r"[0-9a-f]{64}", "a sha256 in 64 lower-case hex digits")
cmake_define = pattern(r"-D[A-Za-z0-9_]+(?::[A-Z]+)?=[A-Za-z0-9._;,+/-]*", "-DNAME=VALUE")


def cmake_args(v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise Invalid("must be a list of -DNAME=VALUE strings")
    try:
        return tuple(cmake_define(a) for a in v)
    except Invalid:
        raise Invalid("must be a list of -DNAME=VALUE strings") from None


@dataclass(frozen=True)
class Setting:
    key: str  # without the llama_ prefix
    default: Any  # PROFILE: taken from the host's profile
    check: Check
    doc: str


PROFILE = object()  # marker: the default comes from the chosen profile


def check_rows(
    rows: tuple[Setting, ...], data: Mapping[str, Any], errors: list[FieldError]
) -> dict[str, Any]:
    """Each row's value from data (or its default), checked; failures go to errors."""
    values: dict[str, Any] = {}
    for s in rows:
        value = data.get(PREFIX + s.key, s.default)
        try:
            values[s.key] = s.check(value)
        except Invalid as e:
            errors.append(FieldError(PREFIX + s.key, value, str(e)))
    return values
