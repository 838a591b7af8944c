"""What a host is actually doing: the running llama-server, read over SSH and HTTP.

One `Server` per host per run. It reads what the checks share (the main PID, the live
command line, the API key) once; everything else each check reads itself. Expected values
come from the inventory (inventory.Target.cfg), and the host's CPU count where the deploy
reads it from the host too (--threads auto).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

import requests

from llamahost import instances as inst
from llamahost.render import ONLINE_CPUS, server_command
from llamahost.spec import HostSpec
from tests.compliance.inventory import Target

HTTP_TIMEOUT = 30  # seconds for one request; a chat of 4 tokens on a loaded server


class ApiKey(requests.auth.AuthBase):
    """The server's key. Never in a repr, an assertion message, a traceback or a log line.

    Given to requests as auth, so no local variable or argument of ours holds the raw key
    (pytest prints function arguments in tracebacks, and locals with -l).
    """

    def __init__(self, value: str):
        self._value = value

    def __repr__(self) -> str:
        return "<API key, redacted>"

    __str__ = __repr__

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._value}"
        return r

    def digest(self) -> str:
        return hashlib.sha256(self._value.encode()).hexdigest()


@dataclass
class Http:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


class Server:
    """One llama-server of a host: the host's first (or only) one, or with ``each()`` every
    instance of a host that runs several (llamahost/instances.py)."""

    def __init__(self, target: Target, host: Any, instance: inst.Instance | None = None):
        self.target = target
        self.cfg = target.cfg
        self.host = host  # testinfra.host.Host
        self._instance = instance

    @functools.cached_property
    def spec(self) -> HostSpec:
        """The host's spec with the GPUs its sysfs shows (a per-gpu host's instances), as
        the deploy resolves it."""
        spec = self.target.spec
        if not spec.serves or not spec.uses_gpu:
            return dataclasses.replace(spec, topology=inst.Topology())
        lines = self.host.check_output(inst.TOPOLOGY_COMMAND).splitlines()
        return dataclasses.replace(spec, topology=inst.parse_topology(lines))

    @property
    def instance(self) -> inst.Instance:
        return self._instance or self.spec.instances[0]

    @property
    def unit(self) -> str:
        return self.instance.unit

    @property
    def name(self) -> str:
        """The host, and the instance when it has several: how a failure names it."""
        i = self.instance.index
        return self.target.name if i is None else f"{self.target.name} {self.unit}"

    def each(self) -> list[Server]:
        """One Server per llama-server of the host (the spec, CPU count and key shared)."""
        out = []
        for x in self.spec.instances:
            s = Server(self.target, self.host, x)
            for shared in ("spec", "cpu_count", "api_key"):
                if shared in self.__dict__:
                    s.__dict__[shared] = self.__dict__[shared]
            out.append(s)
        return out

    # -------------------------------------------------------------- systemd and /proc
    def unit_properties(self, *props: str) -> dict[str, str]:
        out = self.host.check_output("systemctl show %s -p %s", self.unit, ",".join(props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    @functools.cached_property
    def main_pid(self) -> int:
        pid = int(self.unit_properties("MainPID")["MainPID"])
        assert pid > 0, f"{self.target.name}: {self.unit} has no main process"
        return pid

    @functools.cached_property
    def cmdline(self) -> list[str]:
        """The running process's argv, from the kernel (not the unit file)."""
        raw: str = self.host.check_output("tr '\\0' '\\n' < /proc/%s/cmdline", str(self.main_pid))
        return raw.split("\n")

    def arg(self, *names: str) -> str | None:
        """The value after the last of `names` in the live argv (llama.cpp: last one wins)."""
        value = None
        argv = self.cmdline
        for i, a in enumerate(argv[:-1]):
            if a in names:
                value = argv[i + 1]
        return value

    @functools.cached_property
    def cpu_count(self) -> int:
        """The host's online CPUs, by the command the deploy's fact runs."""
        return int(self.host.check_output(ONLINE_CPUS).split()[0])

    def expected_argv(self) -> list[str]:
        """The command line the deploy renders into the unit for this host."""
        return self.expected_argv_for(self.cpu_count)

    def expected_argv_for(self, cpu_count: int) -> list[str]:
        return server_command(self.cfg, cpu_count, self.instance)

    # -------------------------------------------------------------- HTTP
    @functools.cached_property
    def api_key(self) -> ApiKey:
        """Read from the host's key file over SSH, as the server reads it."""
        out = self.host.run("cat %s", self.cfg.api_key_file)
        readable = out.rc == 0  # not asserted on `out`: pytest would print its stdout
        assert readable, f"cannot read {self.cfg.api_key_file}"
        return ApiKey(out.stdout.strip())

    def request(
        self, method: str, path: str, *, key: bool, body: dict[str, Any] | None = None
    ) -> Http:
        url = self.target.api_base_at(self.instance.port) + path
        try:
            r = requests.request(
                method, url, json=body, auth=self.api_key if key else None, timeout=HTTP_TIMEOUT
            )
        except requests.RequestException as e:
            # Re-raised without its chain: the frames below carry the request's headers.
            raise AssertionError(f"{method} {url}: no answer ({type(e).__name__}: {e})") from None
        return Http(r.status_code, r.text)

    def get(self, path: str, *, key: bool = True) -> Http:
        return self.request("GET", path, key=key)

    def post(self, path: str, body: dict[str, Any], *, key: bool = True) -> Http:
        return self.request("POST", path, key=key, body=body)


# ------------------------------------------------------------------ small parsers
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\S+)")


def exposure(systemd_analyze_security: str) -> tuple[float, str]:
    """`systemd-analyze security UNIT` → (exposure 0.0-10.0, systemd's word for it)."""
    m = _EXPOSURE.search(systemd_analyze_security)
    if not m:
        raise ValueError(f"no overall exposure in: {systemd_analyze_security[-300:]!r}")
    return float(m.group(1)), m.group(2)


def listening_inodes(proc_net_tcp: str, address: str, port: int) -> set[str]:
    """Socket inodes in LISTEN state on address:port in /proc/net/tcp or tcp6 text.

    The kernel writes addresses as hex in host byte order (little-endian on x86 and arm64):
    127.0.0.1 is 0100007F, :: is 32 zeros.
    """
    ip = ipaddress.ip_address(address)
    packed = ip.packed
    # /proc/net/tcp6 prints each 32-bit word in host order.
    want = "".join(packed[i : i + 4][::-1].hex().upper() for i in range(0, len(packed), 4))
    found = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, state, inode = fields[1], fields[3], fields[9]
        addr, _, hexport = local.partition(":")
        if state == "0A" and addr == want and int(hexport, 16) == port:
            found.add(inode)
    return found
