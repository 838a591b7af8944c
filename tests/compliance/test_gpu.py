"""The GPU half of the checklist. Each check runs on hosts whose profile uses the GPU and is
skipped, with the reason, elsewhere (the gpu_server fixture). The parsing is in
gpu_parse.py; both are tested against recorded real output (test_gpu_parse.py,
test_gpu_checks.py), since no GPU exists where the project is built."""

from __future__ import annotations

import pytest

from llamahost.layout import server_binary
from tests.compliance import gpu_parse
from tests.compliance.live import Server

pytestmark = pytest.mark.gpu

# Used only where the inventory has no llama_vram_reserve_mib (the memory plan's reserve
# for the CUDA context, cuBLAS workspace and fragmentation): what must stay free after load.
DEFAULT_HEADROOM_MIB = 1024


def smi(server: Server) -> gpu_parse.SmiReport:
    out = server.host.run(gpu_parse.SMI_XML_COMMAND)
    text = out.stdout + out.stderr
    assert out.rc == 0 and not gpu_parse.nvml_mismatch(text), (
        f"`{gpu_parse.SMI_XML_COMMAND}` failed (rc {out.rc}): {text.strip()[:300]}"
    )
    return gpu_parse.parse_smi_xml(out.stdout)


def servers_gpus(server: Server) -> list[gpu_parse.Gpu]:
    """The GPUs on which the running llama-server holds memory."""
    used = [g for g in smi(server).gpus if any(p.pid == server.main_pid for p in g.processes)]
    assert used, f"llama-server (pid {server.main_pid}) holds memory on no GPU"
    return used


def test_cuda_build_lists_the_profiles_device(gpu_server: Server) -> None:
    """The CUDA build sees the profile's device (--list-devices lists CUDA0).

    Checklist: "Build with CUDA on (-DGGML_CUDA=ON)". A CPU-only build, or one without a
    working driver, lists no CUDA device.
    """
    s = gpu_server
    out = s.host.run("%s --list-devices", server_binary(s.cfg.cpp_prefix))
    devices = [d.name for d in gpu_parse.list_devices(out.stdout)]
    wanted = (s.cfg.profile.device or "").split(",")
    assert set(wanted) <= set(devices), f"--list-devices lists {devices}, the profile uses {wanted}"


def test_build_targets_the_gpus_compute_capability(gpu_server: Server) -> None:
    """The CUDA build targets every GPU's compute capability.

    Checklist: CUDA build for the A100 (compute capability 8.0, architecture 80). Read from
    the build's own configure log, against nvidia-smi's compute_cap.
    """
    s = gpu_server
    build = s.host.check_output("readlink -f %s", server_binary(s.cfg.cpp_prefix)).removesuffix(
        "/bin/llama-server"
    )
    archs = gpu_parse.cuda_architectures(s.host.file(f"{build}/logs/configure.log").content_string)
    caps = s.host.check_output("nvidia-smi --query-gpu=compute_cap --format=csv,noheader")
    needed = {gpu_parse.compute_capability_arch(c) for c in caps.splitlines() if c.strip()}
    assert needed, "nvidia-smi reported no compute capability"
    assert needed <= set(archs), f"built for {archs}, the GPUs need {sorted(needed)}"


def test_driver_module_and_userspace_versions_equal(gpu_server: Server) -> None:
    """The driver is loaded; kernel module and userspace versions are equal.

    Checklist: "Driver/CUDA compatible". /proc/driver/nvidia/version against nvidia-smi's
    driver_version; after an unattended upgrade NVML refuses with "Driver/library version
    mismatch" until a reboot.
    """
    s = gpu_server
    proc = s.host.run("cat /proc/driver/nvidia/version")
    assert proc.rc == 0, "no NVIDIA kernel module is loaded (/proc/driver/nvidia/version)"
    module = gpu_parse.kernel_module_version(proc.stdout)
    out = s.host.run(gpu_parse.SMI_XML_COMMAND)
    userspace = gpu_parse.userspace_driver_version(out.stdout + out.stderr)
    assert module == userspace, (
        f"kernel module {module} but userspace {userspace}: reboot onto the installed driver, "
        "and hold nvidia-* packages"
    )


