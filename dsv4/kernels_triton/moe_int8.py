"""Routed-MoE decode on packed int8 dot products with Q8_K activations (the ds4 CUDA decode scheme).

Three kernels, four launches: `_q8k_quant_kernel` turns u [T, D] into Q8_K (int8 codes packed four per
int32 word, one fp32 scale per 256, code sums per 16); `_gate_up_int8_kernel` (one program per (slot,
BLOCK_N rows)) dots IQ2_XXS or Q4_K gate/up rows with those words (dp4a), applies block scales once per
super-block, then clamp/SwiGLU/route weight into h [T*K, F]; h is quantized the same way; then
`_down_int8_kernel` (one program per (token, BLOCK_N rows)) dots Q2_K or Q4_K down rows and sums the K
slots in order (no atomics in any sum: bitwise reproducible). With `fuse_quant_h` (the Q4_K configs) the gate/up
kernel quantizes h itself, three launches: the program that stores the last rows of a 256-block (an arrival
counter per block) quantizes it, with the same result whichever program that is.
Semantics are `TorchOps(act_quant=True).moe`: the integer sums are exact, only the fp32 epilogue order differs (so
selecting this variant in a float-mode TritonOps gives ds4's activation rounding). IQ2_XXS is decoded through
byte-permute selectors: a 512-byte table of 16-bit level records (blocks.iq2_sel16) spread to nibbles in registers,
the 8 signs ORed in, one prmt per 4 signed magnitudes (u's codes are quantized in the matching byte order). On
sm_90+ every launch uses programmatic dependent launch: weight words (and the expert ids, two launches old) are
loaded before griddepcontrol.wait, activations after it. Activation words can be read by 16-byte loads
(blocks.load4: Triton keeps four word loads of one thread apart, and each costs L1 wavefronts), per stage (x_vec_*).
Tiles per gate/up format: TUNED (H200 sweeps). On sm_90+ the Q4_K stages and the Q2_K down stage run on
moe_int8_gluon's Gluon kernels, since h200_decode/85 the IQ2_XXS gate/up too (Int8MoeConfig.gluon_gate_up /
gluon_down: the same integer dots in hand-chosen register layouts).
fp32-grade activations (`limbs=3`, variant int8_limb3, the CUDA decode default of moe.moe_auto): u and h become a
22-bit integer per value and one scale per 256 (2^-22 of the block's max|x|), stored as three signed byte planes
(hi, mid, lo); every decoded weight word is dotted with each plane (three exact dp4a sums, combined in fp32 as
hi + mid/256 + lo/65536), and the code sums turn fp32. The float op's semantics within its fp32 tolerance at about
half the float kernel's time; tiles TUNED_LIMB3. Knows block layouts, not the model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

import torch
import triton
import triton.language as tl

from . import blocks, moe
from .blocks import FMT_IQ2_XXS, FMT_Q2_K, DeviceWeight, _f16_from_bits
from .configs import DeviceInfo, Vendor, detect_device, pdl_launch, use_pdl
from ..quant.formats import QuantFormat

QK = 256  # super-block (Q8_K, Q2_K, Q4_K, IQ2_XXS)
SUM_GROUP = 16  # code sums per 16 activations (Q8_K "bsums")
IQ2_PAIR = 2 * QK  # IQ2_XXS rows are read in pairs of 66-byte blocks (33 int32 words)
# int32 words per unit, as kernel constants: Q8_K codes of one block, IQ2_XXS block pair, Q2_K, Q4_K block
Q8K_WORDS: tl.constexpr = tl.constexpr(QK // 4)
IQ2_PAIR_WORDS: tl.constexpr = tl.constexpr(33)
Q2K_WORDS: tl.constexpr = tl.constexpr(blocks.Q2K_WORDS)
Q4K_WORDS: tl.constexpr = tl.constexpr(blocks.Q4K_WORDS)
SUMS_PER_BLOCK: tl.constexpr = tl.constexpr(QK // SUM_GROUP)
QK_C: tl.constexpr = tl.constexpr(QK)
# 1.5 * 2^23: (y + M) - M rounds |y| < 2^22 to the nearest integer, ties to even (torch.round)
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)
# fp32-grade activations as three int8 planes (quant_q8_k(limbs=3)): |q| <= 2^22 - 1 keeps the rounding above exact
# and the hi plane within +-64; q resolves 2^-22 of the block's max|x| (fp32 resolves 2^-24 of each element)
LIMBS_FP32 = 3
LIMB_MAX_F: tl.constexpr = tl.constexpr(4194303.0)
MAX_T = 8  # decode only: tokens per call (prefill keeps the grouped float kernels)
GATE_UP_FORMATS = (QuantFormat.IQ2_XXS, QuantFormat.Q4_K)
DOWN_FORMATS = (QuantFormat.Q2_K, QuantFormat.Q4_K)


BLOCKS_PER_WARP = 8  # moe_int8_gluon: super-blocks side by side in one warp's K step (4 lanes each)


class Prefetch(IntEnum):
    """When a moe_int8_gluon kernel loads a K step's weight words (Int8GluonTile.prefetch; False and True read as
    NONE and NEXT)."""

    NONE = 0  # after the previous step computed
    NEXT = 1  # before the previous step computes (the first step's before the PDL wait in any case)
    ALL = 2  # every step's before the PDL wait (the IQ2_XXS gate/up of at most 4 steps; elsewhere NEXT)


@dataclass(frozen=True)
class Int8GluonTile:
    """Tile of moe_int8_gluon's kernels (Q4_K and IQ2_XXS gate/up; Q4_K and Q2_K down): `rows` rows per program (of
    gate and of up), split over `warps_rows` warps; `warps_k` warps side by side along K (BLOCKS_PER_WARP super-blocks
    each per step; the IQ2_XXS gate/up: moe_int8_gluon.IQ2_PAIRS_PER_WARP block pairs); `prefetch` (a Prefetch): when
    each step's weight words load (the steps are unrolled)."""

    rows: int = 4
    warps_k: int = 1
    prefetch: bool | Prefetch = False
    warps_rows: int = 1

    @property
    def block_k(self) -> int:
        return BLOCKS_PER_WARP * QK * self.warps_k

    @property
    def warps(self) -> int:
        return self.warps_k * self.warps_rows


@dataclass(frozen=True)
class Int8MoeConfig:
    """Tiles. kstep_*: super-blocks per K step (IQ2_XXS: pairs of them), all loaded before use."""

    block_n_gate_up: int = 16
    kstep_gate_up: int = 2
    warps_gate_up: int = 4
    block_n_down: int = 8
    kstep_down: int = 8
    warps_down: int = 2
    prefetch_gate_up: bool = False  # register double buffer: the next K step's words load while this one computes
    prefetch_down: bool = False
    # the down loop over (slot, K step) unrolled at compile time (one compile per K and F): ptxas then issues later
    # steps' loads between earlier steps' dots instead of one step per loop trip (the down stage is a chain of K
    # dependent steps; sm_90a keeps about two in flight); replaces prefetch
    unroll_down: bool = False
    pdl: bool = True  # programmatic dependent launch where configs.use_pdl allows it (sm_90+)
    # activation words and code sums by 16-byte loads where the PTX path runs (blocks.load4), per stage; always
    # aligned: quant_q8_k's outputs are fresh contiguous tensors whose rows hold whole Q8_K blocks (64 code words,
    # 16 sums), and every group read starts at a multiple of 4 words inside them
    x_vec_gate_up: bool = False
    x_vec_down: bool = False
    # Q4_K d|dmin and scale words (a block's first 16 bytes) by one 16-byte load, per stage, where the PTX path
    # runs and the rows are 16-byte aligned (Q4_K blocks are 144 bytes, so every block is when its row is)
    scale_vec_gate_up: bool = False
    scale_vec_down: bool = False
    # > 0: register cap of the stage's kernel (PTX .maxnreg, NVIDIA): more resident programs per SM, maybe spills
    maxnreg_gate_up: int = 0
    maxnreg_down: int = 0
    # h quantized inside the gate/up kernel by the last program of each 256-block (an arrival counter per block)
    # instead of by a quantizer launch between the stages; needs block_n_gate_up to divide 256 (else the launch)
    fuse_quant_h: bool = False
    # stages on moe_int8_gluon's Gluon kernels (gate/up: Q4_K, IQ2_XXS; down: Q4_K, Q2_K; one or three activation
    # planes, NVIDIA sm_90+; elsewhere the Triton ones). Behind a Gluon gate/up h has its own launch, whatever
    # fuse_quant_h says
    gluon_gate_up: Int8GluonTile | None = None
    gluon_down: Int8GluonTile | None = None
    cpu_widen: bool = True  # interpreter: cost is per program, so run fewer, wider programs


CPU_BLOCK_N_GATE_UP = 256
CPU_BLOCK_N_DOWN = 512


# ---- device helpers -----------------------------------------------------------------------------

@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum of the four signed byte products of int32 words a, b (PTX dp4a.s32.s32; exact)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:  # interpreter / ROCm: the same int32, bytes sign-extended by shift pairs
        return (c + ((a << 24) >> 24) * ((b << 24) >> 24) + ((a << 16) >> 24) * ((b << 16) >> 24)
                + ((a << 8) >> 24) * ((b << 8) >> 24) + (a >> 24) * (b >> 24))


