"""The hosts to check and what each should be, from the pyinfra inventory the deploy used.

pyinfra itself lists the hosts and their merged data (host, group and group_data/ files),
without connecting: `pyinfra INVENTORY debug-inventory --json` (llamahost.inventory). The
expected values are llamahost's own `resolve_host()` of that data, the same call the
deploy's preflight and `plan` make, so there is no second list of hosts and no second
copy of an expected value. Imports llamahost only: no tasks, no pyinfra.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Any

from llamahost import inventory as inv
from llamahost.config import HostConfig
from llamahost.spec import HostSpec, inventory_specs

DEFAULT_INVENTORY = "inventory/prod.py"


class InventoryError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """One host of the inventory. Its data can hold the API key: kept out of repr()."""

    name: str
    data: dict[str, Any] = field(repr=False)
    spec: HostSpec = field(repr=False)

    @property
    def cfg(self) -> HostConfig:
        return self.spec.cfg

    @property
    def ssh_hostname(self) -> str:
        return str(self.data.get("ssh_hostname") or self.name)

    def testinfra_spec(self) -> str:
        """ssh://[user@]host[:port] for testinfra's OpenSSH backend."""
        user = self.data.get("ssh_user")
        port = self.data.get("ssh_port")
        hostname = self.ssh_hostname
        if ":" in hostname:
            hostname = f"[{hostname}]"
        spec = "ssh://" + (f"{user}@" if user else "") + hostname
        return spec + (f":{port}" if port else "")

    def testinfra_kwargs(self) -> dict[str, Any]:
        """The connection the deploy used, as OpenSSH options.

        OpenSSH rather than paramiko: testinfra's paramiko backend accepts unknown host keys
        with a warning and never reads a known_hosts file; OpenSSH checks the host key the
        way the inventory says. BatchMode: a compliance run never stops at a prompt.
        """
        opts = ["-o", "BatchMode=yes"]
        if self.data.get("ssh_known_hosts_file"):
            opts += ["-o", f"UserKnownHostsFile={self.data['ssh_known_hosts_file']}"]
        strict = self.data.get("ssh_strict_host_key_checking")
        if strict is not None:
            opts += ["-o", f"StrictHostKeyChecking={strict}"]
        if self.data.get("ssh_key"):
            opts += ["-o", "IdentitiesOnly=yes"]
        kwargs: dict[str, Any] = {
            "connection": "ssh",
            "ssh_extra_args": " ".join(shlex.quote(o) for o in opts),
            "timeout": 15,
        }
        if self.data.get("ssh_key"):
            kwargs["ssh_identity_file"] = str(self.data["ssh_key"])
        if self.data.get("ssh_config_file"):
            kwargs["ssh_config"] = str(self.data["ssh_config_file"])
        # pyinfra's _sudo: reading the key and /proc of the service needs root.
        if self.data.get("_sudo"):
            kwargs["sudo"] = True
            if self.data.get("_sudo_user"):
                kwargs["sudo_user"] = str(self.data["_sudo_user"])
        return kwargs

    @property
    def api_base(self) -> str:
        """Where the controller reaches llama-server: its listen address when that is one
        address, else the address SSH reaches the host at."""
        return self.api_base_at(self.cfg.profile.port)

    def api_base_at(self, port: int) -> str:
        """The same, for the llama-server (instance) on ``port``."""
        listen = ipaddress.ip_address(self.cfg.profile.host)
        host = self.ssh_hostname if listen.is_unspecified else str(listen)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"


def load(inventory: str) -> list[Target]:
    """Every host of the inventory, validated; any invalid host stops the whole run."""
    try:
        hosts = inv.hosts(inventory)
    except inv.InventoryError as e:
        raise InventoryError(str(e)) from None
    specs, errors = inventory_specs(hosts)
    problems = [str(e) for e in errors]
    for spec in specs:
        if spec.lock.path is not None and spec.lock.entry is None:
            problems.append(
                f"host {spec.name!r}: {spec.lock.path} has no entry for {spec.cfg.model_repo}/"
                f"{spec.cfg.model_file}@{spec.cfg.model_revision} (the deploy refuses this "
                "host too: run `make lock`)"
            )
    if problems:
        raise InventoryError("\n".join(problems))
    data = {name: d for name, d, _ in hosts}
    return [Target(s.name, data[s.name], s) for s in specs]
