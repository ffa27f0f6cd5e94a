"""Routed-MoE decode through tl.dot with sub-blocks as the dot's N axis (variants `fused_dot*`).

Per K step a weight tile [BLOCK_N rows, 16 sub-blocks] is decoded to its INTEGER codes in fp16 (exact:
Q2_K 0..3, Q4_K 0..15, IQ2_XXS signed grid values +-8/25/43) with the magic-number trick (0x6400|q is
fp16 1024+q: no int->float conversion instruction), and multiplied by a sub-block-diagonal activation
tile X [BLOCK_K, 16] (X[k, j] = x[k] if k lies in sub-block j): S[n, j] = sum_{k in j} q[n, k] x[k].
Scales are applied in fp32 after the dot (acc += d*sc*S - dmin*m*sum_j x), their words loaded one step
ahead. The dot columns are sub-blocks instead of zero padding, and the code loads feed tl.dot, so Triton
pipelines them (num_stages). Codes are unpacked in storage order; X is built in the same permuted order.
X is built per program in registers, or (`packed_x`) once per token/slot by _x_pack_kernel; with
`split_gate_up` gate and up run in separate programs and SwiGLU moves into the h packing.
Rounding: x (u, h) is rounded to fp16 once (2^-11 relative); `x_split` feeds x as fp16 hi + lo*2^-11
(~2^-22 relative, fp32-grade). Weights and scales are never rounded. Deterministic: fixed loop orders,
split partials summed in fixed order, no atomics. Knows block layouts, not the model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import triton
import triton.language as tl

from . import blocks, moe
from .blocks import FMT_IQ2_XXS, FMT_Q2_K, DeviceWeight, _f16_from_bits
from .configs import DeviceInfo, Vendor

NSUB = 16  # sub-blocks per K step = N of the dot (tl.dot needs >= 16)
SUB_SIZE = {"Q2_K": 16, "Q4_K": 32, "IQ2_XXS": 32}  # weights per scaled sub-block
X_LO_SCALE = 2048.0  # the lo part of x is stored scaled by 2^11 to stay clear of fp16 subnormals
PROGRAMS_PER_SM = 4  # down projection: split (slot, K step) range until about this many programs per SM


@dataclass(frozen=True)
class DotMoeConfig:
    """Tiles of the two kernels (BLOCK_K is fixed by the format: 16 sub-blocks)."""

    # Defaults chosen from sm_90 compiles on a CPU box (Triton 3.9, not yet timed on the H200): the gate/up
    # kernel holds two decoded [BLOCK_N, 512] tiles and the [512, 16] activation tile; 32 rows x 8 warps
    # keeps its spill small (~300 B stack for IQ2_XXS, ~90 B for Q4_K) at ~100 KB of shared memory.
    block_n_gate_up: int = 32
    block_n_down: int = 64
    num_warps: int = 8
    num_warps_down: int = 4
    stages_gate_up: int = 3
    stages_down: int = 3
    x_split: bool = False  # feed x as fp16 hi + lo (two dots): fp32-grade results
    packed_x: bool = False  # build the activation tiles once (_x_pack_kernel) instead of in every program
    split_gate_up: bool = False  # (needs packed_x) gate and up in separate programs, SwiGLU in the h packing


@triton.jit
def _fp16_from_small(q, BIAS: tl.constexpr):
    """fp16 value q - BIAS for int32 0 <= q < 1024, without a conversion instruction (0x6400 = 1024.0)."""
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + BIAS)


@triton.jit
def _perm(kk, FMT: tl.constexpr):
    """(logical offset within the step, sub-block within the step) of storage-order position kk."""
    if FMT == FMT_IQ2_XXS:
        return kk, kk >> 5
    elif FMT == FMT_Q2_K:
        blk = kk >> 8
        b = 4 * ((kk >> 4) & 15) + ((kk >> 2) & 3)  # byte of qs
        i = 128 * (b >> 5) + 32 * (kk & 3) + (b & 31)
        return blk * 256 + i, blk * 16 + (i >> 4)
    else:  # Q4_K
        blk = kk >> 8
        b = 4 * ((kk >> 3) & 31) + ((kk >> 1) & 3)
        j = 2 * (b >> 5) + (kk & 1)
        return blk * 256 + 32 * j + (b & 31), blk * 8 + j


@triton.jit
def _x_tiles(x_ptr, k0, FMT: tl.constexpr, BLOCK_K: tl.constexpr, X_SPLIT: tl.constexpr):
    """Sub-block-diagonal activation tiles X_hi, X_lo [BLOCK_K, NSUB] fp16 and the fp32 sub-block sums [NSUB]
    (column sums of the same tile: no second load of x)."""
    kk = tl.arange(0, BLOCK_K)
    li, sub = _perm(kk, FMT)
    xv = tl.load(x_ptr + k0 + li).to(tl.float32)
    return _x_from(xv, sub, X_SPLIT)


@triton.jit
def _x_from(xv, sub, X_SPLIT: tl.constexpr):
    xd = tl.where(sub[:, None] == tl.arange(0, 16)[None, :], xv[:, None], 0.0)
    x_hi = xd.to(tl.float16)
    if X_SPLIT:
        x_lo = ((xd - x_hi.to(tl.float32)) * 2048.0).to(tl.float16)
    else:
        x_lo = x_hi
    return x_hi, x_lo, tl.sum(xd, axis=0)


@triton.jit
def _x_pack_kernel(x_ptr, xp_ptr, xs_ptr, stride_xt, wts_ptr, clamp, stride_gu,
                   FMT: tl.constexpr, BLOCK_K: tl.constexpr, X_SPLIT: tl.constexpr, SWIGLU: tl.constexpr):
    """xp[row, step] = the activation tile(s) of _x_tiles as fp16 [BLOCK_K, NC] (NC = 16, or 32 with the
    lo part in columns 16..31), xs[row, step] = the fp32 sub-block sums [16]. SWIGLU: the row is
    h = swiglu(g, u) * wts[row] from g = x[row], u = x[row] + stride_gu (the split gate/up projections)."""
    row = tl.program_id(0)
    step = tl.program_id(1)
    NC: tl.constexpr = 32 if X_SPLIT else 16
    if SWIGLU:
        li, sub = _perm(tl.arange(0, BLOCK_K), FMT)
        p = x_ptr + row.to(tl.int64) * stride_xt + step * BLOCK_K + li
        g = tl.load(p)
        u = tl.load(p + stride_gu)
        xv = moe._swiglu_route(g, u, tl.load(wts_ptr + row).to(tl.float32), clamp)
        x_hi, x_lo, xs = _x_from(xv, sub, X_SPLIT)
    else:
        x_hi, x_lo, xs = _x_tiles(x_ptr + row * stride_xt, step * BLOCK_K, FMT, BLOCK_K, X_SPLIT)
    tile = (row * tl.num_programs(1) + step).to(tl.int64)
    off = tl.arange(0, BLOCK_K)[:, None] * NC + tl.arange(0, 16)[None, :]
    tl.store(xp_ptr + tile * (BLOCK_K * NC) + off, x_hi)
    if X_SPLIT:
        tl.store(xp_ptr + tile * (BLOCK_K * NC) + off + 16, x_lo)
    tl.store(xs_ptr + tile * 16 + tl.arange(0, 16), xs)


@triton.jit
def _x_operand(x_ptr, xp_ptr, xs_ptr, row, k0, FMT: tl.constexpr, BLOCK_K: tl.constexpr, X_SPLIT: tl.constexpr,
               PACKED: tl.constexpr, n_steps):
    """(activation operand [BLOCK_K, NC] fp16, or the hi tile; lo tile or hi again; sub-block sums [16]) of
    row `row` at input offset k0: built in registers, or (PACKED) loaded from the _x_pack_kernel output,
    where the load feeds the dot straight from shared memory."""
    if PACKED:
        NC: tl.constexpr = 32 if X_SPLIT else 16
        tile = (row * n_steps + k0 // BLOCK_K).to(tl.int64)
        xt = tl.load(xp_ptr + tile * (BLOCK_K * NC) + tl.arange(0, BLOCK_K)[:, None] * NC
                     + tl.arange(0, NC)[None, :])
        xs = tl.load(xs_ptr + tile * 16 + tl.arange(0, 16))
        return xt, xt, xs
    else:
        return _x_tiles(x_ptr, k0, FMT, BLOCK_K, X_SPLIT)


@triton.jit
def _w_codes(w_ptr, g32_ptr, rows, n_ok, k0, stride_w, FMT: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """(codes fp16 [BLOCK_N, BLOCK_K] in storage order, IQ2_XXS (0.5+ls)/4 [BLOCK_N, 16] or a dummy) for
    the step at input offset k0. Every load here feeds the dot, so Triton pipelines it.
    All formats are read as int32 words; IQ2_XXS per pair of 66-byte blocks (33 words, 4-byte aligned)."""
    m2 = n_ok[:, None]
    if FMT == FMT_IQ2_XXS:
        r = rows.to(tl.int64)[:, None]
        js = tl.arange(0, 16)[None, :]
        first = js < 8  # block 0 of the pair: its 8-byte groups start 2 bytes into a word
        ib = js & 7
        wi = r * stride_w + (k0 >> 9) * 33 + tl.where(first, 2 * ib, 17 + 2 * ib)
        # separate loads for the grid-index and sign words (a load used at two indirection levels is
        # not pipelined)
        g0 = tl.load(w_ptr + wi, mask=m2, other=0)
        g1 = tl.load(w_ptr + wi + 1, mask=m2 & first, other=0)
        a0 = tl.load(w_ptr + wi + 1, mask=m2, other=0)
        a1 = tl.load(w_ptr + wi + 2, mask=m2 & first, other=0)
        gw = tl.where(first, ((g0 >> 16) & 0xFFFF) | (g1 << 16), g0)
        aux = tl.where(first, ((a0 >> 16) & 0xFFFF) | (a1 << 16), a0)
        lsf = (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.25
        kq = tl.arange(0, 4)[None, None, :]
        gi = (gw[:, :, None] >> (8 * kq)) & 255  # [BN, 16, 4] grid indices
        sidx = (aux[:, :, None] >> (7 * kq)) & 127
        signs = blocks.iq2_ksigns(sidx)
        lo, hi = blocks.iq2_grid_words(g32_ptr, gi)
        jj = tl.arange(0, 8)[None, None, None, :]
        word = tl.where(jj < 4, lo[:, :, :, None], hi[:, :, :, None])
        v = (word >> (8 * (jj & 3))) & 255
        neg = (signs[:, :, :, None] >> jj) & 1
        codes = _fp16_from_small(64 + v - 2 * v * neg, 64)  # signed value, biased by 64 into 0..127
        return tl.reshape(codes, (BLOCK_N, BLOCK_K)), lsf
    elif FMT == FMT_Q2_K:  # 21 words per block: 4 scale words, 16 code words, d|dmin
        return _k_quant_codes(w_ptr, rows, n_ok, k0, stride_w, 21, 2, BLOCK_N, BLOCK_K), m2
    else:  # Q4_K, 36 words per block: d|dmin, 3 words of 6-bit scales/mins, 32 code words
        return _k_quant_codes(w_ptr, rows, n_ok, k0, stride_w, 36, 4, BLOCK_N, BLOCK_K), m2


@triton.jit
def _k_quant_codes(w_ptr, rows, n_ok, k0, stride_w, WORDS: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Unsigned BITS-bit codes of the Q2_K / Q4_K super-blocks (WORDS int32 words each, 8 * BITS code words
    from word 4, low bits first in each byte) of step k0, as fp16 [BLOCK_N, BLOCK_K] in storage order."""
    NB: tl.constexpr = BLOCK_K // 256
    PER_BYTE: tl.constexpr = 8 // BITS
    r = rows.to(tl.int64)[:, None, None]
    base = r * stride_w + ((k0 >> 8) + tl.arange(0, NB)[None, :, None]) * WORDS
    ww = tl.load(w_ptr + base + 4 + tl.arange(0, 8 * BITS)[None, None, :], mask=n_ok[:, None, None], other=0)
    e2 = tl.arange(0, 32 // BITS)[None, None, None, :]
    q = (ww[:, :, :, None] >> (8 * (e2 // PER_BYTE) + BITS * (e2 % PER_BYTE))) & ((1 << BITS) - 1)
    return tl.reshape(_fp16_from_small(q, 0), (BLOCK_N, BLOCK_K))


@triton.jit
def _scale_words(w_ptr, rows, n_ok, k0, stride_w, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The raw words the scales of step k0 come from (4 tensors; unused ones repeat the first). They
    do not feed the dot, so the kernels load them one step ahead (register prefetch)."""
    if FMT == FMT_IQ2_XXS:
        js = tl.arange(0, 16)[None, :]
        dw = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_w + (k0 >> 9) * 33 + 16 * (js >> 3),
                     mask=n_ok[:, None], other=0)
        return dw, dw, dw, dw
    elif FMT == FMT_Q2_K:
        NB: tl.constexpr = BLOCK_K // 256
        m3 = n_ok[:, None, None]
        base = rows.to(tl.int64)[:, None, None] * stride_w + ((k0 >> 8) + tl.arange(0, NB)[None, :, None]) * 21
        sw = tl.load(w_ptr + base + tl.arange(0, 4)[None, None, :], mask=m3, other=0)
        dw = tl.load(w_ptr + base + 20, mask=m3, other=0)
        return sw, dw, dw, dw
    else:
        NB: tl.constexpr = BLOCK_K // 256
        m3 = n_ok[:, None, None]
        base = rows.to(tl.int64)[:, None, None] * stride_w + ((k0 >> 8) + tl.arange(0, NB)[None, :, None]) * 36
        j = tl.arange(0, 8)[None, None, :]
        sh = 8 * (j & 3)
        dw = tl.load(w_ptr + base, mask=m3, other=0)
        lo = (tl.load(w_ptr + base + 1, mask=m3, other=0) >> sh) & 255
        mid = (tl.load(w_ptr + base + 2, mask=m3, other=0) >> sh) & 255
        hi = (tl.load(w_ptr + base + 3, mask=m3, other=0) >> sh) & 255
        return dw, lo, mid, hi


@triton.jit
def _scales(s0, s1, s2, s3, lsf, FMT: tl.constexpr, BLOCK_N: tl.constexpr):
    """(scale, min coefficient) [BLOCK_N, 16] fp32 per sub-block: weight = scale*code - mincoef."""
    if FMT == FMT_IQ2_XXS:
        first = tl.arange(0, 16)[None, :] < 8
        d = tl.where(first, s0, s0 >> 16) & 0xFFFF
        scale = d.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * lsf
        return scale, scale
    elif FMT == FMT_Q2_K:
        sc = (s0[:, :, :, None] >> (8 * tl.arange(0, 4)[None, None, None, :])) & 255
        sc = tl.reshape(sc, (BLOCK_N, s0.shape[1], 16))
        scale = _f16_from_bits(s1) * (sc & 15).to(tl.float32)
        minc = _f16_from_bits(s1 >> 16) * (sc >> 4).to(tl.float32)
        return tl.reshape(scale, (BLOCK_N, 16)), tl.reshape(minc, (BLOCK_N, 16))
    else:
        low_half = tl.arange(0, 8)[None, None, :] < 4
        sc = tl.where(low_half, s1 & 63, (s3 & 15) | ((s1 >> 6) << 4))
        mn = tl.where(low_half, s2 & 63, (s3 >> 4) | ((s2 >> 6) << 4))
        scale = _f16_from_bits(s0) * sc.to(tl.float32)
        minc = _f16_from_bits(s0 >> 16) * mn.to(tl.float32)
        return tl.reshape(scale, (BLOCK_N, 16)), tl.reshape(minc, (BLOCK_N, 16))


@triton.jit
def _sub_dot(codes, x_hi, x_lo, X_SPLIT: tl.constexpr, PACKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """S[n, j] = sum_{k in sub-block j} code[n, k] * x[k], fp32 accumulation."""
    if PACKED and X_SPLIT:  # one dot over [hi | lo] columns, then hi + lo / 2048
        s2 = tl.reshape(tl.dot(codes, x_hi), (BLOCK_N, 2, 16))
        w = tl.where(tl.arange(0, 2) == 0, 1.0, 1.0 / 2048.0)[None, :, None]
        return tl.sum(s2 * w, axis=1)
    else:
        s = tl.dot(codes, x_hi)
        if X_SPLIT:
            s += tl.dot(codes, x_lo) * (1.0 / 2048.0)
        return s


@triton.jit
def _gate_up_dot_kernel(u_ptr, sel_ptr, wts_ptr, h_ptr, gw_ptr, uw_ptr, g32_ptr, xp_ptr, xs_ptr,
                        F, D, KSEL, clamp, stride_ut, stride_ht, stride_w,
                        FMT: tl.constexpr, HAS_MIN: tl.constexpr, X_SPLIT: tl.constexpr, PACKED: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[slot, f] = swiglu(gate[e] @ u[t], up[e] @ u[t]) * wts[slot] per (slot, block of F rows)."""
    slot, t, wt, rn, n_ok, rows = moe.slot_rows(sel_ptr, wts_ptr, KSEL, F, BLOCK_N)
    x_ptr = u_ptr + t * stride_ut
    acc_g = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    g0, g1, g2, g3 = _scale_words(gw_ptr, rows, n_ok, 0, stride_w, FMT, BLOCK_K)
    u0, u1, u2, u3 = _scale_words(uw_ptr, rows, n_ok, 0, stride_w, FMT, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        k_next = tl.minimum(k0 + BLOCK_K, D - BLOCK_K)
        ng0, ng1, ng2, ng3 = _scale_words(gw_ptr, rows, n_ok, k_next, stride_w, FMT, BLOCK_K)
        nu0, nu1, nu2, nu3 = _scale_words(uw_ptr, rows, n_ok, k_next, stride_w, FMT, BLOCK_K)
        x_hi, x_lo, xs = _x_operand(x_ptr, xp_ptr, xs_ptr, t, k0, FMT, BLOCK_K, X_SPLIT, PACKED, D // BLOCK_K)
        cg, lg = _w_codes(gw_ptr, g32_ptr, rows, n_ok, k0, stride_w, FMT, BLOCK_N, BLOCK_K)
        sg = _sub_dot(cg, x_hi, x_lo, X_SPLIT, PACKED, BLOCK_N)
        cu, lu = _w_codes(uw_ptr, g32_ptr, rows, n_ok, k0, stride_w, FMT, BLOCK_N, BLOCK_K)
        su = _sub_dot(cu, x_hi, x_lo, X_SPLIT, PACKED, BLOCK_N)
        ag, bg = _scales(g0, g1, g2, g3, lg, FMT, BLOCK_N)
        au, bu = _scales(u0, u1, u2, u3, lu, FMT, BLOCK_N)
        acc_g += ag * sg
        acc_u += au * su
        if HAS_MIN:
            acc_g -= bg * xs[None, :]
            acc_u -= bu * xs[None, :]
        g0, g1, g2, g3 = ng0, ng1, ng2, ng3
        u0, u1, u2, u3 = nu0, nu1, nu2, nu3
    h = moe._swiglu_route(tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), wt, clamp)
    tl.store(h_ptr + slot * stride_ht + rn, h, mask=n_ok)


@triton.jit
def _gu_proj_kernel(sel_ptr, gw_ptr, uw_ptr, g32_ptr, xp_ptr, xs_ptr, y_ptr, F, D, KSEL, stride_w, stride_yw,
                    stride_ys, FMT: tl.constexpr, HAS_MIN: tl.constexpr, X_SPLIT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[which, slot, f] = (gate if which == 0 else up)[e] @ u[t]: one projection per program (half the
    live decode state of _gate_up_dot_kernel, twice the programs); activation tiles packed."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    which = tl.program_id(2)
    w_ptr = tl.where(which == 0, gw_ptr, uw_ptr)
    t = slot // KSEL
    e = tl.load(sel_ptr + slot).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < F
    rows = e * F + rn
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    n_steps = D // BLOCK_K
    s0, s1, s2, s3 = _scale_words(w_ptr, rows, n_ok, 0, stride_w, FMT, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        k_next = tl.minimum(k0 + BLOCK_K, D - BLOCK_K)
        n0, n1, n2, n3 = _scale_words(w_ptr, rows, n_ok, k_next, stride_w, FMT, BLOCK_K)
        xt, _xt, xs = _x_operand(xp_ptr, xp_ptr, xs_ptr, t, k0, FMT, BLOCK_K, X_SPLIT, True, n_steps)
        c, lf = _w_codes(w_ptr, g32_ptr, rows, n_ok, k0, stride_w, FMT, BLOCK_N, BLOCK_K)
        sd = _sub_dot(c, xt, xt, X_SPLIT, True, BLOCK_N)
        a, b = _scales(s0, s1, s2, s3, lf, FMT, BLOCK_N)
        acc += a * sd
        if HAS_MIN:
            acc -= b * xs[None, :]
        s0, s1, s2, s3 = n0, n1, n2, n3
    tl.store(y_ptr + which * stride_yw + slot * stride_ys + rn, tl.sum(acc, axis=1), mask=n_ok)


@triton.jit
def _down_dot_kernel(h_ptr, sel_ptr, out_ptr, dw_ptr, g32_ptr, xp_ptr, xs_ptr, F, D, KSEL, steps_per_split,
                     stride_ht, stride_os, stride_ot, stride_w,
                     FMT: tl.constexpr, HAS_MIN: tl.constexpr, X_SPLIT: tl.constexpr, PACKED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, t, d] = sum over this split's (slot i, K step) pairs, in order, of down[sel[t,i]] @ h[slot].
    One flat loop over (slot, K step) so the pipeline runs across expert boundaries."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    sp = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < D
    nk = F // BLOCK_K
    it0 = sp * steps_per_split
    it1 = tl.minimum(it0 + steps_per_split, KSEL * nk)
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    i = it0 // nk
    e = tl.load(sel_ptr + t * KSEL + i).to(tl.int64)
    s0, s1, s2, s3 = _scale_words(dw_ptr, e * D + rn, n_ok, (it0 - i * nk) * BLOCK_K, stride_w, FMT, BLOCK_K)
    for it in range(it0, it1):
        i = it // nk
        k0 = (it - i * nk) * BLOCK_K
        slot = t * KSEL + i
        e = tl.load(sel_ptr + slot).to(tl.int64)
        nxt = tl.minimum(it + 1, it1 - 1)
        i_n = nxt // nk
        e_n = tl.load(sel_ptr + t * KSEL + i_n).to(tl.int64)
        n0, n1, n2, n3 = _scale_words(dw_ptr, e_n * D + rn, n_ok, (nxt - i_n * nk) * BLOCK_K, stride_w, FMT, BLOCK_K)
        x_hi, x_lo, xs = _x_operand(h_ptr + slot * stride_ht, xp_ptr, xs_ptr, slot, k0, FMT, BLOCK_K, X_SPLIT,
                                    PACKED, nk)
        c, lf = _w_codes(dw_ptr, g32_ptr, e * D + rn, n_ok, k0, stride_w, FMT, BLOCK_N, BLOCK_K)
        s = _sub_dot(c, x_hi, x_lo, X_SPLIT, PACKED, BLOCK_N)
        a, b = _scales(s0, s1, s2, s3, lf, FMT, BLOCK_N)
        acc += a * s
        if HAS_MIN:
            acc -= b * xs[None, :]
        s0, s1, s2, s3 = n0, n1, n2, n3
    tl.store(out_ptr + sp * stride_os + t * stride_ot + rn, tl.sum(acc, axis=1), mask=n_ok)


def _supported(dw: DeviceWeight, k: int) -> bool:
    sb = SUB_SIZE.get(dw.fmt.name)
    return sb is not None and k % (NSUB * sb) == 0


def _consts(dw: DeviceWeight, cfg: DotMoeConfig) -> dict:
    return dict(FMT=int(dw.fmt), HAS_MIN=dw.fmt.name != "IQ2_XXS", X_SPLIT=cfg.x_split, PACKED=cfg.packed_x,
                BLOCK_K=NSUB * SUB_SIZE[dw.fmt.name])


def _pack_x(x, dw: DeviceWeight, cfg: DotMoeConfig):
    """(xp, xs) activation tiles of x [rows, K] for weight dw's format, or (x, x) when not packed."""
    if not cfg.packed_x:
        return x, x
    rows, k = x.shape
    bk = NSUB * SUB_SIZE[dw.fmt.name]
    nc = 2 * NSUB if cfg.x_split else NSUB
    xp = blocks.empty((rows, k * nc // 2), x.device).view(_fp16())  # fp16 tiles (fp32 NaN poison shows through)
    xs = blocks.empty((rows, k // bk * NSUB), x.device)
    _x_pack_kernel[(rows, k // bk)](x, xp, xs, x.stride(0), x, 0.0, 0, FMT=int(dw.fmt), BLOCK_K=bk,
                                     X_SPLIT=cfg.x_split, SWIGLU=False, num_warps=4)
    return xp, xs


def _pack_h(y, wts, clamp, dw: DeviceWeight, cfg: DotMoeConfig):
    """Activation tiles of h = swiglu(y[0], y[1]) * wts for the down projection (one pass)."""
    _, rows, k = y.shape
    bk = NSUB * SUB_SIZE[dw.fmt.name]
    nc = 2 * NSUB if cfg.x_split else NSUB
    xp = blocks.empty((rows, k * nc // 2), y.device).view(_fp16())
    xs = blocks.empty((rows, k // bk * NSUB), y.device)
    _x_pack_kernel[(rows, k // bk)](y, xp, xs, y.stride(1), wts, float(clamp), y.stride(0), FMT=int(dw.fmt),
                                     BLOCK_K=bk, X_SPLIT=cfg.x_split, SWIGLU=True, num_warps=4)
    return xp, xs


def _fp16():
    import torch

    return torch.float16


def _words(dw: DeviceWeight):
    """(int32 word view [rows, row_bytes/4], words per row, grid as int32 or a dummy); IQ2_XXS rows hold
    an even number of 66-byte blocks here (K % 512 == 0), so they are 4-byte aligned."""
    import torch

    w = dw.plans.get("moe_fast_words")
    if w is None:
        rb = dw.fmt.row_bytes(dw.k)
        w32 = dw.buf.reshape(-1, rb).view(torch.int32)
        g32 = dw.g.view(torch.int32) if dw.fmt.name == "IQ2_XXS" else w32  # grid only read for IQ2
        w = dw.plans["moe_fast_words"] = (w32, rb // 4, g32)
    return w


def _down_split(T: int, D: int, block_n: int, total_steps: int, dev: DeviceInfo) -> int:
    """(slot, K step) range per program: split until about PROGRAMS_PER_SM programs per SM."""
    programs = T * triton.cdiv(D, block_n)
    split = max(1, min(total_steps, triton.cdiv(PROGRAMS_PER_SM * dev.n_sm, programs)))
    return triton.cdiv(total_steps, split)


def fused_dot(u, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight, sel, weights, clamp: float,
              dev: DeviceInfo, cfg: DotMoeConfig | None = None):
    """Routed MoE decode: u [T, D], sel/weights [T, K] -> [T, D] fp32 through the sub-block tl.dot kernels.
    Formats or shapes they do not take (K dim not a multiple of 16 sub-blocks, Q8_0, F16) go to
    moe.fused_blockdot."""
    cfg = cfg or DotMoeConfig()
    if cfg.split_gate_up and not cfg.packed_x:
        cfg = replace(cfg, packed_x=True)
    u, sel, weights, E, F, D = moe._check(u, gate, up, down, sel, weights)
    if not (_supported(gate, D) and _supported(down, F)):
        return moe.fused_blockdot(u, gate, up, down, sel, weights, clamp, dev)
    T, K = sel.shape
    cpu = dev.vendor == Vendor.CPU
    bn = cfg.block_n_gate_up
    gw, stride_w, g32 = _words(gate)
    xp, xs = _pack_x(u, gate, cfg)
    if cfg.split_gate_up:  # gate and up in separate programs; SwiGLU + route weight fused into the h packing
        cg = _consts(gate, cfg)
        y = blocks.empty((2, T * K, F), u.device)
        _gu_proj_kernel[(T * K, triton.cdiv(F, bn), 2)](
            sel, gw, _words(up)[0], g32, xp, xs, y, F, D, K, stride_w, y.stride(0), y.stride(1),
            FMT=cg["FMT"], HAS_MIN=cg["HAS_MIN"], X_SPLIT=cfg.x_split, BLOCK_N=bn, BLOCK_K=cg["BLOCK_K"],
            num_warps=cfg.num_warps, num_stages=1 if cpu else cfg.stages_gate_up)
        h = y[0]
    else:
        h = blocks.empty((T * K, F), u.device)
        _gate_up_dot_kernel[(T * K, triton.cdiv(F, bn))](
            u, sel, weights, h, gw, _words(up)[0], g32, xp, xs, F, D, K, float(clamp), u.stride(0), h.stride(0),
            stride_w, BLOCK_N=bn, num_warps=cfg.num_warps, num_stages=1 if cpu else cfg.stages_gate_up,
            **_consts(gate, cfg))
    c = _consts(down, cfg)
    bn = cfg.block_n_down
    total = K * (F // c["BLOCK_K"])
    per = _down_split(T, D, bn, total, dev)
    split = triton.cdiv(total, per)
    out = blocks.empty((split, T, D), u.device)
    dw, stride_w, g32 = _words(down)
    if cfg.split_gate_up:
        xp, xs = _pack_h(y, weights.reshape(-1), clamp, down, cfg)
    else:
        xp, xs = _pack_x(h, down, cfg)
    _down_dot_kernel[(T, triton.cdiv(D, bn), split)](
        h, sel, out, dw, g32, xp, xs, F, D, K, per, h.stride(0), out.stride(0), out.stride(1), stride_w,
        BLOCK_N=bn, num_warps=cfg.num_warps_down, num_stages=1 if cpu else cfg.stages_down, **c)
    return out[0] if split == 1 else out.sum(0)  # fixed reduction order: deterministic


def fused_dot_x2(u, gate, up, down, sel, weights, clamp, dev):
    return fused_dot(u, gate, up, down, sel, weights, clamp, dev, DotMoeConfig(x_split=True))


def fused_dot_px(u, gate, up, down, sel, weights, clamp, dev):
    return fused_dot(u, gate, up, down, sel, weights, clamp, dev, DotMoeConfig(packed_x=True))


# gate/up projection tiles for the split kernel: sm_90 compiles without spill; 16 rows x 4 warps is
# 168 registers (3 programs per SM), 32 rows x 4 warps 255 (2 per SM)
PXS = DotMoeConfig(block_n_gate_up=16, num_warps=4, stages_gate_up=4, packed_x=True, split_gate_up=True)


def fused_dot_pxs(u, gate, up, down, sel, weights, clamp, dev):
    return fused_dot(u, gate, up, down, sel, weights, clamp, dev, PXS)


def fused_dot_pxs32(u, gate, up, down, sel, weights, clamp, dev):
    return fused_dot(u, gate, up, down, sel, weights, clamp, dev, replace(PXS, block_n_gate_up=32, stages_gate_up=3))


def fused_dot_n64(u, gate, up, down, sel, weights, clamp, dev):
    return fused_dot(u, gate, up, down, sel, weights, clamp, dev, DotMoeConfig(block_n_gate_up=64))


# ---- registered variants (op "moe"; signature fn(u, gate, up, down, sel, weights, clamp, dev)) ---
from ..quant.formats import QuantFormat  # noqa: E402
from .registry import KernelOp, register  # noqa: E402

_FMTS = (QuantFormat.IQ2_XXS, QuantFormat.Q4_K)
register(KernelOp.MOE, "fused_dot", fused_dot, formats=_FMTS, max_t=64,
         doc="decode via tl.dot, 16 sub-blocks as dot columns, exact fp16 codes, x rounded to fp16, pipelined")
register(KernelOp.MOE, "fused_dot_x2", fused_dot_x2, formats=_FMTS, max_t=64,
         doc="fused_dot with x as fp16 hi+lo (two dots): fp32-grade accuracy")
register(KernelOp.MOE, "fused_dot_px", fused_dot_px, formats=_FMTS, max_t=64,
         doc="fused_dot with activation tiles packed once by a pre-kernel (fewer registers, 2 more launches)")
register(KernelOp.MOE, "fused_dot_pxs", fused_dot_pxs, formats=_FMTS, max_t=64,
         doc="fused_dot_px, gate and up in separate 16-row programs, SwiGLU in the h packing (no spill)")
register(KernelOp.MOE, "fused_dot_pxs32", fused_dot_pxs32, formats=_FMTS, max_t=64,
         doc="fused_dot_pxs with 32-row gate/up programs")
register(KernelOp.MOE, "fused_dot_n64", fused_dot_n64, formats=_FMTS, max_t=64,
         doc="fused_dot with 64-row gate/up tiles (wgmma; ~150 KB shared memory, more spill)")
