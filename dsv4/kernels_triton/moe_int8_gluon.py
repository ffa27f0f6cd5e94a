"""moe_int8's stages written in Gluon (Triton's layout-explicit dialect), NVIDIA sm_90+: the Q4_K and IQ2_XXS gate/up
and the down stage for Q4_K and Q2_K experts.

Why: the Triton kernels (moe_int8._gate_up_int8_kernel, _down_int8_kernel) leave the register layout of their
[rows, blocks, 4, 8] word tiles to the compiler; Nsight Compute puts the gate/up at 18 % of the warp slots with
DRAM 45 % busy and the down stage at 83 % of L1 (tools/results/h200_decode/12, 55). Here one layout is chosen by
hand, [rows, super-blocks, LANES_PER_BLOCK lanes, 2 pieces, 4 words]: lane u's piece p is the 16 code bytes
32c + 16hf .. +15 of its super-block, c = (u >> 1) + 2p, hf = u & 1 (one 16-byte load each; low nibbles: sub-block
2c, high: 2c + 1). A warp covers BLOCKS_PER_WARP super-blocks, warps sit side by side along K and/or over rows,
and a lane holds its words for every row of its tile, so it reads the activation words its codes multiply once
per step for all its rows, the 16-code sums it needs are exactly Q8_K "bsums", and no value crosses lanes until
the final reduction. The layout also cuts the instructions per weight (these stages were issue-bound,
h200_decode/62-63): a lane's two pieces sit at one byte position of the packed 6-bit scale words and the piece
picks the packing at compile time, so each pair of adjacent sub-blocks' scales (and mins) decodes in two to four
instructions as byte pairs, applied by PTX dp2a; the nibble dots are dp4a chains (high nibbles masked in place,
dp4a.u32.s32, one shift after); a lane's four sub-blocks share one super-block, so one d dx product per step.
The K steps are unrolled (the down kernel's over (slot, K step)). A down tile with two warps along K at F = 2048
runs FLAT: the token's slots as one K axis, each warp its own slots, half the steps in each warp's chain
(tools/results/h200_decode/78: on one plane 0.4-0.9 us faster; on three planes slower, so not used there).

Q2_K (84-byte blocks: only word-aligned, so word loads) has its own layout in the same down kernel, [rows,
super-blocks, 2 halves, 2 lanes, 4 words] (_q2_offsets): a lane's four qs words hold, for each of the four 2-bit
shifts, one whole 16-weight sub-block, so each sub-block is one dp4a chain (the codes masked in place, one shift
after), the sub-blocks of shifts 0/1 and 2/3 pair up in one scale word (a byte permute with a per-lane selector
puts the pair's bytes side by side) and both their scales and their mins apply by dp2a
(tools/results/h200_decode/69: quant h + down 11.8 -> 9.6 us on one plane, 18 -> 12.7 us on three).

IQ2_XXS (66-byte blocks, read as 33-word pairs) has its own gate/up kernel (_iq2_gate_up_kernel), [rows, pairs,
2 blocks, 8 groups, 4 words]: one lane per 32-weight group, its three words (block 0's groups start two bytes into a
word: funnel-shifted) and its block's d by word loads, the 8 activation words of the group (quant_q8_k's iq2_order) by
two 16-byte loads per step shared by all its rows; each record (8 weights) is moe_int8's selector decode (a 16-bit
level selector gathered per grid index, the signs ORed in, two byte permutes) and two dp4a per plane
(tools/results/h200_decode/85: quant u + gate/up 21.6 -> 19.3 us on three planes, 18.6 -> 17.6 us on one).

Semantics are moe_int8's (TorchOps(act_quant=True).moe): the integer dots and the 6-bit scale and min products
are exact (int32), then d * d_x * isum and dmin * d_x * msum in fp32 as the Triton kernel, summed in another
order. Three activation planes (fp32-grade, quant_q8_k(limbs=3)): each plane's isum exact, combined in fp32 as
moe_int8._limb_sum, the min term from the fp32 code sums. h is quantized by its own launch (quantizing it in the
gate/up kernel, by the last program of each 256-block, was slower here: tools/results/h200_decode/63-65).

Gluon does not run under TRITON_INTERPRET: checked on the GPU (tests/gpu/test_moe_int8_gluon_gpu.py) and compiled
for sm_90 offline in the CPU suite (tests/kernels/test_moe_int8_gluon_compile.py; the IQ2_XXS lane layout and decode
replayed in numpy: tests/kernels/test_moe_int8_gluon_decode.py).
"""
from __future__ import annotations

from dataclasses import replace

import triton

from . import blocks, moe, moe_int8
from .blocks import DeviceWeight
from .configs import DeviceInfo, hopper_plus, pdl_launch
from .moe_int8 import (BLOCKS_PER_WARP, IQ2_PAIR_WORDS, QK, Q2K_WORDS, Q4K_WORDS, Q8K_WORDS, SUM_GROUP, SUMS_PER_BLOCK,
                       Int8GluonTile, Prefetch)
from ..quant.formats import QuantFormat

# without Gluon (Triton < 3.5) moe_int8 keeps its Triton stages
from .gluon_compat import HAVE_GLUON, gl, gluon

LANES_PER_BLOCK = 32 // BLOCKS_PER_WARP  # a super-block's 32 code words as 4 lanes x 2 pieces x 4 words
IQ2_PAIRS_PER_WARP = 2  # IQ2_XXS: one lane per 32-weight group, so a warp's step is 2 block pairs (1024 inputs)
ALL_STEPS_MAX = 4  # Prefetch.ALL holds every step's words in named registers (the IQ2_XXS gate/up's g1-g3, u1-u3)
GATE_UP_FORMATS = (QuantFormat.Q4_K, QuantFormat.IQ2_XXS)

