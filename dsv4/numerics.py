"""Framework-neutral numerics shared by every backend (model.md §4.3.4, §7): the FP8/FP4 activation-format
limits, the indexer's Hadamard matrix, the stable-softplus threshold of the router and the RoPE/YaRN
constants. numpy only: each backend turns these into its own arrays, so the reference and the MLX backend
compute them once, the same way. Knows no framework and no model structure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .ops import RopeParams

FP8_MAX = 448.0  # largest E4M3 magnitude
FP4_MAX = 6.0  # largest E2M1 magnitude
HADAMARD_N = 128
SOFTPLUS_LINEAR = 20.0  # stable softplus: identity above, exp below the negative


def hadamard_np(n: int = HADAMARD_N) -> np.ndarray:
    """Sylvester Hadamard H[i][j] = (-1)^popcount(i & j), scaled by 1/sqrt(n) (orthonormal), float64."""
    i = np.arange(n)
    pc = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    return np.where(pc % 2 == 0, 1.0, -1.0) / math.sqrt(n)


def yarn_corr_dims(rope: RopeParams) -> tuple[float, float]:
    """YaRN correction range (lo, hi) in pair units (model.md §4.3.4): (15, 25) for base 160000."""

    def corr(beta: float) -> float:
        return rope.n_dims * math.log(rope.orig_ctx / (beta * 2 * math.pi)) / (2 * math.log(rope.base))

    return max(0.0, math.floor(corr(rope.beta_fast))), min(rope.n_dims - 1.0, math.ceil(corr(rope.beta_slow)))


@dataclass(frozen=True)
class RopeConstants:
    """The scalars of the CPU fp32 RoPE recipe (model.md §4.3.4), all rounded as the CPU rounds them."""

    theta_scale: float  # fp32 ratio between consecutive pair frequencies (applied by repeated multiplication)
    freq_scale: np.float32
    ramp: Optional[np.ndarray]  # YaRN: float32 [R/2] weight of the extrapolated angle per pair; None without
    mscale: np.float32  # YaRN attention factor applied to cos and sin (1 without)


def rope_constants(rope: RopeParams) -> RopeConstants:
    f32 = np.float32
    theta_scale = float(f32(float(rope.base) ** (float(f32(-2.0) / f32(rope.n_dims)))))
    fs = f32(rope.freq_scale)
    if not rope.yarn:
        return RopeConstants(theta_scale, fs, None, f32(1.0))
    lo, hi = yarn_corr_dims(rope)
    k = np.arange(rope.n_dims // 2, dtype=np.float32)
    y = (k - f32(lo)) / max(f32(0.001), f32(hi - lo))
    ramp = (f32(1.0) - np.clip(y, 0.0, 1.0)).astype(np.float32)
    log_scale = f32(np.log(f32(1.0) / fs))
    attn_factor = f32(1.0) / (f32(1.0) + f32(0.1) * log_scale)
    return RopeConstants(theta_scale, fs, ramp, f32(attn_factor * (f32(1.0) + f32(0.1) * log_scale)))
