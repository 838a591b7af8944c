"""The GPU checks themselves (test_gpu.py), run against recorded real output.

No GPU exists where this runs, so each check gets a stand-in host that answers its
commands with the recordings in fixtures/ (SOURCES.md): the same check code that runs on a
GPU host must pass on a good recording and fail, with a message, on a bad one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llamahost import instances as inst
from llamahost.spec import resolve_host
from tests.compliance import test_gpu
from tests.compliance.inventory import Target
from tests.compliance.live import Server

FIXTURES = Path(__file__).parent / "fixtures"
PID = 28543  # the process in smi-rtx3060-with-process.xml


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str = ""


class FakeFile:
    def __init__(self, content: str | None):
        self.content_string = content or ""
        self.exists = content is not None


class FakeService:
    def __init__(self, enabled: bool, running: bool):
        self.is_enabled = enabled
        self.is_running = running


class FakeHost:
    """Answers the commands the GPU checks run, by regular expression, with recordings."""

    def __init__(self, answers: dict[str, Result], files: dict[str, str] | None = None):
        self.answers = answers
        self.files = files or {}
        self.services: dict[str, FakeService] = {}

    def run(self, command: str, *args: str) -> Result:
        line = command % args if args else command
        for pattern, result in self.answers.items():
            if re.search(pattern, line):
                return result
        return Result(127, "", f"no recording for: {line}")

    def check_output(self, command: str, *args: str) -> str:
        r = self.run(command, *args)
        assert r.rc == 0, f"{command % args if args else command}: rc {r.rc} {r.stderr}"
        return r.stdout.strip()

    def file(self, path: str) -> FakeFile:
        return FakeFile(self.files.get(path))

    def service(self, name: str) -> FakeService:
        return self.services[name]


def gpu_server(host: FakeHost, **data: Any) -> Server:
    data = {"llama_profile": "balanced", **data}
    spec = resolve_host("a100", data)
    server = Server(Target("a100", data, spec), host)
    server.__dict__["main_pid"] = PID  # cached_property: what the live host would say
    # One GPU (what its sysfs would say): the host's single llama-server.
    one_gpu = inst.Topology((inst.GpuTopo("0000:00:04.0", "20b0", None, ()),), 1)
    server.__dict__["spec"] = dataclasses.replace(spec, topology=one_gpu)
    return server


def smi(name: str, rc: int = 0) -> Result:
    return Result(rc, fixture(name))


# ------------------------------------------------------------------ persistence
def test_persistence_check_passes_when_enabled() -> None:
    host = FakeHost({r"^nvidia-smi -q -x$": smi("smi-rtx4090-persistence-enabled.xml")})
    test_gpu.test_persistence_mode_enabled_on_every_gpu(gpu_server(host))


def test_persistence_check_fails_when_disabled() -> None:
    host = FakeHost({r"^nvidia-smi -q -x$": smi("smi-a100-sxm4-40gb-persistence-disabled.xml")})
    with pytest.raises(AssertionError, match=r"not Enabled on: .*00000000:00:04\.0 Disabled"):
        test_gpu.test_persistence_mode_enabled_on_every_gpu(gpu_server(host))


def test_persistence_check_fails_when_nvml_refuses() -> None:
    host = FakeHost(
        {r"^nvidia-smi -q -x$": Result(18, "", fixture("smi-nvml-mismatch-580.178.txt"))}
    )
    with pytest.raises(AssertionError, match="Driver/library version mismatch"):
        test_gpu.test_persistence_mode_enabled_on_every_gpu(gpu_server(host))


# ------------------------------------------------------------------ driver versions
def test_driver_check_passes_when_module_and_userspace_match() -> None:
    host = FakeHost(
        {
            r"^cat /proc/driver/nvidia/version$": Result(
                0, fixture("proc-version-580.95.05-open.txt")
            ),
            r"^nvidia-smi": Result(0, fixture("smi-summary-580.95.05.txt")),
        }
    )
    test_gpu.test_driver_module_and_userspace_versions_equal(gpu_server(host))


def test_driver_check_fails_on_a_mismatch() -> None:
    host = FakeHost(
        {
            r"^cat /proc/driver/nvidia/version$": Result(
                0, fixture("proc-version-580.173.02-proprietary.txt")
            ),
            r"^nvidia-smi": Result(18, "", fixture("smi-nvml-mismatch-580.178.txt")),
        }
    )
    with pytest.raises(AssertionError, match=r"kernel module 580\.173\.02 but userspace 580\.178"):
        test_gpu.test_driver_module_and_userspace_versions_equal(gpu_server(host))


def test_driver_check_fails_without_a_loaded_module() -> None:
    host = FakeHost({r"^cat /proc/driver/nvidia/version$": Result(1, "", "No such file")})
    with pytest.raises(AssertionError, match="no NVIDIA kernel module is loaded"):
        test_gpu.test_driver_module_and_userspace_versions_equal(gpu_server(host))


# ------------------------------------------------------------------ offload
def offload_host(journal: str) -> FakeHost:
    return FakeHost(
        {
            r"^systemctl show llama-server.service -p InvocationID$": Result(
                0, "InvocationID=abc\n"
            ),
            r"^journalctl .*_SYSTEMD_INVOCATION_ID=abc$": Result(0, journal),
        }
    )


def test_offload_check_passes_on_a_full_offload() -> None:
    test_gpu.test_every_layer_on_the_gpu(
        gpu_server(offload_host(fixture("offload-full-81of81.log")))
    )


def test_offload_check_fails_on_a_partly_offloaded_model() -> None:
    host = offload_host(fixture("offload-partial-30of81.log"))
    with pytest.raises(AssertionError, match="only 30 of 81 layers are on the GPU"):
        test_gpu.test_every_layer_on_the_gpu(gpu_server(host))


# ------------------------------------------------------------------ headroom
def test_headroom_check_reads_the_servers_gpu() -> None:
    host = FakeHost({r"^nvidia-smi -q -x$": smi("smi-rtx3060-with-process.xml")})
    test_gpu.test_vram_headroom_after_load(gpu_server(host))  # 5940 MiB free >= 1024
    with pytest.raises(AssertionError, match="less than 8192 MiB free after load"):
        test_gpu.test_vram_headroom_after_load(gpu_server(host, llama_vram_reserve_mib=8192))


def test_headroom_check_fails_when_the_server_is_on_no_gpu() -> None:
    host = FakeHost({r"^nvidia-smi -q -x$": smi("smi-rtx4090-persistence-enabled.xml")})
    with pytest.raises(AssertionError, match="holds memory on no GPU"):
        test_gpu.test_vram_headroom_after_load(gpu_server(host))


# ------------------------------------------------------------------ the CUDA build
def test_device_check_fails_on_a_cpu_build() -> None:
    host = FakeHost(
        {r"llama-server --list-devices$": Result(0, fixture("list-devices-cpu-build.txt"))}
    )
    with pytest.raises(AssertionError, match=r"lists \[\], the profile uses \['CUDA0'\]"):
        test_gpu.test_cuda_build_lists_the_profiles_device(gpu_server(host))


def test_device_check_passes_on_a_cuda_build() -> None:
    host = FakeHost({r"llama-server --list-devices$": Result(0, fixture("list-devices-cuda.txt"))})
    test_gpu.test_cuda_build_lists_the_profiles_device(gpu_server(host))


def test_offload_check_without_the_log_line_weighs_the_processs_gpu_memory() -> None:
    # llama-server at the default -lv 3 logs no offload line: the check falls back to
    # --fit off with -ngl 999 and the GPU memory the process holds (4 MiB in the recording).
    def host(model_bytes: int) -> FakeHost:
        h = offload_host("0.00.009.721 I srv  llama_server: model loaded\n")
        h.answers[r"^stat -c %s "] = Result(0, f"{model_bytes}\n")
        h.answers[r"^nvidia-smi -q -x$"] = smi("smi-rtx3060-with-process.xml")
        return h

    def server(h: FakeHost) -> Server:
        s = gpu_server(h)
        s.__dict__["cmdline"] = s.expected_argv_for(cpu_count=8)
        return s

    test_gpu.test_every_layer_on_the_gpu(server(host(4 << 20)))
    with pytest.raises(AssertionError, match="holds 4 MiB of GPU memory for a 26624 MiB model"):
        test_gpu.test_every_layer_on_the_gpu(server(host(26624 << 20)))
