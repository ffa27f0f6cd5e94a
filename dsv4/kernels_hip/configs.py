"""Tile, warp and dot-dtype tables for AMD GPUs, keyed by architecture family.

CDNA (MI300 gfx942, MI350 gfx950) runs 64-wide wavefronts: Triton's num_warps counts wavefronts,
so a block of the same thread count needs half the warps of CUDA, and BLOCK_K is kept a multiple
of 64 lanes x 8 bytes. RDNA 3.5 (Strix Halo gfx1151) is wave32 with WMMA and a small LLC, so tiles
are smaller. fp8 dot inputs exist on CDNA3 (e4m3fnuz) and CDNA4 (OCP e4m3); RDNA 3.5 has none.
Selection takes the arch string explicitly, so it is unit-tested without a GPU. Not yet verified
on hardware.
"""
from __future__ import annotations

import enum
from typing import Optional

from ..kernels_triton.configs import DotDtype, GemmConfig, GemvConfig
from ..quant.formats import QuantFormat


class ArchFamily(enum.Enum):
    CDNA3 = "cdna3"  # MI300A/X (gfx942)
    CDNA4 = "cdna4"  # MI350/355 (gfx950)
    RDNA3 = "rdna3"  # RX 7000 (gfx110x), RDNA 3.5 APUs (gfx115x: Strix Point/Halo)
    RDNA4 = "rdna4"  # RX 9000 (gfx120x)
    OTHER = "other"


_PREFIXES = (
    ("gfx942", ArchFamily.CDNA3),
    ("gfx950", ArchFamily.CDNA4),
    ("gfx11", ArchFamily.RDNA3),
    ("gfx12", ArchFamily.RDNA4),
)

WAVE64 = 64
WAVE32 = 32


def arch_family(arch: str) -> ArchFamily:
    """'gfx942:sramecc+:xnack-' -> CDNA3; unknown strings -> OTHER (conservative configs)."""
    a = arch.split(":")[0].strip().lower()
    for prefix, fam in _PREFIXES:
        if a.startswith(prefix):
            return fam
    return ArchFamily.OTHER


def wave_size(arch: str) -> int:
    """Threads per wavefront: CDNA (and older GCN) 64, RDNA 32."""
    return WAVE32 if arch_family(arch) in (ArchFamily.RDNA3, ArchFamily.RDNA4) else WAVE64


def fp8_dtype(arch: str) -> Optional[DotDtype]:
    """The fp8 flavour the matrix cores take, or None when there is none."""
    fam = arch_family(arch)
    if fam == ArchFamily.CDNA3:
        return DotDtype.FP8_E4M3_FNUZ
    if fam in (ArchFamily.CDNA4, ArchFamily.RDNA4):
        return DotDtype.FP8_E4M3
    return None


# GEMV: the block covers BLOCK_N rows x BLOCK_K inputs with num_warps * wave threads; with wave64 we
# keep the same thread count as CUDA's 4 warps using 2 wavefronts (Triton's num_warps = wavefronts).
_GEMV = {
    ArchFamily.CDNA3: {"dense": GemvConfig(8, 512, 2), "kquant": GemvConfig(8, 256, 2)},
    ArchFamily.CDNA4: {"dense": GemvConfig(8, 512, 2), "kquant": GemvConfig(8, 256, 2)},
    ArchFamily.RDNA3: {"dense": GemvConfig(4, 256, 4), "kquant": GemvConfig(4, 256, 4)},
    ArchFamily.RDNA4: {"dense": GemvConfig(4, 256, 4), "kquant": GemvConfig(4, 256, 4)},
    ArchFamily.OTHER: {"dense": GemvConfig(4, 256, 2), "kquant": GemvConfig(4, 256, 2)},
}

# GEMM: MFMA 32x32 / 16x16 tiles on CDNA want 64-multiples; RDNA WMMA is 16x16 and its LLC is small.
# num_stages=2 is the stream-pipeliner setting Triton's AMD backend expects (no TMA/async copies).
_GEMM = {
    ArchFamily.CDNA3: (GemmConfig(32, 128, 64, 4, 2), GemmConfig(128, 128, 64, 4, 2)),
    ArchFamily.CDNA4: (GemmConfig(32, 128, 64, 4, 2), GemmConfig(128, 128, 64, 4, 2)),
    ArchFamily.RDNA3: (GemmConfig(32, 64, 32, 4, 2), GemmConfig(64, 64, 32, 4, 2)),
    ArchFamily.RDNA4: (GemmConfig(32, 64, 32, 4, 2), GemmConfig(64, 64, 32, 4, 2)),
    ArchFamily.OTHER: (GemmConfig(32, 64, 32, 4, 2), GemmConfig(64, 64, 32, 4, 2)),
}
SMALL_M = 64  # at or below this many tokens use the small-M tile


def _kind(fmt: QuantFormat) -> str:
    return "dense" if QuantFormat(fmt) in (QuantFormat.Q8_0, QuantFormat.F16, QuantFormat.BF16, QuantFormat.F32) else "kquant"


def hip_gemv(fmt: QuantFormat, arch: str) -> GemvConfig:
    return _GEMV[arch_family(arch)][_kind(fmt)]


def hip_gemm(fmt: QuantFormat, arch: str, tokens: int, use_fp8: bool = False) -> GemmConfig:
    """Prefill tile for `tokens` rows; `use_fp8` picks the arch's fp8 dot type when it has one
    (lossy for Q8_0 codes above 16 in magnitude, so only as an opt-in variant)."""
    small, large = _GEMM[arch_family(arch)]
    cfg = small if tokens <= SMALL_M else large
    if use_fp8:
        f8 = fp8_dtype(arch)
        if f8 is not None:
            from dataclasses import replace

            cfg = replace(cfg, dot=f8)
    return cfg