def test_driver_in_the_pinned_branch(gpu_server: Server) -> None:
    """The loaded driver is in the pinned branch.

    Checklist: "Driver/CUDA compatible"; llama_driver_branch (e.g. 580).
    """
    s = gpu_server
    pinned = s.spec.gpu.driver_branch
    module = gpu_parse.kernel_module_version(s.host.check_output("cat /proc/driver/nvidia/version"))
    assert gpu_parse.branch(module) == str(pinned), f"driver {module}, pinned branch {pinned}"


def test_persistence_mode_enabled_on_every_gpu(gpu_server: Server) -> None:
    """Persistence mode is Enabled on every GPU.

    Checklist: "persistence mode on", from nvidia-smi -q -x.
    """
    off = [f"{g.bus_id} {g.persistence_mode}" for g in smi(gpu_server).gpus]
    off = [x for x in off if not x.endswith(" Enabled")]
    assert not off, f"persistence mode not Enabled on: {off}"


def test_nvidia_persistenced_enabled_and_active(gpu_server: Server) -> None:
    """nvidia-persistenced is enabled and active.

    Checklist: "persistence mode on", kept across reboots (NVIDIA recommends the daemon
    over `nvidia-smi -pm 1`).
    """
    svc = gpu_server.host.service("nvidia-persistenced")
    assert svc.is_enabled, "nvidia-persistenced is not enabled"
    assert svc.is_running, "nvidia-persistenced is not running"


def test_every_layer_on_the_gpu(gpu_server: Server) -> None:
    """Every layer is on the GPU.

    The server's own load log of this start says `offloaded M/M layers to GPU`.

    llama-server writes that line only at -lv 4. Without it, the evidence is the process:
    --fit off with -ngl 999 offloads every layer or fails to start (there is no partial
    offload to fall back to), and the weights must then be in the process's GPU memory.
    """
    s = gpu_server
    inv = s.unit_properties("InvocationID")["InvocationID"]
    journal = s.host.run("journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID=%s", inv).stdout
    got = gpu_parse.offload(journal)
    if got is not None:
        assert got.complete, f"only {got.offloaded} of {got.total} layers are on the GPU"
        return
    ngl = s.arg("-ngl", "--gpu-layers", "--n-gpu-layers")
    assert s.arg("--fit") == "off", "no offload line in the log and --fit is not off"
    assert ngl is not None and int(ngl) >= 999, f"no offload line in the log and -ngl is {ngl}"
    size_mib = int(s.host.check_output("stat -c %%s %s", s.cfg.model_path)) // (1 << 20)
    held = sum(
        p.used_memory_mib or 0 for g in servers_gpus(s) for p in g.processes if p.pid == s.main_pid
    )
    # The input embedding stays in host memory (a few % of the file); the KV cache and
    # compute buffers only add to what the process holds.
    assert held >= 0.9 * size_mib, (
        f"llama-server holds {held} MiB of GPU memory for a {size_mib} MiB model"
    )


def test_vram_headroom_after_load(gpu_server: Server) -> None:
    """VRAM headroom after load.

    Every GPU the server uses keeps at least the memory plan's reserve free
    (llama_vram_reserve_mib, else 1024 MiB) with the model, KV cache and compute buffers
    loaded.
    """
    s = gpu_server
    reserve = int(getattr(s.cfg, "vram_reserve_mib", DEFAULT_HEADROOM_MIB))
    tight = [
        f"{g.bus_id}: {g.memory_free_mib} MiB free of {g.memory_total_mib}"
        for g in servers_gpus(s)
        if g.memory_free_mib < reserve
    ]
    assert not tight, f"less than {reserve} MiB free after load: {tight}"
