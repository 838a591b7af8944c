"""The fleet gateway on the hosts of group `gateway`: HAProxy from the distribution in front
of every llama-server of the inventory (docs/gateway.md).

Its configuration is rendered from the whole inventory on every run, staged, checked with
``haproxy -c`` and only then put in place, and applied with a hitless reload (the old
process finishes the requests it holds). Every secret it holds (the TLS key, the clients'
keys, each served host's API key) goes by tasks/secret.py, so none is ever printed, and
lives in files root:haproxy 0640 in a 0750 directory. A served host's generated key is read
from that host while the run executes, as the monitoring hosts read it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import posixpath
import re
import shlex
from collections.abc import Generator
from dataclasses import dataclass

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.api.facts import FactBase
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta, operation
from pyinfra.api.state import State
from pyinfra.context import host, inventory, state
from pyinfra.facts.files import Directory, FindFiles
from pyinfra.operations import apt, files, python, server

from llamahost import layout
from llamahost.checks import ConfigError
from llamahost.gateway import haproxy as hx
from llamahost.gateway.clients import client_map, read_client_keys
from llamahost.gateway.settings import GROUP, GatewayConfig, controller_file
from llamahost.gateway.tls import SELF_SIGNED_KEY_ARGS
from llamahost.spec import HostSpec
from tasks import monitoring, rolling, secret
from tasks.activate import activate, checked_put
from tasks.facts import KeyDigest
from tasks.preflight import refuse, served_specs
from tasks.secret import SecretDigest


def enabled() -> bool:
    return bool(inventory.get_group(GROUP, []))


def repair_left_drained(spec: HostSpec) -> None:
    """Before anything is drained: servers that an earlier run drained on this gateway and
    never put back (it died, or stopped midway) are set ready again, each with a line."""
    if not spec.is_gateway or not host.get_fact(Directory, path=layout.GATEWAY_DRAINED_DIR):
        return
    left = sorted(
        p.rsplit("/", 1)[-1]
        for p in host.get_fact(FindFiles, path=layout.GATEWAY_DRAINED_DIR, maxdepth=1) or []
    )
    if left:
        python.call(
            name=f"Put back in rotation what an earlier run left drained ({', '.join(left)})",
            function=_put_back,
            servers=left,
        )


def _put_back(state: State, host: Host, servers: list[str]) -> bool:
    for server_name in servers:
        try:
            command = hx.set_state(server_name, "ready")
        except ValueError:
            continue  # not a name the toolkit gives: not its marker
        ok, out = rolling.api(state, host, command)
        if not ok or out.strip():
            logger.warning(
                f"[{host.name}] {server_name}, left drained by an earlier run, is not a server "
                f"of the running HAProxy ({out.strip() or 'no answer'}): its marker is removed"
            )
        else:
            logger.warning(
                f"[{host.name}] {server_name} had been left drained by an earlier run that did "
                "not finish: put back to ready (its health check decides whether it serves)"
            )
        rolling.run(state, host, f"rm -f {shlex.quote(rolling.marker(server_name))}")
    return True


def install(spec: HostSpec) -> None:
    """HAProxy on a host of group `gateway` (a no-op elsewhere)."""
    if not spec.is_gateway:
        return
    served = served_specs()
    try:
        backends = hx.servers(host.name, served)
    except ConfigError as e:
        raise refuse(str(e)) from None
    gw = spec.gateway
    pkg = apt.packages(
        name="Install HAProxy (and socat and openssl for its runtime API and certificate)",
        packages=["haproxy", "socat", "openssl"],
        update=True,
        cache_time=24 * 3600,
        no_recommends=True,
    )
    files.directory(
        name="Gateway secrets directory",
        path=layout.GATEWAY_DIR,
        user="root",
        group="haproxy",
        mode="0750",
    )
    files.directory(
        name="Gateway per-host proxy sockets directory (HAProxy's user only)",
        path=layout.GATEWAY_SOCKETS_DIR,
        user="haproxy",
        group="haproxy",
        mode="0700",
    )
    # The old process reaches the local peer from inside its chroot by the socket's full
    # path: a link there leads back to the sockets directory (docs/gateway.md#fairness-and-reloads).
    files.directory(
        name="Gateway local peer: the sockets directory's path inside HAProxy's chroot",
        path=posixpath.dirname(layout.GATEWAY_SOCKETS_LINK),
        user="root",
        group="root",
        mode="0755",
    )
    files.link(
        name="Gateway local peer: its link to the sockets directory inside the chroot",
        path=layout.GATEWAY_SOCKETS_LINK,
        target=layout.GATEWAY_SOCKETS_IN_CHROOT,
        user="root",
        group="root",
    )
    changed = [
        _client_keys(gw),
        _backend_keys(backends, {s.name: s for s in served}),
        # After the maps: the certificate's check (haproxy -c) opens them.
        _certificate(gw, spec, backends),
    ]
    monitoring.refresh_tls_expiry(changed[-1])
    # An owner or mode changed by hand is put back without a reload: only new content
    # reloads HAProxy.
    for path in (layout.GATEWAY_PEM, layout.GATEWAY_CLIENTS_MAP, layout.GATEWAY_BACKEND_KEYS_MAP):
        files.file(name=f"Owner and mode of {path}", path=path,
                   user="root", group="haproxy", mode="0640")  # fmt: skip
    config = _configuration(gw, backends)
    activation = activate(
        layout.HAPROXY,
        installed_by=[pkg],
        reload_on=[config, *changed],
        why="its configuration changed",
    )
    # Shell because only the running HAProxy can say what it runs (a reload that could not
    # start its new process exits 0 and keeps the old one).
    server.shell(
        name="HAProxy runs the new configuration (its servers, read from its runtime API)",
        commands=[hx.serves_config_check(backends, layout.HAPROXY_ADMIN_SOCKET)],
        _if=lambda: (
            activation.started.did_change()
            or config.did_change()
            or any(op.did_change() for op in changed)
        ),
    )


def _certificate(gw: GatewayConfig, spec: HostSpec, backends: list[hx.Server]) -> OperationMeta:
    """tls.pem, always through the staged file: the new certificate and key are written to
    layout.GATEWAY_STAGED_PEM, checked with ``haproxy -c`` against this gateway's
    configuration pointing at the staged file, and only then renamed over the live one. A
    supplied pair (already checked on the controller: llamahost/gateway/tls.py) is written
    when its bytes differ from the live file's; a self-signed one is made on the gateway
    when there is none or the live one ends within RENEW_WITHIN_S. Changed: HAProxy reloads.
    Runs after the maps are written (``haproxy -c`` opens them)."""
    check_config = _pem_check_config(hx.haproxy_cfg(host.name, gw, backends))
    if gw.gateway_tls_cert is not None and gw.gateway_tls_key is not None:
        chain = controller_file(gw.gateway_tls_cert).read_text()
        key = controller_file(gw.gateway_tls_key).read_text()
        return checked_pem(
            name="Gateway TLS certificate and key (supplied; checked with haproxy -c)",
            check_config=check_config,
            supplied=secret.Secret(chain.rstrip("\n") + "\n" + key),
        )
    expiry = host.get_fact(CertificateExpiry, path=layout.GATEWAY_PEM, within=RENEW_WITHIN_S)
    if expiry is None:
        logger.warning(
            f"[{host.name}] no llama_gateway_tls_cert/llama_gateway_tls_key: the gateway gets a "
            "self-signed certificate; clients must trust it explicitly (docs/gateway.md)"
        )
    elif expiry.renew:
        logger.warning(
            f"[{host.name}] the gateway's certificate ends {expiry.not_after or '(unreadable)'},"
            f" within {RENEW_WITHIN_S // 86400} days: a new self-signed one replaces it"
        )
    else:
        return files.file(name="Gateway TLS certificate present", path=layout.GATEWAY_PEM)
    names = f"DNS:{host.name}" + (f",IP:{spec.address}" if _is_ip(spec.address) else "")
    return checked_pem(
        name="Gateway TLS certificate (self-signed, made on the gateway; checked with haproxy -c)",
        check_config=check_config,
        self_signed=(f"/CN={host.name}", names),
    )


# A self-signed certificate is renewed when it ends within 30 days (it lasts 825).
RENEW_WITHIN_S = 30 * 86400
SELF_SIGNED_DAYS = 825


@dataclass(frozen=True)
class Expiry:
    not_after: str | None  # openssl's notAfter date; None when openssl cannot read it
    renew: bool  # it ends within the time asked (or cannot be read)


class CertificateExpiry(FactBase[Expiry | None]):
    """The end date of a PEM file's first certificate, and whether it ends within
    ``within`` seconds (``openssl x509 -checkend``). Reads the certificate only, never the
    key; None when there is no file."""

    def command(self, path: str, within: int) -> str:
        p = shlex.quote(path)
        return (
            f"if [ -e {p} ]; then openssl x509 -noout -enddate -in {p} 2>/dev/null; "
            f"if openssl x509 -noout -checkend {int(within)} -in {p} >/dev/null 2>&1; "
            "then echo keep; else echo renew; fi; fi"
        )

    def process(self, output: list[str]) -> Expiry | None:
        if not output:
            return None
        end = next((ln.split("=", 1)[1].strip() for ln in output if ln.startswith("notAfter=")),
                   None)  # fmt: skip
        return Expiry(not_after=end, renew=output[-1].strip() != "keep")


def _pem_check_config(config: str) -> str:
    """The gateway's configuration with its certificate at the staged path."""
    live = f" ssl crt {layout.GATEWAY_PEM} "
    assert config.count(live) == 1, "the configuration must name the certificate once"
    return config.replace(live, f" ssl crt {layout.GATEWAY_STAGED_PEM} ")


