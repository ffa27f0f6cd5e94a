"""Routed-MoE decode with fp32 activations on moe_int8's tiling (variant `rows_f32`, the float-mode auto on CUDA).

Same semantics as `moe.fused_blockdot` and `TorchOps(act_quant=False).moe` (no activation rounding: every
weight is decoded exactly and multiplied by the fp32 activation), same structure as `moe_int8` without its
two Q8_K launches: `_gate_up_f32_kernel` (one program per (slot, BLOCK_N rows)) then `_down_f32_kernel`
(one program per (token, BLOCK_N rows), the K slots summed in order: no atomics, bitwise reproducible).
Weight words are read with moe_int8's loaders (IQ2_XXS block pairs, Q4_K and Q2_K super-blocks), one K
step ahead in registers (PF); codes become fp32 without an int->float conversion: a byte permute puts
128 + code into the mantissa of 2^23 and one add removes 2^23 + 128 (qmatmul_fast._q8_words4). IQ2_XXS
signed grid values come from moe_int8's byte-permute selectors with the +128 folded into the byte table.
Activation loads use the weight tile's full shape (one lane per weight word, no layout conversion in the
K loop on sm_90a: no shared memory). Per weight: a permute, an add, an fma, one fp32 load of x shared by
gate and up (about 6 instructions per IQ2_XXS weight with the sign and selector work, sm_90a compile).
On sm_90+ launches use programmatic dependent launch (gate/up waits before reading the routing, down
loads its first weight words before the wait). Tiles per gate/up format: TUNED. Knows block layouts,
not the model.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import blocks, moe, moe_int8
from .blocks import FMT_IQ2_XXS, FMT_Q2_K, DeviceWeight, _f16_from_bits
from .configs import DeviceInfo, Vendor, pdl_launch, use_pdl
from .moe_int8 import (IQ2_PAIR_WORDS, QK, Q2K_WORDS, Q4K_WORDS, QK_C, Int8MoeConfig, _down_rows, _down_step,
                       _iq2_pair_raw, _kstep, _prmt, _q2_k_raw, _words)
from .qmatmul_fast import F32_MAGIC_BITS, Q8_BIAS, _q8_words4
from ..quant.formats import QuantFormat

# IQ2_XXS magnitudes 8/25/43 and -8/-25/-43 as bytes 0-2 of a word, each + 128 (the bias _q8_words4 removes)
IQ2_POS_BIASED: tl.constexpr = tl.constexpr(0x00AB9988)
IQ2_NEG_BIASED: tl.constexpr = tl.constexpr(0x00556778)
NIB_MASK: tl.constexpr = tl.constexpr(0x0F0F0F0F)
CRUMB_MASK: tl.constexpr = tl.constexpr(0x03030303)
MAX_T = moe_int8.MAX_T  # decode only (prefill runs moe_prefill's grouped GEMM)
F32MoeConfig = Int8MoeConfig  # the same tile fields (rows, K step, warps, prefetch, PDL)


# ---- per-format dots on fp32 activations (terms unreduced: summed once per program) ---------------

@triton.jit
def _iq2_half_f32(aux0, aux1, dbits, g32_ptr, xb, PRMT: tl.constexpr, magic):
    """One super-block of IQ2_XXS pairs (aux words [BN, KP, 8] as moe_int8._iq2_half_sel, fp16 d in the low
    half of dbits) against fp32 x at xb + 8 k + j (the 32 weights of group ib: xb [BN, KP, 8] points at
    x[32 ib] of the super-block). Returns d (2 ls + 1) sum_j grid_j sign_j x_j per (row, pair, ib); the /8
    of db = d (2 ls + 1) / 8 is applied by the caller. Output byte m of the low selector word is
    coordinate (0, 4, 1, 5)[m], of the high word (2, 6, 3, 7)[m] (moe_int8's selector order)."""
    pos = tl.full(aux0.shape, IQ2_POS_BIASED, tl.int32)
    neg = tl.full(aux0.shape, IQ2_NEG_BIASED, tl.int32)
    fsum = tl.zeros(aux0.shape, dtype=tl.float32)
    for k in tl.static_range(4):
        p = ((aux1 >> (7 * k)) & 127) * 0x204081  # sign spread and parity: see moe_int8._iq2_half_sel
        p = p | (((p & 0x11111111) * 0x11111111) & 0x10000000)
        sel = tl.load(g32_ptr + ((aux0 >> (8 * k)) & 255)) | ((p << 2) & 0x44444444)
        a0, a1, a2, a3 = _q8_words4(_prmt(pos, neg, sel, PRMT), PRMT, magic)
        b0, b1, b2, b3 = _q8_words4(_prmt(pos, neg, sel >> 16, PRMT), PRMT, magic)
        xk = xb + 8 * k
        fsum += (a0 * tl.load(xk).to(tl.float32) + a1 * tl.load(xk + 4).to(tl.float32)
                 + a2 * tl.load(xk + 1).to(tl.float32) + a3 * tl.load(xk + 5).to(tl.float32)
                 + b0 * tl.load(xk + 2).to(tl.float32) + b1 * tl.load(xk + 6).to(tl.float32)
                 + b2 * tl.load(xk + 3).to(tl.float32) + b3 * tl.load(xk + 7).to(tl.float32))
    return _f16_from_bits(dbits) * (fsum * (2 * ((aux1 >> 28) & 15) + 1).to(tl.float32))


@triton.jit
def _iq2_pair_f32(w0, w1, w2, a0, a1, d0, d1, g32_ptr, xb, PRMT: tl.constexpr, magic):
    """Both super-blocks of IQ2_XXS pairs from _iq2_pair_raw's words, x at xb (the pair's first super-block,
    + 32 ib): 8 * sum over the pair per (row, pair, ib) [BN, KP, 8]."""
    return (_iq2_half_f32(((w0 >> 16) & 0xFFFF) | (w1 << 16), ((w1 >> 16) & 0xFFFF) | (w2 << 16), d0, g32_ptr,
                          xb, PRMT, magic)
            + _iq2_half_f32(a0, a1, d1 >> 16, g32_ptr, xb + QK_C, PRMT, magic))


@triton.jit
def _dot4(w, xp, PRMT: tl.constexpr, magic):
    """(sum_b code_b * x[xp + b], sum_b x[xp + b]) for the 4 biased bytes of words w (fp32)."""
    c0, c1, c2, c3 = _q8_words4(w, PRMT, magic)
    x0 = tl.load(xp).to(tl.float32)
    x1 = tl.load(xp + 1).to(tl.float32)
    x2 = tl.load(xp + 2).to(tl.float32)
    x3 = tl.load(xp + 3).to(tl.float32)
    return c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3, (x0 + x1) + (x2 + x3)


@triton.jit
def _q4_k_words(base):
    """The words of Q4_K super-blocks at word pointers base [BN, KB, 1] (36 words each), every one a
    [BN, KB, 4] tensor over the sub-block pairs c: (d|dmin, the three packed-scale words, then qs words
    8c + w for w = 0..7). One word per lane and load, like the fp32 x loads beside them: 16-byte code
    loads would give the codes another layout than x and a shared-memory conversion per step (sm_90a)."""
    q = base + 4 + 8 * tl.arange(0, 4)[None, None, :]
    return (tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3),
            tl.load(q), tl.load(q + 1), tl.load(q + 2), tl.load(q + 3),
            tl.load(q + 4), tl.load(q + 5), tl.load(q + 6), tl.load(q + 7))


