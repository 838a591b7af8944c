"""The gateway's settings: HAProxy on the hosts of group `gateway`, and how served hosts are
changed behind it (rolling restarts). Rows in the shape of llamahost.config.SETTINGS."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llamahost.checks import (
    PREFIX,
    FieldError,
    Invalid,
    Setting,
    boolean,
    choice,
    either,
    integer,
    listen_address,
    optional,
    pattern,
)
from llamahost.layout import REPO

GROUP = "gateway"  # inventory group whose hosts run HAProxy

# HAProxy from the distribution: Debian 12 ships 2.6, Ubuntu 22.04 2.4, Ubuntu 24.04 2.8.
# The configuration uses only what 2.4 has (docs/gateway.md); older is refused.
MIN_HAPROXY = (2, 4)

# A client waiting in the queue past the queue timeout gets 503 with this Retry-After.
RETRY_AFTER_S = 5

# HAProxy time format (a number and a unit); the value goes into haproxy.cfg as is.
haproxy_time = pattern(r"[1-9][0-9]{0,6}(?:ms|s|m|h)", "a duration like 500ms, 30s, 10m or 1h")
_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(value: str) -> float:
    """An HAProxy time of ``haproxy_time`` ("500ms", "600s", "10m", "1h") in seconds;
    ValueError for anything else."""
    number = value.rstrip("msh")
    unit = value[len(number) :]
    if not number.isascii() or not number.isdigit() or unit not in _TIME_UNITS:
        raise ValueError(f"not an HAProxy time like 500ms, 30s, 10m or 1h: {value!r}")
    return int(number) * _TIME_UNITS[unit]


# An HTTP header name (RFC 9110 token), so no space or newline can reach the configuration.
header_name = pattern(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", "an HTTP header name like X-Session-Id")
controller_path = pattern(
    r"[A-Za-z0-9._+@/-]+", "a path on the controller (letters, digits, ._+@/-)"
)

# What clients reach through the gateway (docs/gateway.md#what-clients-can-reach): the
# OpenAI-compatible API, read from llama-server's routes at the pinned commit
# (tools/server/server.cpp), each path with its methods. Anything else is answered 404 by
# the gateway itself, a listed path with another method 405; /health and /v1/health are
# answered by the gateway without a key.
API_PATHS: tuple[tuple[str, str], ...] = (
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
    ("/v1/responses", "POST"),
    ("/v1/models", "GET"),
)
HEALTH_PATHS = ("/health", "/v1/health")
# llama-server paths that give one client other clients' activity or act on the host:
# opened by llama_gateway_extra_paths only with llama_gateway_allow_dangerous_paths.
DANGEROUS_PATHS = {
    "/slots": "shows every slot's prompt activity and sampling, and saves or erases slots",
    "/metrics": "shows the whole host's load and token counts",
    "/props": "shows the server's settings and chat template",
    "/lora-adapters": "lists and (POST) changes the adapters every client is served with",
    "/tokenize": "runs the host's tokenizer outside the API's limits",
    "/detokenize": "runs the host's tokenizer outside the API's limits",
    "/apply-template": "renders prompts outside the API",
    "/infill": "generates outside the OpenAI API",
    "/v1/stream": "replays or cancels another client's resumable stream by its id",
    "/v1/streams/lookup": "finds other clients' resumable streams",
    "/v1/chat/completions/control": "acts on another client's generation by its id",
}
_EXTRA_PATH = re.compile(r"(?:/[A-Za-z0-9._~:@!$&'()*+,;=-]+)+")


def dangerous(path: str) -> str | None:
    """Why ``path`` is one of DANGEROUS_PATHS (or under one), else None."""
    for p, why in DANGEROUS_PATHS.items():
        if path.rstrip("/") == p or path.startswith(p + "/"):
            return why
    return None


def extra_paths(v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v):
        raise Invalid("must be a list of exact paths like /v1/messages")
    for p in v:
        if not _EXTRA_PATH.fullmatch(p) or "/../" in p + "/" or "/./" in p + "/":
            raise Invalid(
                f"{p!r}: an exact path starting with /, of letters, digits and ._~:@!$&'()*+,;=- "
                "between single slashes (no .., no query string)"
            )
        if p in HEALTH_PATHS or p in dict(API_PATHS):
            raise Invalid(f"{p!r} is open already")
    if len(set(v)) != len(v):
        raise Invalid("lists a path twice")
    return tuple(v)


GATEWAY_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "gateway_listen",
        "0.0.0.0",  # noqa: S104  (clients reach the gateway from elsewhere)
        listen_address,
        "Address HAProxy listens on for clients (HTTPS only) on the `gateway` hosts.",
    ),
    Setting("gateway_port", 443, integer(1, 65535), "HTTPS port of the gateway."),
    Setting(
        "gateway_tls_cert",
        None,
        optional(controller_path),
        "Certificate chain (PEM) on the controller, relative to the repository or absolute: "
        "the certificate, then each intermediate in order, ending at a self-signed root or at "
        "one the controller's trust store holds; checked with openssl before any change "
        "(matches the key, valid now, chain complete). Unset (with `llama_gateway_tls_key`): a "
        "self-signed one is made on the gateway, with a warning in the run's output, and "
        "renewed by a deploy once it has less than 30 days left.",
    ),
    Setting(
        "gateway_tls_key",
        None,
        optional(controller_path),
        "The certificate's private key (PEM) on the controller, not encrypted; not readable by "
        "others (mode 0600 or 0640). Written to the gateway as a secret, never printed, and "
        "put in place only once `haproxy -c` accepts it.",
    ),
    Setting(
        "gateway_client_keys_file",
        None,
        optional(controller_path),
        "Clients' keys on the controller: one `NAME KEY` per line (`#` comments), not "
        "readable by others. Required on `gateway` hosts. Adding or revoking a client is an "
        "edit of this file and a rerun (hitless reload).",
    ),
    Setting(
        "gateway_rate_limit",
        600,
        integer(0, 1_000_000),
        "Requests per minute per client key, per gateway, kept across reloads; above it the "
        "gateway answers 429. 0: no limit.",
    ),
    Setting(
        "gateway_max_in_flight",
        "auto",
        either(choice("auto"), integer(0, 100_000), "auto, or an integer from 0 to 100000"),
        "Requests in flight per client key (streams included, whichever host serves them); "
        "past it the gateway answers 429 with `Retry-After: 1`, so that one key cannot hold "
        "every slot. `auto`: half the slots of the served hosts (rounded up). 0: no limit.",
    ),
    Setting(
        "gateway_auth_failure_limit",
        30,
        integer(0, 1_000_000),
        "Failed authentications (401) per minute from one client address; past it every "
        "request from that address gets 429 with `Retry-After: 60` until its rate falls "
        "under the limit (online key guessing). 0: no limit.",
    ),
    Setting(
        "gateway_queue_timeout",
        "30s",
        haproxy_time,
        "How long a request waits in the gateway's queue for a free slot before it gets 503 "
        f"with `Retry-After: {RETRY_AFTER_S}`.",
    ),
    Setting(
        "gateway_server_timeout",
        "600s",
        haproxy_time,
        "Longest silence from a llama-server: covers the longest non-streaming generation "
        "(a stream resets it with each token). The served hosts' `llama_rolling_drain_timeout` "
        "must be at least as long.",
    ),
    Setting(
        "gateway_max_body",
        8 * 1024 * 1024,
        integer(1024, 1024**3),
        "Largest request body in bytes, any method (413 above it; a chunked body, or a request "
        "other than GET or HEAD without Content-Length: 411).",
    ),
    Setting(
        "gateway_extra_paths",
        [],
        extra_paths,
        "More exact paths clients may reach (GET and POST), beyond the OpenAI-compatible API "
        "(`/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/models`) and "
        "`/health`; every other path is answered 404 by the gateway. `/slots`, `/metrics`, "
        "`/props`, `/lora-adapters`, `/tokenize`, `/detokenize`, `/apply-template`, `/infill` "
        "and the stream handles (`/v1/stream`, `/v1/streams/lookup`, "
        "`/v1/chat/completions/control`) are refused unless "
        "`llama_gateway_allow_dangerous_paths`.",
    ),
    Setting(
        "gateway_allow_dangerous_paths",
        False,
        boolean,
        "`true`: `llama_gateway_extra_paths` may open the paths that show one client the "
        "others' activity or act on the host (every client key then reaches them).",
    ),
    Setting(
        "gateway_affinity_header",
        None,
        optional(header_name),
        "Session affinity, off when unset: requests carrying this header (e.g. "
        "`X-Session-Id`) go by consistent hash to the same host, which holds the "
        "conversation's prompt cache; requests without it go round robin (least "
        "connections applies with affinity off).",
    ),
    Setting(
        "gateway_hash_balance_factor",
        150,
        either(integer(0, 0), integer(101, 65535), "0 (off), or from 101 to 65535"),
        "With `llama_gateway_affinity_header`: a host takes a session's request only while "
        "its requests in flight stay under this percentage of the hosts' average; past it "
        "the session spills over to the next host (HAProxy's `hash-balance-factor`). 0: no "
        "bound.",
    ),
    Setting(
        "serve",
        True,
        boolean,
        "`false`: the host serves no llama-server and runs only what its groups ask (a "
        "`gateway` host's HAProxy, a `monitoring` host's Prometheus): no driver, llama.cpp or "
        "model. Such a host must be in group `gateway` or `monitoring`.",
    ),
    Setting(
        "firewall",
        "auto",
        either(boolean, choice("auto"), "true, false or auto"),
        "`auto`: on for the served hosts of an inventory with a `gateway` group, off without "
        "one; `false` on such a host leaves its llama port open to the network (the run "
        "warns). On: an nftables table of the toolkit's own (`inet llamahost`): the llama "
        "port only from the `gateway` hosts and the `monitoring` hosts (Prometheus scrapes "
        "llama-server's `/metrics` there), the exporter ports only from the `monitoring` "
        "hosts, loopback always; other traffic (SSH included) is left alone. Needs a `gateway` "
        "group; its hosts' and the `monitoring` hosts' addresses (`llama_monitoring_address` "
        "or `ssh_hostname`) must be IPs (else refused by `make plan` and the deploy alike).",
    ),
    Setting(
        "rolling_max_unavailable",
        1,
        integer(1, 1000),
        "Served hosts out of the gateways' rotation at once while a deploy restarts or "
        "reboots them, counting hosts any gateway already sees out (DOWN, MAINT, DRAIN); a "
        "host waits up to 180 s for room, then the rollout stops with the reason. "
        "`pyinfra --no-wait` is refused with gateways (it would ignore this bound).",
    ),
    Setting(
        "rolling_drain_timeout",
        600,
        integer(1, 86400),
        "Seconds a drained host may take to finish its requests in flight before it is "
        "restarted anyway. At least the `gateway` hosts' `llama_gateway_server_timeout` (the "
        "longest answer they wait for), else refused by `make plan` and the deploy.",
    ),
)


@dataclass(frozen=True)
class GatewayConfig:
    gateway_listen: str
    gateway_port: int
    gateway_tls_cert: str | None
    gateway_tls_key: str | None
    gateway_client_keys_file: str | None
    gateway_rate_limit: int
    gateway_max_in_flight: str | int
    gateway_auth_failure_limit: int
    gateway_queue_timeout: str
    gateway_server_timeout: str
    gateway_max_body: int
    gateway_extra_paths: tuple[str, ...]
    gateway_allow_dangerous_paths: bool
    gateway_affinity_header: str | None
    gateway_hash_balance_factor: int
    serve: bool
    firewall: bool  # "auto" resolved by resolve_host (llamahost.spec)
    rolling_max_unavailable: int
    rolling_drain_timeout: int


assert [f.name for f in fields(GatewayConfig)] == [s.key for s in GATEWAY_SETTINGS]


def controller_file(value: str) -> Path:
    """A controller path setting: relative ones are relative to the repository."""
    p = Path(value)
    return p if p.is_absolute() else REPO / p


def _private_file(key: str, value: str, what: str) -> list[FieldError]:
    path = controller_file(value)
    try:
        st = path.stat()
    except OSError as e:
        why = f"{what} not found on the controller ({e.strerror})"
        return [FieldError(PREFIX + key, value, why)]
    if not stat.S_ISREG(st.st_mode):
        return [FieldError(PREFIX + key, value, f"must be a file ({what})")]
    if st.st_mode & 0o007:
        return [
            FieldError(
                PREFIX + key,
                value,
                f"{what} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"chmod 600 {path}",
            )
        ]
    if not os.access(path, os.R_OK):
        return [FieldError(PREFIX + key, value, f"{what} cannot be read by this user")]
    return []


def _tls_pair(cert: str, key: str) -> list[FieldError]:
    """The supplied certificate and key as HAProxy and clients will take them
    (llamahost/gateway/tls.py: the pair matches, the key is not encrypted, every certificate
    is valid now, the chain is complete), checked with openssl before any change."""
    from llamahost.gateway import tls

    values = {tls.CERT: cert, tls.KEY: key}
    return [
        FieldError(PREFIX + p.key, values[p.key], p.why)
        for p in tls.check(controller_file(cert), controller_file(key))
    ]


def cross_checks(gw: GatewayConfig, *, is_gateway: bool) -> list[FieldError]:
    """The checks that read several values or the controller's files."""
    errors: list[FieldError] = []
    if (gw.gateway_tls_cert is None) != (gw.gateway_tls_key is None):
        missing = "gateway_tls_key" if gw.gateway_tls_key is None else "gateway_tls_cert"
        errors.append(
            FieldError(
                PREFIX + missing,
                None,
                "set both gateway_tls_cert and gateway_tls_key, or neither (self-signed)",
            )
        )
    if not gw.gateway_allow_dangerous_paths:
        for path in gw.gateway_extra_paths:
            why = dangerous(path)
            if why is not None:
                errors.append(
                    FieldError(
                        PREFIX + "gateway_extra_paths",
                        list(gw.gateway_extra_paths),
                        f"{path!r} {why}: every client key would reach it; opened only with "
                        "llama_gateway_allow_dangerous_paths: true",
                    )
                )
    if (gw.gateway_affinity_header or "").lower() == "x-conversation-id":
        errors.append(
            FieldError(
                PREFIX + "gateway_affinity_header",
                gw.gateway_affinity_header,
                "the gateway never forwards X-Conversation-Id (it would let one client reach "
                "another's resumable stream); name another header, e.g. X-Session-Id",
            )
        )
    if not is_gateway:
        return errors
    if gw.gateway_tls_cert is not None:
        p = controller_file(gw.gateway_tls_cert)
        if not p.is_file():
            errors.append(
                FieldError(
                    PREFIX + "gateway_tls_cert",
                    gw.gateway_tls_cert,
                    "the certificate file is not found on the controller",
                )
            )
    if gw.gateway_tls_key is not None:
        errors += _private_file("gateway_tls_key", gw.gateway_tls_key, "the TLS key")
    if gw.gateway_tls_cert is not None and gw.gateway_tls_key is not None and not errors:
        errors += _tls_pair(gw.gateway_tls_cert, gw.gateway_tls_key)
    if gw.gateway_client_keys_file is None:
        errors.append(
            FieldError(
                PREFIX + "gateway_client_keys_file",
                None,
                f"required on a host of group {GROUP!r}: a controller file of `NAME KEY` "
                "lines (the clients the gateway admits)",
            )
        )
    else:
        file_errors = _private_file(
            "gateway_client_keys_file", gw.gateway_client_keys_file, "the client keys file"
        )
        if not file_errors:
            try:
                from llamahost.gateway.clients import read_client_keys

                read_client_keys(controller_file(gw.gateway_client_keys_file))
            except Invalid as e:
                file_errors.append(
                    FieldError(
                        PREFIX + "gateway_client_keys_file", gw.gateway_client_keys_file, str(e)
                    )
                )
        errors += file_errors
    return errors
