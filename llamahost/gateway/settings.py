"""The gateway's settings: HAProxy on the hosts of group `gateway`, and how served hosts are
changed behind it (rolling restarts). Rows in the shape of llamahost.config.SETTINGS."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, fields
from pathlib import Path

from llamahost.checks import (
    PREFIX,
    FieldError,
    Invalid,
    Setting,
    boolean,
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
# An HTTP header name (RFC 9110 token), so no space or newline can reach the configuration.
header_name = pattern(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", "an HTTP header name like X-Session-Id")
controller_path = pattern(
    r"[A-Za-z0-9._+@/-]+", "a path on the controller (letters, digits, ._+@/-)"
)


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
        "Certificate chain (PEM) on the controller, relative to the repository or absolute. "
        "Unset (with `llama_gateway_tls_key`): a self-signed one is made on the gateway, with a "
        "warning in the run's output.",
    ),
    Setting(
        "gateway_tls_key",
        None,
        optional(controller_path),
        "The certificate's private key (PEM) on the controller; not readable by others "
        "(mode 0600 or 0640). Written to the gateway as a secret, never printed.",
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
        "Requests per minute per client key; above it the gateway answers 429. 0: no limit.",
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
        "(a stream resets it with each token).",
    ),
    Setting(
        "gateway_max_body",
        8 * 1024 * 1024,
        integer(1024, 1024**3),
        "Largest request body in bytes (413 above it; a body without Content-Length: 411).",
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
        "serve",
        True,
        boolean,
        "`false`: the host serves no llama-server and runs only what its groups ask (a "
        "`gateway` host's HAProxy, a `monitoring` host's Prometheus): no driver, llama.cpp or "
        "model. Such a host must be in group `gateway` or `monitoring`.",
    ),
    Setting(
        "firewall",
        False,
        boolean,
        "On served hosts, an nftables table of the toolkit's own (`inet llamahost`): the llama "
        "port only from the `gateway` hosts, the exporter ports only from the `monitoring` "
        "hosts, loopback always; other traffic (SSH included) is left alone. Needs a `gateway` "
        "group whose hosts' addresses (`llama_monitoring_address` or `ssh_hostname`) are IPs.",
    ),
    Setting(
        "rolling_max_unavailable",
        1,
        integer(1, 1000),
        "Served hosts out of the gateways' rotation at once while a deploy restarts them.",
    ),
    Setting(
        "rolling_drain_timeout",
        300,
        integer(1, 86400),
        "Seconds a drained host may take to finish its requests in flight before it is "
        "restarted anyway.",
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
    gateway_queue_timeout: str
    gateway_server_timeout: str
    gateway_max_body: int
    gateway_affinity_header: str | None
    serve: bool
    firewall: bool
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