@triton.jit
def _q4_k_f32(wd, xb, PRMT: tl.constexpr, magic):
    """Q4_K super-blocks from _q4_k_words' words against fp32 x at xb [BN, KB, 4] = &x[256 b + 64 c]: the low
    nibbles of qs word w are weights 64 c + 4 w + i (sub-block 2c), the high nibbles 64 c + 32 + 4 w + i
    (2c + 1). Returns d (sc_2c p_lo + sc_2c+1 p_hi) - dmin (m_2c xs_lo + m_2c+1 xs_hi) per (row, block, c)
    (quant.md §1.5: the mins multiply the sub-block sums of x)."""
    c = tl.arange(0, 4)[None, None, :]
    dd, s0, s1, s2 = wd[0], wd[1], wd[2], wd[3]
    p_lo = tl.zeros(dd.shape, dtype=tl.float32)
    p_hi = tl.zeros(dd.shape, dtype=tl.float32)
    xs_lo = tl.zeros(dd.shape, dtype=tl.float32)
    xs_hi = tl.zeros(dd.shape, dtype=tl.float32)
    for w in tl.static_range(8):
        q = wd[4 + w]
        a, xa = _dot4((q & NIB_MASK) ^ Q8_BIAS, xb + 4 * w, PRMT, magic)
        b, xb_ = _dot4(((q >> 4) & NIB_MASK) ^ Q8_BIAS, xb + 32 + 4 * w, PRMT, magic)
        p_lo += a
        p_hi += b
        xs_lo += xa
        xs_hi += xb_
    sh = 16 * (c & 1)  # 6-bit scales/mins of sub-blocks 2c, 2c+1 from the 12 packed bytes (moe_int8._q4_k_dot)
    scw = tl.where(c < 2, s0 & 0x3F3F3F3F, (s2 & 0x0F0F0F0F) | ((s0 >> 2) & 0x30303030))
    mnw = tl.where(c < 2, s1 & 0x3F3F3F3F, ((s2 >> 4) & 0x0F0F0F0F) | ((s1 >> 2) & 0x30303030))
    scl = ((scw >> sh) & 255).to(tl.float32) * p_lo + ((scw >> (sh + 8)) & 255).to(tl.float32) * p_hi
    mns = ((mnw >> sh) & 255).to(tl.float32) * xs_lo + ((mnw >> (sh + 8)) & 255).to(tl.float32) * xs_hi
    return _f16_from_bits(dd) * scl - _f16_from_bits(dd >> 16) * mns


