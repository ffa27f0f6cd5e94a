"""Metal kernels (`mx.fast.metal_kernel`) for what MLX has no exact built-in for, and the dispatcher.

Kernels: Q2_K and IQ2_XXS decode GEMV over raw GGUF blocks (dense, and expert-gathered with the
expert id read on the device from `sel`; IQ2 grid + sign tables staged in threadgroup memory, as in
ds4's metal/moe.metal, quant.md §4.3); the HC Sinkhorn chain, the HC weighted sum and HC post; the
clamped SwiGLU x route-weight chain. Each kernel has an MLX-ops twin in twins.py computing the same
function; `KernelSet` picks Metal on macOS arm64 with Metal available and the twin elsewhere (decided
once, at construction). NOT verified on hardware from this repository's CI: tests/apple/test_metal.py
compares every kernel with its twin on a Mac. Knows block layouts and op formulas, not the model.
"""
from __future__ import annotations

import platform
from functools import lru_cache

import mlx.core as mx
import numpy as np

from ..quant.formats import QuantFormat
from ..quant.tables import IQ2XXS_GRID, KSIGNS_IQ2XS
from . import twins

SIMD_WIDTH = 32
GEMV_ROWS_PER_TG = 4  # output rows per threadgroup (one simdgroup each), as ds4's N_R0 for Q2_K/IQ2_XXS
ELEMENTWISE_TG = 256

_HEADER = """
inline float dsv4_half_at(const device uint8_t* p) {
    return float(as_type<half>(ushort(ushort(p[0]) | (ushort(p[1]) << 8))));
}
"""

# Common prologue of the GEMV kernels. Grid (32, OUT padded to ROWS_PER_TG, P); P = T (dense) or T*K
# (gathered: expert sel[p]; input row p/K, or p itself when PER_PAIR). Template ints: IN, OUT, K,
# GATHER, PER_PAIR, ROW_BYTES.
_GEMV_PROLOGUE = """
    const uint lane = thread_index_in_simdgroup;
    const uint row = thread_position_in_grid.y;
    const uint p = thread_position_in_grid.z;
    const bool live = row < OUT;
    const ulong e = GATHER ? ulong(sel[p]) : 0;
    const uint xrow = (GATHER && !PER_PAIR) ? p / K : p;
    const device float* xr = x + ulong(xrow) * IN;
    const device uint8_t* wr = w + (e * OUT + (live ? row : 0)) * ROW_BYTES;
    float sum = 0.0f;
"""

_GEMV_EPILOGUE = """
    sum = simd_sum(sum);
    if (live && lane == 0) {
        out[ulong(p) * OUT + row] = sum;
    }
"""

# Q2_K (quant.md §1.4): a lane takes 16-weight sub-blocks u = lane, lane+32, ...; sub-block j of a block
# is (h, s, hi) = (j/8, (j%8)/2, j%2): weights 128h+32s+16hi+l, codes = bit pair s of qs[32h+16hi+l].
# Sum w*x = d*sc*sum(q*x) - dmin*m*sum(x) per sub-block.
Q2_K_GEMV_SOURCE = _GEMV_PROLOGUE + """
    if (live) {
        for (uint u = lane; u < (IN / 256) * 16; u += 32) {
            const uint blk = u / 16, j = u % 16;
            const uint h = j / 8, s = (j % 8) / 2, hi = j % 2;
            const device uint8_t* b = wr + blk * 84;
            const float d = dsv4_half_at(b + 80), dmin = dsv4_half_at(b + 82);
            const uint8_t sc = b[j];
            const device uint8_t* qs = b + 16 + 32 * h + 16 * hi;
            const device float* xs = xr + blk * 256 + 128 * h + 32 * s + 16 * hi;
            float aq = 0.0f, ax = 0.0f;
            for (uint l = 0; l < 16; ++l) {
                const float xv = xs[l];
                aq += float((qs[l] >> (2 * s)) & 3) * xv;
                ax += xv;
            }
            sum += (d * float(sc & 15)) * aq - (dmin * float(sc >> 4)) * ax;
        }
    }
""" + _GEMV_EPILOGUE

