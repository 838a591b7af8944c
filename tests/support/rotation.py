"""Who was out of rotation when, read from HAProxy's own log of its servers' state changes.

Sampling the runtime API every fraction of a second can miss a drain that lasts less than
one sample (a host with no request in flight is drained in one stats call); HAProxy logs
every change as it makes it, so the order of events is exact. Lines as HAProxy 2.6 writes
them (recorded from Debian 12's haproxy 2.6.12, syslog facility local0):

    Server llama/b enters drain state. 1 active and 0 backup servers online. ...
    Server llama/b is DOWN, reason: Layer4 connection problem, ...
    Server llama/b remains in forced drain mode.
    Server llama/b is DOWN (leaving forced drain).
    Server llama/b is UP, reason: Layer4 check passed, ...
    Server llama/b is UP (leaving forced drain).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_EVENT = re.compile(r"Server (?P<backend>[^/\s]+)/(?P<server>\S+) (?P<what>.*)")


@dataclass
class Rotation:
    """Each server's events in order, and the most servers out of rotation at one time."""

    events: dict[str, list[str]] = field(default_factory=dict)
    most_out: int = 0
    out_at_end: list[str] = field(default_factory=list)


def replay(log: str, backend: str) -> Rotation:
    """Replay ``backend``'s state changes from HAProxy log lines (other lines are ignored).

    A server is out of rotation while it is drained or in maintenance (admin states) or
    down (health checks); the two are tracked apart, as HAProxy does.
    """
    admin: dict[str, bool] = {}
    down: dict[str, bool] = {}
    rot = Rotation()
    for line in log.splitlines():
        m = _EVENT.search(line)
        if not m or m["backend"] != backend:
            continue
        srv, what = m["server"], m["what"]
        if what.startswith("enters drain state") or "going DOWN for maintenance" in what:
            admin[srv] = True
        elif "leaving forced drain" in what or "leaving forced maintenance" in what:
            admin[srv] = False
        if what.startswith("is DOWN"):
            down[srv] = True
        elif what.startswith("is UP"):
            down[srv] = False
        rot.events.setdefault(srv, []).append(re.split(r"[.,](?:\s|$)", what)[0])
        rot.most_out = max(rot.most_out, len(_out(admin, down)))
    rot.out_at_end = _out(admin, down)
    return rot


def _out(admin: dict[str, bool], down: dict[str, bool]) -> list[str]:
    return sorted(s for s in admin.keys() | down.keys() if admin.get(s) or down.get(s))