@triton.jit
def _q2_k_f32(q0, q1, q2, q3, sc0, sc1, dd, xb, PRMT: tl.constexpr, magic):
    """Q2_K super-blocks from _q2_k_raw's words (tile lane he = 2h + e holds qs words 8h + 4e + w, w < 4)
    against fp32 x at xb [BN, KB, 4] = &x[256 b + 128 h + 16 e]: weight 128 h + 32 s + 16 e + 4 w + i is
    bits 2s of byte i of that word, in sub-block j = 8h + 2s + e. Returns d sum_s sc_j p_j - dmin sum_s m_j
    xs_j per lane (quant.md §1.4)."""
    e = tl.arange(0, 4)[None, None, :] & 1
    it = tl.zeros(q0.shape, dtype=tl.float32)
    mins = tl.zeros(q0.shape, dtype=tl.float32)
    for sp in tl.static_range(2):
        scw = sc0 if sp == 0 else sc1  # scale bytes 4 (2h + sp) .. +3
        for s2 in tl.static_range(2):
            s = 2 * sp + s2
            xs = xb + 32 * s
            p0, x0 = _dot4(((q0 >> (2 * s)) & CRUMB_MASK) ^ Q8_BIAS, xs, PRMT, magic)
            p1, x1 = _dot4(((q1 >> (2 * s)) & CRUMB_MASK) ^ Q8_BIAS, xs + 4, PRMT, magic)
            p2, x2 = _dot4(((q2 >> (2 * s)) & CRUMB_MASK) ^ Q8_BIAS, xs + 8, PRMT, magic)
            p3, x3 = _dot4(((q3 >> (2 * s)) & CRUMB_MASK) ^ Q8_BIAS, xs + 12, PRMT, magic)
            byte = (scw >> (8 * (2 * s2 + e))) & 255
            it += (byte & 15).to(tl.float32) * ((p0 + p1) + (p2 + p3))
            mins += (byte >> 4).to(tl.float32) * ((x0 + x1) + (x2 + x3))
    return _f16_from_bits(dd) * it - _f16_from_bits(dd >> 16) * mins


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _gate_up_f32_kernel(x_ptr, sel_ptr, wts_ptr, h_ptr, gw_ptr, uw_ptr, g32_ptr,
                        F, D, KSEL, clamp, stride_w, stride_xt, stride_ht, magic,
                        FMT: tl.constexpr, BLOCK_N: tl.constexpr, KSTEP: tl.constexpr, PRMT: tl.constexpr,
                        PF: tl.constexpr = False, PDL: tl.constexpr = False):
    """h[slot, f] = swiglu(gate[e] @ u[t], up[e] @ u[t]) * wts[slot] with fp32 u; slot = t * KSEL + i,
    e = sel[slot]. KSTEP IQ2_XXS block pairs (grid as moe_int8's selector table g32) or Q4_K blocks per K
    step. Rows past F are clamped to F - 1 (valid reads, not stored). PF: the next step's weight words
    load before this step computes (the last step re-reads itself). The routing may come from the
    previous kernel: everything waits for it (PDL)."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = (slot // KSEL).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    blocks.pdl_wait(PDL)
    e = tl.load(sel_ptr + slot).to(tl.int64)
    wt = tl.load(wts_ptr + slot).to(tl.float32)
    roff = (e * F + tl.minimum(rn, F - 1)) * stride_w
    xt = x_ptr + t * stride_xt
    if FMT == FMT_IQ2_XXS:
        kk = tl.arange(0, KSTEP)[None, :, None]
        # x pointers shaped like the weight tile: the compiler gives both one layout (no conversion)
        xo = tl.zeros([BLOCK_N, 1, 1], dtype=tl.int32) + 32 * tl.arange(0, 8)[None, None, :]
        gb = gw_ptr + roff[:, None, None]
        ub = uw_ptr + roff[:, None, None]
        acc_g = tl.zeros([BLOCK_N, KSTEP, 8], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, KSTEP, 8], dtype=tl.float32)
        n_pairs = D // (2 * QK_C)
        if PF:
            g0, g1, g2, g3, g4, g5, g6 = _iq2_pair_raw(gb + kk * IQ2_PAIR_WORDS)
            u0, u1, u2, u3, u4, u5, u6 = _iq2_pair_raw(ub + kk * IQ2_PAIR_WORDS)
        for p0 in tl.range(0, n_pairs, KSTEP, num_stages=1):
            xb = xt + (p0 + kk) * (2 * QK_C) + xo
            if PF:
                pn = (tl.minimum(p0 + KSTEP, n_pairs - KSTEP) + kk) * IQ2_PAIR_WORDS
                ng0, ng1, ng2, ng3, ng4, ng5, ng6 = _iq2_pair_raw(gb + pn)
                nu0, nu1, nu2, nu3, nu4, nu5, nu6 = _iq2_pair_raw(ub + pn)
            else:
                pw = (p0 + kk) * IQ2_PAIR_WORDS
                g0, g1, g2, g3, g4, g5, g6 = _iq2_pair_raw(gb + pw)
                u0, u1, u2, u3, u4, u5, u6 = _iq2_pair_raw(ub + pw)
            acc_g += _iq2_pair_f32(g0, g1, g2, g3, g4, g5, g6, g32_ptr, xb, PRMT, magic)
            acc_u += _iq2_pair_f32(u0, u1, u2, u3, u4, u5, u6, g32_ptr, xb, PRMT, magic)
            if PF:
                g0, g1, g2, g3, g4, g5, g6 = ng0, ng1, ng2, ng3, ng4, ng5, ng6
                u0, u1, u2, u3, u4, u5, u6 = nu0, nu1, nu2, nu3, nu4, nu5, nu6
        gsum = tl.sum(tl.sum(acc_g, axis=2), axis=1) * 0.125
        usum = tl.sum(tl.sum(acc_u, axis=2), axis=1) * 0.125
    else:  # Q4_K: tile [BN, KSTEP, 4 sub-block pairs]
        kk = tl.arange(0, KSTEP)[None, :, None]
        xo = tl.zeros([BLOCK_N, 1, 1], dtype=tl.int32) + 64 * tl.arange(0, 4)[None, None, :]
        gb = gw_ptr + roff[:, None, None]
        ub = uw_ptr + roff[:, None, None]
        acc_g = tl.zeros([BLOCK_N, KSTEP, 4], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, KSTEP, 4], dtype=tl.float32)
        n_blocks = D // QK_C
        if PF:
            gq = _q4_k_words(gb + kk * Q4K_WORDS)
            uq = _q4_k_words(ub + kk * Q4K_WORDS)
        for b0 in tl.range(0, n_blocks, KSTEP, num_stages=1):
            xb = xt + (b0 + kk) * QK_C + xo
            if PF:
                bn_ = (tl.minimum(b0 + KSTEP, n_blocks - KSTEP) + kk) * Q4K_WORDS
                ngq = _q4_k_words(gb + bn_)
                nuq = _q4_k_words(ub + bn_)
            else:
                bw = (b0 + kk) * Q4K_WORDS
                gq = _q4_k_words(gb + bw)
                uq = _q4_k_words(ub + bw)
            acc_g += _q4_k_f32(gq, xb, PRMT, magic)
            acc_u += _q4_k_f32(uq, xb, PRMT, magic)
            if PF:
                gq = ngq
                uq = nuq
        gsum = tl.sum(tl.sum(acc_g, axis=2), axis=1)
        usum = tl.sum(tl.sum(acc_u, axis=2), axis=1)
    h = moe._swiglu_route(gsum, usum, wt, clamp)
    tl.store(h_ptr + slot * stride_ht + rn, h, mask=rn < F)


@triton.jit
def _down_f32_kernel(h_ptr, sel_ptr, out_ptr, w_ptr, F, D, KSEL, stride_w, stride_ht, stride_ot, magic,
                     FMT: tl.constexpr, BLOCK_N: tl.constexpr, KSTEP: tl.constexpr, PRMT: tl.constexpr,
                     PF: tl.constexpr = False, PDL: tl.constexpr = False):
    """out[t, d] = sum over i < KSEL (in order) of down[sel[t*KSEL+i]][d, :] @ h[t*KSEL+i, :], h fp32; KSTEP
    super-blocks per K step, one flat loop over (slot, K step). PF: the next (slot, step)'s weight words
    load before this one computes; the first ones before the PDL wait (sel is older than h)."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.minimum(rn, D - 1)
    n_steps = F // (QK_C * KSTEP)
    last = KSEL * n_steps - 1
    sel_t = sel_ptr + t * KSEL  # the token's expert ids
    if FMT == FMT_Q2_K:  # tile [BN, KSTEP, 4 lanes he = 2h + e]
        kk = tl.arange(0, KSTEP)[None, :, None]
        he = tl.arange(0, 4)[None, None, :]
        xo = tl.zeros([BLOCK_N, 1, 1], dtype=tl.int32) + 128 * (he >> 1) + 16 * (he & 1)
        acc = tl.zeros([BLOCK_N, KSTEP, 4], dtype=tl.float32)
        if PF:
            q0, q1, q2, q3, c0, c1, dd = _q2_k_raw(
                w_ptr + _down_rows(sel_t, 0, rc, D, stride_w)[:, None, None] + kk * Q2K_WORDS)
        blocks.pdl_wait(PDL)  # h comes from the previous kernel
        for j in tl.range(0, KSEL * n_steps, num_stages=1):
            i, b0 = _down_step(j, n_steps, KSTEP)
            if PF:
                i_p, b_p = _down_step(tl.minimum(j + 1, last), n_steps, KSTEP)
                nq0, nq1, nq2, nq3, nc0, nc1, ndd = _q2_k_raw(
                    w_ptr + _down_rows(sel_t, i_p, rc, D, stride_w)[:, None, None] + (b_p + kk) * Q2K_WORDS)
            else:
                q0, q1, q2, q3, c0, c1, dd = _q2_k_raw(
                    w_ptr + _down_rows(sel_t, i, rc, D, stride_w)[:, None, None] + (b0 + kk) * Q2K_WORDS)
            xb = h_ptr + (t * KSEL + i).to(tl.int64) * stride_ht + (b0 + kk) * QK_C + xo
            acc += _q2_k_f32(q0, q1, q2, q3, c0, c1, dd, xb, PRMT, magic)
            if PF:
                q0, q1, q2, q3, c0, c1, dd = nq0, nq1, nq2, nq3, nc0, nc1, ndd
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:  # Q4_K: tile [BN, KSTEP, 4 sub-block pairs]
        kk = tl.arange(0, KSTEP)[None, :, None]
        xo = tl.zeros([BLOCK_N, 1, 1], dtype=tl.int32) + 64 * tl.arange(0, 4)[None, None, :]
        acc = tl.zeros([BLOCK_N, KSTEP, 4], dtype=tl.float32)
        if PF:
            wq = _q4_k_words(w_ptr + _down_rows(sel_t, 0, rc, D, stride_w)[:, None, None] + kk * Q4K_WORDS)
        blocks.pdl_wait(PDL)
        for j in tl.range(0, KSEL * n_steps, num_stages=1):
            i, b0 = _down_step(j, n_steps, KSTEP)
            if PF:
                i_p, b_p = _down_step(tl.minimum(j + 1, last), n_steps, KSTEP)
                nwq = _q4_k_words(w_ptr + _down_rows(sel_t, i_p, rc, D, stride_w)[:, None, None]
                                  + (b_p + kk) * Q4K_WORDS)
            else:
                wq = _q4_k_words(w_ptr + _down_rows(sel_t, i, rc, D, stride_w)[:, None, None] + (b0 + kk) * Q4K_WORDS)
            xb = h_ptr + (t * KSEL + i).to(tl.int64) * stride_ht + (b0 + kk) * QK_C + xo
            acc += _q4_k_f32(wq, xb, PRMT, magic)
            if PF:
                wq = nwq
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + t * stride_ot + rn, total, mask=rn < D)


