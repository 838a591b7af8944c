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
import re
import shlex

from pyinfra import logger
from pyinfra.api.facts import FactBase
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import State
from pyinfra.context import host, inventory, state
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, python, server

from llamahost import layout
from llamahost.checks import ConfigError
from llamahost.gateway import haproxy as hx
from llamahost.gateway.clients import client_map, read_client_keys
from llamahost.gateway.settings import GROUP, GatewayConfig, controller_file
from llamahost.spec import HostSpec
from tasks import secret
from tasks.activate import activate, checked_put
from tasks.facts import KeyDigest
from tasks.preflight import refuse, served_specs


def enabled() -> bool:
    return bool(inventory.get_group(GROUP, []))


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
    changed = [
        _certificate(gw, spec),
        _client_keys(gw),
        _backend_keys(backends, {s.name: s for s in served}),
    ]
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


def _certificate(gw: GatewayConfig, spec: HostSpec) -> OperationMeta:
    if gw.gateway_tls_cert is not None and gw.gateway_tls_key is not None:
        chain = controller_file(gw.gateway_tls_cert).read_text()
        key = controller_file(gw.gateway_tls_key).read_text()
        return secret.file(
            name="Gateway TLS certificate and key (supplied)",
            path=layout.GATEWAY_PEM,
            secret=secret.Secret(chain.rstrip("\n") + "\n" + key),
            user="root",
            group="haproxy",
            mode="0640",
        )
    if not host.get_fact(File, path=layout.GATEWAY_PEM):
        logger.warning(
            f"[{host.name}] no llama_gateway_tls_cert/llama_gateway_tls_key: the gateway gets a "
            "self-signed certificate; clients must trust it explicitly (docs/gateway.md)"
        )
        pem = layout.GATEWAY_PEM
        tmp = f"{layout.GATEWAY_DIR}/.tls.new"
        names = f"DNS:{host.name}" + (f",IP:{spec.address}" if _is_ip(spec.address) else "")
        # Shell because the key must be made on the gateway and never travel: openssl with
        # umask 077, then owner and mode, then the rename.
        server.shell(
            name="Gateway TLS certificate (self-signed, made on the gateway)",
            commands=[
                "umask 077 && "
                + shlex.join(
                    [
                        "openssl",
                        "req",
                        "-x509",
                        "-newkey",
                        "rsa:3072",
                        "-nodes",
                        "-days",
                        "825",
                        "-subj",
                        f"/CN={host.name}",
                        "-addext",
                        f"subjectAltName={names}",
                        "-keyout",
                        f"{tmp}.key",
                        "-out",
                        f"{tmp}.crt",
                    ]
                )
                + f" 2>/dev/null && cat {tmp}.crt {tmp}.key >{tmp} && rm -f {tmp}.crt {tmp}.key"
                + f" && chown root:haproxy {tmp} && chmod 0640 {tmp} && mv -f {tmp} {pem}"
            ],
        )
    return files.file(name="Gateway TLS certificate present", path=layout.GATEWAY_PEM)


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
    )
