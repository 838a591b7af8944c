"""The CUDA build: architectures from the GPU (or the setting), the toolkit package, and
the CMake arguments of llama.cpp's CUDA build."""

from __future__ import annotations

from llamahost.gpu.host import GpuError, Probe
from llamahost.gpu.settings import GpuSettings

# ---------------------------------------------------------------- CUDA build
# Compute capability by PCI device id, for hosts without a driver yet (pci.ids and NVIDIA's
# CUDA GPU list). Only what this toolkit is likely to meet; others need the setting.
COMPUTE_CAPABILITY_BY_DEVICE = {
    "20b0": "8.0",  # A100 SXM4 40GB
    "20b2": "8.0",  # A100 SXM4 80GB
    "20b5": "8.0",  # A100 PCIe 80GB
    "20f1": "8.0",  # A100 PCIe 40GB
    "20b7": "8.0",  # A30
    "2236": "8.6",  # A10
    "27b8": "8.9",  # L4
    "26b9": "8.9",  # L40S
    "2330": "9.0",  # H100 SXM5 80GB
    "2331": "9.0",  # H100 PCIe
    "1eb8": "7.5",  # T4
}


def architectures(host: str, settings: GpuSettings, found: Probe) -> str:
    """``CMAKE_CUDA_ARCHITECTURES``: the setting, else every GPU's compute capability.

    Always explicit: the build may run before the new driver is loaded, when CMake's
    ``native`` would see no GPU.
    """
    if settings.cuda_architectures:
        return settings.cuda_architectures
    caps = {g.compute_cap for g in found.smi.gpus}
    if not caps:
        unknown = sorted({g.device_id for g in found.pci} - set(COMPUTE_CAPABILITY_BY_DEVICE))
        if unknown or not found.pci:
            what = f"PCI device {', '.join('10de:' + d for d in unknown)}" if unknown else "no GPU"
            raise GpuError(
                f"host {host!r}: cannot tell the CUDA architecture ({what}, no driver yet): "
                'set llama_cuda_architectures, e.g. "80" for A100. Nothing was changed.'
            )
        caps = {COMPUTE_CAPABILITY_BY_DEVICE[g.device_id] for g in found.pci}
    return ";".join(sorted((c.replace(".", "") for c in caps), key=int))


def toolkit_package(cuda: str) -> str:
    return "cuda-toolkit-" + cuda.replace(".", "-")


def nvcc_path(cuda: str) -> str:
    return f"/usr/local/cuda-{cuda}/bin/nvcc"


def cuda_cmake_args(archs: str, cuda: str) -> tuple[str, ...]:
    # nvcc is named because the toolkit does not put itself on PATH.
    return (
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
        f"-DCMAKE_CUDA_COMPILER={nvcc_path(cuda)}",
    )