# ---- host side ------------------------------------------------------------------------------------

def gate_up_f32(u, gate: DeviceWeight, up: DeviceWeight, sel, weights, clamp: float, prmt: bool,
                cfg: F32MoeConfig, pdl: bool = False):
    """Stage 1 of fused_f32: u [T, D] float -> h [T*K, F] fp32 (SwiGLU of the slot's expert, routed)."""
    (T, K), (_, F, D) = sel.shape, gate.shape
    gw, stride_w = _words(gate)
    uw, _ = _words(up)
    iq2 = gate.fmt == QuantFormat.IQ2_XXS
    g32 = moe_int8.iq2_selectors(gw.device) if iq2 else gw  # the selector table is only read for IQ2_XXS
    kstep = _kstep(D // (moe_int8.IQ2_PAIR if iq2 else QK), cfg.kstep_gate_up)
    bn = cfg.block_n_gate_up
    h = blocks.empty((T * K, F), u.device)
    _gate_up_f32_kernel[(T * K, triton.cdiv(F, bn))](
        u, sel, weights, h, gw, uw, g32, F, D, K, float(clamp), stride_w, u.stride(0), h.stride(0),
        F32_MAGIC_BITS.value, FMT=int(gate.fmt), BLOCK_N=bn, KSTEP=kstep, PRMT=prmt, PF=cfg.prefetch_gate_up,
        PDL=pdl, num_warps=cfg.warps_gate_up, **pdl_launch(pdl))
    return h


def down_f32(h, down: DeviceWeight, sel, prmt: bool, cfg: F32MoeConfig, pdl: bool = False):
    """Stage 2 of fused_f32: h [T*K, F] fp32 -> out [T, D] fp32, the K slots summed in fixed order."""
    (T, K), (_, D, F) = sel.shape, down.shape
    dw, stride_d = _words(down)
    bn = cfg.block_n_down
    out = blocks.empty((T, D), h.device)
    _down_f32_kernel[(T, triton.cdiv(D, bn))](
        h, sel, out, dw, F, D, K, stride_d, h.stride(0), out.stride(0), F32_MAGIC_BITS.value,
        FMT=int(down.fmt), BLOCK_N=bn, KSTEP=_kstep(F // QK, cfg.kstep_down), PRMT=prmt,
        PF=cfg.prefetch_down, PDL=pdl, num_warps=cfg.warps_down, **pdl_launch(pdl))
    return out



def fused_f32(u, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight, sel, weights, clamp: float,
              dev: DeviceInfo, cfg: F32MoeConfig | None = None):
    """Routed MoE for few tokens, fp32 activations: u [T, D], sel/weights [T, K] -> [T, D] fp32. Formats
    or shapes it does not take (those moe_int8.supports refuses) run moe.fused_blockdot."""
    cfg = cfg or TUNED.get(gate.fmt, F32MoeConfig())
    if dev.vendor == Vendor.CPU and cfg.cpu_widen:
        cfg = replace(cfg, block_n_gate_up=max(cfg.block_n_gate_up, moe_int8.CPU_BLOCK_N_GATE_UP),
                      block_n_down=max(cfg.block_n_down, moe_int8.CPU_BLOCK_N_DOWN))
    u, sel, weights, E, F, D = moe._check(u, gate, up, down, sel, weights)
    if not moe_int8.supports(gate, down):
        return moe.fused_blockdot(u, gate, up, down, sel, weights, clamp, dev)
    T, K = sel.shape
    if T == 0:
        return blocks.empty((0, D), u.device)
    u = u if u.stride(-1) == 1 else u.contiguous()
    prmt = moe_int8.use_asm(dev, u)
    pdl = cfg.pdl and use_pdl(dev, u)
    h = gate_up_f32(u, gate, up, sel, weights, clamp, prmt, cfg, pdl)
    return down_f32(h, down, sel, prmt, cfg, pdl)


# Tiles per gate/up format: moe_int8.TUNED's until the H200 sweep of tools/probe_decode.py (part f32).
TUNED = dict(moe_int8.TUNED)
CONFIGS = {"rows_f32": None}


def _variant(cfg: F32MoeConfig | None):
    def fn(u, gate, up, down, sel, weights, clamp, dev):
        return fused_f32(u, gate, up, down, sel, weights, clamp, dev, cfg)
    return fn


from .registry import KernelOp, register  # noqa: E402

register(KernelOp.MOE, "rows_f32", _variant(None), formats=moe_int8.GATE_UP_FORMATS, max_t=MAX_T,
         doc="fp32 activations on moe_int8's tiling: exact weight decode (byte permutes, no int->float "
             "conversion), one fp32 load of x per weight, next K step prefetched, PDL; two launches")
