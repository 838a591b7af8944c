"""The served host's firewall, when ``llama_firewall`` is on (docs/gateway.md#exposure):
nftables from the distribution, a table of the toolkit's own (``inet llamahost``) that lets
the llama port be opened only by the `gateway` and `monitoring` hosts (Prometheus scrapes
llama-server's /metrics there) and the exporter ports only by the `monitoring` hosts, loaded
at boot by a unit of its own. What it cannot say (no gateway, a gateway known by name) is
refused by the inventory's validation (llamahost.fleet), as `plan` refuses it.

The rules are staged, checked with ``nft -c``, and only then put in place and loaded (one
transaction replaces the table). Turned off again, the unit is stopped (which deletes the
table) and its files removed.
"""

from __future__ import annotations

from io import StringIO

from pyinfra import logger
from pyinfra.context import host
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, server, systemd

from llamahost import firewall as fw
from llamahost import layout
from llamahost.checks import ConfigError
from llamahost.spec import HostSpec
from tasks.activate import activate, checked_put
from tasks.facts import NftTable
from tasks.preflight import inventory_specs_or_refuse, refuse

UNIT_PATH = f"{layout.SYSTEMD_DIR}/{layout.FIREWALL_UNIT}"


def apply(spec: HostSpec) -> None:
    """The firewall in place on a served host with ``llama_firewall`` on; removed when off."""
    if not spec.gateway.firewall:
        if spec.firewall_declined:
            logger.warning(
                f"{host.name}: llama_firewall is false in an inventory with a `gateway` group: "
                f"llama-server's port {spec.profile.port} stays open to the network with this "
                "host's key, past the gateway's client keys and limits (docs/gateway.md#exposure)"
            )
        _remove()
        return
    specs = inventory_specs_or_refuse()
    gateways = [s for s in specs if s.is_gateway]
    monitors = [s for s in specs if s.is_monitoring]
    try:
        allowed = fw.allows(spec, gateways, monitors)
    except ConfigError as e:
        raise refuse(str(e)) from None
    # Installed already (cloud images often have it): no package index update either.
    if "nftables" not in host.get_fact(DebPackages):
        apt.packages(
            name="Install nftables",
            packages=["nftables"],
            update=True,
            cache_time=24 * 3600,
            no_recommends=True,
        )
    files.directory(name="llamahost firewall directory", path=layout.FIREWALL_DIR,
                    user="root", group="root", mode="0755")  # fmt: skip
    rules = checked_put(
        "the firewall rules",
        fw.rules(host.name, allowed),
        staged=layout.FIREWALL_STAGED,
        live=layout.FIREWALL_RULES,
        check="nft -c -f {}",
    )
    unit = files.put(
        name=f"Unit {layout.FIREWALL_UNIT}",
        src=StringIO(fw.unit()),
        dest=UNIT_PATH,
        mode="0644",
    )
    live = host.get_fact(NftTable, table=layout.FIREWALL_TABLE)
    drifted = host.get_fact(File, path=UNIT_PATH) is not None and (
        live is None or fw.loaded(live) != fw.expected(allowed)
    )
    activate(
        layout.FIREWALL_UNIT,
        unit_file=unit,
        reload_on=[rules],
        why="its unit changed",
    )
    if drifted:
        # Deleted or edited by hand: loaded again (when new rules have not just been).
        server.shell(
            name="Load the firewall rules again (the loaded table differs from them)",
            commands=[f"systemctl reload-or-restart {layout.FIREWALL_UNIT}"],
            _if=lambda: not rules.did_change(),
        )


def _remove() -> None:
    if not host.get_fact(File, path=UNIT_PATH):
        return
    systemd.service(name=f"Stop and disable {layout.FIREWALL_UNIT} (llama_firewall is off)",
                    service=layout.FIREWALL_UNIT, running=False, enabled=False)  # fmt: skip
    for path in (UNIT_PATH, layout.FIREWALL_RULES, layout.FIREWALL_STAGED):
        files.file(name=f"Remove {path}", path=path, present=False)
    systemd.daemon_reload(name="Reload systemd units (firewall removed)")
