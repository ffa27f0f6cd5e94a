"""Metal kernels (`mx.fast.metal_kernel`) for what MLX has no exact built-in for, and the dispatcher.

Kernels: Q2_K and IQ2_XXS decode GEMV over raw GGUF blocks (dense, and expert-gathered with the
expert id read on the device from `sel`; IQ2 grid + sign tables staged in threadgroup memory, as in
ds4's metal/moe.metal, quant.md §4.3); HC pre and HC head each fused into one kernel (rms0, control
projection, Sinkhorn / sigmoid, weighted stream sum), HC post; the clamped SwiGLU x route-weight
chain. Each has an MLX-ops twin (twins.py) computing the same function; `KernelSet` picks Metal on
macOS arm64 with Metal available, the twin elsewhere (decided once, at construction). NOT verified on
hardware here: tests/apple/test_metal.py compares every kernel with its twin on a Mac (CI on Linux
emulates the sources as C++). Knows block layouts and op formulas, not the model.
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
HC_FUSED_TG = 256  # threads per token in the fused HC pre/head kernels (8 simdgroups)

_HEADER = """
inline float dsv4_half_at(const device uint8_t* p) {
    return float(as_type<half>(ushort(ushort(p[0]) | (ushort(p[1]) << 8))));
}

// HC controls m [2S + S*S] -> pre [S], post [S], comb [S*S] (row r = source stream), as ops.hc_pre.
template <int S, int ITERS>
inline void dsv4_sinkhorn(const thread float* m, const device float* scale, const device float* base,
                          float eps, thread float* pre, thread float* post, thread float* comb) {
    for (int i = 0; i < S; ++i) {
        pre[i] = 1.0f / (1.0f + metal::precise::exp(-(m[i] * scale[0] + base[i]))) + eps;
        post[i] = 2.0f / (1.0f + metal::precise::exp(-(m[S + i] * scale[1] + base[S + i])));
    }
    for (int r = 0; r < S; ++r) {
        float mx = -INFINITY;
        for (int k = 0; k < S; ++k) {
            comb[r * S + k] = m[2 * S + r * S + k] * scale[2] + base[2 * S + r * S + k];
            mx = max(mx, comb[r * S + k]);
        }
        float den = 0.0f;
        for (int k = 0; k < S; ++k) {
            comb[r * S + k] = metal::precise::exp(comb[r * S + k] - mx);
            den += comb[r * S + k];
        }
        for (int k = 0; k < S; ++k) comb[r * S + k] = comb[r * S + k] / den + eps;
    }
    for (int it = 0; it < ITERS; ++it) {
        if (it > 0) {
            for (int r = 0; r < S; ++r) {
                float den = eps;
                for (int k = 0; k < S; ++k) den += comb[r * S + k];
                for (int k = 0; k < S; ++k) comb[r * S + k] /= den;
            }
        }
        for (int k = 0; k < S; ++k) {
            float den = eps;
            for (int r = 0; r < S; ++r) den += comb[r * S + k];
            for (int r = 0; r < S; ++r) comb[r * S + k] /= den;
        }
    }
}
"""

# Row dot products, one per format: each lane of a simdgroup returns its partial sum of w_row . x
# (the caller simd_sums). Q2_K (quant.md §1.4): a lane takes 16-weight sub-blocks u = lane, lane+32, ..;
# sub-block j of a block is (h, s, hi) = (j/8, (j%8)/2, j%2): weights 128h+32s+16hi+l, codes = bit pair s
# of qs[32h+16hi+l]; per sub-block w.x = d*sc*sum(q*x) - dmin*m*sum(x). IQ2_XXS (§1.6): a lane takes
# 32-weight groups g = lane, lane+32, ..: aux0 bytes = grid indices, aux1 = 4 x 7-bit sign indices +
# 4-bit scale; w = d*(0.5+ls)*0.25 * grid * sign, grid and ksigns read from threadgroup memory.
_DOT_HEADER = """
inline float dsv4_dot_q2_k(const device uint8_t* wr, const device float* xr, uint lane, uint n_in) {
    float sum = 0.0f;
    for (uint u = lane; u < (n_in / 256) * 16; u += 32) {
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
    return sum;
}

inline float dsv4_dot_iq2_xxs(const device uint8_t* wr, const device float* xr, uint lane, uint n_in,
                              const threadgroup uint8_t* tg_grid, const threadgroup uint8_t* tg_signs) {
    float sum = 0.0f;
    for (uint g = lane; g < (n_in / 256) * 8; g += 32) {
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
    return sum;
}
"""

# IQ2_XXS kernels first stage the grid (256 x 8 bytes) and ksigns (128 bytes) in threadgroup memory.
_IQ2_TABLES = """
    threadgroup uint8_t tg_grid[2048];
    threadgroup uint8_t tg_signs[128];
    {
        const uint tid = thread_index_in_threadgroup;
        const uint nthr = threads_per_threadgroup.x * threads_per_threadgroup.y;
        for (uint i = tid; i < 2048; i += nthr) tg_grid[i] = grid[i];
        for (uint i = tid; i < 128; i += nthr) tg_signs[i] = ksigns[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
"""
_DOT_CALL = {"q2_k": "dsv4_dot_q2_k({w}, {x}, lane, IN)",
             "iq2_xxs": "dsv4_dot_iq2_xxs({w}, {x}, lane, IN, tg_grid, tg_signs)"}


def _with_tables(fmt: str, body: str) -> str:
    return (_IQ2_TABLES if fmt == "iq2_xxs" else "") + body


# GEMV (ops.qmatmul, and the expert-gathered form for the MoE). Grid (32, OUT padded to ROWS_PER_TG, P):
# one simdgroup per output row; P = T (dense) or T*K (gathered: expert sel[p]; input row p/K, or p
# itself when PER_PAIR). Template: IN, OUT, K, GATHER, PER_PAIR, ROW_BYTES.
_GEMV_BODY = """
    const uint lane = thread_index_in_simdgroup;
    const uint row = thread_position_in_grid.y;
    const uint p = thread_position_in_grid.z;
    const bool live = row < OUT;
    const ulong e = GATHER ? ulong(sel[p]) : 0;
    const uint xrow = (GATHER && !PER_PAIR) ? p / K : p;
    const device float* xr = x + ulong(xrow) * IN;
    const device uint8_t* wr = w + (e * OUT + (live ? row : 0)) * ROW_BYTES;
    float sum = live ? {dot} : 0.0f;
    sum = simd_sum(sum);
    if (live && lane == 0) out[ulong(p) * OUT + row] = sum;
"""
Q2_K_GEMV_SOURCE = _with_tables("q2_k", _GEMV_BODY.replace("{dot}", _DOT_CALL["q2_k"].format(w="wr", x="xr")))
IQ2_XXS_GEMV_SOURCE = _with_tables("iq2_xxs",
                                   _GEMV_BODY.replace("{dot}", _DOT_CALL["iq2_xxs"].format(w="wr", x="xr")))

# Fused routed-expert gate+up (ds4's pair_swiglu): per (token, slot) pair p and row f of expert sel[p],
# h[p, f] = silu(min(gate.x, clamp)) * clip(up.x, -clamp, clamp) * wt[p], one pass over x for both.
# Grid (32, F padded, T*K). Template: IN (= D), OUT (= F), K, ROW_BYTES; params = [clamp].
_MOE_PAIR_BODY = """
    const uint lane = thread_index_in_simdgroup;
    const uint row = thread_position_in_grid.y;
    const uint p = thread_position_in_grid.z;
    const bool live = row < OUT;
    const ulong e = ulong(sel[p]);
    const device float* xr = x + ulong(p / K) * IN;
    const ulong off = (e * OUT + (live ? row : 0)) * ROW_BYTES;
    const device uint8_t* gr = gate + off;
    const device uint8_t* ur = up + off;
    float g = live ? {dot_g} : 0.0f;
    float u = live ? {dot_u} : 0.0f;
    g = simd_sum(g);
    u = simd_sum(u);
    if (live && lane == 0) {
        const float cl = params[0];
        const float gc = min(g, cl);
        out[ulong(p) * OUT + row] = gc / (1.0f + metal::precise::exp(-gc)) * clamp(u, -cl, cl) * wt[p];
    }
"""
# Fused routed-expert down + sum over the K slots (ds4's sum6): out[t, row] = sum_k down[sel[t,k]][row] . h[t,k].
# Grid (32, D padded, T). Template: IN (= F), OUT (= D), K, ROW_BYTES.
_MOE_DOWN_SUM_BODY = """
    const uint lane = thread_index_in_simdgroup;
    const uint row = thread_position_in_grid.y;
    const uint t = thread_position_in_grid.z;
    const bool live = row < OUT;
    float sum = 0.0f;
    if (live) {
        for (uint k = 0; k < K; ++k) {
            const ulong p = ulong(t) * K + k;
            const device uint8_t* wr = w + (ulong(sel[p]) * OUT + row) * ROW_BYTES;
            const device float* xr = x + p * IN;
            sum += {dot};
        }
    }
    sum = simd_sum(sum);
    if (live && lane == 0) out[ulong(t) * OUT + row] = sum;
"""


def _moe_pair_source(fmt: str) -> str:
    return _with_tables(fmt, _MOE_PAIR_BODY.replace("{dot_g}", _DOT_CALL[fmt].format(w="gr", x="xr"))
                        .replace("{dot_u}", _DOT_CALL[fmt].format(w="ur", x="xr")))


def _moe_down_sum_source(fmt: str) -> str:
    return _with_tables(fmt, _MOE_DOWN_SUM_BODY.replace("{dot}", _DOT_CALL[fmt].format(w="wr", x="xr")))


MOE_PAIR_SOURCES = {f: _moe_pair_source(f) for f in _DOT_CALL}
MOE_DOWN_SUM_SOURCES = {f: _moe_down_sum_source(f) for f in _DOT_CALL}

# HC Sinkhorn chain (ops.hc_pre): one thread per token; S and ITERS template ints; params = [eps].
HC_SINKHORN_SOURCE = """
    const uint t = thread_position_in_grid.x;
    if (t >= N_TOK) return;
    float mt[2 * S + S * S], pr[S], po[S], cb[S * S];
    for (uint i = 0; i < 2 * S + S * S; ++i) mt[i] = m[ulong(t) * (2 * S + S * S) + i];
    dsv4_sinkhorn<S, ITERS>(mt, scale, base, params[0], pr, po, cb);
    for (uint i = 0; i < S; ++i) { pre[t * S + i] = pr[i]; post[t * S + i] = po[i]; }
    for (uint i = 0; i < S * S; ++i) comb[ulong(t) * S * S + i] = cb[i];
"""

# Fused HC pre / head (ops.hc_pre, ops.hc_head): one threadgroup of TG threads per token does
# rms0 + the control projection m = fn @ flat(X) / rms (sum of squares and NC dot products reduced with
# simd_sum, then across simdgroups in threadgroup memory), the stream weights (Sinkhorn chain, or the
# head's sigmoid), and the weighted stream sum. Grid (TG, 1, T); params = [eps, rms_eps].
_HC_FUSED_HEAD = """
    const uint tid = thread_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    const uint t = thread_position_in_grid.z;
    threadgroup float tg_part[TG / 32][NC + 1];
    threadgroup float tg_w[S];
    const device float* Xt = X + ulong(t) * (S * D);
    float ss = 0.0f;
    float acc[NC];
    for (uint c = 0; c < NC; ++c) acc[c] = 0.0f;
    for (uint i = tid; i < S * D; i += TG) {
        const float v = Xt[i];
        ss += v * v;
        for (uint c = 0; c < NC; ++c) acc[c] += float(fn[ulong(c) * (S * D) + i]) * v;
    }
    ss = simd_sum(ss);
    for (uint c = 0; c < NC; ++c) acc[c] = simd_sum(acc[c]);
    if (lane == 0) {
        tg_part[tid / 32][0] = ss;
        for (uint c = 0; c < NC; ++c) tg_part[tid / 32][1 + c] = acc[c];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        float tot = 0.0f, mc[NC];
        for (uint c = 0; c < NC; ++c) mc[c] = 0.0f;
        for (uint g = 0; g < TG / 32; ++g) {
            tot += tg_part[g][0];
            for (uint c = 0; c < NC; ++c) mc[c] += tg_part[g][1 + c];
        }
        const float r = 1.0f / sqrt(tot / float(S * D) + params[1]);
        for (uint c = 0; c < NC; ++c) mc[c] *= r;
"""
_HC_FUSED_TAIL = """
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint d = tid; d < D; d += TG) {
        float a = 0.0f;
        for (uint s = 0; s < S; ++s) a += tg_w[s] * Xt[s * D + d];
        out[ulong(t) * D + d] = a;
    }
"""
HC_PRE_FUSED_SOURCE = _HC_FUSED_HEAD + """
        float pr[S], po[S], cb[S * S];
        dsv4_sinkhorn<S, ITERS>(mc, scale, base, params[0], pr, po, cb);
        for (uint s = 0; s < S; ++s) { tg_w[s] = pr[s]; post[t * S + s] = po[s]; }
        for (uint i = 0; i < S * S; ++i) comb[ulong(t) * S * S + i] = cb[i];
""" + _HC_FUSED_TAIL
HC_HEAD_FUSED_SOURCE = _HC_FUSED_HEAD + """
        for (uint s = 0; s < S; ++s)
            tg_w[s] = 1.0f / (1.0f + metal::precise::exp(-(mc[s] * scale[0] + base[s]))) + params[0];
""" + _HC_FUSED_TAIL

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


_FMT_KEY = {QuantFormat.Q2_K: "q2_k", QuantFormat.IQ2_XXS: "iq2_xxs"}
_TABLE_INPUTS = {"q2_k": [], "iq2_xxs": ["grid", "ksigns"]}


@lru_cache(maxsize=None)
def _kernel(name: str):
    for f in _DOT_CALL:
        if name == f"dsv4_moe_pair_{f}":
            return mx.fast.metal_kernel(name=name, input_names=["x", "gate", "up", "sel", "wt", "params"]
                                        + _TABLE_INPUTS[f], output_names=["out"], source=MOE_PAIR_SOURCES[f],
                                        header=_HEADER + _DOT_HEADER)
        if name == f"dsv4_moe_down_sum_{f}":
            return mx.fast.metal_kernel(name=name, input_names=["x", "w", "sel"] + _TABLE_INPUTS[f],
                                        output_names=["out"], source=MOE_DOWN_SUM_SOURCES[f],
                                        header=_HEADER + _DOT_HEADER)
    spec = {
        "dsv4_q2_k_gemv": (["x", "w", "sel"], Q2_K_GEMV_SOURCE),
        "dsv4_iq2_xxs_gemv": (["x", "w", "sel", "grid", "ksigns"], IQ2_XXS_GEMV_SOURCE),
        "dsv4_hc_sinkhorn": (["m", "scale", "base", "params"], HC_SINKHORN_SOURCE),
        "dsv4_hc_pre": (["X", "fn", "scale", "base", "params"], HC_PRE_FUSED_SOURCE),
        "dsv4_hc_head": (["X", "fn", "scale", "base", "params"], HC_HEAD_FUSED_SOURCE),
        "dsv4_hc_wsum": (["X", "a"], HC_WSUM_SOURCE),
        "dsv4_hc_post": (["X", "y", "post", "comb"], HC_POST_SOURCE),
        "dsv4_swiglu": (["gate", "up", "wt", "params"], SWIGLU_SOURCE),
    }[name]
    outputs = {"dsv4_hc_sinkhorn": ["pre", "post", "comb"], "dsv4_hc_pre": ["out", "post", "comb"]}.get(name, ["out"])
    return mx.fast.metal_kernel(name=name, input_names=spec[0], output_names=outputs, source=spec[1],
                                header=_HEADER + _DOT_HEADER)


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

    # ---- routed experts, fused (raw formats) ------------------------------------------------------------
    def moe_raw(self, u, gate, up, down, fmt_gate_up: QuantFormat, fmt_down: QuantFormat, sel, weights,
                clamp: float):
        """Routed experts from raw blocks: gate/up [E, F, rb] (one format), down [E, D, rb]; u [T, D];
        sel, weights [T, K] -> [T, D] = sum_k down[e] . (swiglu(gate[e] . u, up[e] . u) * w)."""
        if not self.use_metal:
            h = twins.swiglu(twins.raw_gather_matmul(u, gate, fmt_gate_up, sel),
                             twins.raw_gather_matmul(u, up, fmt_gate_up, sel), clamp, weights)
            return twins.raw_gather_matmul(h, down, fmt_down, sel).sum(1)
        t, k = sel.shape
        f_dim, d_dim = gate.shape[1], down.shape[1]
        sel32 = sel.reshape(-1).astype(mx.int32)
        fg, fd = _FMT_KEY[fmt_gate_up], _FMT_KEY[fmt_down]
        (h,) = _kernel(f"dsv4_moe_pair_{fg}")(
            inputs=[u.astype(mx.float32), gate.reshape(-1), up.reshape(-1), sel32,
                    weights.reshape(-1).astype(mx.float32), mx.array([clamp], dtype=mx.float32)]
            + (list(_iq2_tables_u8()) if fg == "iq2_xxs" else []),
            template=[("IN", d_dim), ("OUT", f_dim), ("K", k), ("ROW_BYTES", fmt_gate_up.row_bytes(d_dim))],
            grid=(SIMD_WIDTH, _round_up(f_dim, GEMV_ROWS_PER_TG), t * k), threadgroup=(SIMD_WIDTH, GEMV_ROWS_PER_TG, 1),
            output_shapes=[(t * k, f_dim)], output_dtypes=[mx.float32], **self._init,
        )
        (y,) = _kernel(f"dsv4_moe_down_sum_{fd}")(
            inputs=[h, down.reshape(-1), sel32] + (list(_iq2_tables_u8()) if fd == "iq2_xxs" else []),
            template=[("IN", f_dim), ("OUT", d_dim), ("K", k), ("ROW_BYTES", fmt_down.row_bytes(f_dim))],
            grid=(SIMD_WIDTH, _round_up(d_dim, GEMV_ROWS_PER_TG), t), threadgroup=(SIMD_WIDTH, GEMV_ROWS_PER_TG, 1),
            output_shapes=[(t, d_dim)], output_dtypes=[mx.float32], **self._init,
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

    def hc_pre(self, X, fn, scale, base, iters: int, eps: float, rms_eps: float):
        """Fused ops.hc_pre: X [T, S, D], fn [NC, S*D] (F16/F32 array) -> (x [T, D], post [T, S], comb)."""
        t, s, d = X.shape
        if not self.use_metal:
            m = mx.fast.rms_norm(X.reshape(t, s * d), None, rms_eps) @ fn.astype(mx.float32).T
            pre, post, comb = self.hc_sinkhorn(m, scale, base, s, iters, eps)
            return twins.hc_weighted_sum(X, pre), post, comb
        return tuple(_kernel("dsv4_hc_pre")(
            inputs=[X, fn, scale, base, mx.array([eps, rms_eps], dtype=mx.float32)],
            template=[("S", s), ("D", d), ("NC", fn.shape[0]), ("ITERS", iters), ("TG", HC_FUSED_TG)],
            grid=(HC_FUSED_TG, 1, t), threadgroup=(HC_FUSED_TG, 1, 1),
            output_shapes=[(t, d), (t, s), (t, s, s)], output_dtypes=[mx.float32] * 3, **self._init,
        ))

    def hc_head(self, X, fn, scale, base, eps: float, rms_eps: float):
        """Fused ops.hc_head: X [T, S, D], fn [S, S*D] -> [T, D]."""
        t, s, d = X.shape
        if not self.use_metal:
            m = mx.fast.rms_norm(X.reshape(t, s * d), None, rms_eps) @ fn.astype(mx.float32).T
            return twins.hc_weighted_sum(X, mx.sigmoid(m * scale[0] + base) + eps)
        (out,) = _kernel("dsv4_hc_head")(
            inputs=[X, fn, scale, base, mx.array([eps, rms_eps], dtype=mx.float32)],
            template=[("S", s), ("D", d), ("NC", fn.shape[0]), ("TG", HC_FUSED_TG)],
            grid=(HC_FUSED_TG, 1, t), threadgroup=(HC_FUSED_TG, 1, 1),
            output_shapes=[(t, d)], output_dtypes=[mx.float32], **self._init,
        )
        return out

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