if HAVE_GLUON:
    _BPW: gl.constexpr = gl.constexpr(BLOCKS_PER_WARP)
    _LPB: gl.constexpr = gl.constexpr(LANES_PER_BLOCK)
    _IQ2_PPW: gl.constexpr = gl.constexpr(IQ2_PAIRS_PER_WARP)
    PF_NONE: gl.constexpr = gl.constexpr(int(Prefetch.NONE))
    PF_NEXT: gl.constexpr = gl.constexpr(int(Prefetch.NEXT))
    PF_ALL: gl.constexpr = gl.constexpr(int(Prefetch.ALL))

    @gluon.jit
    def _prmt(a, b, sel):
        """Bytes of the 8-byte value b:a picked by the selector nibbles of sel (PTX prmt; sel may differ per lane,
        a constant one is folded into the instruction)."""
        return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _pack16(a, b):
        """The low 16 bits of a and of b as one int32 (a's in the low half)."""
        return _prmt(a, b, gl.full(a.shape, 0x5410, gl.int32, layout=a.type.layout))

    @gluon.jit
    def _dp2a_acc(a, b, c):
        """c + a.h0 b.b0 + a.h1 b.b1 (signed 16-bit halves of a, signed bytes 0 and 1 of b; exact): PTX dp2a.lo."""
        return gl.inline_asm_elementwise("dp2a.lo.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _dp2a(a, b):
        """_dp2a_acc onto 0."""
        return _dp2a_acc(a, b, gl.zeros_like(a))

    @gluon.jit
    def _words(t):
        """The four words of a thread's innermost axis ([..., 4], held in one thread) as four tensors [...]."""
        a, b = gl.split(t.reshape(t.shape[:-1] + [2, 2]))
        w0, w2 = gl.split(a)
        w1, w3 = gl.split(b)
        return w0, w1, w2, w3

    @gluon.jit
    def _words_sliced(t):
        """_words' four tensors in the layout of t's slice along its last axis (the same registers)."""
        w0, w1, w2, w3 = _words(t)
        L: gl.constexpr = gl.SliceLayout(len(t.shape) - 1, t.type.layout)
        return gl.convert_layout(w0, L), gl.convert_layout(w1, L), gl.convert_layout(w2, L), gl.convert_layout(w3, L)

    @gluon.jit
    def _dp4a_acc(a, b, c, ATYPE: gl.constexpr):
        """c + the four byte products of a (signed or unsigned bytes: ATYPE "s32" / "u32") and b (signed)."""
        return gl.inline_asm_elementwise("dp4a." + ATYPE + ".s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _dot4(q, x, ATYPE: gl.constexpr):
        """Sum over the innermost axis (4 words, one thread) of dp4a(q, x): one dp4a chain, no adds."""
        q0, q1, q2, q3 = _words(q)
        x0, x1, x2, x3 = _words(x)
        p = _dp4a_acc(q3, x3, _dp4a_acc(q2, x2, _dp4a_acc(q1, x1, _dp4a_acc(q0, x0, q0 * 0, ATYPE), ATYPE),
                                         ATYPE), ATYPE)
        return gl.convert_layout(p, gl.SliceLayout(len(q.shape) - 1, q.type.layout))  # the same registers

    @gluon.jit
    def _to_rows(acc):
        """Sum a per-lane accumulator over every axis but the rows."""
        for _ in gl.static_range(len(acc.shape) - 1):
            acc = gl.sum(acc, axis=len(acc.shape) - 1)
        return acc

    @gluon.jit
    def _gate_up_out(acc_g, min_g, acc_u, min_u, wt, clamp, h_row, rn, F):
        """A gate/up program's end: the per-lane sums [ROWS, ...] reduced to rows, SwiGLU and route weight, h
        stored."""
        g = _to_rows(acc_g) - _to_rows(min_g)
        u = _to_rows(acc_u) - _to_rows(min_u)
        gl.store(h_row + rn, moe._swiglu_route(g, u, wt, clamp), mask=rn < F)

    @gluon.constexpr_function
    def _axis_layout(layout, rank, dim):
        """The 1-d layout of axis `dim` of a rank-`rank` distributed layout."""
        for d in range(rank - 1, dim, -1):
            layout = gl.SliceLayout(d, layout)
        for _ in range(dim):
            layout = gl.SliceLayout(0, layout)
        return layout

    @gluon.jit
    def _iota(N: gl.constexpr, DIM: gl.constexpr, RANK: gl.constexpr, L: gl.constexpr):
        """arange(N) along axis DIM of the rank-RANK layout L, size 1 on the other axes."""
        x = gl.arange(0, N, layout=_axis_layout(L, RANK, DIM))
        for _ in gl.static_range(DIM):
            x = gl.expand_dims(x, 0)
        for d in gl.static_range(DIM + 1, RANK):
            x = gl.expand_dims(x, d)
        return x

    @gluon.constexpr_function
    def _tile_layout(rows, warps_k, warps_rows, q2=False):
        """The register layout of a tile: Q4_K [rows, super-blocks, lanes, 2 pieces, 4 words] (module docstring);
        q2: Q2_K [rows, super-blocks, 2 halves, 2 lanes, 4 words] (_q2_offsets)."""
        if q2:
            return gl.BlockedLayout([rows // warps_rows, 1, 1, 1, 4], [1, BLOCKS_PER_WARP, 2, LANES_PER_BLOCK // 2, 1],
                                    [warps_rows, warps_k, 1, 1, 1], [4, 3, 2, 1, 0])
        return gl.BlockedLayout([rows // warps_rows, 1, 1, 2, 4], [1, BLOCKS_PER_WARP, LANES_PER_BLOCK, 1, 1],
                                [warps_rows, warps_k, 1, 1, 1], [4, 3, 2, 1, 0])

    @gluon.jit
    def _lane_sums(ROWS: gl.constexpr, NB: gl.constexpr, L5: gl.constexpr):
        """A zeroed fp32 accumulator [ROWS, NB, lanes] (one per lane and row: _q4_step's acc / accm)."""
        return gl.zeros([ROWS, NB, _LPB], gl.float32, layout=gl.SliceLayout(3, gl.SliceLayout(4, L5)))

    @gluon.jit
    def _lane_offsets(L5: gl.constexpr, NB: gl.constexpr):
        """Word offsets of one K step (NB super-blocks) in the tile [rows, NB, 4 lanes, 2 pieces, 4 words] (module
        docstring). Returns the weight codes wq [1, NB, 4, 2, 4] and header
        words wh [1, NB, 1, 1, 4] from the row start, the activation words xo [NB, 4, 2, 4] (the high nibbles' are
        8 more), their code sums so [NB, 4, 2] (the high half's: 2 more), the scale index bo [NB, 4], the scale
        byte shift jm [1, 1, 4, 1], the piece pc [1, 1, 1, 2] and the header word index i5 [1, 1, 1, 1, 4]."""
        b = _iota(NB, 1, 5, L5)
        u = _iota(_LPB, 2, 5, L5)
        i5 = _iota(4, 4, 5, L5)
        wq = b * Q4K_WORDS + 4 + 16 * _iota(2, 3, 5, L5) + 4 * u + i5
        wh = b * Q4K_WORDS + i5
        LX: gl.constexpr = gl.SliceLayout(0, L5)
        ux = _iota(_LPB, 1, 4, LX)
        xo = (_iota(NB, 0, 4, LX) * Q8K_WORDS + 16 * (ux >> 1) + 32 * _iota(2, 2, 4, LX) + 4 * (ux & 1)
              + _iota(4, 3, 4, LX))
        L4: gl.constexpr = gl.SliceLayout(4, L5)
        LS: gl.constexpr = gl.SliceLayout(0, L4)
        us = _iota(_LPB, 1, 3, LS)
        so = _iota(NB, 0, 3, LS) * SUMS_PER_BLOCK + 4 * (us >> 1) + 8 * _iota(2, 2, 3, LS) + (us & 1)
        LB: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(3, L4))
        bo = _iota(NB, 0, 2, LB) + 0 * _iota(_LPB, 1, 2, LB)
        jm = 16 * (_iota(_LPB, 2, 4, L4) >> 1)
        return wq, wh, xo, so, bo, jm, _iota(2, 3, 4, L4), i5

    @gluon.jit
    def _acts(xq_row, xs_row, xd_row, kb, xo, so, bo, zero5, stride_l, LIMBS: gl.constexpr):
        """A slot's activations for the step at super-block kb: each plane's low / high code words (broadcast to
        the tile; LIMBS = 1: the three pairs are one), the code sums and the scales [1, NB, 4]. The sums: one
        plane, the low and high halves' int sums packed in one word (_pack16), returned twice; three planes (fp32
        bits), the two halves' fp32 values."""
        xl0 = gl.expand_dims(gl.load(xq_row + kb * Q8K_WORDS + xo), 0) + zero5
        xh0 = gl.expand_dims(gl.load(xq_row + kb * Q8K_WORDS + 8 + xo), 0) + zero5
        xl1, xh1, xl2, xh2 = xl0, xh0, xl0, xh0
        s_lo = gl.load(xs_row + kb * SUMS_PER_BLOCK + so)
        s_hi = gl.load(xs_row + kb * SUMS_PER_BLOCK + 2 + so)
        if LIMBS > 1:
            xl1 = gl.expand_dims(gl.load(xq_row + stride_l + kb * Q8K_WORDS + xo), 0) + zero5
            xh1 = gl.expand_dims(gl.load(xq_row + stride_l + kb * Q8K_WORDS + 8 + xo), 0) + zero5
            xl2 = gl.expand_dims(gl.load(xq_row + 2 * stride_l + kb * Q8K_WORDS + xo), 0) + zero5
            xh2 = gl.expand_dims(gl.load(xq_row + 2 * stride_l + kb * Q8K_WORDS + 8 + xo), 0) + zero5
            s_a = gl.expand_dims(s_lo.to(gl.float32, bitcast=True), 0)
            s_b = gl.expand_dims(s_hi.to(gl.float32, bitcast=True), 0)
        else:
            s_a = gl.expand_dims(_pack16(s_lo, s_hi), 0)
            s_b = s_a
        return xl0, xh0, xl1, xh1, xl2, xh2, s_a, s_b, gl.expand_dims(gl.load(xd_row + kb + bo), 0)

    @gluon.jit
    def _plane_isum(q, xl, xh, sc2):
        """One activation plane's exact sum over a lane's pieces of sc_j isum_j: the low nibbles of the code words
        q against xl, the high ones (masked in place: x 16, dotted unsigned; 0xF0F0F0F0) against xh."""
        pair = _pack16(_dot4(q & 0x0F0F0F0F, xl, "s32"), _dot4(q & -252645136, xh, "u32") >> 4)
        return gl.sum(_dp2a(pair, sc2), axis=3)

    @gluon.jit
    def _q4_step(q, hw, xl0, xh0, xl1, xh1, xl2, xh2, s_a, s_b, dx, jm, pc, i5, acc, accm, LIMBS: gl.constexpr):
        """One K step of one matrix: codes q [R, NB, 4, 2, 4] and header words hw [R, NB, 1, 1, 4] against
        the activations (_acts); adds d dx isum to acc and dmin dx msum to accm [R, NB, 4] (each lane's four
        sub-blocks summed in int32 first: one super-block, so one d and one dx). LIMBS = 3: each plane's isum
        exact (< 2^23), combined in fp32 as moe_int8._limb_sum; msum from the fp32 code sums."""
        dd = gl.sum(gl.sum(gl.where(i5 == 0, hw, 0), axis=4), axis=3)
        s0 = gl.sum(gl.where(i5 == 1, hw, 0), axis=4) >> jm
        s1 = gl.sum(gl.where(i5 == 2, hw, 0), axis=4) >> jm
        s2 = gl.sum(gl.where(i5 == 3, hw, 0), axis=4) >> jm
        low = pc == 0  # piece 0: sub-blocks 0-3 (6 bits in place); piece 1: 4-7 (low 4 bits + 2 high ones)
        sc2 = gl.where(low, s0 & 0x3F3F, (s2 & 0x0F0F) | ((s0 >> 2) & 0x3030))
        m2 = gl.where(low, s1 & 0x3F3F, ((s2 >> 4) & 0x0F0F) | ((s1 >> 2) & 0x3030))
        if LIMBS > 1:
            it = moe_int8._limb_sum(_plane_isum(q, xl0, xh0, sc2), _plane_isum(q, xl1, xh1, sc2),
                                    _plane_isum(q, xl2, xh2, sc2))
            mn = gl.sum((m2 & 255).to(gl.float32) * s_a + (m2 >> 8).to(gl.float32) * s_b, axis=3)
        else:
            it = _plane_isum(q, xl0, xh0, sc2).to(gl.float32)
            mn = gl.sum(_dp2a(s_a + gl.zeros_like(m2), m2), axis=3).to(gl.float32)
        acc += (blocks._f16_from_bits(dd) * dx) * it
        accm += (blocks._f16_from_bits(dd >> 16) * dx) * mn
        return acc, accm

    @gluon.jit
    def _q2_offsets(L5: gl.constexpr, NB: gl.constexpr):
        """Word offsets of one K step (NB Q2_K super-blocks) in the tile [rows, NB, 2 halves hf, 2 lanes e,
        4 words]: lane (hf, e) holds qs words 8 hf + 4 e .. +3, i.e. for each shift j the 16 weights
        128 hf + 32 j + 16 e .. +15, all of sub-block 8 hf + 2 j + e. Returns the codes wq [1, NB, 2, 2, 4], the
        header words wh [1, NB, 2, 1, 4] (scale words 2 hf and 2 hf + 1, d|dmin twice), the activation words xo
        [NB, 2, 2, 4] of shift 0 (shift j's: 8 j more), the code sums so [NB, 2, 2] of shift 0 (2 j more), the
        scale index bo [NB, 1, 1], the byte selector pe [1, 1, 1, 2] that moves a scale word's bytes e and
        2 + e (the sub-blocks of shifts 0 and 1, or 2 and 3) to bytes 0 and 1, and the word index i5."""
        b = _iota(NB, 1, 5, L5)
        hf = _iota(2, 2, 5, L5)
        i5 = _iota(4, 4, 5, L5)
        wq = b * Q2K_WORDS + 4 + 8 * hf + 4 * _iota(2, 3, 5, L5) + i5
        wh = b * Q2K_WORDS + gl.where(i5 < 2, 2 * hf + i5, Q2K_WORDS - 1)
        LX: gl.constexpr = gl.SliceLayout(0, L5)
        xo = _iota(NB, 0, 4, LX) * Q8K_WORDS + 32 * _iota(2, 1, 4, LX) + 4 * _iota(2, 2, 4, LX) + _iota(4, 3, 4, LX)
        LS: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(4, L5))
        so = _iota(NB, 0, 3, LS) * SUMS_PER_BLOCK + 8 * _iota(2, 1, 3, LS) + _iota(2, 2, 3, LS)
        pe = 0x20 + 0x11 * _iota(2, 3, 4, gl.SliceLayout(4, L5))
        return wq, wh, xo, so, _iota(NB, 0, 3, LS), pe, i5

    @gluon.constexpr_function
    def _q2_mask(j):
        """0x03030303 << 2 j as a signed int32 constant."""
        m = 0x03030303 << (2 * j)
        return m - (1 << 32) if m >= 1 << 31 else m

    @gluon.jit
    def _q2_shift_dot(q, x_row, xo, zero5, J: gl.constexpr):
        """Each lane's 16-weight dot of shift J: the codes masked in place (x 4^J, unsigned bytes) dotted by one
        dp4a chain, then shifted back (exact)."""
        x = gl.expand_dims(gl.load(x_row + 8 * J + xo), 0) + zero5
        return _dot4(q & _q2_mask(J), x, "u32") >> (2 * J)

    @gluon.jit
    def _q2_plane_isum(q, x_row, xo, zero5, sc01, sc23):
        """One activation plane's exact sum over a lane's four sub-blocks of sc_j isum_j (two dp2a on pairs)."""
        p01 = _pack16(_q2_shift_dot(q, x_row, xo, zero5, 0), _q2_shift_dot(q, x_row, xo, zero5, 1))
        p23 = _pack16(_q2_shift_dot(q, x_row, xo, zero5, 2), _q2_shift_dot(q, x_row, xo, zero5, 3))
        return _dp2a_acc(p23, sc23, _dp2a(p01, sc01))

    @gluon.jit
    def _q2_step(q, hw, x_row, s_row, d_row, kb, xo, so, bo, pe, i5, zero5, acc, accm, stride_l,
                 LIMBS: gl.constexpr):
        """One K step of Q2_K codes q [R, NB, 2, 2, 4] and header words hw [R, NB, 2, 1, 4] (_q2_offsets) against
        the activations at super-block kb (codes x_row, sums s_row, scales d_row): adds d dx isum to acc and
        dmin dx msum to accm [R, NB, 2, 2] (quant.md 1.4). LIMBS = 3: each plane's isum exact (< 2^19), combined
        in fp32 as moe_int8._limb_sum; msum from the fp32 code sums."""
        zero4 = gl.sum(zero5, axis=4)
        s01 = gl.sum(gl.where(i5 == 0, hw, 0), axis=4) + zero4
        s23 = gl.sum(gl.where(i5 == 1, hw, 0), axis=4) + zero4
        t01 = _prmt(s01, s01, pe + zero4)
        t23 = _prmt(s23, s23, pe + zero4)
        dd = gl.sum(gl.where(i5 == 2, hw, 0), axis=4)
        sc01, sc23 = t01 & 0x0F0F, t23 & 0x0F0F
        m01, m23 = (t01 >> 4) & 0x0F0F, (t23 >> 4) & 0x0F0F
        xr = x_row + kb * Q8K_WORDS
        sp = s_row + kb * SUMS_PER_BLOCK + so
        hi = _q2_plane_isum(q, xr, xo, zero5, sc01, sc23)
        s0 = gl.expand_dims(gl.load(sp), 0)
        s1 = gl.expand_dims(gl.load(sp + 2), 0)
        s2 = gl.expand_dims(gl.load(sp + 4), 0)
        s3 = gl.expand_dims(gl.load(sp + 6), 0)
        if LIMBS > 1:
            it = moe_int8._limb_sum(hi, _q2_plane_isum(q, xr + stride_l, xo, zero5, sc01, sc23),
                                    _q2_plane_isum(q, xr + 2 * stride_l, xo, zero5, sc01, sc23))
            mn = ((m01 & 255).to(gl.float32) * s0.to(gl.float32, bitcast=True)
                  + (m01 >> 8).to(gl.float32) * s1.to(gl.float32, bitcast=True)
                  + (m23 & 255).to(gl.float32) * s2.to(gl.float32, bitcast=True)
                  + (m23 >> 8).to(gl.float32) * s3.to(gl.float32, bitcast=True))
        else:
            it = hi.to(gl.float32)
            mn = _dp2a_acc(_pack16(s2 + zero4, s3 + zero4), m23, _dp2a(_pack16(s0 + zero4, s1 + zero4), m01))
            mn = mn.to(gl.float32)
        dx = gl.expand_dims(gl.load(d_row + kb + bo), 0)
        acc += (blocks._f16_from_bits(dd) * dx) * it
        accm += (blocks._f16_from_bits(dd >> 16) * dx) * mn
        return acc, accm

    @gluon.jit
    def _slot_rows(sel_ptr, wts_ptr, KSEL, ROWS: gl.constexpr, L5: gl.constexpr):
        """A gate/up program's (slot, token, expert, route weight, its ROWS rows f along axis 0 of L5) for program
        (slot, row tile)."""
        slot = gl.program_id(0)
        t = (slot // KSEL).to(gl.int64)
        e = gl.load(sel_ptr + slot).to(gl.int64)
        wt = gl.load(wts_ptr + slot).to(gl.float32)
        return slot, t, e, wt, gl.program_id(1) * ROWS + gl.arange(0, ROWS, layout=_axis_layout(L5, 5, 0))

    @gluon.jit
    def _q4_gate_up_kernel(xq_ptr, xd_ptr, xs_ptr, sel_ptr, wts_ptr, h_ptr, gw_ptr, uw_ptr, F, D, KSEL, clamp,
                           stride_w, stride_xq, stride_xd, stride_xs, stride_ht, stride_xl, ROWS: gl.constexpr,
                           WARPS_K: gl.constexpr, WARPS_ROWS: gl.constexpr, PF: gl.constexpr, PDL: gl.constexpr,
                           STEPS: gl.constexpr, LIMBS: gl.constexpr = 1):
        """h[slot, f] = swiglu(gate[e] @ u[t], up[e] @ u[t]) * wts[slot] for ROWS rows f of one slot
        (t = slot // KSEL, e = sel[slot]), u as quant_q8_k's (codes xq, scales xd, sums xs); weights as int32
        words, stride_w per row. Rows past F read row F - 1 (not stored). The STEPS (= D / (256 NB)) K steps
        unrolled; PF: each step's weight words load before the previous step computes (the first step's before the
        wait in any case). LIMBS = 3: u as three planes, stride_xl words apart (quant_q8_k(limbs=3))."""
        L5: gl.constexpr = _tile_layout(ROWS, WARPS_K, WARPS_ROWS)
        NB: gl.constexpr = _BPW * WARPS_K
        slot, t, e, wt, rn = _slot_rows(sel_ptr, wts_ptr, KSEL, ROWS, L5)
        wq, wh, xo, so, bo, jm, pc, i5 = _lane_offsets(L5, NB)
        r5 = _rows5((e * F + gl.minimum(rn, F - 1)) * stride_w)
        qoff = r5 + wq
        hoff = r5 + wh
        zero5 = gl.full([ROWS, NB, _LPB, 2, 4], 0, gl.int32, layout=L5)
        acc_g = _lane_sums(ROWS, NB, L5)
        acc_u = _lane_sums(ROWS, NB, L5)
        min_g = _lane_sums(ROWS, NB, L5)
        min_u = _lane_sums(ROWS, NB, L5)
        gq = gl.load(gw_ptr + qoff)
        gh = gl.load(gw_ptr + hoff)
        uq = gl.load(uw_ptr + qoff)
        uh = gl.load(uw_ptr + hoff)
        blocks.pdl_wait(PDL)  # u's codes come from the previous kernel (sel and the route weights are older)
        for step in gl.static_range(STEPS):
            cgq, cgh, cuq, cuh = gq, gh, uq, uh
            nxt = (step + 1) * NB * Q4K_WORDS
            if PF and step + 1 < STEPS:
                gq = gl.load(gw_ptr + qoff + nxt)
                gh = gl.load(gw_ptr + hoff + nxt)
                uq = gl.load(uw_ptr + qoff + nxt)
                uh = gl.load(uw_ptr + hoff + nxt)
            xl0, xh0, xl1, xh1, xl2, xh2, s_a, s_b, dx = _acts(
                xq_ptr + t * stride_xq, xs_ptr + t * stride_xs, xd_ptr + t * stride_xd, step * NB, xo, so, bo, zero5,
                stride_xl, LIMBS)
            acc_g, min_g = _q4_step(cgq, cgh, xl0, xh0, xl1, xh1, xl2, xh2, s_a, s_b, dx, jm, pc, i5, acc_g, min_g,
                                    LIMBS)
            acc_u, min_u = _q4_step(cuq, cuh, xl0, xh0, xl1, xh1, xl2, xh2, s_a, s_b, dx, jm, pc, i5, acc_u, min_u,
                                    LIMBS)
            if not PF and step + 1 < STEPS:
                gq = gl.load(gw_ptr + qoff + nxt)
                gh = gl.load(gw_ptr + hoff + nxt)
                uq = gl.load(uw_ptr + qoff + nxt)
                uh = gl.load(uw_ptr + hoff + nxt)
        _gate_up_out(acc_g, min_g, acc_u, min_u, wt, clamp, h_ptr + slot.to(gl.int64) * stride_ht, rn, F)

    @gluon.jit
    def _step_words(gw_ptr, uw_ptr, off, g, u, LOAD: gl.constexpr):
        """Gate's and up's words at off where LOAD, else g and u (a step past the last: never read)."""
        if LOAD:
            g = gl.load(gw_ptr + off)
            u = gl.load(uw_ptr + off)
        return g, u

    @gluon.jit
    def _pick4(i: gl.constexpr, a, b, c, d):
        """The i-th of a, b, c, d (i a compile-time step index)."""
        if i == 0:
            r = a
        elif i == 1:
            r = b
        elif i == 2:
            r = c
        else:
            r = d
        return r

    @gluon.jit
    def _funnel(lo, hi, sh):
        """The 32 bits of the 64-bit hi:lo from bit sh on (PTX shf.r.clamp; sh may differ per lane)."""
        return gl.inline_asm_elementwise("shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sh], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.constexpr_function
    def _iq2_layout(rows, warps_k, warps_rows):
        """The register layout of an IQ2_XXS gate/up tile [rows, pairs, 2 blocks, 8 groups, 4 words] (_iq2_offsets):
        lane (pair, block, group) of a warp, a warp's pairs side by side along K, the rows in registers."""
        return gl.BlockedLayout([rows // warps_rows, 1, 1, 1, 4], [1, IQ2_PAIRS_PER_WARP, 2, 8, 1],
                                [warps_rows, warps_k, 1, 1, 1], [4, 3, 2, 1, 0])

    @gluon.jit
    def _iq2_offsets(L5: gl.constexpr, NP: gl.constexpr):
        """Word offsets of one K step (NP IQ2_XXS block pairs, 33 words each) in the tile [rows, NP, 2 blocks h,
        8 groups g, 4 words]: lane (p, h, g) holds the three words its group's 8 bytes (4 grid indices, then the
        sign and scale word) lie in, and the word of its block's d. Block 1's groups are word-aligned (words
        17 + 2 g, 18 + 2 g; its third word repeats the second), block 0's start two bytes into word 2 g (read
        across words 2 g .. 2 g + 2, funnel-shifted by 16); d of block 0 is the low half of word 0, of block 1
        the high half of word 16. Returns the weight words wo [1, NP, 2, 8, 4], the funnel shift sh [1, 1, 2, 1]
        (16 for block 0, 0 for block 1), the activation words xo [NP, 2, 8, 4] of the group's first 16 codes
        (the next 16: 4 more) and the super-block index bo [NP, 2, 8]."""
        h = _iota(2, 2, 5, L5)
        i5 = _iota(4, 4, 5, L5)
        aux = 2 * _iota(8, 3, 5, L5) + 17 * h + gl.minimum(i5, 2 - h)
        wo = _iota(NP, 1, 5, L5) * IQ2_PAIR_WORDS + gl.where(i5 == 3, 16 * h, aux)
        sh = 16 - 16 * _iota(2, 2, 4, gl.SliceLayout(4, L5))
        LX: gl.constexpr = gl.SliceLayout(0, L5)
        xo = ((2 * _iota(NP, 0, 4, LX) + _iota(2, 1, 4, LX)) * Q8K_WORDS + 8 * _iota(8, 2, 4, LX)
              + _iota(4, 3, 4, LX))
        LB: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(4, L5))
        bo = 2 * _iota(NP, 0, 3, LB) + _iota(2, 1, 3, LB) + 0 * _iota(8, 2, 3, LB)
        return wo, sh, xo, bo

    @gluon.jit
    def _iq2_record(aux0, aux1, K: gl.constexpr, sel16_ptr):
        """Record K (coordinates 8 K .. 8 K + 7 of the group) as two words of signed int8 magnitudes in selector
        order (moe_int8._iq2_half_sel: coordinates (0, 4, 1, 5) and (2, 6, 3, 7)): its grid index gathers the
        16-bit level selector (blocks.iq2_sel16), spread to nibbles; its 7 sign bits go to bit 2 of their
        nibbles (blocks.iq2_signs' spread), the 8th sign the parity of the 7 (popc); two byte permutes pick the
        magnitudes from {8, 25, 43} and {-8, -25, -43}."""
        gi = (aux0 >> (8 * K)) & 255
        v = gl.load(sel16_ptr + gi).to(gl.int32) & 0xFFFF
        sidx = (aux1 >> (7 * K)) & 127
        par = gl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [sidx], dtype=gl.int32, is_pure=True, pack=1)
        sel = (((v | (v << 14)) & 0x33333333) | (((sidx * blocks.SIGN_SPREAD) << 2) & 0x44444444)
               | ((par & 1) << 30))
        pos = gl.full(sel.shape, blocks.IQ2_POS_BYTES, gl.int32, layout=sel.type.layout)
        neg = gl.full(sel.shape, blocks.IQ2_NEG_BYTES, gl.int32, layout=sel.type.layout)
        return _prmt(pos, neg, sel), _prmt(pos, neg, sel >> 16)

    @gluon.jit
    def _iq2_plane(x_row, xo, zero5):
        """One activation plane's 8 code words of each lane's group (two 16-byte loads, the tile's rows sharing
        them) as eight tensors [1, NP, 2, 8]."""
        a0, a1, a2, a3 = _words_sliced(gl.expand_dims(gl.load(x_row + xo), 0) + zero5)
        a4, a5, a6, a7 = _words_sliced(gl.expand_dims(gl.load(x_row + 4 + xo), 0) + zero5)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @gluon.jit
    def _iq2_isum(lo, hi, K: gl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7, acc):
        """acc + record K's two decoded words dotted with their activation words (2 K, 2 K + 1): two dp4a."""
        if K == 0:
            xa, xb = x0, x1
        elif K == 1:
            xa, xb = x2, x3
        elif K == 2:
            xa, xb = x4, x5
        else:
            xa, xb = x6, x7
        return _dp4a_acc(hi, xb, _dp4a_acc(lo, xa, acc, "s32"), "s32")

    @gluon.jit
    def _iq2_step(q, x_row, xo, dx, sh, zero5, sel16_ptr, acc, stride_l, LIMBS: gl.constexpr):
        """One K step of one matrix: the group words q [R, NP, 2, 8, 4] (_iq2_offsets) against the activation
        codes at x_row (quant_q8_k's iq2_order) and scales dx [1, NP, 2, 8]; adds d dx (2 ls + 1) isum to acc
        [R, NP, 2, 8] (the 1/8 of quant.md 1.6 is the caller's). LIMBS = 3: each plane's isum exact, combined in
        fp32 as moe_int8._limb_sum (each (limb sum) (2 ls + 1) < 2^23)."""
        w0, w1, w2, wd = _words_sliced(q)
        s = sh + gl.zeros_like(w0)
        aux0 = _funnel(w0, w1, s)
        aux1 = _funnel(w1, w2, s)
        d = blocks._f16_from_bits(wd >> (16 - s))
        x0, x1, x2, x3, x4, x5, x6, x7 = _iq2_plane(x_row, xo, zero5)
        isum = gl.zeros_like(w0)
        if LIMBS > 1:
            m0, m1, m2, m3, m4, m5, m6, m7 = _iq2_plane(x_row + stride_l, xo, zero5)
            o0, o1, o2, o3, o4, o5, o6, o7 = _iq2_plane(x_row + 2 * stride_l, xo, zero5)
            isum_m = gl.zeros_like(w0)
            isum_o = gl.zeros_like(w0)
        for k in gl.static_range(4):
            lo, hi = _iq2_record(aux0, aux1, k, sel16_ptr)
            isum = _iq2_isum(lo, hi, k, x0, x1, x2, x3, x4, x5, x6, x7, isum)
            if LIMBS > 1:
                isum_m = _iq2_isum(lo, hi, k, m0, m1, m2, m3, m4, m5, m6, m7, isum_m)
                isum_o = _iq2_isum(lo, hi, k, o0, o1, o2, o3, o4, o5, o6, o7, isum_o)
        ls = 2 * ((aux1 >> 28) & 15) + 1
        if LIMBS > 1:
            term = moe_int8._limb_sum(isum * ls, isum_m * ls, isum_o * ls)
        else:
            term = (isum * ls).to(gl.float32)
        return acc + (d * dx) * term

    @gluon.jit
    def _iq2_gate_up_kernel(xq_ptr, xd_ptr, sel_ptr, wts_ptr, h_ptr, gw_ptr, uw_ptr, sel16_ptr, F, D, KSEL, clamp,
                            stride_w, stride_xq, stride_xd, stride_ht, stride_xl, ROWS: gl.constexpr,
                            WARPS_K: gl.constexpr, WARPS_ROWS: gl.constexpr, PF: gl.constexpr, PDL: gl.constexpr,
                            STEPS: gl.constexpr, LIMBS: gl.constexpr = 1):
        """_q4_gate_up_kernel for IQ2_XXS gate/up rows (int32 words, stride_w per row; 66-byte blocks in 33-word
        pairs) against u as quant_q8_k(iq2_order=True)'s codes xq and scales xd: one lane per 32-weight group
        (_iq2_offsets), its 8 activation words loaded once per step for all its rows; STEPS = D / (1024 WARPS_K)
        K steps unrolled, PF a Prefetch (ALL: every step's words before the wait, STEPS <= ALL_STEPS_MAX). LIMBS = 3: u
        as three planes, stride_xl words apart."""
        L5: gl.constexpr = _iq2_layout(ROWS, WARPS_K, WARPS_ROWS)
        NP: gl.constexpr = _IQ2_PPW * WARPS_K
        slot, t, e, wt, rn = _slot_rows(sel_ptr, wts_ptr, KSEL, ROWS, L5)
        wo, sh, xo, bo = _iq2_offsets(L5, NP)
        off = _rows5((e * F + gl.minimum(rn, F - 1)) * stride_w) + wo
        zero5 = gl.full([ROWS, NP, 2, 8, 4], 0, gl.int32, layout=L5)
        acc_g = gl.zeros([ROWS, NP, 2, 8], gl.float32, layout=gl.SliceLayout(4, L5))
        acc_u = gl.zeros_like(acc_g)
        gq = gl.load(gw_ptr + off)
        uq = gl.load(uw_ptr + off)
        SW: gl.constexpr = NP * IQ2_PAIR_WORDS  # words per step
        if PF == PF_ALL:  # steps 1-3 too, before the wait (named registers: at most 4 steps)
            g1, u1 = _step_words(gw_ptr, uw_ptr, off + SW, gq, uq, 1 < STEPS)
            g2, u2 = _step_words(gw_ptr, uw_ptr, off + 2 * SW, gq, uq, 2 < STEPS)
            g3, u3 = _step_words(gw_ptr, uw_ptr, off + 3 * SW, gq, uq, 3 < STEPS)
        blocks.pdl_wait(PDL)  # u's codes come from the previous kernel (sel and the route weights are older)
        for step in gl.static_range(STEPS):
            if PF == PF_ALL:
                cgq, cuq = _pick4(step, gq, g1, g2, g3), _pick4(step, uq, u1, u2, u3)
            else:
                cgq, cuq = gq, uq
            nxt = (step + 1) * SW
            if PF == PF_NEXT and step + 1 < STEPS:
                gq = gl.load(gw_ptr + off + nxt)
                uq = gl.load(uw_ptr + off + nxt)
            kb = step * 2 * NP  # the step's first super-block
            x_row = xq_ptr + t * stride_xq + kb * Q8K_WORDS
            dx = gl.expand_dims(gl.load(xd_ptr + t * stride_xd + kb + bo), 0)
            acc_g = _iq2_step(cgq, x_row, xo, dx, sh, zero5, sel16_ptr, acc_g, stride_xl, LIMBS)
            acc_u = _iq2_step(cuq, x_row, xo, dx, sh, zero5, sel16_ptr, acc_u, stride_xl, LIMBS)
            if PF == PF_NONE and step + 1 < STEPS:
                gq = gl.load(gw_ptr + off + nxt)
                uq = gl.load(uw_ptr + off + nxt)
        g = _to_rows(acc_g) * 0.125
        u = _to_rows(acc_u) * 0.125
        gl.store(h_ptr + slot.to(gl.int64) * stride_ht + rn, moe._swiglu_route(g, u, wt, clamp), mask=rn < F)

    @gluon.jit
    def _rows5(roff):
        """[ROWS] word offsets of rows -> [ROWS, 1, 1, 1, 1]."""
        return gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(roff, 1), 2), 3), 4)

    @gluon.jit
    def _down_rows(sel_t, rc, D, stride_w, step, L5: gl.constexpr, NB: gl.constexpr, WORDS: gl.constexpr,
                   KSTEPS: gl.constexpr, FLAT: gl.constexpr):
        """Word offsets [ROWS, 1 or NB, 1, 1, 1] of step `step`'s weight rows (plus the tile's b * WORDS: wq, wh).
        KSTEPS steps per slot; FLAT (KSTEPS super-blocks per row): a step spans NB / KSTEPS slots, super-block b
        of the step in slot (step NB + b) / KSTEPS."""
        if FLAT:
            b = _iota(NB, 1, 5, L5)
            g = step * NB + b  # the super-block's index in the token's run of slots
            e = gl.load(sel_t + g // KSTEPS).to(gl.int64)
            r5 = _rows5(rc.to(gl.int64) * stride_w) + e * D * stride_w + (g % KSTEPS - b) * WORDS
        else:
            r5 = (_rows5((gl.load(sel_t + step // KSTEPS).to(gl.int64) * D + rc) * stride_w)
                  + (step % KSTEPS) * NB * WORDS)
        return r5

    @gluon.jit
    def _down_slot(t, KSEL, step, NB: gl.constexpr, KSTEPS: gl.constexpr, FLAT: gl.constexpr):
        """(h row, first super-block in it) that step `step` of token t reads its activations from: _down_rows'
        step on the activation side; FLAT: the token's slot rows as one run of super-blocks."""
        if FLAT:
            return t.to(gl.int64) * KSEL, step * NB
        else:
            return t.to(gl.int64) * KSEL + step // KSTEPS, (step % KSTEPS) * NB

    @gluon.jit
    def _down_kernel(hq_ptr, hd_ptr, hs_ptr, sel_ptr, out_ptr, w_ptr, F, D, KSEL, stride_w, stride_hq, stride_hd,
                     stride_hs, stride_ot, stride_hl, ROWS: gl.constexpr, WARPS_K: gl.constexpr,
                     WARPS_ROWS: gl.constexpr, PF: gl.constexpr, PDL: gl.constexpr, KSTEPS: gl.constexpr,
                     STEPS: gl.constexpr, LIMBS: gl.constexpr = 1, Q2: gl.constexpr = False,
                     FLAT: gl.constexpr = False):
        """out[t, d] = sum over i < KSEL of down[sel[t KSEL + i]][d, :] @ h[t KSEL + i, :] for ROWS rows d, h as
        quant_q8_k's (codes hq, scales hd, sums hs): the STEPS = KSEL KSTEPS (KSTEPS = F / (256 NB)) (slot, K step)
        steps unrolled in order, every term in its lane until the final reduction (deterministic); PF as
        _q4_gate_up_kernel's. Each step's rows depend on a load of its expert id: unrolled, no step waits for the
        previous one's. LIMBS = 3: h as three planes, stride_hl words apart. Q2: Q2_K weights (_q2_offsets), else
        Q4_K. FLAT (NB a multiple of the F / 256 = KSTEPS super-blocks of a row; h's slot rows contiguous): the
        token's slots as one K axis, a step takes NB / KSTEPS slots side by side (with WARPS_K warps, each warp its
        own slots: fewer steps in each warp's chain), STEPS = KSEL KSTEPS / NB."""
        L5: gl.constexpr = _tile_layout(ROWS, WARPS_K, WARPS_ROWS, Q2)
        NB: gl.constexpr = _BPW * WARPS_K
        WORDS: gl.constexpr = Q2K_WORDS if Q2 else Q4K_WORDS
        t = gl.program_id(0)
        pid_n = gl.program_id(1)
        rn = pid_n * ROWS + gl.arange(0, ROWS, layout=_axis_layout(L5, 5, 0))
        rc = gl.minimum(rn, D - 1)
        if Q2:
            wq, wh, xo, so, bo, pe, i5 = _q2_offsets(L5, NB)
            acc = gl.zeros([ROWS, NB, 2, _LPB // 2], gl.float32, layout=gl.SliceLayout(4, L5))
            zero5 = gl.full([ROWS, NB, 2, _LPB // 2, 4], 0, gl.int32, layout=L5)
        else:
            wq, wh, xo, so, bo, jm, pc, i5 = _lane_offsets(L5, NB)
            acc = _lane_sums(ROWS, NB, L5)
            zero5 = gl.full([ROWS, NB, _LPB, 2, 4], 0, gl.int32, layout=L5)
        accm = gl.zeros_like(acc)
        sel_t = sel_ptr + t * KSEL  # the token's expert ids (older than the previous kernel)
        r5 = _down_rows(sel_t, rc, D, stride_w, 0, L5, NB, WORDS, KSTEPS, FLAT)
        q = gl.load(w_ptr + r5 + wq)
        hw = gl.load(w_ptr + r5 + wh)
        blocks.pdl_wait(PDL)  # h's codes come from the previous kernel
        for step in gl.static_range(STEPS):
            cq, chw = q, hw
            if step + 1 < STEPS:
                r5 = _down_rows(sel_t, rc, D, stride_w, step + 1, L5, NB, WORDS, KSTEPS, FLAT)
                if PF:
                    q = gl.load(w_ptr + r5 + wq)
                    hw = gl.load(w_ptr + r5 + wh)
            slot, kb = _down_slot(t, KSEL, step, NB, KSTEPS, FLAT)
            if Q2:
                acc, accm = _q2_step(cq, chw, hq_ptr + slot * stride_hq, hs_ptr + slot * stride_hs,
                                     hd_ptr + slot * stride_hd, kb, xo, so, bo, pe, i5, zero5, acc,
                                     accm, stride_hl, LIMBS)
            else:
                xl0, xh0, xl1, xh1, xl2, xh2, s_a, s_b, dx = _acts(
                    hq_ptr + slot * stride_hq, hs_ptr + slot * stride_hs, hd_ptr + slot * stride_hd,
                    kb, xo, so, bo, zero5, stride_hl, LIMBS)
                acc, accm = _q4_step(cq, chw, xl0, xh0, xl1, xh1, xl2, xh2, s_a, s_b, dx, jm, pc, i5, acc, accm,
                                     LIMBS)
            if not PF and step + 1 < STEPS:
                q = gl.load(w_ptr + r5 + wq)
                hw = gl.load(w_ptr + r5 + wh)
        gl.store(out_ptr + t.to(gl.int64) * stride_ot + rn, _to_rows(acc) - _to_rows(accm), mask=rn < D)


def _tile_ok(tile: Int8GluonTile, n_rows: int, k: int, block_k: int | None = None) -> bool:
    """Whether the tile's rows and warps make a layout and its steps (block_k inputs: the tile's own unless given)
    and row tiles cover k inputs and n_rows rows whole."""
    return (tile.rows % tile.warps_rows == 0 and (tile.rows // tile.warps_rows) & (tile.rows // tile.warps_rows - 1)
            == 0 and tile.warps_k & (tile.warps_k - 1) == 0 and k % (block_k or tile.block_k) == 0
            and n_rows % tile.rows == 0)


def _words_plan(key, owner: DeviceWeight, build):
    """owner.plans[key], made once by build() (the weights' word views and the static checks do not change)."""
    if key not in owner.plans:
        owner.plans[key] = build()
    return owner.plans[key]


def _prefetch(tile: Int8GluonTile, steps: int = 0) -> int:
    """The kernel's PF: tile.prefetch, Prefetch.ALL only where the kernel takes it (the IQ2_XXS gate/up, which passes
    its steps: at most ALL_STEPS_MAX); elsewhere NEXT (h200_decode/95-96: slower on the Q4_K gate/up and the down
    kernels, whose registers it raises to 239-255)."""
    pf = Prefetch(int(tile.prefetch))
    return int(Prefetch.NEXT if pf == Prefetch.ALL and not 0 < steps <= ALL_STEPS_MAX else pf)


def iq2_block_k(tile: Int8GluonTile) -> int:
    """Inputs per K step of the IQ2_XXS gate/up kernel: IQ2_PAIRS_PER_WARP block pairs per warp along K."""
    return IQ2_PAIRS_PER_WARP * moe_int8.IQ2_PAIR * tile.warps_k


def _gate_up_plan(gate: DeviceWeight, up: DeviceWeight, tile: Int8GluonTile):
    """(gate words, up words, words per row) where the Gluon gate/up takes these weights and tile (Q4_K or IQ2_XXS, K
    a whole number of steps, F of row tiles; Q4_K rows 16-byte aligned: its 16-byte code loads; IQ2_XXS reads words),
    else None; cached in gate's plans."""
    def build():
        E, F, D = gate.shape
        if gate.fmt not in GATE_UP_FORMATS or up.fmt != gate.fmt:
            return None
        gw, stride_w = moe_int8._words(gate)
        uw, _ = moe_int8._words(up)
        if gate.fmt == QuantFormat.IQ2_XXS:
            ok = _tile_ok(tile, F, D, iq2_block_k(tile))
        else:
            ok = _tile_ok(tile, F, D) and moe_int8._aligned16(gw, stride_w) and moe_int8._aligned16(uw, stride_w)
        return (gw, uw, stride_w) if ok else None
    return _words_plan(("moe_int8_gluon", "gate_up", tile, up.buf.data_ptr()), gate, build)


def _down_plan(down: DeviceWeight, tile: Int8GluonTile):
    """(down words, words per row) where the Gluon down kernel takes this weight and tile (Q2_K, or Q4_K with rows
    16-byte aligned (its 16-byte code loads; Q2_K's are word loads); F a whole number of steps, D of row tiles),
    else None; cached in its plans."""
    def build():
        E, D, F = down.shape
        if down.fmt not in (QuantFormat.Q2_K, QuantFormat.Q4_K):
            return None
        dw, stride_w = moe_int8._words(down)
        aligned = down.fmt == QuantFormat.Q2_K or moe_int8._aligned16(dw, stride_w)
        return (dw, stride_w) if (_tile_ok(tile, D, F) or _flat_ok(tile, D, F)) and aligned else None
    return _words_plan(("moe_int8_gluon", "down", tile), down, build)


def _flat_ok(tile: Int8GluonTile, n_rows: int, f: int) -> bool:
    """Whether the down kernel's FLAT mode takes the tile: warps along K, a step a whole number of F-input rows wide
    (more than one), _tile_ok's row conditions (the slot count is checked per call: flat_steps)."""
    return (tile.warps_k > 1 and tile.block_k > f and tile.block_k % f == 0 and f % QK == 0
            and _tile_ok(tile, n_rows, tile.block_k))


def flat_steps(tile: Int8GluonTile, f: int, k_sel: int) -> int:
    """FLAT-mode steps for k_sel slots of F inputs, 0 when the slots are not a whole number of steps."""
    return k_sel * f // tile.block_k if (k_sel * f) % tile.block_k == 0 else 0


def supports(gate: DeviceWeight, up: DeviceWeight, dev: DeviceInfo, x, tile: Int8GluonTile) -> bool:
    """Whether the Gluon gate/up kernel takes this stage: CUDA sm_90+ and _gate_up_plan."""
    return HAVE_GLUON and hopper_plus(dev, x) and _gate_up_plan(gate, up, tile) is not None


def down_tile(tile: Int8GluonTile, f: int, k_sel: int) -> Int8GluonTile | None:
    """The tile the down stage runs for k_sel slots of F inputs: the tile itself where its steps fit F or (flat: two
    or more warps along K, a step wider than F) the slots fill whole steps, else the same tile with one warp along K
    where its step fits F, else None (the Triton kernel)."""
    for t in (tile, replace(tile, warps_k=1)):
        if t.block_k <= f or (t.warps_k > 1 and flat_steps(t, f, k_sel)):
            return t
    return None


def supports_down(down: DeviceWeight, dev: DeviceInfo, x, tile: Int8GluonTile) -> bool:
    """Whether the Gluon down kernel takes this stage (tile: down_tile's): CUDA sm_90+ and _down_plan."""
    return HAVE_GLUON and hopper_plus(dev, x) and _down_plan(down, tile) is not None


def gate_up(uq, gate: DeviceWeight, up: DeviceWeight, sel, weights, clamp: float, tile: Int8GluonTile, pdl: bool):
    """moe_int8.gate_up_int8 on the Gluon kernel of the gate format (supports() must hold; IQ2_XXS: u in iq2_order),
    u one plane or three: h [T*K, F] fp32."""
    xq, xd, xs = uq
    (T, K), (_, F, D) = sel.shape, gate.shape
    gw, uw, stride_w = _gate_up_plan(gate, up, tile)
    h = blocks.empty((T * K, F), xq.device)
    if gate.fmt == QuantFormat.IQ2_XXS:
        steps = D // iq2_block_k(tile)
        _iq2_gate_up_kernel[(T * K, triton.cdiv(F, tile.rows))](
            xq, xd, sel, weights, h, gw, uw, gate.sel16, F, D, K, float(clamp), stride_w, xq.stride(-2),
            xd.stride(0), h.stride(0), moe_int8._plane_stride(xq), ROWS=tile.rows, WARPS_K=tile.warps_k,
            WARPS_ROWS=tile.warps_rows, PF=_prefetch(tile, steps), PDL=pdl, STEPS=steps,
            LIMBS=moe_int8._limbs(xq), num_warps=tile.warps, **pdl_launch(pdl))
        return h
    _q4_gate_up_kernel[(T * K, triton.cdiv(F, tile.rows))](
        xq, xd, xs, sel, weights, h, gw, uw, F, D, K, float(clamp), stride_w, xq.stride(-2), xd.stride(0),
        xs.stride(0), h.stride(0), moe_int8._plane_stride(xq), ROWS=tile.rows, WARPS_K=tile.warps_k,
        WARPS_ROWS=tile.warps_rows, PF=_prefetch(tile), PDL=pdl, STEPS=D // tile.block_k, LIMBS=moe_int8._limbs(xq),
        num_warps=tile.warps, **pdl_launch(pdl))
    return h


def down(hq3, down_w: DeviceWeight, sel, tile: Int8GluonTile, pdl: bool):
    """moe_int8.down_int8 on the Gluon kernel (supports_down() must hold), h one plane or three: out [T, D] fp32,
    slots summed in order."""
    hq, hd, hs = hq3
    (T, K), (_, D, F) = sel.shape, down_w.shape
    dw, stride_w = _down_plan(down_w, tile)
    flat = tile.block_k > F
    if flat and not (flat_steps(tile, F, K) and hq.stride(-2) * 4 == F and hs.stride(0) * SUM_GROUP == F
                     and hd.stride(0) * QK == F):
        raise ValueError(f"the flat down tile {tile} needs {K} slots of {F} inputs to fill whole steps and h's slot "
                         "rows contiguous")
    out = blocks.empty((T, D), hq.device)
    _down_kernel[(T, triton.cdiv(D, tile.rows))](
        hq, hd, hs, sel, out, dw, F, D, K, stride_w, hq.stride(-2), hd.stride(0), hs.stride(0), out.stride(0),
        moe_int8._plane_stride(hq),
        ROWS=tile.rows, WARPS_K=tile.warps_k, WARPS_ROWS=tile.warps_rows, PF=_prefetch(tile), PDL=pdl,
        KSTEPS=F // QK if flat else F // tile.block_k, STEPS=K * F // tile.block_k, LIMBS=moe_int8._limbs(hq),
        Q2=down_w.fmt == QuantFormat.Q2_K, FLAT=flat, num_warps=tile.warps, **pdl_launch(pdl))
    return out