def _self_signed_command(subject: str, names: str) -> str:
    """Make a certificate and key on the gateway into the staged file, root:haproxy 0640:
    the key is never readable by others (umask 077) and never travels."""
    tmp = layout.GATEWAY_STAGED_PEM
    req = shlex.join(
        [
            "openssl", "req", "-x509", *SELF_SIGNED_KEY_ARGS, "-nodes",
            "-days", str(SELF_SIGNED_DAYS), "-subj", subject,
            "-addext", f"subjectAltName={names}",
            "-keyout", f"{tmp}.key", "-out", f"{tmp}.crt",
        ]
    )  # fmt: skip
    t = shlex.quote(tmp)
    return (
        f"umask 077 && {req} 2>/dev/null && cat {t}.crt {t}.key >{t} && rm -f {t}.crt {t}.key"
        f" && chown root:haproxy {t} && chmod 0640 {t}"
    )


def _install_staged_command() -> str:
    """``haproxy -c`` on the check configuration, then the rename; a refused certificate
    is removed and the live one kept (HAProxy's messages name files and lines, never their
    content)."""
    staged, live = shlex.quote(layout.GATEWAY_STAGED_PEM), shlex.quote(layout.GATEWAY_PEM)
    cfg = shlex.quote(layout.GATEWAY_PEM_CHECK_CONFIG)
    return (
        f"if haproxy -c -f {cfg} >/dev/null; then mv -f {staged} {live}; "
        f"else rm -f {staged}; echo 'HAProxy refuses the new TLS certificate and key: "
        f"the live {layout.GATEWAY_PEM} is kept' >&2; exit 1; fi"
    )


