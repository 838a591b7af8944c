"""The unit's sandbox, as systemd itself rates it."""

from __future__ import annotations

from typing import Any

from llamahost.layout import UNIT
from tests.compliance.live import Server, exposure

# Measured with systemd 252 on the test host (Debian 12): the CPU unit rates 1.4 and the
# GPU variant (device allow-list instead of PrivateDevices, ProcSubset=all, no
# MemoryDenyWriteExecute) 1.5. 2.0 leaves room for other systemd versions' weights (the
# production hosts run Ubuntu's 249/255, not measured) and still fails the losses systemd
# weighs heavily: no system-call filter 2.8, no capability bounding set 3.1, no sandbox 9.2.
# Finer ones rate under it (User=root 1.7, no ProtectSystem 1.5): the service-user check
# and the unit-file check (test_service.py) catch those.
MAX_EXPOSURE = 2.0


def test_sandbox_exposure_at_most_the_threshold(server: Server, host: Any) -> None:
    """Sandbox exposure (systemd-analyze security) is at most 2.0.

    README, "The unit": sandboxed, rated 1.4 "OK" on the test host. Why 2.0: see
    MAX_EXPOSURE.
    """
    out = host.check_output("systemd-analyze security --no-pager %s", UNIT)
    level, word = exposure(out)
    assert level <= MAX_EXPOSURE, (
        f"{UNIT} exposure {level} {word}, above {MAX_EXPOSURE}; "
        f"see `systemd-analyze security {UNIT}` on {server.target.name}"
    )