# IQ2_XXS (quant.md §1.6): grid (256 x 8 bytes) and ksigns (128 bytes) copied to threadgroup memory by
# all threads, then a lane takes 32-weight groups g = lane, lane+32, ...: aux0 bytes = grid indices,
# aux1 = 4 x 7-bit sign indices + 4-bit scale; w = d*(0.5+ls)*0.25 * grid * sign.
IQ2_XXS_GEMV_SOURCE = """
    threadgroup uint8_t tg_grid[2048];
    threadgroup uint8_t tg_signs[128];
    {
        const uint tid = thread_index_in_threadgroup;
        const uint nthr = threads_per_threadgroup.x * threads_per_threadgroup.y;
        for (uint i = tid; i < 2048; i += nthr) tg_grid[i] = grid[i];
        for (uint i = tid; i < 128; i += nthr) tg_signs[i] = ksigns[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
""" + _GEMV_PROLOGUE + """
    if (live) {
        for (uint g = lane; g < (IN / 256) * 8; g += 32) {
            const uint blk = g / 8, ib = g % 8;
            const device uint8_t* b = wr + blk * 66;
            const device uint8_t* q = b + 2 + 8 * ib;
            const uint aux1 = uint(q[4]) | (uint(q[5]) << 8) | (uint(q[6]) << 16) | (uint(q[7]) << 24);
            const float db = dsv4_half_at(b) * (0.5f + float(aux1 >> 28)) * 0.25f;
            const device float* xs = xr + blk * 256 + 32 * ib;
            float acc = 0.0f;
            for (uint k = 0; k < 4; ++k) {
                const threadgroup uint8_t* gv = tg_grid + 8 * uint(q[k]);
                const uint8_t sg = tg_signs[(aux1 >> (7 * k)) & 127];
                for (uint j = 0; j < 8; ++j) {
                    const float v = float(gv[j]);
                    acc += ((sg >> j) & 1 ? -v : v) * xs[8 * k + j];
                }
            }
            sum += db * acc;
        }
    }
""" + _GEMV_EPILOGUE

# HC Sinkhorn chain (ops.hc_pre): one thread per token; S and ITERS template ints; params = [eps].
HC_SINKHORN_SOURCE = """
    const uint t = thread_position_in_grid.x;
    if (t >= N_TOK) return;
    const float eps = params[0];
    const device float* mt = m + ulong(t) * (2 * S + S * S);
    for (uint i = 0; i < S; ++i) {
        pre[t * S + i] = 1.0f / (1.0f + metal::precise::exp(-(mt[i] * scale[0] + base[i]))) + eps;
        post[t * S + i] = 2.0f / (1.0f + metal::precise::exp(-(mt[S + i] * scale[1] + base[S + i])));
    }
    float c[S][S];
    for (uint r = 0; r < S; ++r) {
        float mx = -INFINITY;
        for (uint k = 0; k < S; ++k) {
            c[r][k] = mt[2 * S + r * S + k] * scale[2] + base[2 * S + r * S + k];
            mx = max(mx, c[r][k]);
        }
        float den = 0.0f;
        for (uint k = 0; k < S; ++k) { c[r][k] = metal::precise::exp(c[r][k] - mx); den += c[r][k]; }
        for (uint k = 0; k < S; ++k) c[r][k] = c[r][k] / den + eps;
    }
    for (uint it = 0; it < ITERS; ++it) {
        if (it > 0) {
            for (uint r = 0; r < S; ++r) {
                float den = eps;
                for (uint k = 0; k < S; ++k) den += c[r][k];
                for (uint k = 0; k < S; ++k) c[r][k] /= den;
            }
        }
        for (uint k = 0; k < S; ++k) {
            float den = eps;
            for (uint r = 0; r < S; ++r) den += c[r][k];
            for (uint r = 0; r < S; ++r) c[r][k] /= den;
        }
    }
    for (uint r = 0; r < S; ++r)
        for (uint k = 0; k < S; ++k) comb[(ulong(t) * S + r) * S + k] = c[r][k];
"""

# x[t, d] = sum_s a[t, s] X[t, s, d]; grid (D, T).
HC_WSUM_SOURCE = """
    const uint d = thread_position_in_grid.x, t = thread_position_in_grid.y;
    if (d >= D) return;
    float acc = 0.0f;
    for (uint s = 0; s < S; ++s) acc += a[t * S + s] * X[(ulong(t) * S + s) * D + d];
    out[ulong(t) * D + d] = acc;
"""

