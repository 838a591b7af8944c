"""The unit the deploy plans for a host, through the real tasks under pyinfra's @fake
connector, checked by the compliance suite's own check against recorded host output."""

from __future__ import annotations

from typing import Any

import pytest

from llamahost import layout
from llamahost.spec import resolve_host
from tasks import service
from tests.compliance import test_service
from tests.compliance.inventory import Target
from tests.compliance.live import Server
from tests.compliance.test_gpu_checks import FakeHost as RecordedHost
from tests.compliance.test_gpu_checks import Result
from tests.plan.fakehost import FIXTURES, FakeHost, plan

CPUS = 8
NO_DROPINS = {
    r"^systemctl show llama-server\.service -p DropInPaths$": Result(0, "DropInPaths=\n"),
    r"^cd /etc/systemd/system && ls -d llama-server\*": Result(0, "llama-server.service\n"),
    r"numa_node": Result(0, (FIXTURES / "sysfs-gpu-topology-a100.txt").read_text()),
}


def _check(data: dict[str, Any], unit_on_host: str) -> None:
    host = RecordedHost(NO_DROPINS, files={layout.UNIT_PATH: unit_on_host})
    server = Server(Target("@fake/debian-12", data, resolve_host("@fake/debian-12", data)), host)
    server.__dict__["cpu_count"] = CPUS  # cached_property: what the host would say
    test_service.test_unit_file_is_the_one_the_deploy_renders(server, host)


@pytest.mark.parametrize("profile", ["cpu-demo", "balanced"])
def test_unit_check_passes_on_a_gpu_host_whatever_the_profile(profile: str) -> None:
    """A CPU profile on a host where the GPU path is taken (an A100 in lspci): the deploy's
    unit and the compliance check's agree, because both follow the profile."""
    data = {"llama_profile": profile}
    p = plan(FakeHost("debian-12"), data, then=lambda spec, _: service.unit(spec, CPUS))
    assert p.result.gpu, "the GPU path must be taken for this test to mean anything"
    unit = p.uploaded(layout.UNIT_PATH)
    assert ("nvidia-persistenced" in unit) == (profile != "cpu-demo")
    _check(data, unit)


def test_unit_check_still_fails_on_a_unit_that_differs() -> None:
    data = {"llama_profile": "cpu-demo"}
    p = plan(FakeHost("debian-12"), data, then=lambda spec, _: service.unit(spec, CPUS))
    unit = p.uploaded(layout.UNIT_PATH)
    # What the deploy wrote before the unit followed the profile: GPU ordering lines.
    gpu_ordered = unit.replace(
        "Wants=network-online.target\n",
        "Wants=network-online.target\nAfter=nvidia-persistenced.service\n",
    )
    with pytest.raises(AssertionError, match="differs from the deploy's rendering"):
        _check(data, gpu_ordered)
    with pytest.raises(AssertionError, match="differs from the deploy's rendering"):
        _check(data, unit.replace("-c 4096", "-c 8192"))
