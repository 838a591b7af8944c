"""The CUDA build: architectures from the GPU (or the setting), the toolkit package, and
the CMake arguments of llama.cpp's CUDA build."""

from __future__ import annotations

from llamahost.gpu.host import GpuError, Probe
from llamahost.gpu.settings import GpuSettings

# ---------------------------------------------------------------- CUDA build
# Compute capability by PCI device id, for hosts without a driver yet. Names as pci.ids
# 2026.10.24 gives them (Debian's pci.ids 0.0~2026.10.24-1, /usr/share/misc/pci.ids, vendor
# 10de); the capability is the chip's, from NVIDIA's CUDA GPU list: GA100 8.0, GA102 8.6,
# AD10x 8.9, GH100 9.0, GB100 10.0, TU104 7.5. Others need llama_cuda_architectures.
COMPUTE_CAPABILITY_BY_DEVICE = {
    "20b0": "8.0",  # GA100 [A100 SXM4 40GB]
    "20b1": "8.0",  # GA100 [A100 PCIe 40GB]
    "20b2": "8.0",  # GA100 [A100 SXM4 80GB]
    "20b3": "8.0",  # GA100 [A100-SXM-64GB]
    "20b5": "8.0",  # GA100 [A100 PCIe 80GB]
    "20f1": "8.0",  # GA100 [A100 PCIe 40GB]
    "20f3": "8.0",  # GA100 [A800-SXM4-80GB]
    "20f5": "8.0",  # GA100 [A800 80GB PCIe]
    "20f6": "8.0",  # GA100 [A800 40GB PCIe]
    "20b7": "8.0",  # GA100GL [A30 PCIe]
    "2236": "8.6",  # GA102GL [A10]
    "27b8": "8.9",  # AD104GL [L4]
    "26b9": "8.9",  # AD102GL [L40S]
    "2321": "9.0",  # GH100 [H100L 94GB]
    "2322": "9.0",  # GH100 [H800 PCIe]
    "2324": "9.0",  # GH100 [H800]
    "2330": "9.0",  # GH100 [H100 SXM5 80GB]
    "2331": "9.0",  # GH100 [H100 PCIe]
    "2335": "9.0",  # GH100 [H200 SXM 141GB]
    "2337": "9.0",  # GH100 [H100 SXM5 64GB]
    "2338": "9.0",  # GH100 [H100 SXM5 96GB]
    "2339": "9.0",  # GH100 [H100 SXM5 94GB]
    "233b": "9.0",  # GH100 [H200 NVL]
    "2342": "9.0",  # GH100 [GH200 120GB / 480GB]
    "2348": "9.0",  # GH100 [GH200 144G HBM3e]
    "2901": "10.0",  # GB100 [B200]
    "2909": "10.0",  # GB100 [HGX B200 168GB]
    "1eb8": "7.5",  # TU104GL [Tesla T4]
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