# X'[t, c, d] = post[t, c] * y[t, d] + sum_r comb[t, r, c] * X[t, r, d]; grid (D, S, T).
HC_POST_SOURCE = """
    const uint d = thread_position_in_grid.x, c = thread_position_in_grid.y, t = thread_position_in_grid.z;
    if (d >= D) return;
    float acc = post[t * S + c] * y[ulong(t) * D + d];
    for (uint r = 0; r < S; ++r) acc += comb[(t * S + r) * S + c] * X[(ulong(t) * S + r) * D + d];
    out[(ulong(t) * S + c) * D + d] = acc;
"""

# h = silu(min(g, clamp)) * clip(u, -clamp, clamp) * wt[p]; grid (F, P); params = [clamp].
SWIGLU_SOURCE = """
    const uint f = thread_position_in_grid.x, p = thread_position_in_grid.y;
    if (f >= F) return;
    const float cl = params[0];
    const ulong i = ulong(p) * F + f;
    const float g = min(gate[i], cl);
    const float u = clamp(up[i], -cl, cl);
    out[i] = g / (1.0f + metal::precise::exp(-g)) * u * wt[p];
"""


def metal_supported() -> bool:
    """True on macOS arm64 with a Metal device MLX can use."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return False
    try:
        return bool(mx.metal.is_available())
    except Exception:  # an MLX build without the metal module
        return False


@lru_cache(maxsize=None)
def _kernel(name: str):
    spec = {
        "dsv4_q2_k_gemv": (["x", "w", "sel"], Q2_K_GEMV_SOURCE),
        "dsv4_iq2_xxs_gemv": (["x", "w", "sel", "grid", "ksigns"], IQ2_XXS_GEMV_SOURCE),
        "dsv4_hc_sinkhorn": (["m", "scale", "base", "params"], HC_SINKHORN_SOURCE),
        "dsv4_hc_wsum": (["X", "a"], HC_WSUM_SOURCE),
        "dsv4_hc_post": (["X", "y", "post", "comb"], HC_POST_SOURCE),
        "dsv4_swiglu": (["gate", "up", "wt", "params"], SWIGLU_SOURCE),
    }[name]
    outputs = ["pre", "post", "comb"] if name == "dsv4_hc_sinkhorn" else ["out"]
    return mx.fast.metal_kernel(name=name, input_names=spec[0], output_names=outputs, source=spec[1],
                                header=_HEADER)


@lru_cache(maxsize=None)
def _iq2_tables_u8() -> tuple[mx.array, mx.array]:
    return mx.array(np.ascontiguousarray(IQ2XXS_GRID).reshape(-1)), mx.array(KSIGNS_IQ2XS)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class KernelSet:
    """The dispatcher: every fused op, on Metal (use_metal) or through its twin. Same math either way."""

    def __init__(self, use_metal: bool | None = None, poison: bool = False):
        self.use_metal = metal_supported() if use_metal is None else bool(use_metal)
        # poison: outputs start as NaN, so an element a kernel forgets to write shows up (tests)
        self._init = {"init_value": float("nan")} if poison else {}

    # ---- quantized GEMV (Q2_K, IQ2_XXS) ------------------------------------------------------------
    def raw_matmul(self, x: mx.array, raw: mx.array, fmt: QuantFormat) -> mx.array:
        """x [T, in] @ dequant(raw [out, rb]).T -> [T, out]."""
        if not self.use_metal:
            return twins.raw_matmul(x, raw, fmt)
        sel = mx.zeros((1,), dtype=mx.int32)
        return self._gemv(x, raw[None], fmt, sel, x.shape[0], 1, gather=False, per_pair=False)

    def raw_gather_matmul(self, x: mx.array, raw: mx.array, fmt: QuantFormat, sel: mx.array) -> mx.array:
        """raw [E, out, rb]; sel [T, K]; x [T, in] or [T, K, in] -> [T, K, out]."""
        if not self.use_metal:
            return twins.raw_gather_matmul(x, raw, fmt, sel)
        t, k = sel.shape
        y = self._gemv(x, raw, fmt, sel.reshape(-1).astype(mx.int32), t * k, k, gather=True, per_pair=x.ndim == 3)
        return y.reshape(t, k, -1)

    def _gemv(self, x, raw, fmt, sel, n_p, k, gather, per_pair):
        out_dim, n_in = raw.shape[-2], x.shape[-1]
        inputs = [x.astype(mx.float32), raw.reshape(-1), sel]
        name = "dsv4_q2_k_gemv"
        if fmt == QuantFormat.IQ2_XXS:
            inputs += list(_iq2_tables_u8())
            name = "dsv4_iq2_xxs_gemv"
        elif fmt != QuantFormat.Q2_K:
            raise ValueError(f"no Metal GEMV for {fmt.name}")
        (y,) = _kernel(name)(
            inputs=inputs,
            template=[("IN", n_in), ("OUT", out_dim), ("K", k), ("GATHER", gather), ("PER_PAIR", per_pair),
                      ("ROW_BYTES", fmt.row_bytes(n_in))],
            grid=(SIMD_WIDTH, _round_up(out_dim, GEMV_ROWS_PER_TG), n_p),
            threadgroup=(SIMD_WIDTH, GEMV_ROWS_PER_TG, 1),
            output_shapes=[(n_p, out_dim)], output_dtypes=[mx.float32], **self._init,
        )
        return y

    # ---- hyper-connections -------------------------------------------------------------------------
    def hc_sinkhorn(self, m, scale, base, n_hc: int, iters: int, eps: float):
        if not self.use_metal:
            return _compiled_sinkhorn(n_hc, iters, eps)(m, scale, base)
        t = m.shape[0]
        return _kernel("dsv4_hc_sinkhorn")(
            inputs=[m, scale, base, mx.array([eps], dtype=mx.float32)],
            template=[("N_TOK", t), ("S", n_hc), ("ITERS", iters)],
            grid=(_round_up(t, SIMD_WIDTH), 1, 1), threadgroup=(SIMD_WIDTH, 1, 1),
            output_shapes=[(t, n_hc), (t, n_hc), (t, n_hc, n_hc)], output_dtypes=[mx.float32] * 3, **self._init,
        )

    def hc_weighted_sum(self, X, a):
        if not self.use_metal:
            return twins.hc_weighted_sum(X, a)
        t, s, d = X.shape
        (y,) = _kernel("dsv4_hc_wsum")(
            inputs=[X, a], template=[("S", s), ("D", d)],
            grid=(_round_up(d, ELEMENTWISE_TG), t, 1), threadgroup=(ELEMENTWISE_TG, 1, 1),
            output_shapes=[(t, d)], output_dtypes=[mx.float32], **self._init,
        )
        return y

    def hc_post(self, X, y, post, comb):
        if not self.use_metal:
            return twins.hc_post(X, y, post, comb)
        t, s, d = X.shape
        (out,) = _kernel("dsv4_hc_post")(
            inputs=[X, y, post, comb], template=[("S", s), ("D", d)],
            grid=(_round_up(d, ELEMENTWISE_TG), s, t), threadgroup=(ELEMENTWISE_TG, 1, 1),
            output_shapes=[(t, s, d)], output_dtypes=[mx.float32], **self._init,
        )
        return out

    # ---- elementwise chains --------------------------------------------------------------------------
    def swiglu(self, gate, up, clamp: float, weights=None):
        """silu(min(gate, clamp)) * clip(up) [* weights[..., None]]; gate/up [..., F], weights [...]."""
        if not self.use_metal:
            return twins.swiglu(gate, up, clamp, weights)
        shape = gate.shape
        f = shape[-1]
        p = int(np.prod(shape[:-1]))
        wt = mx.ones((p,), mx.float32) if weights is None else weights.reshape(-1).astype(mx.float32)
        (out,) = _kernel("dsv4_swiglu")(
            inputs=[gate.reshape(p, f), up.reshape(p, f), wt, mx.array([clamp], dtype=mx.float32)],
            template=[("F", f)], grid=(_round_up(f, ELEMENTWISE_TG), p, 1), threadgroup=(ELEMENTWISE_TG, 1, 1),
            output_shapes=[(p, f)], output_dtypes=[mx.float32], **self._init,
        )
        return out.reshape(shape)


@lru_cache(maxsize=None)
def _compiled_sinkhorn(n_hc: int, iters: int, eps: float):
    """mx.compile of the twin (40 tiny normalizations fuse into a few kernels)."""
    return mx.compile(lambda m, scale, base: twins.hc_sinkhorn(m, scale, base, n_hc, iters, eps))