@operation()
def checked_pem(
    check_config: str,
    supplied: secret.Secret | None = None,
    self_signed: tuple[str, str] | None = None,
) -> Generator[StringCommand | FunctionCommand, None, None]:
    """layout.GATEWAY_PEM replaced through the staged file once ``haproxy -c`` accepts it:
    ``supplied`` (written only when its sha256 differs from the live file's) or a new
    ``self_signed`` (subject, subjectAltName) certificate made on the gateway."""
    if supplied is not None:
        if host.get_fact(SecretDigest, path=layout.GATEWAY_PEM) == supplied.digest:
            host.noop(f"{layout.GATEWAY_PEM} holds it already")
            return
        yield FunctionCommand(secret.write, (), {"path": layout.GATEWAY_STAGED_PEM,
              "secret": supplied, "user": "root", "group": "haproxy", "mode": "0640"})  # fmt: skip
    elif self_signed is not None:
        yield StringCommand(_self_signed_command(*self_signed))
    else:
        raise ValueError("checked_pem needs a supplied pair or a self-signed subject")
    # No secret in it (the configuration names the key files), written the same way.
    yield FunctionCommand(secret.write, (), {"path": layout.GATEWAY_PEM_CHECK_CONFIG,
          "secret": secret.Secret(check_config), "user": "root", "group": "haproxy",
          "mode": "0640"})  # fmt: skip
    yield StringCommand(_install_staged_command())


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _client_keys(gw: GatewayConfig) -> OperationMeta:
    assert gw.gateway_client_keys_file is not None  # required on gateways (spec)
    clients = read_client_keys(controller_file(gw.gateway_client_keys_file))
    return secret.file(
        name=f"Client keys ({len(clients)} clients)",
        path=layout.GATEWAY_CLIENTS_MAP,
        secret=client_map(clients),
        user="root",
        group="haproxy",
        mode="0640",
    )


