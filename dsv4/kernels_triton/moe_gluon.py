"""Routed-MoE prefill gate/up for IQ2_XXS (and Q4_K) experts, and down for Q2_K (and Q4_K) experts, with the
decoded weights as wgmma's register operand (Gluon: NVIDIA sm_90+ only). moe_prefill's tuned path takes both for
the q2 recipe; for Q4_K they are slower than moe_prefill's Triton kernels on the H200 (tools/results/h200_prefill/
11f, 15) and are registered or probed for comparison only. The down kernel (_down_kernel) is the gate/up's K loop
with both warpgroups on their own output rows and h as the activations.

Why: in moe_prefill's Triton kernels every decoded weight goes to shared memory and back (a store of the
fp16 tile, then the dot's operand read), and Nsight Compute puts those kernels at 77-88 % of the L1/shared
pipe (tools/results/h200_prefill/). Hopper's wgmma can take its A operand from registers, so here the weights
are decoded straight into A's register layout (the weights as A: [weight rows, BK inputs], the expert tile's
tokens as N) and only the activations pass through shared memory (copied there by cp.async, no registers).

The layout trick: in A's layout (fp16, k_width 2) a lane holds, of every 32 inputs, dot positions
2c + {0, 1, 8, 9, 16, 17, 24, 25} (c = lane % 4). A dot sums over k in any order as long as both operands
use the same one, so dot position p is made to read input input_of_dot_pos(p): then a lane
holds 8 consecutive inputs, one IQ2_XXS grid record (8 weights), of one 32-weight group per row, and
decodes it alone (IQ2_XXS: one 8-byte gather of pair selectors, the signs, four byte permutes to fp16 pairs
and their scaling; Q4_K: two code words, the sub-block's 6-bit scale and min, four byte permutes and fp16 fmas).
The activations are permuted to the same order once per call (permuted_activations). No weight word is read
twice and nothing is dequantized to memory.

The decode is moe_prefill's H2 decode (scale and min rounded to fp16, q * s - m rounded to fp16 once), so
the weights equal grouped_v2's bit for bit; the sums differ from it only by fp32 summation order.
Gluon does not run under TRITON_INTERPRET: checked natively on the GPU (tests/gpu/test_moe_gluon_gpu.py) and
compiled for sm_90 offline in the CPU suite (tests/kernels/test_moe_gluon_compile.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton

from . import blocks, moe
from .blocks import DeviceWeight
from .configs import DeviceInfo, hopper_plus
from ..quant.formats import QuantFormat
from ..quant.tables import IQ2XXS_LEVELS

# without Gluon (Triton < 3.5) moe_prefill keeps its Triton kernels
from .gluon_compat import HAVE_GLUON, async_copy, fence_async_shared, gl, gluon, warpgroup_mma, warpgroup_mma_wait
from .gluon_compat import async_load as _async_load, barrier as _barrier

FORMATS = (QuantFormat.IQ2_XXS, QuantFormat.Q4_K)  # gate/up formats the kernel decodes
ROWS = 64  # gate rows (and as many up rows) per program: one warpgroup's wgmma M each
WARPS = 8  # two warpgroups: gate, up
# per IQ2_XXS level (8, 25, 43): the byte-permute selector of its fp16's low byte (0x00, 0x40, 0x60) in _PAIR_ASM
PAIR_LOW_SELECTORS = (0x8, 0x3, 0x7)
# _PAIR_ASM's permute sources p, n (bytes 0-3, 4-7): the fp16 high bytes of +8 / 25 / 43 (0x48 0x4E 0x51), then
# 0x40, those of -8 / -25 / -43 (0xC8 0xCE 0xD1), then 0x60; the low byte 0x00 of 8 is byte 0's sign (0) replicated
# (selector nibble 8)
PAIR_SOURCES = (0x40514E48, 0x60D1CEC8)
_PAIR_ASM_TEXT = """{{
.reg .b32 t, p, n;
mov.b32 p, {p:#010x};
mov.b32 n, {n:#010x};
prmt.b32 t, p, n, $1;
mul.rn.f16x2 $0, t, $2;
}}"""


# Q4_K pair asm ({sel}: which two bytes of the code word; see _Q4_LO_ASM)
_Q4_PAIR_ASM = """{{
.reg .b32 t, k, mg;
mov.b32 mg, 0x64646464;
prmt.b32 t, $1, mg, {sel};
mov.b32 k, 0x64006400;
sub.rn.f16x2 t, t, k;
fma.rn.f16x2 $0, t, $2, $3;
}}"""


def input_of_dot_pos(p: int) -> int:
    """The input (within its 32) that dot position p reads: bits (0, 3, 4) of p are bits (0, 1, 2) of the
    record coordinate, bits (1, 2) the record (lane c)."""
    return (p & ~31) | (((p >> 1) & 3) << 3) | (((p >> 4) & 1) << 2) | (((p >> 3) & 1) << 1) | (p & 1)


def group_layout(bk: int):
    """The [2 ROWS, bk // 8] layout of the grid records (one per element) that makes each lane own the records
    its A registers hold: record c of a 32-group in lane bits 0-1, rows 1/2/4 in lane bits 2-4, row 8 in a
    register, rows 16/32/64 in the warps, the 32-groups in registers."""
    regs = [[8, 0]] + [[0, 4 << i] for i in range((bk // 32).bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[16 << i, 0] for i in range(WARPS.bit_length() - 1)],
                                      block_bases=[], shape=[16 * WARPS, bk // 8])


if HAVE_GLUON:
    _ROWS: gl.constexpr = gl.constexpr(ROWS)
    _WARPS: gl.constexpr = gl.constexpr(WARPS)
    _HW: gl.constexpr = gl.constexpr(blocks.IQ2_HALFWORDS)
    # bit i (i < 4) of a sign index to bit 2 of nibble 2i + 1 (the high byte's selector of coordinate i):
    # 64 * (1 + 2^7 + 2^14 + 2^21), no carries; SIGN_BITS: those four bits
    _SIGN4: gl.constexpr = gl.constexpr(0x08102040)
    _SIGN_BITS: gl.constexpr = gl.constexpr(0x40404040)
    _IQ2: gl.constexpr = gl.constexpr(int(QuantFormat.IQ2_XXS))
    _Q4K_WORDS: gl.constexpr = gl.constexpr(blocks.Q4K_WORDS)
    _Q2K: gl.constexpr = gl.constexpr(int(QuantFormat.Q2_K))
    _Q2K_WORDS: gl.constexpr = gl.constexpr(blocks.Q2K_WORDS)
    _Q2K_HEAD: gl.constexpr = gl.constexpr(blocks.Q2K_WORDS - 1)  # the d|dmin word, after scales and codes
    # Q4_K: fp16 pair (q0 * s - m, q1 * s - m) from bytes 0-1 (SEL 0x4140) or 2-3 (0x4342) of a word of 4-bit
    # codes: the codes into fp16 mantissas under 0x64 (1024 + q), minus 1024 (exact), one fma with the fp16
    # scale pair and negated min pair: moe_prefill's H2 decode
    _Q4_LO_ASM: gl.constexpr = gl.constexpr(_Q4_PAIR_ASM.format(sel="0x4140"))
    _Q4_HI_ASM: gl.constexpr = gl.constexpr(_Q4_PAIR_ASM.format(sel="0x4342"))
    # fp16 pair (q0 * s, q1 * s) from a pair selector $1: the byte permute picks each fp16's bytes of +-8 / 25 / 43
    # straight from the two source words (PAIR_SOURCES), then times the fp16 scale pair $2 (one rounding):
    # moe_prefill's H2 decode bit for bit, without its minus-bias step. The sources as immediates: loaded into
    # registers instead, the kernel was slower (h200_prefill/13)
    _PAIR_ASM: gl.constexpr = gl.constexpr(_PAIR_ASM_TEXT.format(p=PAIR_SOURCES[0], n=PAIR_SOURCES[1]))

    @gluon.jit
    def _asm1(asm: gl.constexpr, a):
        return gl.inline_asm_elementwise(asm, "=r,r", [a], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _pair(sel, s2):
        return gl.inline_asm_elementwise(_PAIR_ASM, "=r,r,r", [sel, s2], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _q4_pair(w, s2, m2, ASM: gl.constexpr):
        return gl.inline_asm_elementwise(ASM, "=r,r,r,r", [w, s2, m2], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _f16_pair(v):
        """fp32 -> its fp16 value in both halves of an int32 (an f16x2 operand)."""
        b = v.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return b | (b << 16)

    @gluon.jit
    def _q4_words(w32, g, c, k0):
        """The two code words of records g (c = g % 4) of step k0 (lane c: bytes 8c..8c+7 of its sub-block's
        32 in the pair's 32-byte run, both nibbles), and the header words of the records' block (d|dmin and the
        12 scale bytes), as loaded; w32: the rows' first word ([ROWS, 1] pointers)."""
        sb = k0 // 32 + (g >> 2)  # global sub-block
        cw = (sb >> 3) * _Q4K_WORDS + 4 + 8 * ((sb & 7) >> 1) + 2 * c
        return gl.load(w32 + cw), gl.load(w32 + (cw + 1))

    @gluon.jit
    def _q4_head(w32, k0):
        """The header words (d|dmin, scale bytes 0-3, 4-7, 8-11) of step k0's block, [ROWS, 1] each."""
        hb = (k0 // 256) * _Q4K_WORDS
        return gl.load(w32 + hb), gl.load(w32 + (hb + 1)), gl.load(w32 + (hb + 2)), gl.load(w32 + (hb + 3))

    @gluon.jit
    def _q4_sel(q0, q1, hd, hlo, hmid, hhi, g, k0):
        """Stage 1 for Q4_K records: (the codes of the record's nibble in the low nibbles of two words, the fp16
        scale pair, the negated fp16 min pair) of the sub-block's 6-bit scale and min (blocks.q4_k_scale_min)."""
        jj = (k0 // 32 + (g >> 2)) & 7
        sh = 4 * (jj & 1)
        n0 = (q0 >> sh) & 0x0F0F0F0F
        n1 = (q1 >> sh) & 0x0F0F0F0F
        s, m = blocks.q4_k_scale_min(hlo, hmid, hhi, hd, jj)
        return n0, n1, _f16_pair(s), _f16_pair(-m)

    @gluon.jit
    def _iq2_words(w16, w8, g, c, k0):
        """(grid index byte, aux1 low and high halves) of records g (c = g % 4) of step k0 (BK <= 256), as
        loaded; w16 / w8 the rows' first half-word / byte ([ROWS, 1] pointers). The step's part of the offset
        is one scalar (block and first sub-block), the record's a constant per register."""
        sb0 = k0 // 32  # first sub-block of the step: a multiple of BK / 32, so the records stay in its block
        step_hw = (sb0 >> 3) * _HW + 4 * (sb0 & 7) + 1  # aux0 of the step's first sub-block
        hw = step_hw + 4 * (g >> 2)
        return gl.load(w8 + (2 * hw + c)), gl.load(w16 + (hw + 2)), gl.load(w16 + (hw + 3))

    @gluon.jit
    def _psel_fill(psel_ptr):
        """Copy iq2_pair_selectors into this program's static shared table (declared here, once: one element per
        thread), then a barrier: the K loop's first gathers come before its own first barrier."""
        # one table entry per thread: the declaring asm must be emitted once (a second copy does not assemble)
        gl.static_assert(_WARPS * 32 == 256, "the table fill takes one entry per thread")
        i = gl.arange(0, 256, layout=gl.BlockedLayout([1], [32], [_WARPS], [0]))
        v = gl.load(psel_ptr + i)
        gl.inline_asm_elementwise(".shared .align 8 .b64 dsv4_psel[256];\n"
                                  "{ .reg .u32 a; mov.u32 a, dsv4_psel; mad.lo.u32 a, $1, 8, a; st.shared.b64 [a], $2;"
                                  " mov.u32 $0, 0; }", "=r,r,l", [i, v], dtype=gl.int32, is_pure=False, pack=1)
        _barrier()

    @gluon.jit
    def _psel_gather(gi):
        """iq2_pair_selectors[gi] from the shared table (_psel_fill)."""
        return gl.inline_asm_elementwise("{ .reg .u32 a; mov.u32 a, dsv4_psel; mad.lo.u32 a, $1, 8, a;"
                                         " ld.shared.b64 $0, [a]; }", "=l,r", [gi], dtype=gl.int64, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _iq2_sel(gi, lo, hi, d, c, psel_ptr, TAB: gl.constexpr):
        """Stage 1 of the decode, per record: (pair selectors of coordinates 0-3 and 4-7 with the signs ORed
        in, the fp16 scale pair) from the loaded words: one 8-byte gather (iq2_pair_selectors), the signs of
        the 7-bit index and its parity. TAB: the gather from the shared copy of the table (_psel_fill)."""
        if TAB:
            lv = _psel_gather(gi.to(gl.int32))
        else:
            lv = gl.load(psel_ptr + gi.to(gl.int32))
        a1 = lo.to(gl.int32) | (hi.to(gl.int32) << 16)
        sidx = (a1 >> (7 * c)) & 127
        par = _asm1("popc.b32 $0, $1;", sidx) & 1  # the 8th sign: an even count of minus signs
        sel_a = lv.to(gl.int32) | (((sidx & 15) * _SIGN4) & _SIGN_BITS)
        sel_b = (lv >> 32).to(gl.int32) | ((((sidx >> 4) | (par << 3)) * _SIGN4) & _SIGN_BITS)
        return sel_a, sel_b, _f16_pair(d * (0.5 + ((a1 >> 28) & 15).to(gl.float32)) * 0.25)

    @gluon.jit
    def _q2_group(g, c, k0):
        """(global 32-group, 16-weight sub-block within its block) of Q2_K records g (lane c) of step k0."""
        gg = k0 // 32 + (g >> 2)
        return gg, 8 * ((gg >> 2) & 1) + 2 * (gg & 3) + (c >> 1)

    @gluon.jit
    def _q2_words(w32, g, c, k0, BK: gl.constexpr):
        """Q2_K: the two code words of records g (c = g % 4) of step k0 and the word holding their 16-weight
        sub-block's scale byte, as loaded. A 32-group (index gg) is shift 2 (gg % 4) of half (gg // 4) % 2 of its
        block: lane c's 8 inputs are bits 2 (gg % 4) of bytes 8c..8c+7 of the half's 32 code bytes (two words),
        in sub-block 8 half + 2 (gg % 4) + c // 2. With 64-input steps (groups 2i, 2i + 1: shifts of the same code
        bytes, sub-blocks 8 half + 4 (i % 2) .. + 3) a lane's records of a row read the same two code words and
        every record of a row the same scale word: each loaded once (h200_prefill/22, 25)."""
        if BK == 64:  # the step's first group stands for both
            gg = k0 // 32
        else:
            gg, _j = _q2_group(g, c, k0)
        blk = (gg >> 3) * _Q2K_WORDS
        half = (gg >> 2) & 1
        cw = blk + 4 + 8 * half + 2 * c
        # the scale byte's word: sub-block 8 half + 2 (gg % 4) + c // 2, 4 bytes a word (c // 2 stays in the word)
        sw = gl.load(w32 + (blk + 2 * half + ((gg & 3) >> 1)))
        return gl.load(w32 + cw), gl.load(w32 + (cw + 1)), sw

    @gluon.jit
    def _q2_sel(q0, q1, sw, hd, g, c, k0):
        """Stage 1 for Q2_K records: (the codes of the record's shift in the low bits of the bytes of two words, the
        fp16 scale pair d * (sc & 15), the negated fp16 min pair dmin * (sc >> 4)): moe_prefill's H2 decode, whose
        pair asm here is the Q4_K one (codes < 16 in bytes)."""
        gg, j = _q2_group(g, c, k0)
        sh = 2 * (gg & 3)
        sc = (sw >> (8 * (j & 3))) & 255
        d = blocks._f16_from_bits(hd)
        dmin = blocks._f16_from_bits(hd >> 16)
        return ((q0 >> sh) & 0x03030303, (q1 >> sh) & 0x03030303, _f16_pair(d * (sc & 15).to(gl.float32)),
                _f16_pair(-(dmin * (sc >> 4).to(gl.float32))))

    @gluon.jit
    def _stage2(s0, s1, s2, s3, FMT: gl.constexpr, R: gl.constexpr, BK: gl.constexpr, A_LAYOUT: gl.constexpr):
        """Stage 2: A [R, BK] fp16 in A_LAYOUT (dot positions of input_of_dot_pos), four fp16 pairs per record
        (coordinates 0-1, 2-3 from s0, 4-5, 6-7 from s1)."""
        if FMT == _IQ2:  # s0, s1: pair selectors, s2: scale pair
            z = gl.join(gl.join(_pair(s0, s2), _pair(s0 >> 16, s2)), gl.join(_pair(s1, s2), _pair(s1 >> 16, s2)))
        else:  # Q4_K, Q2_K: s0, s1: code words (codes in bytes), s2 / s3: scale / negated min pairs
            z = gl.join(gl.join(_q4_pair(s0, s2, s3, _Q4_LO_ASM), _q4_pair(s0, s2, s3, _Q4_HI_ASM)),
                        gl.join(_q4_pair(s1, s2, s3, _Q4_LO_ASM), _q4_pair(s1, s2, s3, _Q4_HI_ASM)))
        # z: [R, G, j1, j2] fp16 pairs
        z = gl.reshape(z, [R, BK // 32, 4, 2, 2])
        z = gl.permute(z, [0, 1, 4, 3, 2])  # [R, BK/32, j2, j1, c] words: positions 32w + 16j2 + 8j1 + 2c
        z = gl.reshape(z, [R, BK // 2])
        # the words as fp16 pairs: joined with themselves, the two elements Triton packs into one register
        # (the new, fastest dimension) are the word's low and high halves, so this is a register move
        zz = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [gl.join(z, z)], dtype=gl.float16,
                                       is_pure=True, pack=2)
        return gl.convert_layout(gl.reshape(zz, [R, BK]), A_LAYOUT)

    @gluon.jit
    def _words(wrow, g, c, k0, FMT: gl.constexpr, BK: gl.constexpr):
        """The per-record words of step k0 as loaded (three; Q4_K repeats its first)."""
        if FMT == _IQ2:
            return _iq2_words(wrow, wrow.to(gl.pointer_type(gl.uint8)), g, c, k0)
        elif FMT == _Q2K:
            return _q2_words(wrow, g, c, k0, BK)
        else:
            q0, q1 = _q4_words(wrow, g, c, k0)
            return q0, q1, q0

    @gluon.jit
    def _stage1(w0, w1, w2, wrow, g, c, k0, psel_ptr, FMT: gl.constexpr, TAB: gl.constexpr):
        """Stage 1 of step k0's decode from its words (four values per record; IQ2_XXS repeats its scale)."""
        if FMT == _IQ2:
            d = gl.load(wrow + (k0 // 256) * _HW).to(gl.float16, bitcast=True).to(gl.float32)
            sa, sb, s2 = _iq2_sel(w0, w1, w2, d, c, psel_ptr, TAB)
            return sa, sb, s2, s2
        elif FMT == _Q2K:
            return _q2_sel(w0, w1, w2, gl.load(wrow + ((k0 // 256) * _Q2K_WORDS + _Q2K_HEAD)), g, c, k0)
        else:
            hd, hlo, hmid, hhi = _q4_head(wrow, k0)
            return _q4_sel(w0, w1, hd, hlo, hmid, hhi, g, k0)

    @gluon.jit
    def _step(step, acc, s0, s1, s2, s3, w0, w1, w2, x_s, xp, wrow, g, c, psel_ptr, D, FMT: gl.constexpr,
              R: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr, TAB: gl.constexpr):
        """One K step of _k_loop: copy x of the next step, make A from stage 1's values (s0..s3) and issue
        its MMA, stage 1 of the next step from its words (w0..w2) under the MMA, wait for the MMA and the copy.
        Returns (acc, the next step's stage-1 values)."""
        kn = gl.minimum((step + 1) * BK, D - BK)
        _async_load(x_s.index((step + 1) % 3), xp + kn)
        async_copy.commit_group()
        a = _stage2(s0, s1, s2, s3, FMT, R, BK, A_L)
        acc = warpgroup_mma(a, x_s.index(step % 3).permute((1, 0)), acc, is_async=True)
        s0, s1, s2, s3 = _stage1(w0, w1, w2, wrow, g, c, kn, psel_ptr, FMT, TAB)
        acc, a = warpgroup_mma_wait(0, deps=[acc, a])
        async_copy.wait_group(0)
        fence_async_shared()
        _barrier()  # x of step + 1 in place for every warp; both warpgroups past this step's MMA
        return acc, s0, s1, s2, s3

    @gluon.jit
    def _k_loop(xp, wrow, g, c, psel_ptr, KLEN, n_steps, FMT: gl.constexpr, R: gl.constexpr, BM: gl.constexpr,
                BK: gl.constexpr, PF: gl.constexpr, TAB: gl.constexpr):
        """The K loop both kernels share: acc [R, BM] (wgmma layout) = the decoded weight rows (wrow: their first
        words, [R, 1]; records g, lanes c) times the activation rows xp ([BM, BK] pointers of the first step) over
        KLEN inputs in n_steps steps of BK (see _gate_up_kernel's docstring for the stages, the buffers and PF)."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                      instr_shape=[16, BM, 16])
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        x_s = gl.allocate_shared_memory(gl.float16, [3, BM, BK], SMEM)
        acc = gl.zeros([R, BM], gl.float32, MMA)
        _async_load(x_s.index(0), xp)
        async_copy.commit_group()
        w0, w1, w2 = _words(wrow, g, c, 0, FMT, BK)
        s0, s1, s2, s3 = _stage1(w0, w1, w2, wrow, g, c, 0, psel_ptr, FMT, TAB)
        if PF:
            w0, w1, w2 = _words(wrow, g, c, gl.minimum(BK, KLEN - BK), FMT, BK)
        async_copy.wait_group(0)
        fence_async_shared()
        _barrier()
        if PF:  # two steps per iteration, the word sets alternating
            for step in range(0, n_steps, 2):
                n0, n1, n2 = _words(wrow, g, c, gl.minimum((step + 2) * BK, KLEN - BK), FMT, BK)
                acc, s0, s1, s2, s3 = _step(step, acc, s0, s1, s2, s3, w0, w1, w2, x_s, xp, wrow, g, c, psel_ptr,
                                            KLEN, FMT, R, BK, A_L, TAB)
                w0, w1, w2 = _words(wrow, g, c, gl.minimum((step + 3) * BK, KLEN - BK), FMT, BK)
                acc, s0, s1, s2, s3 = _step(step + 1, acc, s0, s1, s2, s3, n0, n1, n2, x_s, xp, wrow, g, c, psel_ptr,
                                            KLEN, FMT, R, BK, A_L, TAB)
        else:
            for step in range(0, n_steps):
                w0, w1, w2 = _words(wrow, g, c, gl.minimum((step + 1) * BK, KLEN - BK), FMT, BK)
                acc, s0, s1, s2, s3 = _step(step, acc, s0, s1, s2, s3, w0, w1, w2, x_s, xp, wrow, g, c, psel_ptr,
                                            KLEN, FMT, R, BK, A_L, TAB)
        return acc

    @gluon.jit
    def _tile(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, KLEN, BM: gl.constexpr, BK: gl.constexpr, XL: gl.constexpr):
        """(expert, first and end sorted row, K steps: 0 for an empty tile, the tile's BM sorted rows in XL's row
        slice: rows past its end repeat a valid row, their columns are never stored) of tile program_id(1)."""
        tile = gl.program_id(1)
        e = gl.load(tile_e_ptr + tile).to(gl.int64)
        lo = gl.load(tile_lo_ptr + tile)
        hi = gl.load(tile_hi_ptr + tile)
        rm_x = gl.maximum(gl.minimum(lo + gl.arange(0, BM, layout=gl.SliceLayout(1, XL)), hi - 1), 0)
        return e, lo, hi, gl.where(hi > lo, KLEN // BK, 0), rm_x

    @gluon.jit
    def _gate_up_kernel(x_ptr, order_ptr, wts_ptr, h_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, gw_ptr, psel_ptr,
                        F, D, KSEL, clamp, stride_xt, stride_ht, stride_w, up_delta, FMT: gl.constexpr,
                        BM: gl.constexpr, BK: gl.constexpr, PF: gl.constexpr, GL: gl.constexpr, XL: gl.constexpr,
                        HL: gl.constexpr, TAB: gl.constexpr):
        """h[r, f] = swiglu(gate[e] @ x[t], up[e] @ x[t])[f] * wts[p] for the sorted rows r of tile program_id(1)
        (expert e, pair p = order[r], token t = p // KSEL) and the ROWS rows f of program_id(0). x: the
        activations in dot-position order (permuted_activations); stride_w and up_delta in the weight view's words
        (int16 for IQ2_XXS, int32 for Q4_K).

        Two warpgroups: the first decodes and multiplies the ROWS gate rows, the second the same up rows (one
        [2 ROWS, BK] A operand); the halves meet in the epilogue. Per step, the pair stage of the decode makes
        A and its MMA is issued; the selector stage of the next step (the gathers, the signs) runs while the
        MMA does, and the step ends waiting for it: no A register is live across steps, so none can be
        overwritten under an MMA still reading it. The activation tiles go global -> shared by cp.async into
        three buffers: the one step i fills was last read by step i - 2's MMA, which both warpgroups waited
        for before the barrier that ends step i - 1. The weight words are loaded one step before their stage 1
        (which runs one step before their MMA); PF: two steps before, the loop unrolled by two so that each load
        writes the registers of the word set consumed just before it (a word set carried from one step to the
        next instead is a register copy, which waits for the load: h200_prefill/14). PF needs an even number of
        steps (D / BK). TAB (IQ2_XXS): the pair selectors gathered from a shared copy of the table (_psel_fill)
        instead of the global one, whose 8-byte gathers touch most of its 16 lines per warp: 2.29 -> 2.09 ms at
        T=2048, and 80 registers (h200_prefill/19b)."""
        R: gl.constexpr = 2 * _ROWS
        G: gl.constexpr = BK // 8
        pid_n = gl.program_id(0)
        e, lo, hi, n_steps, rm_x = _tile(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, D, BM, BK, XL)
        tok = (gl.load(order_ptr + rm_x) // KSEL).to(gl.int64)
        xp = (x_ptr + gl.expand_dims(tok * stride_xt, 1)
              + gl.expand_dims(gl.arange(0, BK, layout=gl.SliceLayout(0, XL)), 0))
        # weight rows [R]: gate rows, then the same up rows; records [R, G]
        r2 = gl.arange(0, R, layout=gl.SliceLayout(1, GL))
        rr = gl.minimum(pid_n * _ROWS + (r2 % _ROWS), F - 1)
        roff = gl.expand_dims((e * F + rr) * stride_w + gl.where(r2 >= _ROWS, up_delta, 0).to(gl.int64), 1)
        if FMT == _IQ2:
            wrow = gw_ptr.to(gl.pointer_type(gl.uint16)) + roff
        else:
            wrow = gw_ptr.to(gl.pointer_type(gl.int32)) + roff
        g = gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(0, GL)), 0)
        c = g & 3
        if TAB:
            _psel_fill(psel_ptr)
        acc = _k_loop(xp, wrow, g, c, psel_ptr, D, n_steps, FMT, R, BM, BK, PF, TAB)
        # gate rows (warpgroup 0) beside the up rows (warpgroup 1): one register pair per element
        gu = gl.convert_layout(gl.permute(gl.reshape(acc, [2, _ROWS, BM]), [1, 2, 0]), HL)
        gacc, uacc = gl.split(gu)
        EL: gl.constexpr = gacc.type.layout
        rm = lo + gl.arange(0, BM, layout=gl.SliceLayout(0, EL))
        m_ok = rm < hi
        pair = gl.load(order_ptr + rm, mask=m_ok, other=0)
        wt = gl.load(wts_ptr + pair, mask=m_ok, other=0.0)
        h = moe._swiglu_route(gacc, uacc, gl.expand_dims(wt, 0), clamp)
        rf = pid_n * _ROWS + gl.arange(0, _ROWS, layout=gl.SliceLayout(1, EL))
        hp = h_ptr + gl.expand_dims(rm.to(gl.int64) * stride_ht, 0) + gl.expand_dims(rf, 1)
        gl.store(hp, h.to(gl.float16), mask=gl.expand_dims(m_ok, 0) & gl.expand_dims(rf < F, 1))


    @gluon.jit
    def _down_kernel(h_ptr, order_ptr, y_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, dw_ptr, F, D, stride_ht, stride_yp,
                     stride_w, FMT: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, PF: gl.constexpr,
                     GL: gl.constexpr, XL: gl.constexpr, YL: gl.constexpr):
        """y[order[r], d] = down[e][d, :] @ h[r, :] for the sorted rows r of tile program_id(1) (expert e) and the
        2 ROWS output rows d of program_id(0) (one writer per pair): _gate_up_kernel's K loop (the same steps,
        stages and buffers) with both warpgroups on their own output rows, Q2_K or Q4_K weights (int32 words,
        stride_w per row) and h's rows, in dot-position order (permuted_activations), as the activations."""
        R: gl.constexpr = 2 * _ROWS
        G: gl.constexpr = BK // 8
        pid_n = gl.program_id(0)
        e, lo, hi, n_steps, rm_x = _tile(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, F, BM, BK, XL)
        xp = (h_ptr + gl.expand_dims(rm_x.to(gl.int64) * stride_ht, 1)
              + gl.expand_dims(gl.arange(0, BK, layout=gl.SliceLayout(0, XL)), 0))
        r2 = gl.arange(0, R, layout=gl.SliceLayout(1, GL))
        rd = gl.minimum(pid_n * R + r2, D - 1)
        wrow = dw_ptr.to(gl.pointer_type(gl.int32)) + gl.expand_dims((e * D + rd) * stride_w, 1)
        g = gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(0, GL)), 0)
        c = g & 3
        acc = _k_loop(xp, wrow, g, c, dw_ptr, F, n_steps, FMT, R, BM, BK, PF, False)
        y = gl.convert_layout(acc, YL)
        rm = lo + gl.arange(0, BM, layout=gl.SliceLayout(0, YL))
        m_ok = rm < hi
        pair = gl.load(order_ptr + rm, mask=m_ok, other=0).to(gl.int64)
        rs = pid_n * R + gl.arange(0, R, layout=gl.SliceLayout(1, YL))
        gl.store(y_ptr + gl.expand_dims(pair * stride_yp, 0) + gl.expand_dims(rs, 1), y,
                 mask=gl.expand_dims(m_ok, 0) & gl.expand_dims(rs < D, 1))


@functools.lru_cache(maxsize=None)
def iq2_pair_selectors(device):
    """The IQ2_XXS grid as byte-permute pair selectors, int64 [256] (2 KiB, one copy per device): byte j of an entry
    selects coordinate j's fp16, its low byte's selector in the low nibble (PAIR_LOW_SELECTORS), its level (0..2:
    the high byte of +8 / 25 / 43) in the high one, whose bit 2 (clear here) the kernel sets for a minus sign (the
    high byte from _PAIR_ASM's n). Each 16-bit half selects one fp16 pair (q_j, q_j+1)."""
    lev = IQ2XXS_LEVELS.astype(np.int64)
    low = np.array(PAIR_LOW_SELECTORS, dtype=np.int64)
    sel = np.zeros(256, dtype=np.int64)
    for j in range(8):
        sel |= (low[lev[:, j]] | (lev[:, j] << 4)) << (8 * j)
    return torch.from_numpy(sel).to(device)


def permuted_activations(x16):
    """x [T, D] fp16 in dot-position order: input 32w + 8c + 4j2 + 2j1 + j0 at position 32w + 16j2 + 8j1 + 2c
    + j0 (input_of_dot_pos), one copy kernel."""
    T, D = x16.shape
    out = torch.empty_like(x16)
    out.view(T, D // 32, 2, 2, 4, 2).copy_(x16.view(T, D // 32, 4, 2, 2, 2).permute(0, 1, 3, 4, 2, 5))
    return out


def x_layout(bm: int, bk: int):
    """Activation tile [bm, bk] copies: 8 fp16 (16 bytes) per lane, a row over bk // 8 lanes."""
    lanes_k = min(32, bk // 8)
    return gl.BlockedLayout([1, 8], [32 // lanes_k, lanes_k], [WARPS, 1], [1, 0])


def pair_layout():
    """[ROWS, bm, 2] (gate, up) in the epilogue: the pair in one thread, lanes along the rows (h's contiguous
    dimension)."""
    return gl.BlockedLayout([2, 1, 2], [16, 2, 1], [1, WARPS, 1], [2, 0, 1])


def y_layout():
    """[2 ROWS, bm] down outputs: lanes along the output rows (y's contiguous dimension), warps along the pairs."""
    return gl.BlockedLayout([1, 1], [32, 1], [1, WARPS], [0, 1])


@dataclass(frozen=True)
class RegATile:
    """Tiles of the kernel beside the expert tiles' height (the wgmma N), which the caller's expert sort fixes."""

    block_k: int = 128  # inputs per step
    prefetch: bool = True  # weight words two steps ahead instead of one
    maxnreg: int = 0  # PTX register cap (0: none)
    smem_table: bool = False  # IQ2_XXS gate/up: the pair-selector gathers from a shared copy of the table


PSEL_TABLE_BYTES = 256 * 8  # the shared copy of iq2_pair_selectors (static shared memory)
SMEM_DEFAULT = 48 * 1024  # shared memory a program gets without the opt-in Triton asks for above it


def _tile_ok(tile: RegATile, block_m: int, k: int) -> bool:
    """The tile conditions of both kernels over k inputs (whole blocks; PF's loop takes two steps at a time)."""
    return (k % 256 == 0 and tile.block_k in (64, 128, 256) and block_m % 8 == 0 and 8 <= block_m <= 256
            and (not tile.prefetch or (k // tile.block_k) % 2 == 0))


def _uses_table(tile: RegATile, fmt: QuantFormat) -> bool:
    """Whether the gate/up reads the shared selector table (tile.smem_table: IQ2_XXS only; Q4_K has no table)."""
    return tile.smem_table and fmt == QuantFormat.IQ2_XXS


def _table_fits(tile: RegATile, block_m: int, fmt: QuantFormat) -> bool:
    """Whether the gate/up's shared memory fits where it uses the table: Triton opts in to more than SMEM_DEFAULT
    only for a dynamic part above it and does not count the static table, so the three activation buffers and the
    table must fit in SMEM_DEFAULT together (64 x 128 tiles failed to launch with it: h200_prefill/19)."""
    return not _uses_table(tile, fmt) or 3 * block_m * tile.block_k * 2 + PSEL_TABLE_BYTES <= SMEM_DEFAULT


def supports(u, gate: DeviceWeight, up: DeviceWeight, dev: DeviceInfo, tile: RegATile, block_m: int) -> bool:
    """Whether the kernel takes these experts with expert tiles of block_m pairs."""
    from .moe_prefill import _up_delta

    _E, F, D = gate.shape
    return (HAVE_GLUON and gate.fmt in FORMATS and up.fmt == gate.fmt and hopper_plus(dev, u) and F % ROWS == 0
            and _tile_ok(tile, block_m, D) and _table_fits(tile, block_m, gate.fmt) and _up_delta(gate, up) is not None)


def gate_up_stage(x16, gate: DeviceWeight, up: DeviceWeight, weights, clamp: float, tiles, K: int, block_m: int,
                  tile: RegATile):
    """h [T*K, F] fp16 in sorted-row order, as moe_prefill.gate_up_stage (IQ2_XXS or Q4_K experts, sm_90+:
    supports); tiles: moe.expert_tiles of block_m pairs."""
    from .moe_prefill import _up_delta, empty_f16

    order, te, lo, hi = tiles
    _E, F, D = gate.shape
    h = empty_f16((x16.shape[0] * K, F), x16.device)
    xp = permuted_activations(x16)
    _gate_up_kernel[(F // ROWS, te.numel())](
        xp, order, weights.reshape(-1), h, te, lo, hi, gate.w, iq2_pair_selectors(x16.device), F, D, K,
        float(clamp), xp.stride(0), h.stride(0), gate.stride_w, _up_delta(gate, up), FMT=int(gate.fmt), BM=block_m,
        BK=tile.block_k, PF=tile.prefetch, GL=group_layout(tile.block_k), XL=x_layout(block_m, tile.block_k),
        HL=pair_layout(), TAB=_uses_table(tile, gate.fmt), num_warps=WARPS,
        **({"maxnreg": tile.maxnreg} if tile.maxnreg else {}))
    return h


DOWN_FORMATS = (QuantFormat.Q2_K, QuantFormat.Q4_K)  # down formats _down_kernel decodes


def supports_down(h, down: DeviceWeight, dev: DeviceInfo, tile: RegATile, block_m: int) -> bool:
    """Whether _down_kernel takes these experts (h: the gate/up stage's output) with expert tiles of block_m pairs."""
    _E, D, F = down.shape
    return (HAVE_GLUON and down.fmt in DOWN_FORMATS and hopper_plus(dev, h) and D % (2 * ROWS) == 0
            and _tile_ok(tile, block_m, F))


def down_stage(h, down: DeviceWeight, tiles, T: int, K: int, block_m: int, tile: RegATile):
    """y [T*K, D] fp32 in pair order (one writer per pair) from h [T*K, F] fp16 in sorted-row order, as
    moe_prefill.down_stage (Q2_K or Q4_K experts, sm_90+: supports_down); tiles: moe.expert_tiles of block_m
    pairs. h is permuted to dot-position order by one copy (0.07 ms at T=2048; writing it so from the gate/up
    epilogue made that kernel 0.25 ms slower: h200_prefill/15b)."""
    order, te, lo, hi = tiles
    _E, D, F = down.shape
    y = blocks.empty((T * K, D), h.device)
    hp = permuted_activations(h)
    _down_kernel[(D // (2 * ROWS), te.numel())](
        hp, order, y, te, lo, hi, down.w, F, D, hp.stride(0), y.stride(0), down.stride_w, FMT=int(down.fmt),
        BM=block_m, BK=tile.block_k, PF=tile.prefetch, GL=group_layout(tile.block_k),
        XL=x_layout(block_m, tile.block_k), YL=y_layout(), num_warps=WARPS,
        **({"maxnreg": tile.maxnreg} if tile.maxnreg else {}))
    return y
