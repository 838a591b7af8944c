"""The hosts to check and what each should be, from the pyinfra inventory the deploy used.

pyinfra itself lists the hosts and their merged data (host, group and group_data/ files),
without connecting: `pyinfra INVENTORY debug-inventory --json`. The expected configuration
is llamahost's own `resolve()` of that data, the same call the deploy's preflight makes,
so there is no second list of hosts and no second copy of an expected value.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamahost import lock as locks
from llamahost.config import ConfigError, HostConfig, resolve
from llamahost.plan import plan_host

REPO = Path(__file__).resolve().parents[2]
DEFAULT_INVENTORY = "inventory/prod.py"


class InventoryError(Exception):
    pass


def effective_config(name: str, data: dict[str, Any]) -> HostConfig:
    """What the deploy makes of a host's data: validated, then pinned by the model lock.

    The same steps as tasks/preflight.host_config, through the same llamahost functions
    (resolve, lock, plan_host), without pyinfra's host context. The model's shape is not
    fetched: the configuration plan_host returns does not depend on it, only its verdict.
    """
    cfg = resolve(name, data)
    models = None
    if cfg.model_lock:
        path = Path(cfg.model_lock)
        try:
            models = locks.load(path if path.is_absolute() else REPO / path)
        except locks.LockError as e:
            raise InventoryError(str(e)) from None
        if locks.entry_for(cfg, models) is None:
            raise InventoryError(
                f"host {name!r}: {cfg.model_lock} has no entry for {locks.key(cfg)} "
                "(the deploy refuses this host too: run `make lock`)"
            )
    return plan_host(cfg, models, None).cfg


@dataclass(frozen=True)
class Target:
    """One host of the inventory. Its data can hold the API key: kept out of repr()."""

    name: str
    data: dict[str, Any] = field(repr=False)
    cfg: HostConfig = field(repr=False)

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
        listen = ipaddress.ip_address(self.cfg.profile.host)
        host = self.ssh_hostname if listen.is_unspecified else str(listen)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.cfg.profile.port}"


def load(inventory: str) -> list[Target]:
    """Every host of the inventory, validated; any invalid host stops the whole run."""
    argv = [sys.executable, "-m", "pyinfra", inventory, "debug-inventory", "--json"]
    p = subprocess.run(
        argv, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=120
    )
    if p.returncode != 0:
        raise InventoryError(f"{shlex.join(argv)} failed:\n{p.stderr[-3000:]}")
    try:
        hosts = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise InventoryError(f"pyinfra printed no JSON: {p.stdout[:500]!r}") from None
    targets = []
    errors = []
    for h in hosts:
        try:
            targets.append(Target(h["name"], h["data"], effective_config(h["name"], h["data"])))
        except (ConfigError, InventoryError) as e:
            errors.append(str(e))
    if errors:
        raise InventoryError("\n".join(errors))
    if not targets:
        raise InventoryError(f"{inventory} lists no host")
    return targets