class BackendKeyDigests(FactBase[dict[str, str]]):
    """The backend keys map's entries as server → sha256 of the key (never the key)."""

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return (
            f"if [ -f {p} ]; then while read -r n k; do printf '%s ' \"$n\"; "
            f'printf %s "$k" | sha256sum; done <{p}; fi'
        )

    def process(self, output: list[str]) -> dict[str, str]:
        return {line.split()[0]: line.split()[1] for line in output if len(line.split()) >= 2}


def _key_digest(key: str) -> str:
    """As KeyDigest computes it on a host: the key without whitespace."""
    return hashlib.sha256(re.sub(r"\s", "", key).encode()).hexdigest()


def _backend_keys(backends: list[hx.Server], specs: dict[str, HostSpec]) -> OperationMeta:
    """The map server → that host's API key. Planned from digests only (the served hosts'
    key files and the map's entries); written while the run executes, after the bring-up
    has generated the keys of fresh hosts."""
    have = host.get_fact(BackendKeyDigests, path=layout.GATEWAY_BACKEND_KEYS_MAP) or {}
    stale = set(have) != {b.name for b in backends}
    for b in backends:
        cfg = specs[b.host].cfg
        if cfg.api_key is not None:
            want: str | None = _key_digest(cfg.api_key)
        else:
            served = inventory.get_host(b.host)
            active = served in state.active_hosts
            want = served.get_fact(KeyDigest, path=cfg.api_key_file) if active else have.get(b.name)
        stale = stale or want is None or have.get(b.name) != want
    if not stale:
        # Never a change; reload_on reads it like the others.
        return files.file(name="Backend keys map present", path=layout.GATEWAY_BACKEND_KEYS_MAP)
    return python.call(
        _if=_rollout_complete,
        name="Backend keys map (each served host's API key, read from that host)",
        function=_write_backend_keys,
        entries=[(b.name, b.host, specs[b.host].cfg.api_key_file) for b in backends],
        supplied={
            b.name: secret.Secret(k)
            for b in backends
            if (k := specs[b.host].cfg.api_key) is not None
        },
    )


def _write_backend_keys(
    state: State,
    host: Host,
    entries: list[tuple[str, str, str]],
    supplied: dict[str, secret.Secret],
) -> bool:
    """Runs while the run executes, on the gateway: each key read from its host with output
    off (or taken from the inventory), the map written as any secret is."""
    lines = []
    for name, served_name, path in entries:
        if name in supplied:
            key = supplied[name].reveal().strip()
        else:
            key = secret.read_api_key(state, served_name, path)
        lines.append(f"{name} {key}\n")
    return secret.write(
        state,
        host,
        layout.GATEWAY_BACKEND_KEYS_MAP,
        secret.Secret("".join(lines)),
        user="root",
        group="haproxy",
        mode="0640",
    )


def _configuration(gw: GatewayConfig, backends: list[hx.Server]) -> OperationMeta:
    """haproxy.cfg, put in place once ``haproxy -c`` accepts it."""
    return checked_put(
        "the HAProxy configuration",
        hx.haproxy_cfg(host.name, gw, backends),
        staged=layout.GATEWAY_STAGED_CONFIG,
        live=layout.HAPROXY_CONFIG,
        check="haproxy -c -q -f {}",
        # A rollout that stopped left hosts on their old address, port or key: the file
        # that describes them all as changed waits for the run that completes it.
        when=_rollout_complete,
    )


def _rollout_complete() -> bool:
    if rolling.stopped(state):
        logger.warning(
            f"[{host.name}] the rollout stopped at {rolling.stopped(state)}: the HAProxy "
            "configuration and keys map keep describing the hosts as they still run"
        )
        return False
    return True