@triton.jit
def _pack_words(q, IQ2_ORDER: tl.constexpr):
    """[256] int32 codes in -128..127 -> [64] int32 words, 4 codes each (little-endian; IQ2_ORDER: per 8 codes
    words [c0 c4 c1 c5], [c2 c6 c3 c7], the IQ2_XXS selector order)."""
    i = tl.arange(0, QK_C)
    if IQ2_ORDER:
        v = (q & 255) << (8 * (2 * (i & 1) + ((i >> 2) & 1)))
        first = ((i >> 1) & 1) == 0
        wa = tl.sum(tl.reshape(tl.where(first, v, 0), (Q8K_WORDS // 2, 8)), axis=1)
        wb = tl.sum(tl.reshape(tl.where(first, 0, v), (Q8K_WORDS // 2, 8)), axis=1)
        return tl.reshape(tl.join(wa, wb), (Q8K_WORDS,))
    else:
        return tl.sum(tl.reshape((q & 255) << (8 * (i & 3)), (Q8K_WORDS, 4)), axis=1)  # disjoint: sum == or


@triton.jit
def _mul_rn(a, b, ASM: tl.constexpr):
    """fp32 a * b rounded on its own, never contracted into an FMA with the add after it: PTX mul.rn where ASM (so
    the kernel around it keeps FP fusion); a plain product otherwise (such kernels launch with fusion off)."""
    if ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _q8k_block(x, qp, dp, sp, stride_ql, IQ2_ORDER: tl.constexpr, LIMBS: tl.constexpr, ASM: tl.constexpr):
    """Quantize one Q8_K block x [256] fp32: its code words at qp (plane l at qp + l stride_ql), scale at dp,
    code sums at sp. LIMBS = 1: max = the first element of largest |x| (torch.argmax picks the first of ties),
    iscale = -127/max, q = min(127, rint(iscale x)), d = 1/iscale (0 for an all-zero block); IEEE divisions
    (div_rn) as on the host. LIMBS = 3 (fp32-grade activations): q = rint(x * LIMB_MAX / max|x|),
    |q| <= LIMB_MAX < 2^22, stored as three signed byte planes q = 65536 hi + 256 mid + lo (hi, mid, lo), d the
    scale of the hi plane (max|x| * 65536 / LIMB_MAX), the sums of q per 16 as fp32 in hi-plane units (bits)."""
    i = tl.arange(0, QK_C)
    ax = tl.abs(x)
    amax = tl.max(ax, axis=0)
    qp = qp + tl.arange(0, Q8K_WORDS)
    sp = sp + tl.arange(0, SUMS_PER_BLOCK)
    if LIMBS == 1:
        first = tl.min(tl.where(ax == amax, i, QK_C), axis=0)
        mx = tl.sum(tl.where(i == first, x, 0.0), axis=0)
        nz = mx != 0.0
        iscale = tl.where(nz, tl.math.div_rn(-127.0, tl.where(nz, mx, 1.0)), 0.0)
        y = _mul_rn(iscale, x, ASM)
        q = tl.minimum((y + ROUND_MAGIC) - ROUND_MAGIC, 127.0).to(tl.int32)
        d = tl.where(nz, tl.math.div_rn(1.0, tl.where(nz, iscale, 1.0)), 0.0)
        tl.store(qp, _pack_words(q, IQ2_ORDER))
        tl.store(sp, tl.sum(tl.reshape(q, (SUMS_PER_BLOCK, 16)), axis=1))
    else:
        nz = amax != 0.0
        iscale = tl.where(nz, tl.math.div_rn(LIMB_MAX_F, tl.where(nz, amax, 1.0)), 0.0)
        y = _mul_rn(iscale, x, ASM)  # |y| <= LIMB_MAX (1 + 2^-23) < 2^22: the magic-number rounding is exact
        q = tl.minimum(tl.maximum((y + ROUND_MAGIC) - ROUND_MAGIC, -LIMB_MAX_F), LIMB_MAX_F).to(tl.int32)
        lo = ((q + 128) & 255) - 128
        r1 = (q - lo) >> 8  # exact: q - lo is a multiple of 256
        mid = ((r1 + 128) & 255) - 128
        hi = (r1 - mid) >> 8  # |hi| <= 64
        tl.store(qp, _pack_words(hi, IQ2_ORDER))
        tl.store(qp + stride_ql, _pack_words(mid, IQ2_ORDER))
        tl.store(qp + 2 * stride_ql, _pack_words(lo, IQ2_ORDER))
        sums = tl.sum(tl.reshape(q, (SUMS_PER_BLOCK, 16)), axis=1).to(tl.float32) * (1.0 / 65536.0)
        tl.store(sp, sums.to(tl.int32, bitcast=True))
        d = tl.where(nz, tl.math.div_rn(65536.0, tl.where(nz, iscale, 1.0)), 0.0)
    tl.store(dp, d)


@triton.jit
def _q8k_quant_kernel(x_ptr, q_ptr, d_ptr, s_ptr, stride_x, stride_q, stride_d, stride_s, stride_ql,
                      IQ2_ORDER: tl.constexpr = False, PDL: tl.constexpr = False, LIMBS: tl.constexpr = 1):
    """One Q8_K block (row, 256 columns) per program, as TorchOps.quant_q8_k (_q8k_block; launched with FP
    fusion off, QUANT_LAUNCH)."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    blocks.pdl_wait(PDL)
    x = tl.load(x_ptr + r * stride_x + b * QK_C + tl.arange(0, QK_C)).to(tl.float32)
    _q8k_block(x, q_ptr + r * stride_q + b * Q8K_WORDS, d_ptr + r * stride_d + b, s_ptr + r * stride_s
               + b * SUMS_PER_BLOCK, stride_ql, IQ2_ORDER, LIMBS, False)


@triton.jit
def _quant_h_last(h_row, q_row, d_row, s_row, cnt_row, pid_n, stride_ql, BLOCK_N: tl.constexpr,
                  LIMBS: tl.constexpr, ASM: tl.constexpr):
    """After a gate/up program stored its BLOCK_N values of an h row (256 % BLOCK_N == 0): the program that
    stores the last of a 256-block quantizes that block (_q8k_block) and resets its arrival counter, so that h
    needs no quantizer launch. Which program does it changes nothing in the result. The barrier orders every
    thread's h stores before the one-thread release; the block is read past L1."""
    b = (pid_n * BLOCK_N) // QK_C
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_row + b, 1, sem="acq_rel")
    if arrived == QK_C // BLOCK_N - 1:
        x = tl.load(h_row + b * QK_C + tl.arange(0, QK_C), cache_modifier=".cg")
        _q8k_block(x, q_row + b * Q8K_WORDS, d_row + b, s_row + b * SUMS_PER_BLOCK, stride_ql, False, LIMBS, ASM)
        tl.atomic_xchg(cnt_row + b, 0, sem="relaxed")  # the next call is ordered by the kernel boundaries


@triton.jit
def _limb_sum(hi, mid, lo):
    """fp32 hi + mid / 256 + lo / 65536 of three exact integer dot terms (LIMBS = 3), in hi-plane units."""
    return hi.to(tl.float32) + mid.to(tl.float32) * (1.0 / 256.0) + lo.to(tl.float32) * (1.0 / 65536.0)


@triton.jit
def _iq2_pair_raw(base):
    """The words of IQ2_XXS block pairs at word pointers base [BN, KP, 1] that the selector decode reads:
    (w0, w1, w2) = words 2 ib, 2 ib + 1, 2 ib + 2 (block 0's aux pairs straddle words), (a0, a1) = words
    17 + 2 ib, 18 + 2 ib (block 1), [BN, KP, 8]; the words holding d of block 0 and 1 [BN, KP, 1]."""
    ib = tl.arange(0, 8)[None, None, :]
    return (tl.load(base + 2 * ib), tl.load(base + 2 * ib + 1), tl.load(base + 2 * ib + 2),
            tl.load(base + 17 + 2 * ib), tl.load(base + 18 + 2 * ib), tl.load(base), tl.load(base + 16))


@triton.jit
def _iq2_half_sel(aux0, aux1, dbits, sel16_ptr, x_ptr, xw, B: tl.constexpr, ASM: tl.constexpr,
                  XV: tl.constexpr = False, LIMBS: tl.constexpr = 1, xl=0):
    """One super-block of an IQ2_XXS pair, from its aux words [BN, KP, 8] (grid indices | sign and scale
    bits) and its fp16 d (low half of dbits), against activation words x_ptr + xw [1, KP, 1] in
    quant_q8_k's iq2_order. Returns (d [BN, KP, 1] fp32, (2 ls + 1) * isum [BN, KP, 8] int32 per
    32-weight group ib); the dot is sum_ib d * d_x * that / 8 (§1.6: db = d (2 ls + 1) / 8).
    The grid is read as byte-permute selectors (blocks.iq2_levels | blocks.iq2_signs: level of coordinate j
    in nibble n(j) = 2 (j % 4) + j // 4, bit 2 set where it is negative), and one prmt per 4 coordinates
    reads the signed magnitude from the byte pair {8, 25, 43} / {-8, -25, -43}. Output byte k of the low
    word is coordinate (0, 4, 1, 5)[k], of the high word (2, 6, 3, 7)[k]. XV: the 8 activation words of each
    group as two 16-byte loads (blocks.load4). LIMBS = 3: the activation planes at xl and 2 xl words too (each
    decoded word dotted three times); the returned term is then fp32, hi + mid / 256 + lo / 65536."""
    ib = tl.arange(0, 8)[None, None, :]
    xb = x_ptr + xw + B * Q8K_WORDS + 8 * ib
    xv = blocks.load4(xb, XV) + blocks.load4(xb + 4, XV)  # the group's 8 activation words
    isum = tl.zeros(aux0.shape, dtype=tl.int32)
    if LIMBS > 1:
        xm = blocks.load4(xb + xl, XV) + blocks.load4(xb + xl + 4, XV)
        xo = blocks.load4(xb + 2 * xl, XV) + blocks.load4(xb + 2 * xl + 4, XV)
        isum_m = isum
        isum_o = isum
    for k in tl.static_range(4):
        lo, hi = blocks.iq2_signed(blocks.iq2_levels(sel16_ptr, (aux0 >> (8 * k)) & 255), (aux1 >> (7 * k)) & 127,
                                   blocks.IQ2_POS_BYTES, blocks.IQ2_NEG_BYTES, ASM)
        isum = _dp4a(lo, xv[2 * k], isum, ASM)
        isum = _dp4a(hi, xv[2 * k + 1], isum, ASM)
        if LIMBS > 1:
            isum_m = _dp4a(hi, xm[2 * k + 1], _dp4a(lo, xm[2 * k], isum_m, ASM), ASM)
            isum_o = _dp4a(hi, xo[2 * k + 1], _dp4a(lo, xo[2 * k], isum_o, ASM), ASM)
    ls = 2 * ((aux1 >> 28) & 15) + 1
    if LIMBS > 1:  # each (limb sum) * ls < 2^23: exact in fp32
        term = _limb_sum(isum * ls, isum_m * ls, isum_o * ls)
    else:
        term = isum * ls
    return _f16_from_bits(dbits), term


@triton.jit
def _iq2_pair_sel(w0, w1, w2, a0, a1, d0, d1, sel16_ptr, x_ptr, xw, dx0, dx1, ASM: tl.constexpr,
                  XV: tl.constexpr = False, LIMBS: tl.constexpr = 1, xl=0):
    """Both super-blocks of IQ2_XXS pairs from _iq2_pair_raw's words: sum over the pair of
    d * d_x * (2 ls + 1) * isum per (row, pair, ib) [BN, KP, 8] fp32 (the /8 is applied by the caller)."""
    da, ta = _iq2_half_sel(((w0 >> 16) & 0xFFFF) | (w1 << 16), ((w1 >> 16) & 0xFFFF) | (w2 << 16), d0,
                           sel16_ptr, x_ptr, xw, 0, ASM, XV, LIMBS, xl)
    db, tb = _iq2_half_sel(a0, a1, d1 >> 16, sel16_ptr, x_ptr, xw, 1, ASM, XV, LIMBS, xl)
    return (da * dx0) * ta.to(tl.float32) + (db * dx1) * tb.to(tl.float32)


@triton.jit
def _q4_k_raw(base, SV: tl.constexpr = False):
    """The words of Q4_K super-blocks at word pointers base [BN, KB, 1, 1] (36 words each): codes
    [BN, KB, 4, 8] (qs words 8c + w, 16-byte runs), the three packed-scale words and d|dmin. SV (base
    16-byte aligned): d|dmin and the scale words, words 0-3, by one 16-byte load instead of four."""
    c = tl.arange(0, 4)[None, None, :, None]
    w = tl.arange(0, 8)[None, None, None, :]
    if SV:
        dd, s0, s1, s2 = blocks.load4(base, SV)
        return tl.load(base + 4 + 8 * c + w), s0, s1, s2, dd
    else:  # in this order Triton merges two of the word loads (a different order compiled to more loads)
        return tl.load(base + 4 + 8 * c + w), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base)


@triton.jit
def _q4_k_dot(q, s0, s1, s2, dd, x_ptr, xw, s_ptr, sw, dx, ASM: tl.constexpr, XV: tl.constexpr = False,
              LIMBS: tl.constexpr = 1, xl=0):
    """Q4_K super-blocks from _q4_k_raw's words against activation words x_ptr + xw [1, KB, 1, 1]
    (64 per block), code sums s_ptr + sw (16 per block), scales dx [1, KB, 1, 1]. Returns the unreduced
    terms (quant.md §1.5): scale part [BN, KB, 4, 8] = d dx (sc_2c isum_lo + sc_2c+1 isum_hi) per qs
    word of sub-block pair c, and min part [BN, KB, 4, 1] = dmin dx (m xsum). XV: each sub-block pair's four
    code sums by one 16-byte load (the codes' own loads are already 16-byte). LIMBS = 3: the planes at xl and
    2 xl dotted too, the code sums fp32 (bits), both parts in fp32 from exact integer terms."""
    c = tl.arange(0, 4)[None, None, :, None]  # sub-block pair (2c, 2c+1) = qs words 8c .. 8c+7
    w = tl.arange(0, 8)[None, None, None, :]
    xq = x_ptr + xw + 16 * c + w
    zero = tl.zeros(q.shape, dtype=tl.int32)
    q_lo = q & 0x0F0F0F0F  # sub-block 2c: low nibbles
    q_hi = (q >> 4) & 0x0F0F0F0F  # 2c + 1: high nibbles
    p_lo = _dp4a(q_lo, tl.load(xq), zero, ASM)
    p_hi = _dp4a(q_hi, tl.load(xq + 8), zero, ASM)
    if LIMBS > 1:
        pm_lo = _dp4a(q_lo, tl.load(xq + xl), zero, ASM)
        pm_hi = _dp4a(q_hi, tl.load(xq + xl + 8), zero, ASM)
        po_lo = _dp4a(q_lo, tl.load(xq + 2 * xl), zero, ASM)
        po_hi = _dp4a(q_hi, tl.load(xq + 2 * xl + 8), zero, ASM)
    # 6-bit scales/mins, four per word (j < 4 | j >= 4), from the 12 packed bytes
    sh = 16 * (c & 1)
    scw = tl.where(c < 2, s0 & 0x3F3F3F3F, (s2 & 0x0F0F0F0F) | ((s0 >> 2) & 0x30303030))
    mnw = tl.where(c < 2, s1 & 0x3F3F3F3F, ((s2 >> 4) & 0x0F0F0F0F) | ((s1 >> 2) & 0x30303030))
    sc_lo, sc_hi = (scw >> sh) & 255, (scw >> (sh + 8)) & 255
    m_lo, m_hi = (mnw >> sh) & 255, (mnw >> (sh + 8)) & 255
    it = p_lo * sc_lo + p_hi * sc_hi
    # code sums of 16: sub-block 2c has sums 4c and 4c+1, sub-block 2c+1 has 4c+2 and 4c+3
    xs0, xs1, xs2, xs3 = blocks.load4(s_ptr + sw + 4 * c, XV)
    if LIMBS > 1:  # per-lane limb terms < 2^20 (2 sub-blocks x 6-bit scale x 4 codes x 15 x 128): exact in fp32
        itf = _limb_sum(it, pm_lo * sc_lo + pm_hi * sc_hi, po_lo * sc_lo + po_hi * sc_hi)
        minf = (m_lo.to(tl.float32) * (xs0.to(tl.float32, bitcast=True) + xs1.to(tl.float32, bitcast=True))
                + m_hi.to(tl.float32) * (xs2.to(tl.float32, bitcast=True) + xs3.to(tl.float32, bitcast=True)))
    else:
        itf = it.to(tl.float32)
        minf = (m_lo * (xs0 + xs1) + m_hi * (xs2 + xs3)).to(tl.float32)
    return (_f16_from_bits(dd) * dx) * itf, (_f16_from_bits(dd >> 16) * dx) * minf


@triton.jit
def _q2_k_raw(base):
    """The words of Q2_K super-blocks at word pointers base [BN, KB, 1] (21 words: scales 0-3, qs 4-19,
    d|dmin 20): qs words 4 he + 0..3 of tile lane he [BN, KB, 4] (see _q2_k_dot), the scale words
    2h + 0/1 and d|dmin."""
    he = tl.arange(0, 4)[None, None, :]
    qb = base + 4 + 4 * he
    h = he >> 1
    return (tl.load(qb), tl.load(qb + 1), tl.load(qb + 2), tl.load(qb + 3), tl.load(base + 2 * h),
            tl.load(base + 2 * h + 1), tl.load(base + 20))


@triton.jit
def _q2_k_dot(q0, q1, q2, q3, sc0, sc1, dd, x_ptr, xw, s_ptr, sw, dx, ASM: tl.constexpr, XV: tl.constexpr = False,
              LIMBS: tl.constexpr = 1, xl=0):
    """Q2_K super-blocks from _q2_k_raw's words against activation words x_ptr + xw [1, KB, 1], code
    sums s_ptr + sw, scales dx [1, KB, 1]. Weight 128h + 32s + 4w' + b (w' < 8) is bits 2s of byte b of
    qs word 8h + w', sub-block j = 8h + 2s + (w' >= 4); tile lane he = 2h + (w' >= 4) holds the 4 words
    w = w' & 3 of sub-blocks 8h + 2s + (he & 1), so each 16-weight dot is one dp4a chain in one thread.
    Returns the unreduced terms [BN, KB, 4] = d dx sum_s sc_j isum_j - dmin dx sum_s m_j xsum_j
    (quant.md §1.4). XV: activation words and code sums by 16-byte loads (blocks.load4). LIMBS = 3: the planes
    at xl and 2 xl dotted too, the code sums fp32 (bits)."""
    he = tl.arange(0, 4)[None, None, :]
    h = he >> 1
    e = he & 1
    xb = x_ptr + xw + 32 * h + 4 * e
    zero = tl.zeros(q0.shape, dtype=tl.int32)
    it = zero
    mins = zero
    if LIMBS > 1:
        it_m = zero
        it_o = zero
        minf = tl.zeros(q0.shape, dtype=tl.float32)
    if XV:  # code sums 8h .. 8h + 7 as two 16-byte loads; sub-block 8h + 2s + e's is word 2s + e of them
        cs_lo = blocks.load4(s_ptr + sw + 8 * h, XV)
        cs_hi = blocks.load4(s_ptr + sw + 8 * h + 4, XV)
    for sp in tl.static_range(2):
        scw = sc0 if sp == 0 else sc1  # scale bytes 4 (2h + sp) .. +3
        for s2 in tl.static_range(2):
            s = 2 * sp + s2
            p = _q2_k_chain(q0, q1, q2, q3, s, blocks.load4(xb + 8 * s, XV), ASM)
            byte = (scw >> (8 * (2 * s2 + e))) & 255
            it += (byte & 15) * p
            if LIMBS > 1:
                it_m += (byte & 15) * _q2_k_chain(q0, q1, q2, q3, s, blocks.load4(xb + xl + 8 * s, XV), ASM)
                it_o += (byte & 15) * _q2_k_chain(q0, q1, q2, q3, s, blocks.load4(xb + 2 * xl + 8 * s, XV), ASM)
            if XV:
                cs = cs_lo if sp == 0 else cs_hi
                csum = tl.where(e == 0, cs[2 * s2], cs[2 * s2 + 1])
            else:
                csum = tl.load(s_ptr + sw + 8 * h + 2 * s + e)
            if LIMBS > 1:
                minf += (byte >> 4).to(tl.float32) * csum.to(tl.float32, bitcast=True)
            else:
                mins += (byte >> 4) * csum
    if LIMBS > 1:  # per-lane limb terms < 2^19 (4 sub-blocks x 4-bit scale x 16 codes x 3 x 128): exact in fp32
        itf = _limb_sum(it, it_m, it_o)
    else:
        itf = it.to(tl.float32)
        minf = mins.to(tl.float32)
    return (_f16_from_bits(dd) * dx) * itf - (_f16_from_bits(dd >> 16) * dx) * minf


@triton.jit
def _q2_k_chain(q0, q1, q2, q3, s: tl.constexpr, xs, ASM: tl.constexpr):
    """One 16-weight Q2_K dot (shift 2 s of the four qs words) against the four activation words xs."""
    p = _dp4a((q0 >> (2 * s)) & 0x03030303, xs[0], tl.zeros(q0.shape, dtype=tl.int32), ASM)
    p = _dp4a((q1 >> (2 * s)) & 0x03030303, xs[1], p, ASM)
    p = _dp4a((q2 >> (2 * s)) & 0x03030303, xs[2], p, ASM)
    return _dp4a((q3 >> (2 * s)) & 0x03030303, xs[3], p, ASM)


# ---- kernels ------------------------------------------------------------------------------------
# Every term stays in its own tile lane across the K loop (elementwise accumulation in the load
# layout); the cross-thread reductions run once per program, after the loop.

@triton.jit
def _gate_up_int8_kernel(xq_ptr, xd_ptr, xs_ptr, sel_ptr, wts_ptr, h_ptr, gw_ptr, uw_ptr, sel16_ptr,
                         hq_ptr, hd_ptr, hs_ptr, cnt_ptr,
                         F, D, KSEL, clamp, stride_w, stride_xq, stride_xd, stride_xs, stride_ht, stride_xl,
                         stride_hq, stride_hd, stride_hs, stride_hl,
                         FMT: tl.constexpr, BLOCK_N: tl.constexpr, KSTEP: tl.constexpr, ASM: tl.constexpr,
                         PF: tl.constexpr = False, PDL: tl.constexpr = False, XV: tl.constexpr = False,
                         SV: tl.constexpr = False, LIMBS: tl.constexpr = 1, QH: tl.constexpr = False):
    """h[slot, f] = swiglu(gate[e] @ u[t], up[e] @ u[t]) * wts[slot] with u as Q8_K (codes xq, scales
    xd, sums xs; IQ2_XXS: in quant_q8_k's iq2_order); slot = t * KSEL + i, e = sel[slot]. KSTEP block
    pairs (IQ2_XXS, grid as blocks.iq2_sel16's table) or blocks (Q4_K) per K step. Rows past F are
    clamped to F - 1 (valid reads, results not stored). PF: the next step's weight words are loaded
    before this step computes (register double buffer; the last step re-reads itself). LIMBS = 3: u as
    quant_q8_k(limbs=3)'s planes (stride_xl words apart), fp32-grade. QH: h is also quantized to Q8_K here with
    LIMBS planes (hq, hd, hs as quant_q8_k's outputs; cnt_ptr: F / 256 arrival counters per slot, zero between
    calls), by the last program of each 256-block (_quant_h_last)."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = (slot // KSEL).to(tl.int64)
    e = tl.load(sel_ptr + slot).to(tl.int64)
    wt = tl.load(wts_ptr + slot).to(tl.float32)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    roff = (e * F + tl.minimum(rn, F - 1)) * stride_w
    if FMT == FMT_IQ2_XXS:
        kk = tl.arange(0, KSTEP)[None, :, None]
        gb = gw_ptr + roff[:, None, None]
        ub = uw_ptr + roff[:, None, None]
        acc_g = tl.zeros([BLOCK_N, KSTEP, 8], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, KSTEP, 8], dtype=tl.float32)
        n_pairs = D // (2 * QK_C)
        if PF:
            g0, g1, g2, g3, g4, g5, g6 = _iq2_pair_raw(gb + kk * IQ2_PAIR_WORDS)
            u0, u1, u2, u3, u4, u5, u6 = _iq2_pair_raw(ub + kk * IQ2_PAIR_WORDS)
        blocks.pdl_wait(PDL)  # u's codes come from the previous kernel (sel and weights are older)
        for p0 in tl.range(0, n_pairs, KSTEP, num_stages=1):  # no cp.async pipelining (measured slower)
            pw = (p0 + kk) * IQ2_PAIR_WORDS
            xw = t * stride_xq + (p0 + kk) * (2 * Q8K_WORDS)
            dx0 = tl.load(xd_ptr + t * stride_xd + 2 * (p0 + kk))  # [1, KSTEP, 1]
            dx1 = tl.load(xd_ptr + t * stride_xd + 2 * (p0 + kk) + 1)
            if PF:
                pn = (tl.minimum(p0 + KSTEP, n_pairs - KSTEP) + kk) * IQ2_PAIR_WORDS
                ng0, ng1, ng2, ng3, ng4, ng5, ng6 = _iq2_pair_raw(gb + pn)
                nu0, nu1, nu2, nu3, nu4, nu5, nu6 = _iq2_pair_raw(ub + pn)
            else:
                g0, g1, g2, g3, g4, g5, g6 = _iq2_pair_raw(gb + pw)
                u0, u1, u2, u3, u4, u5, u6 = _iq2_pair_raw(ub + pw)
            acc_g += _iq2_pair_sel(g0, g1, g2, g3, g4, g5, g6, sel16_ptr, xq_ptr, xw, dx0, dx1, ASM, XV, LIMBS,
                                   stride_xl)
            acc_u += _iq2_pair_sel(u0, u1, u2, u3, u4, u5, u6, sel16_ptr, xq_ptr, xw, dx0, dx1, ASM, XV, LIMBS,
                                   stride_xl)
            if PF:
                g0, g1, g2, g3, g4, g5, g6 = ng0, ng1, ng2, ng3, ng4, ng5, ng6
                u0, u1, u2, u3, u4, u5, u6 = nu0, nu1, nu2, nu3, nu4, nu5, nu6
        gsum = tl.sum(tl.sum(acc_g, axis=2), axis=1) * 0.125
        usum = tl.sum(tl.sum(acc_u, axis=2), axis=1) * 0.125
    else:  # Q4_K
        kk = tl.arange(0, KSTEP)[None, :, None, None]
        gb = gw_ptr + roff[:, None, None, None]
        ub = uw_ptr + roff[:, None, None, None]
        acc_g = tl.zeros([BLOCK_N, KSTEP, 4, 8], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, KSTEP, 4, 8], dtype=tl.float32)
        min_g = tl.zeros([BLOCK_N, KSTEP, 4, 1], dtype=tl.float32)
        min_u = tl.zeros([BLOCK_N, KSTEP, 4, 1], dtype=tl.float32)
        n_blocks = D // QK_C
        if PF:
            gq, gs0, gs1, gs2, gdd = _q4_k_raw(gb + kk * Q4K_WORDS, SV)
            uq, us0, us1, us2, udd = _q4_k_raw(ub + kk * Q4K_WORDS, SV)
        blocks.pdl_wait(PDL)
        for b0 in tl.range(0, n_blocks, KSTEP, num_stages=1):
            xw = t * stride_xq + (b0 + kk) * Q8K_WORDS
            sw = t * stride_xs + (b0 + kk) * SUMS_PER_BLOCK
            dx = tl.load(xd_ptr + t * stride_xd + b0 + kk)
            if PF:
                bn_ = (tl.minimum(b0 + KSTEP, n_blocks - KSTEP) + kk) * Q4K_WORDS
                ngq, ngs0, ngs1, ngs2, ngdd = _q4_k_raw(gb + bn_, SV)
                nuq, nus0, nus1, nus2, nudd = _q4_k_raw(ub + bn_, SV)
            else:
                bw = (b0 + kk) * Q4K_WORDS
                gq, gs0, gs1, gs2, gdd = _q4_k_raw(gb + bw, SV)
                uq, us0, us1, us2, udd = _q4_k_raw(ub + bw, SV)
            pg, mg = _q4_k_dot(gq, gs0, gs1, gs2, gdd, xq_ptr, xw, xs_ptr, sw, dx, ASM, XV, LIMBS, stride_xl)
            pu, mu = _q4_k_dot(uq, us0, us1, us2, udd, xq_ptr, xw, xs_ptr, sw, dx, ASM, XV, LIMBS, stride_xl)
            acc_g += pg
            acc_u += pu
            min_g += mg
            min_u += mu
            if PF:
                gq, gs0, gs1, gs2, gdd = ngq, ngs0, ngs1, ngs2, ngdd
                uq, us0, us1, us2, udd = nuq, nus0, nus1, nus2, nudd
        gsum = (tl.sum(tl.sum(tl.sum(acc_g, axis=3), axis=2), axis=1)
                - tl.sum(tl.sum(tl.sum(min_g, axis=3), axis=2), axis=1))
        usum = (tl.sum(tl.sum(tl.sum(acc_u, axis=3), axis=2), axis=1)
                - tl.sum(tl.sum(tl.sum(min_u, axis=3), axis=2), axis=1))
    h = moe._swiglu_route(gsum, usum, wt, clamp)
    tl.store(h_ptr + slot * stride_ht + rn, h, mask=rn < F)
    if QH:
        _quant_h_last(h_ptr + slot * stride_ht, hq_ptr + slot * stride_hq, hd_ptr + slot * stride_hd,
                      hs_ptr + slot * stride_hs, cnt_ptr + slot * (F // QK_C), pid_n, stride_hl, BLOCK_N, LIMBS, ASM)


@triton.jit
def _down_step(j, n_steps, KSTEP: tl.constexpr):
    """Flat step j of a down program (slot-major over K steps, so the slots are summed in order):
    (slot i of the token, first super-block of the step)."""
    i = j // n_steps
    return i, (j - i * n_steps) * KSTEP


@triton.jit
def _down_rows(sel_ptr, slot, rc, D, stride_w):
    """Word offsets of the rows rc [BN] of expert sel_ptr[slot] in the stacked down weight."""
    return (tl.load(sel_ptr + slot).to(tl.int64) * D + rc) * stride_w


@triton.jit
def _q2_down_part(j, n_steps, t, KSEL, sel_ptr, w_ptr, rc, D, stride_w, hq_ptr, hd_ptr, hs_ptr, stride_hq,
                  stride_hd, stride_hs, stride_hl, KSTEP: tl.constexpr, ASM: tl.constexpr, XV: tl.constexpr,
                  LIMBS: tl.constexpr):
    """Flat step j of a Q2_K down program, loaded and dotted: the unreduced terms [BN, KSTEP, 4]."""
    kk = tl.arange(0, KSTEP)[None, :, None]
    i, b0 = _down_step(j, n_steps, KSTEP)
    slot = (t * KSEL + i).to(tl.int64)
    q0, q1, q2, q3, c0, c1, dd = _q2_k_raw(
        w_ptr + _down_rows(sel_ptr, slot, rc, D, stride_w)[:, None, None] + (b0 + kk) * Q2K_WORDS)
    dx = tl.load(hd_ptr + slot * stride_hd + b0 + kk)
    return _q2_k_dot(q0, q1, q2, q3, c0, c1, dd, hq_ptr, slot * stride_hq + (b0 + kk) * Q8K_WORDS,
                     hs_ptr, slot * stride_hs + (b0 + kk) * SUMS_PER_BLOCK, dx, ASM, XV, LIMBS, stride_hl)


@triton.jit
def _q4_down_part(j, n_steps, t, KSEL, sel_ptr, w_ptr, rc, D, stride_w, hq_ptr, hd_ptr, hs_ptr, stride_hq,
                  stride_hd, stride_hs, stride_hl, KSTEP: tl.constexpr, ASM: tl.constexpr, XV: tl.constexpr,
                  SV: tl.constexpr, LIMBS: tl.constexpr):
    """Flat step j of a Q4_K down program, loaded and dotted: (scale terms [BN, KSTEP, 4, 8], min terms
    [BN, KSTEP, 4, 1])."""
    kk = tl.arange(0, KSTEP)[None, :, None, None]
    i, b0 = _down_step(j, n_steps, KSTEP)
    slot = (t * KSEL + i).to(tl.int64)
    q, s0, s1, s2, dd = _q4_k_raw(
        w_ptr + _down_rows(sel_ptr, slot, rc, D, stride_w)[:, None, None, None] + (b0 + kk) * Q4K_WORDS, SV)
    dx = tl.load(hd_ptr + slot * stride_hd + b0 + kk)
    return _q4_k_dot(q, s0, s1, s2, dd, hq_ptr, slot * stride_hq + (b0 + kk) * Q8K_WORDS,
                     hs_ptr, slot * stride_hs + (b0 + kk) * SUMS_PER_BLOCK, dx, ASM, XV, LIMBS, stride_hl)


@triton.jit
def _down_int8_kernel(hq_ptr, hd_ptr, hs_ptr, sel_ptr, out_ptr, w_ptr, F, D, KSEL,
                      stride_w, stride_hq, stride_hd, stride_hs, stride_ot, stride_hl,
                      FMT: tl.constexpr, BLOCK_N: tl.constexpr, KSTEP: tl.constexpr, ASM: tl.constexpr,
                      PF: tl.constexpr = False, PDL: tl.constexpr = False, XV: tl.constexpr = False,
                      SV: tl.constexpr = False, STEPS: tl.constexpr = 0, LIMBS: tl.constexpr = 1):
    """out[t, d] = sum over i < KSEL of down[sel[t*KSEL+i]][d, :] @ h[t*KSEL+i, :] with h as Q8_K
    (codes hq, scales hd, sums hs); KSTEP super-blocks per K step, slots in order. One flat loop over
    (slot, K step); PF: the next (slot, step)'s weight words are loaded before this one computes. STEPS
    (= KSEL * F / (256 KSTEP), > 0): that loop unrolled, so later steps' loads need not wait a loop trip.
    LIMBS = 3: h as quant_q8_k(limbs=3)'s planes (stride_hl words apart), fp32-grade."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.minimum(rn, D - 1)
    n_steps = F // (QK_C * KSTEP)
    last = KSEL * n_steps - 1
    sel_t = sel_ptr + t * KSEL  # the token's expert ids
    if FMT == FMT_Q2_K:  # tile [BN, KSTEP, 4 sub-rows]
        kk = tl.arange(0, KSTEP)[None, :, None]
        acc = tl.zeros([BLOCK_N, KSTEP, 4], dtype=tl.float32)
        if PF:
            i_p, b_p = _down_step(0, n_steps, KSTEP)
            q0, q1, q2, q3, c0, c1, dd = _q2_k_raw(
                w_ptr + _down_rows(sel_t, i_p, rc, D, stride_w)[:, None, None] + (b_p + kk) * Q2K_WORDS)
        blocks.pdl_wait(PDL)  # h's codes come from the previous kernel (sel and weights are older)
        if STEPS > 0:
            for j in tl.static_range(STEPS):
                acc += _q2_down_part(j, n_steps, t, KSEL, sel_ptr, w_ptr, rc, D, stride_w, hq_ptr, hd_ptr, hs_ptr,
                                     stride_hq, stride_hd, stride_hs, stride_hl, KSTEP, ASM, XV, LIMBS)
        elif PF:
            for j in tl.range(0, KSEL * n_steps, num_stages=1):  # no cp.async pipelining (measured slower)
                i, b0 = _down_step(j, n_steps, KSTEP)
                slot = (t * KSEL + i).to(tl.int64)
                i_p, b_p = _down_step(tl.minimum(j + 1, last), n_steps, KSTEP)
                nq0, nq1, nq2, nq3, nc0, nc1, ndd = _q2_k_raw(
                    w_ptr + _down_rows(sel_t, i_p, rc, D, stride_w)[:, None, None] + (b_p + kk) * Q2K_WORDS)
                dx = tl.load(hd_ptr + slot * stride_hd + b0 + kk)
                acc += _q2_k_dot(q0, q1, q2, q3, c0, c1, dd, hq_ptr, slot * stride_hq + (b0 + kk) * Q8K_WORDS,
                                 hs_ptr, slot * stride_hs + (b0 + kk) * SUMS_PER_BLOCK, dx, ASM, XV, LIMBS,
                                 stride_hl)
                q0, q1, q2, q3, c0, c1, dd = nq0, nq1, nq2, nq3, nc0, nc1, ndd
        else:
            for j in tl.range(0, KSEL * n_steps, num_stages=1):  # no cp.async pipelining (measured slower)
                acc += _q2_down_part(j, n_steps, t, KSEL, sel_ptr, w_ptr, rc, D, stride_w, hq_ptr, hd_ptr, hs_ptr,
                                     stride_hq, stride_hd, stride_hs, stride_hl, KSTEP, ASM, XV, LIMBS)
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:  # Q4_K: tile [BN, KSTEP, 4 sub-block pairs, 8 words]
        kk = tl.arange(0, KSTEP)[None, :, None, None]
        acc = tl.zeros([BLOCK_N, KSTEP, 4, 8], dtype=tl.float32)
        acc_min = tl.zeros([BLOCK_N, KSTEP, 4, 1], dtype=tl.float32)
        if PF:
            i_p, b_p = _down_step(0, n_steps, KSTEP)
            q, s0, s1, s2, dd = _q4_k_raw(
                w_ptr + _down_rows(sel_t, i_p, rc, D, stride_w)[:, None, None, None] + (b_p + kk) * Q4K_WORDS, SV)
        blocks.pdl_wait(PDL)
        if STEPS > 0:
            for j in tl.static_range(STEPS):
                part, mpart = _q4_down_part(j, n_steps, t, KSEL, sel_ptr, w_ptr, rc, D, stride_w, hq_ptr, hd_ptr,
                                            hs_ptr, stride_hq, stride_hd, stride_hs, stride_hl, KSTEP, ASM, XV, SV,
                                            LIMBS)
                acc += part
                acc_min += mpart
        elif PF:
            for j in tl.range(0, KSEL * n_steps, num_stages=1):
                i, b0 = _down_step(j, n_steps, KSTEP)
                slot = (t * KSEL + i).to(tl.int64)
                i_p, b_p = _down_step(tl.minimum(j + 1, last), n_steps, KSTEP)
                nq, ns0, ns1, ns2, ndd = _q4_k_raw(
                    w_ptr + _down_rows(sel_t, i_p, rc, D, stride_w)[:, None, None, None] + (b_p + kk) * Q4K_WORDS, SV)
                dx = tl.load(hd_ptr + slot * stride_hd + b0 + kk)
                part, mpart = _q4_k_dot(q, s0, s1, s2, dd, hq_ptr, slot * stride_hq + (b0 + kk) * Q8K_WORDS,
                                        hs_ptr, slot * stride_hs + (b0 + kk) * SUMS_PER_BLOCK, dx, ASM, XV, LIMBS,
                                        stride_hl)
                acc += part
                acc_min += mpart
                q, s0, s1, s2, dd = nq, ns0, ns1, ns2, ndd
        else:
            for j in tl.range(0, KSEL * n_steps, num_stages=1):  # no cp.async pipelining (measured slower)
                part, mpart = _q4_down_part(j, n_steps, t, KSEL, sel_ptr, w_ptr, rc, D, stride_w, hq_ptr, hd_ptr,
                                            hs_ptr, stride_hq, stride_hd, stride_hs, stride_hl, KSTEP, ASM, XV, SV,
                                            LIMBS)
                acc += part
                acc_min += mpart
        total = (tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
                 - tl.sum(tl.sum(tl.sum(acc_min, axis=3), axis=2), axis=1))
    tl.store(out_ptr + t * stride_ot + rn, total, mask=rn < D)


# ---- host side ------------------------------------------------------------------------------------

def empty_i32(shape, device):
    """int32 scratch (Q8_K codes and sums); tests replace it to fill with garbage."""
    return torch.empty(tuple(shape), device=device, dtype=torch.int32)


# No FMA contraction in the quantizer: rint must see the fp32-rounded product iscale * x, as torch does. One warp: the
# next kernel waits on this launch, and a warp's shuffles are quicker than two warps' barriers (h200_decode/77: the
# whole q4 three-plane call 33.0 -> 32.1 us, q2 34.7 -> 34.0; 4 or 8 warps slower; a Gluon quantizer with half the
# instructions, each lane packing its own 8 codes, gained at most 0.5 us more: 79, not taken)
QUANT_LAUNCH = dict(num_warps=1, enable_fp_fusion=False)


def quant_q8_k(x, iq2_order: bool = False, pdl: bool = False, limbs: int = 1):
    """x [R, C] float (C % 256 == 0) -> (codes int32 [R, C/4] (4 int8 codes per word, little-endian),
    scales fp32 [R, C/256], code sums int32 [R, C/16]); the Q8_K of TorchOps.quant_q8_k. iq2_order:
    the codes of each 8 in the order the selector IQ2_XXS decode reads (words [c0 c4 c1 c5] [c2 c6 c3 c7]).
    limbs=3 (LIMBS_FP32): fp32-grade activations, codes [3, R, C/4] (hi, mid, lo planes), sums as fp32 bits
    (see _q8k_quant_kernel); the kernels read the plane count from the codes' shape."""
    R, C = x.shape
    if C % QK:
        raise ValueError(f"Q8_K needs a multiple of {QK} columns, got {C}")
    if limbs not in (1, LIMBS_FP32):
        raise ValueError(f"limbs must be 1 or {LIMBS_FP32}, got {limbs}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = empty_i32((R, C // 4) if limbs == 1 else (limbs, R, C // 4), x.device)
    s = empty_i32((R, C // SUM_GROUP), x.device)
    d = blocks.empty((R, C // QK), x.device)
    if R:
        _q8k_quant_kernel[(R, C // QK)](x, q, d, s, x.stride(0), q.stride(-2), d.stride(0), s.stride(0),
                                        _plane_stride(q), IQ2_ORDER=iq2_order, PDL=pdl, LIMBS=limbs,
                                        **QUANT_LAUNCH, **pdl_launch(pdl))
    return q, d, s


def _limbs(q) -> int:
    """Activation planes of quant_q8_k's codes (1: Q8_K; 3: codes [3, R, C/4])."""
    return q.shape[0] if q.dim() == 3 else 1


def _plane_stride(q) -> int:
    return q.stride(0) if q.dim() == 3 else 0


IQ2_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # byte position (within 8) of code j in iq2_order


def dequant_q8_k(q, d, iq2_order: bool = False):
    """fp32 [R, C] codes * scale of quant_q8_k's output (tests, debugging); limbs=3 codes in hi-plane units."""
    if q.dim() == 3:
        planes = [dequant_q8_k(q[i], torch.ones_like(d), iq2_order).double() for i in range(q.shape[0])]
        total = planes[0] + planes[1] / 256 + planes[2] / 65536
        return (total.view(d.shape[0], -1, QK) * d[:, :, None].double()).reshape(d.shape[0], -1).float()
    codes = q.contiguous().view(torch.int8).to(torch.float32)
    if iq2_order:
        codes = codes.reshape(codes.shape[0], -1, 8)[:, :, list(IQ2_ORDER)].reshape(codes.shape[0], -1)
    return (codes.view(q.shape[0], -1, QK) * d[:, :, None]).reshape(q.shape[0], -1)


def _words(w: DeviceWeight):
    """(int32 word view of the rows, words per row) of a Q2_K/Q4_K/IQ2_XXS weight."""
    flat = w.buf.reshape(-1, w.buf.shape[-1])
    return flat.view(torch.int32), flat.shape[1] // 4


def _kstep(n_units: int, want: int) -> int:
    """Largest power of two <= want dividing n_units (units: IQ2_XXS block pairs or super-blocks)."""
    k = 1
    while k * 2 <= want and n_units % (k * 2) == 0:
        k *= 2
    return k


def supports(gate: DeviceWeight, down: DeviceWeight) -> bool:
    E, F, D = gate.shape
    return (gate.fmt in GATE_UP_FORMATS and down.fmt in DOWN_FORMATS
            and D % (IQ2_PAIR if gate.fmt == QuantFormat.IQ2_XXS else QK) == 0 and F % QK == 0)


def _aligned16(words, stride: int) -> bool:
    """Whether every row of an int32 word view starts on a 16-byte boundary (blocks.load4's requirement)."""
    return words.data_ptr() % 16 == 0 and stride % 4 == 0


def use_asm(dev: DeviceInfo, x) -> bool:
    """PTX dp4a only on an NVIDIA device (the interpreter and ROCm run the plain-Triton emulation)."""
    return dev.vendor == Vendor.NVIDIA and x.is_cuda


def fused_int8(u, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight, sel, weights, clamp: float,
               dev: DeviceInfo, cfg: Int8MoeConfig | None = None, limbs: int = 1):
    """Routed MoE for few tokens with Q8_K activations: u [T, D], sel/weights [T, K] -> [T, D] fp32.
    limbs=3 (LIMBS_FP32): u and h as three int8 planes each (fp32-grade: the float op's semantics, not ds4's
    rounding). Formats or shapes it does not take (gate/up other than IQ2_XXS/Q4_K, down other than Q2_K/Q4_K,
    IQ2_XXS with D % 512) run moe.fused_blockdot, which keeps float activations."""
    cfg = cfg or (TUNED if limbs == 1 else TUNED_LIMB3).get(gate.fmt, Int8MoeConfig())
    cpu = dev.vendor == Vendor.CPU
    if cpu and cfg.cpu_widen:
        cfg = replace(cfg, block_n_gate_up=max(cfg.block_n_gate_up, CPU_BLOCK_N_GATE_UP),
                      block_n_down=max(cfg.block_n_down, CPU_BLOCK_N_DOWN))
    u, sel, weights, E, F, D = moe._check(u, gate, up, down, sel, weights)
    if not supports(gate, down):
        return moe.fused_blockdot(u, gate, up, down, sel, weights, clamp, dev)
    T, K = sel.shape
    if T == 0:
        return blocks.empty((0, D), u.device)
    asm = use_asm(dev, u)
    pdl = cfg.pdl and use_pdl(dev, u)
    uq = quant_q8_k(u, iq2_order=uses_iq2_order(gate), pdl=pdl, limbs=limbs)
    # the Gluon gate/up never quantizes h (slower than its own launch there: h200_decode/63-65)
    if fuses_quant_h(cfg) and not _gluon_gate_up(cfg, gate, up, dev, uq[0], asm):
        hq3 = gate_up_int8(uq, gate, up, sel, weights, clamp, asm, cfg, pdl, quant_h=limbs, dev=dev)
    else:
        hq3 = quant_q8_k(gate_up_int8(uq, gate, up, sel, weights, clamp, asm, cfg, pdl, dev=dev), pdl=pdl,
                         limbs=limbs)
    return down_int8(hq3, down, sel, asm, cfg, pdl, dev)


def _gluon_gate_up(cfg: Int8MoeConfig, gate: DeviceWeight, up: DeviceWeight, dev: DeviceInfo, xq, asm: bool) -> bool:
    """Whether gate_up_int8 (without quant_h) runs moe_int8_gluon's kernel for this stage."""
    if cfg.gluon_gate_up is None or not asm:
        return False
    from . import moe_int8_gluon

    return moe_int8_gluon.supports(gate, up, dev, xq, cfg.gluon_gate_up)


def fuses_quant_h(cfg: Int8MoeConfig) -> bool:
    """Whether fused_int8 quantizes h inside the gate/up kernel (cfg.fuse_quant_h and a tile dividing 256)."""
    return cfg.fuse_quant_h and QK % cfg.block_n_gate_up == 0


COUNTERS_MIN = 4096  # Flash at T = 8: 8 tokens x 6 slots x 2048 / 256 = 384
_COUNTERS_PLAN = ("moe_int8", "quant_h_counters")  # their key in the gate weight's plan cache


def block_counters(gate: DeviceWeight, n: int):
    """n zeroed int32 arrival counters of _quant_h_last, kept in the gate weight's plan cache as the Q8_0 GEMVs keep
    their split-K slots (zero between calls: each block's last program resets its own; one stream at a time).
    Allocated by the first call that needs more, so a CUDA graph should be captured after an eager call (as
    bench_kernels and the probes do)."""
    c = gate.plans.get(_COUNTERS_PLAN)
    if c is None or c.numel() < n:
        c = gate.plans[_COUNTERS_PLAN] = torch.zeros(max(n, COUNTERS_MIN), device=gate.buf.device, dtype=torch.int32)
    return c


def uses_iq2_order(gate: DeviceWeight) -> bool:
    """Whether gate_up_int8 reads u's Q8_K codes in quant_q8_k's iq2_order (the IQ2_XXS selector decode)."""
    return gate.fmt == QuantFormat.IQ2_XXS


def gate_up_int8(uq, gate: DeviceWeight, up: DeviceWeight, sel, weights, clamp: float, asm: bool,
                 cfg: Int8MoeConfig, pdl: bool = False, quant_h: int = 0, dev: DeviceInfo | None = None):
    """Stage 1 of fused_int8: uq = quant_q8_k(u, iq2_order=uses_iq2_order(gate)) -> h [T*K, F] fp32
    (SwiGLU of the slot's expert, routed); quant_h = 1 or 3 (needs fuses_quant_h(cfg)): instead
    quant_q8_k(h, limbs=quant_h)'s outputs, quantized in the same kernel (always the Triton one). cfg.gluon_gate_up:
    without quant_h, the Gluon kernel where moe_int8_gluon.supports it (dev: xq's device, detected when not
    given)."""
    xq, xd, xs = uq
    if not quant_h and _gluon_gate_up(cfg, gate, up, dev or detect_device(xq.device), xq, asm):
        from . import moe_int8_gluon

        return moe_int8_gluon.gate_up(uq, gate, up, sel, weights, clamp, cfg.gluon_gate_up, pdl)
    (T, K), (_, F, D) = sel.shape, gate.shape
    gw, stride_w = _words(gate)
    uw, _ = _words(up)
    kstep = _kstep(D // (IQ2_PAIR if uses_iq2_order(gate) else QK), cfg.kstep_gate_up)
    bn = cfg.block_n_gate_up
    h = blocks.empty((T * K, F), xq.device)
    if quant_h:
        if not fuses_quant_h(cfg) or quant_h not in (1, LIMBS_FP32):
            raise ValueError(f"quant_h={quant_h} needs limbs 1 or {LIMBS_FP32} and fuse_quant_h with a tile "
                             f"dividing {QK} (block_n_gate_up={bn})")
        hq = empty_i32((T * K, F // 4) if quant_h == 1 else (quant_h, T * K, F // 4), xq.device)
        hs = empty_i32((T * K, F // SUM_GROUP), xq.device)
        hd = blocks.empty((T * K, F // QK), xq.device)
        cnt = block_counters(gate, T * K * (F // QK))
        qh_args = (hq, hd, hs, cnt)
        qh_strides = (hq.stride(-2), hd.stride(0), hs.stride(0), _plane_stride(hq))
    else:
        qh_args, qh_strides = (h, h, h, h), (0, 0, 0, 0)
    _gate_up_int8_kernel[(T * K, triton.cdiv(F, bn))](
        xq, xd, xs, sel, weights, h, gw, uw, gate.sel16, *qh_args, F, D, K, float(clamp), stride_w,
        xq.stride(-2), xd.stride(0), xs.stride(0), h.stride(0), _plane_stride(xq), *qh_strides, LIMBS=_limbs(xq),
        QH=bool(quant_h), FMT=int(gate.fmt), BLOCK_N=bn, KSTEP=kstep, ASM=asm,
        PF=cfg.prefetch_gate_up, PDL=pdl, XV=cfg.x_vec_gate_up and asm,
        SV=cfg.scale_vec_gate_up and asm and gate.fmt == QuantFormat.Q4_K and _aligned16(gw, stride_w)
        and _aligned16(uw, stride_w),
        num_warps=cfg.warps_gate_up, **pdl_launch(pdl), **_maxnreg(cfg.maxnreg_gate_up, asm),
        # the fused quantizer's rint must see the rounded product: off the PTX path, no FMA contraction at all
        **({"enable_fp_fusion": False} if quant_h and not asm else {}))
    return (hq, hd, hs) if quant_h else h


def down_int8(hq3, down: DeviceWeight, sel, asm: bool, cfg: Int8MoeConfig, pdl: bool = False,
              dev: DeviceInfo | None = None):
    """Stage 2 of fused_int8: hq3 = quant_q8_k(h) -> out [T, D] fp32, the K slots summed in fixed order.
    cfg.gluon_down: the Gluon kernel where moe_int8_gluon.supports_down it (dev: detected when not given)."""
    hq, hd, hs = hq3
    if cfg.gluon_down is not None and asm:
        from . import moe_int8_gluon

        tile = moe_int8_gluon.down_tile(cfg.gluon_down, down.shape[-1], sel.shape[1])
        if tile is not None and moe_int8_gluon.supports_down(down, dev or detect_device(hq.device), hq, tile):
            return moe_int8_gluon.down(hq3, down, sel, tile, pdl)
    (T, K), (_, D, F) = sel.shape, down.shape
    dw, stride_d = _words(down)
    bn = cfg.block_n_down
    kstep = _kstep(F // QK, cfg.kstep_down)
    out = blocks.empty((T, D), hq.device)
    _down_int8_kernel[(T, triton.cdiv(D, bn))](
        hq, hd, hs, sel, out, dw, F, D, K, stride_d, hq.stride(-2), hd.stride(0), hs.stride(0), out.stride(0),
        _plane_stride(hq), LIMBS=_limbs(hq), FMT=int(down.fmt), BLOCK_N=bn, KSTEP=kstep, ASM=asm,
        STEPS=K * F // (QK * kstep) if cfg.unroll_down else 0,
        PF=cfg.prefetch_down and not cfg.unroll_down, PDL=pdl, XV=cfg.x_vec_down and asm,
        SV=cfg.scale_vec_down and asm and down.fmt == QuantFormat.Q4_K and _aligned16(dw, stride_d),
        num_warps=cfg.warps_down, **pdl_launch(pdl), **_maxnreg(cfg.maxnreg_down, asm))
    return out


def _maxnreg(cap: int, asm: bool) -> dict:
    """Launch option of a register cap (only on the NVIDIA path: the interpreter and ROCm take none)."""
    return {"maxnreg": cap} if cap and asm else {}


# ---- registered variants (op "moe"; signature fn(u, gate, up, down, sel, weights, clamp, dev)) ---
# Tuned per gate/up format on the H200 (tools/results/h200_decode/: tools/probe_decode.py moe_sweep, pdl, xv,
# xv_sweep): IQ2_XXS gate/up wants many 1-warp programs with the next step prefetched (its activation words as
# 16-byte loads: faster alone, 2 us slower behind the Q8_K launch, 22/23; on Triton 3.6 that kernel takes 96
# registers instead of 64, so a token's 3072 programs no longer fit the SMs at once); Q2_K down 4 rows with
# 16-byte activation loads (4 warps: the whole q2 call 36.0 -> 32.4-32.7 us, 22), since h200_decode/37 1 warp
# unrolled over the K slots (quant h + down 13.8-13.9 -> 12.9 us; Q4_K down gains nothing from unrolling); Q4_K
# gate/up 32 rows x 4 warps with its scale words by 16-byte loads (h200_decode/36: 25.8 -> 24.3 us; the down stage
# is 0.4 us slower with them), Q4_K down 2 rows, 1 warp, prefetched.
# Q4_K elsewhere than NVIDIA sm_90+ (Triton kernels; h quantized in the gate/up kernel); TUNED adds the Gluon tiles
TRITON_Q4 = Int8MoeConfig(block_n_gate_up=32, kstep_gate_up=2, warps_gate_up=4, block_n_down=2, kstep_down=8,
                          warps_down=1, prefetch_down=True, scale_vec_gate_up=True, fuse_quant_h=True,
                          maxnreg_gate_up=168)
TUNED = {
    # the unrolled Q2_K down kernel capped at 128 registers: quant h + down 13.0 -> 12.1 us (h200_decode/41; caps
    # on every other tuned stage measured slower) where Gluon is not; on sm_90+ the Gluon Q2_K down (h200_decode/69:
    # quant h + down 11.8 -> 9.6 us, whole q2 call 30.2-31.0 -> 28.6 us), since 78-79 4 rows x 2 warps, each its own
    # slots (FLAT), prefetched: quant h + down 9.5 -> 8.6-8.7 us, whole call 27.8-27.9 -> 27.3-27.4 us; since
    # h200_decode/85 the IQ2_XXS gate/up on moe_int8_gluon's kernel too, 1 row x 1 warp prefetched: quant u + gate/up
    # 18.6-18.7 -> 17.6-17.7 us, whole call 26.8-27.4 -> 26.3 us; since 92/93/95 2 rows with all 4 K steps' words
    # before the PDL wait (Prefetch.ALL): quant u + gate/up 17.6-18.0 -> 17.1-17.2 us, whole call 25.8-26.5 -> 25.2-25.9
    QuantFormat.IQ2_XXS: Int8MoeConfig(block_n_gate_up=4, kstep_gate_up=2, warps_gate_up=1, prefetch_gate_up=True,
                                       block_n_down=4, kstep_down=8, warps_down=1, x_vec_down=True, unroll_down=True,
                                       maxnreg_down=128, gluon_gate_up=Int8GluonTile(2, prefetch=Prefetch.ALL),
                                       gluon_down=Int8GluonTile(4, warps_k=2, prefetch=True)),
    # on sm_90+ the Gluon Q4_K stages (moe_int8_gluon): gate/up 4 rows x 1 warp, down 4 rows x 1 warp prefetched,
    # h quantized by its own launch there (fuse_quant_h is the Triton fallback's). h200_decode/64: the whole q4 call
    # 33.4 -> 30.1 us against the previous tuned config in the same run, 31.3 with h quantized in that gate/up
    # kernel; 66: 4 gate/up rows x 1 warp 29.4 us against 8 rows x 2 warps 30.0-30.1 (in 65 29.8-30.1 both); 78-79:
    # the down 8 rows x 2 warps, each its own slots (FLAT): whole call 28.9-29.0 -> 28.6 us
    QuantFormat.Q4_K: replace(TRITON_Q4, gluon_gate_up=Int8GluonTile(4), gluon_down=Int8GluonTile(8, warps_k=2)),
}
TUNED_TRITON = {fmt: replace(cfg, gluon_gate_up=None, gluon_down=None) for fmt, cfg in TUNED.items()}
# The same kernels on three activation planes (limbs=3) load three times the activation words per weight word:
# h200_decode/39 swept every tile again: IQ2_XXS gate/up 8 rows x 1 pair, 1 warp, prefetched, 16-byte activation
# loads (25.6 -> 22.9 us); Q2_K down unrolled, 4 rows x 4 warps, 16-byte loads (19.5 -> 17.3); Q4_K gate/up as
# TUNED (31.9); Q4_K down unrolled, 8 rows x 2 warps, 16-byte loads (25.2 -> 21.7). h200_decode/57 (gate/up register
# caps above 128, fused h quantizer or not): Q4_K as TUNED, h fused and 168 registers (whole call 57.1 -> 50.6 us,
# without the cap the fused kernel takes 180 registers and is slower: 64.0); IQ2_XXS gate/up at 168 registers,
# h not fused (40.8 -> 40.0-40.1 us; fused 40.5-40.7)
TUNED_LIMB3 = {
    # on sm_90+ the Gluon Q2_K down on three planes, 4 rows x 1 warp prefetched (h200_decode/69: quant h + down
    # 17.9-18.3 -> 12.7 us, whole q2 call 40.2 -> 34.6 us); since 82 8 rows x 2 warps, each its own slots (FLAT):
    # quant h + down 12.3-12.4 -> 12.1 us, whole call 34.0-34.2 -> 33.5-33.7 us; since h200_decode/85 the IQ2_XXS
    # gate/up on moe_int8_gluon's kernel, 2 rows x 1 warp: quant u + gate/up 21.6-21.7 -> 19.3 us, whole call
    # 33.4-33.6 -> 30.8-30.9 us
    QuantFormat.IQ2_XXS: Int8MoeConfig(block_n_gate_up=8, kstep_gate_up=1, warps_gate_up=1, prefetch_gate_up=True,
                                       x_vec_gate_up=True, block_n_down=4, kstep_down=8, warps_down=4,
                                       x_vec_down=True, unroll_down=True, maxnreg_gate_up=168,
                                       gluon_gate_up=Int8GluonTile(2), gluon_down=Int8GluonTile(8, warps_k=2)),
    # on sm_90+ the Gluon Q4_K stages on three planes: gate/up 2 rows x 1 warp, down 4 rows x 1 warp (h launched)
    # (h200_decode/66: quant u + gate/up 28.0 -> 20.2 us, quant h + down 22.9 -> 12.8 us against the Triton
    # stages; whole call 50.3 -> 34.1 us with the next-best pair of tiles)
    QuantFormat.Q4_K: replace(TRITON_Q4, block_n_down=8, warps_down=2, prefetch_down=False,
                              x_vec_down=True, unroll_down=True, gluon_gate_up=Int8GluonTile(2),
                              gluon_down=Int8GluonTile(4)),
}
CONFIGS = {
    "int8": None,  # TUNED for the gate/up format (Int8MoeConfig() for others)
    "int8_triton": TUNED_TRITON,
    "int8_base": Int8MoeConfig(),
    "int8_n8": Int8MoeConfig(block_n_gate_up=8, kstep_gate_up=4, warps_gate_up=2,
                             block_n_down=4, kstep_down=8, warps_down=1),
}


def _variant(cfg: Int8MoeConfig | dict | None, limbs: int = 1):
    """cfg: one config, one per gate/up format (dict), or None (TUNED / TUNED_LIMB3)."""
    def fn(u, gate, up, down, sel, weights, clamp, dev):
        c = cfg.get(gate.fmt) if isinstance(cfg, dict) else cfg
        return fused_int8(u, gate, up, down, sel, weights, clamp, dev, c, limbs)
    return fn


from .registry import KernelOp, register  # noqa: E402

_DOCS = {
    "int8": "Q8_K activations + dp4a int8 dots (ds4 CUDA decode), tiles tuned per format on the H200 (IQ2_XXS "
            "gate/up on sm_90+ moe_int8_gluon's kernel, 2 rows x 1 warp, every K step's words before the PDL wait, "
            "elsewhere 4 rows x 2 pairs, 1 warp, prefetch; Q2_K down on sm_90+ moe_int8_gluon's kernel, 4 rows x 2 "
            "warps (flat), prefetched, elsewhere 4 rows, 1 warp, unrolled over the K slots, 16-byte activation loads, "
            "at most 128 registers; Q4_K on sm_90+ moe_int8_gluon's kernels (gate/up 4 rows x 1 warp, h by its own "
            "launch; down 8 rows x 2 warps (flat)), elsewhere int8_triton's), programmatic dependent launch on sm_90+",
    "int8_triton": "int8 on the Triton kernels alone (Q4_K: the tuned config before the Gluon stages, h quantized in "
                   "the gate/up kernel; IQ2_XXS/Q2_K: int8's Triton tiles)",
    "int8_base": "int8 with one tile for every format: gate/up 16 rows x 2 pairs/blocks, 4 warps; down 8 rows x 8 "
                 "blocks, 2 warps",
    "int8_n8": "int8 with small programs: gate/up 8 rows x 4 pairs/blocks, 2 warps; down 4 rows, 1 warp",
}
for _name, _cfg in CONFIGS.items():
    register(KernelOp.MOE, _name, _variant(_cfg), formats=GATE_UP_FORMATS, max_t=MAX_T, doc=_DOCS[_name],
             act_quant=True)
# float semantics (act_quant False): u and h as three int8 planes, 2^-22 of each 256-block's max
register(KernelOp.MOE, "int8_limb3", _variant(None, LIMBS_FP32), formats=GATE_UP_FORMATS, max_t=MAX_T,
         doc="int8's kernels on fp32-grade activations: u and h as three int8 planes (hi, mid, lo of a 22-bit code "
             "per 256-block), three dp4a per decoded weight word; tiles TUNED_LIMB3 (H200 sweep)")
