"""ROCm specializations for the Triton kernels (chosen when `torch.version.hip` is set).

`configs` holds the tile/warp tables for CDNA3 (MI300, wave64, MFMA, fp8 e4m3fnuz) and RDNA 3.5
(Strix Halo, wave32, WMMA, no fp8) and the arch -> family mapping. The kernels themselves are the
ones in `dsv4.kernels_triton`; nothing here launches anything. Not yet verified on hardware.
"""
from .configs import ArchFamily, arch_family, fp8_dtype, hip_gemm, hip_gemv, wave_size

__all__ = ["ArchFamily", "arch_family", "fp8_dtype", "hip_gemm", "hip_gemv", "wave_size"]
