"""Routed-MoE prefill as two grouped tensor-core GEMMs over experts (variants `grouped_v2*`).

(token, slot) pairs are sorted by expert on the device (`moe.expert_tiles`, no host sync) into tiles of
BLOCK_M pairs of one expert. Kernel 1 per (F block, tile): acc_g, acc_u [BLOCK_M, BLOCK_N] = x_tile @ W^T
over D (x = u in fp16, rows gathered), then SwiGLU(clamp) * route weight, stored as fp16 h in sorted-row
order. Kernel 2 per (D block, tile): y[pair] = h[row] @ down[e]^T (one writer per pair); the K slots are
summed after in fixed order (deterministic, no atomics). Each weight is decoded once per tile, per group
in whole words (IQ2_XXS: one 2-byte gather from the 512-byte selector table per 8 weights, signs ORed into the
selector, one byte permute per 4 signed weights; Q2_K/Q4_K: one and per 4 weights), bytes placed into float
mantissas by a byte permute (no int->float conversions), scaled per group and rounded to fp16 in registers; the
tile goes to shared memory once as the dot's operand. Other formats/shapes go to `moe.moe_float`. Knows block
layouts.

What bounds these kernels on the H200 is the L1/shared-memory pipe (Nsight Compute: 77-88 % busy), not
issue or DRAM: every weight passes it as scattered word loads, as an fp16 store of the decoded tile and as
the dot's operand read. The weight words are loaded one step ahead and carried as loop values untouched,
which keeps them plain loads into registers (Triton pipelines words consumed in their own step as 2/4-byte
cp.async copies through shared memory: 1.3-2.6x slower stages); IQ2_XXS goes two deep (words two steps
ahead, grid records one). Options (PrefillConfig), measured in tools/results/h200_prefill/:
  * fuse: gate and up rows as one [2*BLOCK_N, BLOCK_K] tile, one dot and one wait per step;
  * swap / swap_down: the weights as the dot's A operand and the expert tile's tokens as its N;
  * Q4_K words by 16-byte loads (not in the fused tile: Triton 3.6 then converts layouts every step).
`TUNED` holds the fastest per gate/up format; moe's auto variant uses it (`grouped_v2_default`). For IQ2_XXS
experts on NVIDIA sm_90+ its gate/up stage is moe_gluon's kernel (PrefillConfig.rega: the decoded weights as
wgmma's register operand, never in shared memory; tools/results/h200_prefill/11), and so is its Q2_K down stage
(PrefillConfig.rega_down, h200_prefill/15); this file's kernels everywhere else and for Q4_K (where moe_gluon's
Q4_K decode is slower, gate/up and down: 11f, 15).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl

from . import blocks, moe, moe_gluon
from .blocks import FMT_IQ2_XXS, FMT_Q2_K, DeviceWeight
from .configs import TRITON_VERSION, DeviceInfo, Vendor
from ..quant.formats import QuantFormat
from .qmatmul_fast import _q8_word_codes

F32_MAGIC_BITS = 0x4B000000  # fp32 2^23: a byte in its mantissa is exact (passed as an argument: see qmatmul_fast)
BYTE_BIAS: tl.constexpr = tl.constexpr(0x80808080 - (1 << 32))  # xor: signed byte b -> unsigned b + 128

# One pair of fp16 weights per invocation ($0, two halves): byte $3 of word $1 and byte $4 of word $2
# (128 + q each) go into the low bytes of two fp16 1024 (0x64 high bytes from the magic register) ->
# 1152 + q; minus 1152 is q exactly; then q*s + (-m) with scales $5 and negated mins $6 as fp16 pairs.
# Each element reads its own word and byte index, so the result does not depend on which two elements
# Triton packs into one invocation (an earlier form read both bytes from $1, which assumed the pair
# shared its word: some tile layouts broke that and gave wrong weights on the GPU). The selector
# arithmetic folds at compile time (the byte indices are constants); two byte permutes per pair.
_H2_ASM: tl.constexpr = tl.constexpr("""{
.reg .b32 c, t, k, mg;
add.u32 c, $4, 4;
shl.b32 c, c, 8;
or.b32 c, c, $3;
prmt.b32 t, $1, $2, c;
mov.b32 mg, 0x64646464;
prmt.b32 t, t, mg, 0x4240;
mov.b32 k, 0x64806480;
sub.rn.f16x2 t, t, k;
fma.rn.f16x2 $0, t, $5, $6;
}""")
SUPPORTED_GATE_UP = ("IQ2_XXS", "Q4_K")
SUPPORTED_DOWN = ("Q2_K", "Q4_K")
MAX_GRID_Y = 65535  # CUDA limit of the tile axis (program axis 1); ~700k tokens at K=6, BLOCK_M=64
# Group-major word tensors (see _row_groups): what gives 16-byte stores of the tile under Triton 3.6;
# 3.9 wants row-major. Checked on sm_90a compiles with 3.6.0 and 3.9.0 only; either way compiles.
GROUPS_FIRST = TRITON_VERSION < (3, 7)


@dataclass(frozen=True)
class PrefillConfig:
    """Tiles of both kernels; BLOCK_K a multiple of 128 (Q2_K half blocks / Q4_K sub-block pairs).
    Defaults from sm_90a compiles on a CPU box (Triton 3.6 and 3.9; not yet timed on a GPU): no spill,
    128-184 registers at 8 warps, 128-208 KB of shared memory. Q2_K wants block_k_down 256 (at 128 the tile
    layout degenerates and goes through shared memory in pieces, ~4x the instructions)."""

    block_m: int = 64  # pairs per expert tile (the dot's M; the mean is ~48 pairs per expert at T=2048)
    block_n: int = 128  # gate/up weight rows per program
    block_k: int = 128  # gate/up inputs per step
    num_warps: int = 8
    num_stages: int = 3
    block_n_down: int = 128
    block_k_down: int = 256  # one super-block per step
    num_warps_down: int = 8
    h2: bool = True  # scale and min rounded to fp16, the scaling done on fp16 pairs (~1.5 fewer instructions
    # per weight on sm_90a; False: fp32 scaling, each weight rounded to fp16 once)
    fuse: bool = False  # gate and up rows decoded as one tile, one dot per step (needs gate/up buffers whose
    # distance is a whole number of words: always so for the loader's tensors)
    swap: bool = False  # gate/up dot with the weights as A ([2N or N, M] accumulators), tokens as the dot's N
    swap_down: bool = False  # the same for the down kernel
    num_stages_down: int = 0  # 0: num_stages
    rega: Any = None  # a moe_gluon.RegATile: the gate/up by the Gluon kernel with the weights as wgmma's
    # register operand (expert tiles of block_m pairs) where it runs (NVIDIA sm_90+ with Gluon), this file's elsewhere
    rega_down: Any = None  # the same for the down stage (moe_gluon._down_kernel)


def empty_f16(shape, device):
    """fp16 scratch (h); tests replace this to NaN-poison it."""
    return torch.empty(tuple(shape), device=device, dtype=torch.float16)


@triton.jit
def _scaled4(wb, s, m, PRMT: tl.constexpr, H2: tl.constexpr, magic):
    """fp16 (q*s - m) for the 4 bytes 128 + q of int32 words wb, as [..., 2 (b>>1), 2 (b&1)] (k-adjacent
    weights last: the pairs the fp16 packing and the shared-memory stores want).
    fp32: per weight a byte permute into the mantissa of 2^23, an add, an fma, then the fp16 rounding
    (one per weight, two weights per conversion). H2: s and m rounded to fp16 first and the math done on
    fp16 pairs (per two weights a byte permute, an HADD2 and an HFMA2)."""
    if H2:
        s16 = s.to(tl.float16)
        m16 = m.to(tl.float16)
        if PRMT:
            w4 = tl.join(tl.join(wb, wb), tl.join(wb, wb))
            z = tl.zeros(wb.shape, tl.int32)
            sel = tl.join(tl.join(z, z + 2), tl.join(z + 1, z + 3))
            s4 = tl.join(tl.join(s16, s16), tl.join(s16, s16))
            nm4 = tl.join(tl.join(-m16, -m16), tl.join(-m16, -m16))
            return tl.inline_asm_elementwise(_H2_ASM, "=r,r,r,r,r,r,r", [w4, sel, s4, nm4], dtype=tl.float16,
                                             is_pure=True, pack=2)
        else:
            q0 = (((wb & 255) - 128).to(tl.float32) * s16.to(tl.float32) - m16.to(tl.float32)).to(tl.float16)
            q1 = ((((wb >> 8) & 255) - 128).to(tl.float32) * s16.to(tl.float32) - m16.to(tl.float32)).to(tl.float16)
            q2 = ((((wb >> 16) & 255) - 128).to(tl.float32) * s16.to(tl.float32) - m16.to(tl.float32)).to(tl.float16)
            q3 = ((((wb >> 24) & 255) - 128).to(tl.float32) * s16.to(tl.float32) - m16.to(tl.float32)).to(tl.float16)
            return tl.join(tl.join(q0, q2), tl.join(q1, q3))
    else:
        q0 = _q8_word_codes(wb, 0, PRMT, magic)
        q1 = _q8_word_codes(wb, 1, PRMT, magic)
        q2 = _q8_word_codes(wb, 2, PRMT, magic)
        q3 = _q8_word_codes(wb, 3, PRMT, magic)
        return tl.join(tl.join((q0 * s - m).to(tl.float16), (q2 * s - m).to(tl.float16)),
                       tl.join((q1 * s - m).to(tl.float16), (q3 * s - m).to(tl.float16)))


@triton.jit
def _join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """[..., 2 (i>>2), 2 ((i>>1)&1), 2 (i&1)] from v_i (i&1 last: the fastest register dimension)."""
    return tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))


@triton.jit
def _rep4(v):
    """v repeated over two new dimensions [..., 2, 2] (copies of the same registers)."""
    return tl.join(tl.join(v, v), tl.join(v, v))


@triton.jit
def _rep8(v):
    """v repeated over three new dimensions [..., 2, 2, 2]."""
    return _rep4(tl.join(v, v))


@triton.jit
def _row_groups(roff, n_ok, k0, G: tl.constexpr, NG: tl.constexpr, GF: tl.constexpr):
    """(row offset int64, row mask, global index of the G-input groups from k0) broadcast over [BLOCK_N, NG], or
    [NG, BLOCK_N] when GF
    (groups first). Same math either way; the orientation decides which dimension the compiler
    spreads lanes over first (Triton 3.6 and 3.9 break the tie in opposite directions), and the
    store into the dot's shared tile is 16 bytes wide only when the lanes go over the groups."""
    if GF:
        return roff[None, :], n_ok[None, :], _group_ids(k0, G, NG, GF)
    else:
        return roff[:, None], n_ok[:, None], _group_ids(k0, G, NG, GF)


@triton.jit
def _dot_tile(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRMT: tl.constexpr):
    """[BLOCK_N, BLOCK_K] from a tile whose dimensions are already in k order, k-adjacent weights in
    the fastest register dimensions (so no permute before the reshape, and wide shared stores). On
    CUDA an identity inline-asm (a register move ptxas drops) keeps the 2-D tile as the operand of
    the shared-memory store: without it Triton (3.6 always, 3.9 for some shapes) moves the store
    above the reshape onto the high-rank shape and aborts ("Illegal shared layout")."""
    w2 = tl.reshape(w, (BLOCK_N, BLOCK_K))
    if PRMT:
        w2 = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w2], dtype=tl.float16, is_pure=True, pack=2)
    return w2


@triton.jit
def _grid_record(sel16_ptr, a0, KQ: tl.constexpr):
    """Grid record KQ (0..3) of the 32-weight groups as its level selector (one 2-byte gather from the
    512-byte blocks.iq2_sel16 table, spread to nibbles)."""
    return blocks.iq2_levels(sel16_ptr, (a0 >> (8 * KQ)) & 255)


@triton.jit
def _iq2_grid(sel16_ptr, raw):
    """The 4 grid records of the groups whose words _iq2_raw loaded, 4 int32 level selectors (loop-carried
    when fetched a step ahead)."""
    a0 = _iq2_aux(raw, 1)
    return (_grid_record(sel16_ptr, a0, 0), _grid_record(sel16_ptr, a0, 1), _grid_record(sel16_ptr, a0, 2),
            _grid_record(sel16_ptr, a0, 3))


@triton.jit
def _iq2_record(lv, a1, KQ: tl.constexpr, PRMT: tl.constexpr):
    """The two signed grid words (bytes 128 + q; weights 0..3, 4..7) of grid record KQ (0..3) of the
    32-weight groups, from its level selector lv: blocks.iq2_signed reads 128 +- {8, 25, 43} by one byte
    permute per 4 weights (coordinates (0, 4, 1, 5) and (2, 6, 3, 7)), two more put them in order."""
    a, b = blocks.iq2_signed(lv, (a1 >> (7 * KQ)) & 127, blocks.IQ2_POS_BIASED, blocks.IQ2_NEG_BIASED, PRMT)
    return blocks.prmt(a, b, tl.full(a.shape, 0x6420, tl.int32), PRMT), \
        blocks.prmt(a, b, tl.full(a.shape, 0x7531, tl.int32), PRMT)


@triton.jit
def _iq2_raw(w_ptr, roff, n_ok, k0, BLOCK_K: tl.constexpr, GF: tl.constexpr):
    """The int16 words of the 32-weight groups of step k0 as loaded: (d, the 4 halves of aux0 and aux1),
    [BLOCK_N, BLOCK_K/32] or [BLOCK_K/32, BLOCK_N] each (IQ2_XXS blocks are 2-byte aligned)."""
    G: tl.constexpr = BLOCK_K // 32
    r, m, cg = _row_groups(roff, n_ok, k0, 32, G, GF)  # cg: global 32-weight group
    base = r + (cg >> 3) * 33
    hw = base + 1 + 4 * (cg & 7)
    return (tl.load(w_ptr + base, mask=m, other=0), tl.load(w_ptr + hw, mask=m, other=0),
            tl.load(w_ptr + hw + 1, mask=m, other=0), tl.load(w_ptr + hw + 2, mask=m, other=0),
            tl.load(w_ptr + hw + 3, mask=m, other=0))


@triton.jit
def _iq2_aux(raw, I: tl.constexpr):
    """aux word (I = 1: grid indices aux0, I = 3: signs and scale aux1) of _iq2_raw's half-words, int32."""
    return (raw[I].to(tl.int32) & 0xFFFF) | (raw[I + 1].to(tl.int32) << 16)


@triton.jit
def _iq2_group(raw):
    """(group scale db fp32, aux1 int32) from the words of _iq2_raw (aux0 feeds _iq2_grid)."""
    a1 = _iq2_aux(raw, 3)
    d = raw[0].to(tl.float16, bitcast=True).to(tl.float32)
    return d * (0.5 + ((a1 >> 28) & 15).to(tl.float32)) * 0.25, a1


@triton.jit
def _iq2_xxs_tile_g(grid, db, a1, PRMT: tl.constexpr, H2: tl.constexpr, magic, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GF: tl.constexpr):
    """fp16 weights [BLOCK_N, BLOCK_K] from the group scale, aux1 and the grid records of _iq2_grid.

    Per 32-weight group (one [BLOCK_N, G] or [G, BLOCK_N] element per thread): 4 grid records and their
    sign indices. Per 4 weights: a byte permute to the signed, biased bytes and one to order them
    (_iq2_record). Then _scaled4: bytes into fp16 mantissas, the group scale applied on fp16 pairs (H2) or
    per weight in fp32."""
    l0, h0 = _iq2_record(grid[0], a1, 0, PRMT)
    l1, h1 = _iq2_record(grid[1], a1, 1, PRMT)
    l2, h2 = _iq2_record(grid[2], a1, 2, PRMT)
    l3, h3 = _iq2_record(grid[3], a1, 3, PRMT)
    # words [.., kq1, kq0, half] (group dims first), the scale repeated over the new dimensions
    wb = tl.join(tl.join(tl.join(l0, l2), tl.join(l1, l3)), tl.join(tl.join(h0, h2), tl.join(h1, h3)))
    s = _rep8(db)
    w = _scaled4(wb, s, tl.zeros(s.shape, tl.float32), PRMT, H2, magic)  # no min term
    if GF:
        w = tl.permute(w, (1, 0, 2, 3, 4, 5, 6))
    # dims [BN, G, kq1, kq0, half, b1, b0]: k = 32g + 8kq + 4half + b, in order
    return _dot_tile(w, BLOCK_N, BLOCK_K, PRMT)


@triton.jit
def _q2_word(w):
    """The 4 biased 2-bit code words of a Q2_K code word, [..., s1, s0] (shift 2s)."""
    return tl.join(tl.join(w & 0x03030303, (w >> 4) & 0x03030303),
                   tl.join((w >> 2) & 0x03030303, (w >> 6) & 0x03030303)) ^ BYTE_BIAS


@triton.jit
def _q2_scale(sw, dsc, dmn, J: tl.constexpr):
    """(d * (sc & 15), dmin * (sc >> 4)) of scale byte J (0..3) of words sw."""
    sc = (sw >> (8 * J)) & 255
    return dsc * (sc & 15).to(tl.float32), dmn * (sc >> 4).to(tl.float32)


@triton.jit
def _words4(w_ptr, off, m):
    """The 4 consecutive int32 words at each off (16-byte aligned: one 16-byte load per element), as 4
    tensors shaped like off."""
    x = tl.load(w_ptr + off[:, :, None] + tl.arange(0, 4)[None, None, :], mask=m[:, :, None], other=0)
    e, o = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], 2, 2)))
    w0, w2 = tl.split(e)
    w1, w3 = tl.split(o)
    return w0, w1, w2, w3


@triton.jit
def _codes8(w_ptr, cp, m):
    """The 8 consecutive int32 code words at cp (a tuple; 4-byte loads: Q2_K blocks are only 4-byte aligned)."""
    return (tl.load(w_ptr + cp, mask=m, other=0), tl.load(w_ptr + cp + 1, mask=m, other=0),
            tl.load(w_ptr + cp + 2, mask=m, other=0), tl.load(w_ptr + cp + 3, mask=m, other=0),
            tl.load(w_ptr + cp + 4, mask=m, other=0), tl.load(w_ptr + cp + 5, mask=m, other=0),
            tl.load(w_ptr + cp + 6, mask=m, other=0), tl.load(w_ptr + cp + 7, mask=m, other=0))


@triton.jit
def _group_ids(k0, G: tl.constexpr, NG: tl.constexpr, GF: tl.constexpr):
    """Global group index (k0 // G + i) shaped like _row_groups' third result."""
    if GF:
        return k0 // G + tl.arange(0, NG)[:, None]
    else:
        return k0 // G + tl.arange(0, NG)[None, :]


@triton.jit
def _q2_k_words(w_ptr, roff, n_ok, k0, BLOCK_K: tl.constexpr, GF: tl.constexpr):
    """Q2_K words of the half blocks of step k0 (int32 words, 21 per block): a tuple (d|dmin, scale words 2h
    and 2h+1, the 8 code words), [BLOCK_N, H] or [H, BLOCK_N] each (loop-carried when prefetched)."""
    H: tl.constexpr = BLOCK_K // 128
    r, m, cg = _row_groups(roff, n_ok, k0, 128, H, GF)  # cg: global half-block
    base = r + (cg >> 1) * 21
    hh = cg & 1
    return (tl.load(w_ptr + base + 20, mask=m, other=0), tl.load(w_ptr + base + 2 * hh, mask=m, other=0),
            tl.load(w_ptr + base + 2 * hh + 1, mask=m, other=0)) + _codes8(w_ptr, base + 4 + 8 * hh, m)


@triton.jit
def _q2_k_decode(wd, PRMT: tl.constexpr, H2: tl.constexpr, magic, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GF: tl.constexpr):
    """fp16 weights [BLOCK_N, BLOCK_K] from the words of _q2_k_words.

    Per half block (128 weights, one [BLOCK_N, H] element per thread): 8 code words; weight
    128h + 32s + 4c + b is bits 2s of byte b of code word c, in 16-weight sub-block j = 8h + 2s + c//4
    (scale d*(sc&15), min dmin*(sc>>4); 8 per thread per half block). Per word and shift: one and
    (+bias) for 4 weights. Per weight: byte permute into the mantissa of 2^23, add, fma, fp16 rounding."""
    dd, swl, swh = wd[0], wd[1], wd[2]
    dsc = blocks._f16_from_bits(dd)
    dmn = blocks._f16_from_bits(dd >> 16)
    # scale bytes j = 8h + 2s + ch: word 2h + s//2, byte 2(s&1) + ch
    s00, m00 = _q2_scale(swl, dsc, dmn, 0)
    s01, m01 = _q2_scale(swl, dsc, dmn, 1)
    s10, m10 = _q2_scale(swl, dsc, dmn, 2)
    s11, m11 = _q2_scale(swl, dsc, dmn, 3)
    s20, m20 = _q2_scale(swh, dsc, dmn, 0)
    s21, m21 = _q2_scale(swh, dsc, dmn, 1)
    s30, m30 = _q2_scale(swh, dsc, dmn, 2)
    s31, m31 = _q2_scale(swh, dsc, dmn, 3)
    wb = _join8(_q2_word(wd[3]), _q2_word(wd[4]), _q2_word(wd[5]), _q2_word(wd[6]),
                _q2_word(wd[7]), _q2_word(wd[8]), _q2_word(wd[9]), _q2_word(wd[10]))
    # [BN, H, s1, s0, c2] (sXY: shift X, code words 4Y..4Y+3), repeated over c1, c0
    s = _rep4(tl.join(tl.join(tl.join(s00, s20), tl.join(s10, s30)), tl.join(tl.join(s01, s21), tl.join(s11, s31))))
    mn = _rep4(tl.join(tl.join(tl.join(m00, m20), tl.join(m10, m30)), tl.join(tl.join(m01, m21), tl.join(m11, m31))))
    w = _scaled4(wb, s, mn, PRMT, H2, magic)
    if GF:
        w = tl.permute(w, (1, 0, 2, 3, 4, 5, 6, 7, 8))
    # dims [BN, H, s1, s0, c2, c1, c0, b1, b0]: k = 128h + 32s + 4c + b, in order
    return _dot_tile(w, BLOCK_N, BLOCK_K, PRMT)


@triton.jit
def _q4_word(w):
    """The 2 biased nibble words of a Q4_K code word, [..., n]: low nibbles, high."""
    return tl.join(w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F) ^ BYTE_BIAS


@triton.jit
def _q4_k_words(w_ptr, roff, n_ok, k0, BLOCK_K: tl.constexpr, GF: tl.constexpr, VEC: tl.constexpr):
    """Q4_K words of the sub-block pairs of step k0 (int32 words, 36 per block): a tuple (the 4 header words
    d|dmin and the 12 scale bytes, the pair's 8 code words). VEC: three 16-byte loads per pair (blocks
    and rows are 16-byte aligned: 144-byte blocks); not with the fused gate/up tile, where Triton 3.6
    then converts the word tensors' layout through shared memory every step (sm_90a compiles)."""
    P: tl.constexpr = BLOCK_K // 64
    r, m, cg = _row_groups(roff, n_ok, k0, 64, P, GF)  # cg: global sub-block pair
    base = r + (cg >> 2) * 36
    cp = base + 4 + 8 * (cg & 3)
    if VEC:
        return _words4(w_ptr, base, m) + _words4(w_ptr, cp, m) + _words4(w_ptr, cp + 4, m)
    else:
        return (tl.load(w_ptr + base, mask=m, other=0), tl.load(w_ptr + base + 1, mask=m, other=0),
                tl.load(w_ptr + base + 2, mask=m, other=0), tl.load(w_ptr + base + 3, mask=m, other=0)) + _codes8(
                    w_ptr, cp, m)


@triton.jit
def _q4_k_decode(wd, k0, PRMT: tl.constexpr, H2: tl.constexpr, magic, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GF: tl.constexpr):
    """fp16 weights [BLOCK_N, BLOCK_K] from the words of _q4_k_words at input offset k0.

    Per sub-block pair p (64 weights, one [BLOCK_N, P] element per thread): 8 code words; weight
    64p + 32n + 4c + b is nibble n of byte b of code word c, in sub-block j = 2p + n (6-bit scale/min).
    Per word and nibble: one and (+bias) for 4 weights. Per weight: byte permute into the mantissa of
    2^23, add, fma, fp16 rounding."""
    P: tl.constexpr = BLOCK_K // 64
    pp = _group_ids(k0, 64, P, GF) & 3
    dd, lo, mid, hi = wd[0], wd[1], wd[2], wd[3]
    s0, m0 = blocks.q4_k_scale_min(lo, mid, hi, dd, 2 * pp)
    s1, m1 = blocks.q4_k_scale_min(lo, mid, hi, dd, 2 * pp + 1)
    wb = _join8(_q4_word(wd[4]), _q4_word(wd[5]), _q4_word(wd[6]), _q4_word(wd[7]),
                _q4_word(wd[8]), _q4_word(wd[9]), _q4_word(wd[10]), _q4_word(wd[11]))
    w = _scaled4(wb, _rep8(tl.join(s0, s1)), _rep8(tl.join(m0, m1)), PRMT, H2, magic)
    if GF:
        w = tl.permute(w, (1, 0, 2, 3, 4, 5, 6, 7))
    # dims [BN, P, n, c2, c1, c0, b1, b0]: k = 64p + 32n + 4c + b, in order
    return _dot_tile(w, BLOCK_N, BLOCK_K, PRMT)


@triton.jit
def _kq_words(w_ptr, roff, n_ok, k0, FMT: tl.constexpr, BLOCK_K: tl.constexpr, GF: tl.constexpr,
              VEC: tl.constexpr):
    """The words of step k0 as loaded (a tuple). The kernels load them one step ahead and carry them
    as loop values untouched: so they stay plain loads into registers. Consumed in the step that loads
    them (and for IQ2_XXS, carried after arithmetic), Triton's software pipeliner makes them 2- or 4-byte
    cp.async copies into shared memory read back from there: ncu on the H200 showed the L1/shared pipe
    85% busy, mostly with those (tools/results/h200_prefill/)."""
    if FMT == FMT_Q2_K:
        return _q2_k_words(w_ptr, roff, n_ok, k0, BLOCK_K, GF)
    else:
        return _q4_k_words(w_ptr, roff, n_ok, k0, BLOCK_K, GF, VEC)


@triton.jit
def _kq_decode(wd, k0, magic, FMT: tl.constexpr, PRMT: tl.constexpr, H2: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GF: tl.constexpr):
    if FMT == FMT_Q2_K:
        return _q2_k_decode(wd, PRMT, H2, magic, BLOCK_N, BLOCK_K, GF)
    else:
        return _q4_k_decode(wd, k0, PRMT, H2, magic, BLOCK_N, BLOCK_K, GF)


@triton.jit
def _tile_rows(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, tile, BLOCK_M: tl.constexpr):
    e = tl.load(tile_e_ptr + tile).to(tl.int64)
    lo = tl.load(tile_lo_ptr + tile)
    hi = tl.load(tile_hi_ptr + tile)
    rm = lo + tl.arange(0, BLOCK_M)
    return e, rm, rm < hi, hi > lo


@triton.jit
def _mma(x, w, acc, SWAP: tl.constexpr):
    """acc [M, N] += x [M, K] @ w [N, K]^T; with SWAP acc [N, M] += w @ x^T (the weights as the dot's A
    operand, the tile's tokens as its N: wgmma's N can be as small as the expert tile)."""
    if SWAP:
        return tl.dot(w, tl.trans(x), acc)
    else:
        return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """An fp32 accumulator for _mma: [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] with SWAP."""
    if SWAP:
        return tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        return tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def _per_pair(v, SWAP: tl.constexpr):
    """A per-pair vector broadcast along the accumulator's pair dimension (rows, or columns with SWAP)."""
    if SWAP:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _store_acc(ptr, pair_off, col, val, m_ok, n_ok, SWAP: tl.constexpr):
    """val (an _mma accumulator's shape) to ptr + pair_off[pair] + col[n]."""
    if SWAP:
        tl.store(ptr + pair_off[None, :] + col[:, None], val, mask=m_ok[None, :] & n_ok[:, None])
    else:
        tl.store(ptr + pair_off[:, None] + col[None, :], val, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """The gate and up halves of a fused accumulator ([M, 2N] or, with SWAP, [2N, M]): [M, N] or [N, M] each."""
    if SWAP:
        return tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N, BLOCK_M)), (1, 2, 0)))
    else:
        return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))


@triton.jit
def _x_tile(x_ptr, tok, m_ok, stride_xt, k0, BLOCK_K: tl.constexpr):
    """Activation rows of the tile's pairs at inputs k0.., [BLOCK_M, BLOCK_K] fp16 (gathered rows)."""
    return tl.load(x_ptr + tok[:, None] * stride_xt + (k0 + tl.arange(0, BLOCK_K))[None, :],
                   mask=m_ok[:, None], other=0.0)


@triton.jit
def _gate_up_kernel(x_ptr, order_ptr, wts_ptr, h_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                    gw_ptr, uw_ptr, sel16_ptr, F, D, KSEL, clamp, stride_xt, stride_ht, stride_w, up_delta, magic,
                    FMT: tl.constexpr, PRMT: tl.constexpr, H2: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GF: tl.constexpr, FUSE: tl.constexpr,
                    SWAP: tl.constexpr):
    """h[r, f] = swiglu(gate[e] @ x[t], up[e] @ x[t])[f] * wts[p] for the sorted rows r of a tile of
    expert e (pair p = order[r], token t = p // KSEL); x fp16. The F block runs fastest (program axis 0)
    so programs in flight share their tile's activation rows in L2. FUSE: the gate rows and the same up
    rows (up_delta words after them) decoded as one [2*BLOCK_N, BLOCK_K] tile, one dot per step (one
    shared-memory round trip and one wait instead of two). Weight words one step ahead in registers, for
    IQ2_XXS two (see _kq_words)."""
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    e, rm, m_ok, used = _tile_rows(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, tile, BLOCK_M)
    pair = tl.load(order_ptr + rm, mask=m_ok, other=0)
    tok = (pair // KSEL).to(tl.int64)
    wt = tl.load(wts_ptr + pair, mask=m_ok, other=0.0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < F
    n_steps = tl.where(used, D // BLOCK_K, 0)
    if FUSE:
        r2 = tl.arange(0, 2 * BLOCK_N)
        rn2 = pid_n * BLOCK_N + (r2 % BLOCK_N)
        n_ok2 = rn2 < F
        roff2 = (e * F + rn2) * stride_w + tl.where(r2 >= BLOCK_N, up_delta, 0).to(tl.int64)
        acc = _acc_zeros(BLOCK_M, 2 * BLOCK_N, SWAP)
        if FMT == FMT_IQ2_XXS:
            # two deep: group words two steps ahead, their grid records one step ahead (all loop-carried
            # as loaded, so plain loads: see _kq_words)
            gr = _iq2_raw(gw_ptr, roff2, n_ok2, 0, BLOCK_K, GF)
            gg = _iq2_grid(sel16_ptr, gr)
            gr2 = _iq2_raw(gw_ptr, roff2, n_ok2, tl.minimum(BLOCK_K, D - BLOCK_K), BLOCK_K, GF)
            for step in range(0, n_steps):
                k0 = step * BLOCK_K
                x = _x_tile(x_ptr, tok, m_ok, stride_xt, k0, BLOCK_K)
                ngr2 = _iq2_raw(gw_ptr, roff2, n_ok2, tl.minimum(k0 + 2 * BLOCK_K, D - BLOCK_K), BLOCK_K, GF)
                ngg = _iq2_grid(sel16_ptr, gr2)
                gd, g1 = _iq2_group(gr)
                w = _iq2_xxs_tile_g(gg, gd, g1, PRMT, H2, magic, 2 * BLOCK_N, BLOCK_K, GF)
                acc = _mma(x, w, acc, SWAP)
                gr = gr2
                gg = ngg
                gr2 = ngr2
        else:
            gw = _kq_words(gw_ptr, roff2, n_ok2, 0, FMT, BLOCK_K, GF, False)
            for step in range(0, n_steps):
                k0 = step * BLOCK_K
                x = _x_tile(x_ptr, tok, m_ok, stride_xt, k0, BLOCK_K)
                ngw = _kq_words(gw_ptr, roff2, n_ok2, tl.minimum(k0 + BLOCK_K, D - BLOCK_K), FMT, BLOCK_K, GF,
                                False)
                w = _kq_decode(gw, k0, magic, FMT, PRMT, H2, 2 * BLOCK_N, BLOCK_K, GF)
                acc = _mma(x, w, acc, SWAP)
                gw = ngw
        acc_g, acc_u = _halves(acc, BLOCK_M, BLOCK_N, SWAP)
    else:
        roff = (e * F + rn) * stride_w
        acc_g = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
        acc_u = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
        if FMT == FMT_IQ2_XXS:  # two deep, as the fused path
            gr = _iq2_raw(gw_ptr, roff, n_ok, 0, BLOCK_K, GF)
            ur = _iq2_raw(uw_ptr, roff, n_ok, 0, BLOCK_K, GF)
            gg = _iq2_grid(sel16_ptr, gr)
            ug = _iq2_grid(sel16_ptr, ur)
            gr2 = _iq2_raw(gw_ptr, roff, n_ok, tl.minimum(BLOCK_K, D - BLOCK_K), BLOCK_K, GF)
            ur2 = _iq2_raw(uw_ptr, roff, n_ok, tl.minimum(BLOCK_K, D - BLOCK_K), BLOCK_K, GF)
            for step in range(0, n_steps):
                k0 = step * BLOCK_K
                x = _x_tile(x_ptr, tok, m_ok, stride_xt, k0, BLOCK_K)
                k_next2 = tl.minimum(k0 + 2 * BLOCK_K, D - BLOCK_K)
                ngr2 = _iq2_raw(gw_ptr, roff, n_ok, k_next2, BLOCK_K, GF)
                nur2 = _iq2_raw(uw_ptr, roff, n_ok, k_next2, BLOCK_K, GF)
                ngg = _iq2_grid(sel16_ptr, gr2)
                nug = _iq2_grid(sel16_ptr, ur2)
                gd, g1 = _iq2_group(gr)
                wg = _iq2_xxs_tile_g(gg, gd, g1, PRMT, H2, magic, BLOCK_N, BLOCK_K, GF)
                acc_g = _mma(x, wg, acc_g, SWAP)
                ud, u1 = _iq2_group(ur)
                wu = _iq2_xxs_tile_g(ug, ud, u1, PRMT, H2, magic, BLOCK_N, BLOCK_K, GF)
                acc_u = _mma(x, wu, acc_u, SWAP)
                gr = gr2
                ur = ur2
                gg = ngg
                ug = nug
                gr2 = ngr2
                ur2 = nur2
        else:
            gw = _kq_words(gw_ptr, roff, n_ok, 0, FMT, BLOCK_K, GF, True)
            uw = _kq_words(uw_ptr, roff, n_ok, 0, FMT, BLOCK_K, GF, True)
            for step in range(0, n_steps):
                k0 = step * BLOCK_K
                x = _x_tile(x_ptr, tok, m_ok, stride_xt, k0, BLOCK_K)
                k_next = tl.minimum(k0 + BLOCK_K, D - BLOCK_K)
                ngw = _kq_words(gw_ptr, roff, n_ok, k_next, FMT, BLOCK_K, GF, True)
                nuw = _kq_words(uw_ptr, roff, n_ok, k_next, FMT, BLOCK_K, GF, True)
                wg = _kq_decode(gw, k0, magic, FMT, PRMT, H2, BLOCK_N, BLOCK_K, GF)
                acc_g = _mma(x, wg, acc_g, SWAP)
                wu = _kq_decode(uw, k0, magic, FMT, PRMT, H2, BLOCK_N, BLOCK_K, GF)
                acc_u = _mma(x, wu, acc_u, SWAP)
                gw = ngw
                uw = nuw
    h = moe._swiglu_route(acc_g, acc_u, _per_pair(wt, SWAP), clamp)
    _store_acc(h_ptr, rm.to(tl.int64) * stride_ht, rn, h.to(tl.float16), m_ok, n_ok, SWAP)


@triton.jit
def _down_kernel(h_ptr, order_ptr, y_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, dw_ptr,
                 F, D, stride_ht, stride_yp, stride_w, magic,
                 FMT: tl.constexpr, PRMT: tl.constexpr, H2: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GF: tl.constexpr, SWAP: tl.constexpr):
    """y[order[r], d] = down[e][d, :] @ h[r, :] for the sorted rows r of each tile (one writer per pair).
    Weight words one step ahead in registers (see _kq_words)."""
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    e, rm, m_ok, used = _tile_rows(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, tile, BLOCK_M)
    pair = tl.load(order_ptr + rm, mask=m_ok, other=0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < D
    roff = (e * D + rn) * stride_w
    acc = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    n_steps = tl.where(used, F // BLOCK_K, 0)
    rm64 = rm.to(tl.int64)
    wd = _kq_words(dw_ptr, roff, n_ok, 0, FMT, BLOCK_K, GF, True)
    for step in range(0, n_steps):
        k0 = step * BLOCK_K
        hx = _x_tile(h_ptr, rm64, m_ok, stride_ht, k0, BLOCK_K)
        nwd = _kq_words(dw_ptr, roff, n_ok, tl.minimum(k0 + BLOCK_K, F - BLOCK_K), FMT, BLOCK_K, GF, True)
        w = _kq_decode(wd, k0, magic, FMT, PRMT, H2, BLOCK_N, BLOCK_K, GF)
        acc = _mma(hx, w, acc, SWAP)
        wd = nwd
    _store_acc(y_ptr, pair * stride_yp, rn, acc, m_ok, n_ok, SWAP)


def _takes(gate: DeviceWeight, down: DeviceWeight, F: int, D: int, cfg: PrefillConfig) -> bool:
    return (gate.fmt.name in SUPPORTED_GATE_UP and down.fmt.name in SUPPORTED_DOWN
            and cfg.block_k % 128 == 0 and cfg.block_k_down % 128 == 0 and D % cfg.block_k == 0
            and F % cfg.block_k_down == 0)


def _up_delta(gate: DeviceWeight, up: DeviceWeight) -> int | None:
    """up.w's first word counted from gate.w's (the fused kernel addresses both from gate.w), or None when
    the two cannot be addressed that way."""
    if gate.w.dtype != up.w.dtype or gate.w.device != up.w.device or gate.stride_w != up.stride_w:
        return None
    diff = up.w.data_ptr() - gate.w.data_ptr()
    return diff // gate.w.element_size() if diff % gate.w.element_size() == 0 else None


def expert_rows(sel, E: int, cfg: PrefillConfig):
    """(order, tile_e, tile_lo, tile_hi) of moe.expert_tiles for the config's tile height."""
    return moe.expert_tiles(sel, E, cfg.block_m)


def gate_up_stage(x16, gate: DeviceWeight, up: DeviceWeight, weights, clamp: float, tiles, K: int,
                  dev: DeviceInfo, cfg: PrefillConfig):
    """h [T*K, F] fp16 in sorted-row order (kernel 1) from x16 [T, D] fp16."""
    order, te, lo, hi = tiles
    E, F, D = gate.shape
    h = empty_f16((x16.shape[0] * K, F), x16.device)
    delta = _up_delta(gate, up) if cfg.fuse else None
    fuse = delta is not None
    _gate_up_kernel[(triton.cdiv(F, cfg.block_n), te.numel())](
        x16, order, weights.reshape(-1), h, te, lo, hi, gate.w, up.w, gate.sel16, F, D, K,
        float(clamp), x16.stride(0), h.stride(0), gate.stride_w, delta or 0, F32_MAGIC_BITS, FMT=int(gate.fmt),
        PRMT=dev.vendor == Vendor.NVIDIA, H2=cfg.h2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GF=GROUPS_FIRST, FUSE=fuse, SWAP=cfg.swap, num_warps=cfg.num_warps,
        num_stages=1 if dev.vendor == Vendor.CPU else cfg.num_stages)
    return h


def down_stage(h, down: DeviceWeight, tiles, T: int, K: int, dev: DeviceInfo, cfg: PrefillConfig):
    """y [T*K, D] fp32 in pair order (kernel 2, one writer per pair) from h of gate_up_stage."""
    order, te, lo, hi = tiles
    E, D, F = down.shape
    y = blocks.empty((T * K, D), h.device)
    _down_kernel[(triton.cdiv(D, cfg.block_n_down), te.numel())](
        h, order, y, te, lo, hi, down.w, F, D, h.stride(0), y.stride(0), down.stride_w,
        F32_MAGIC_BITS, FMT=int(down.fmt), PRMT=dev.vendor == Vendor.NVIDIA, H2=cfg.h2, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n_down, BLOCK_K=cfg.block_k_down, GF=GROUPS_FIRST, SWAP=cfg.swap_down,
        num_warps=cfg.num_warps_down,
        num_stages=1 if dev.vendor == Vendor.CPU else (cfg.num_stages_down or cfg.num_stages))
    return y


def grouped_v2(u, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight, sel, weights, clamp: float,
               dev: DeviceInfo, cfg: PrefillConfig | None = None):
    """Routed MoE prefill: u [T, D], sel/weights [T, K] -> [T, D] fp32. u and h are rounded to fp16,
    weights to fp16 after exact decoding and scaling; fp32 accumulation. Formats or shapes the kernels
    do not take go to moe.moe_float (fp32 decode kernels for T <= 8, moe.grouped above)."""
    cfg = cfg or PrefillConfig()
    u, sel, weights, E, F, D = moe._check(u, gate, up, down, sel, weights)
    T, K = sel.shape
    if not _takes(gate, down, F, D, cfg) or triton.cdiv(T * K, cfg.block_m) + E > MAX_GRID_Y:
        return moe.moe_float(u, gate, up, down, sel, weights, clamp, dev)
    tiles = expert_rows(sel, E, cfg)
    x16 = u.to(torch.float16)  # one rounding of u, read by every F block of every tile
    # h in fp16: the down GEMM's operand type anyway (rounding at the store equals rounding at the load),
    # half the traffic, and the tile loads go straight to shared memory with no per-program conversion.
    # |h| <= clamp^2 * route weight stays far inside fp16 range for the model's clamp.
    if cfg.rega is not None and moe_gluon.supports(u, gate, up, dev, cfg.rega, cfg.block_m):
        h = moe_gluon.gate_up_stage(x16, gate, up, weights, clamp, tiles, K, cfg.block_m, cfg.rega)
    else:
        h = gate_up_stage(x16, gate, up, weights, clamp, tiles, K, dev, cfg)
    if cfg.rega_down is not None and moe_gluon.supports_down(h, down, dev, cfg.rega_down, cfg.block_m):
        y = moe_gluon.down_stage(h, down, tiles, T, K, cfg.block_m, cfg.rega_down)
    else:
        y = down_stage(h, down, tiles, T, K, dev, cfg)
    return y.view(T, K, D).sum(1)  # fixed reduction order for a given shape: deterministic


CONFIGS = {
    "grouped_v2": PrefillConfig(),
    # fp32 scaling: each weight rounded to fp16 once (~1-1.5 more instructions per weight)
    "grouped_v2_f32": PrefillConfig(h2=False),
    # larger expert tiles: fewer repeated decodes of experts with > 64 pairs, more registers
    "grouped_v2_m128": PrefillConfig(block_m=128, num_stages=2),
    # 4-warp gate/up programs of 64 rows (~96 KB shared: two programs per SM)
    "grouped_v2_n64": PrefillConfig(block_n=64, num_warps=4),
}

# Per gate/up format, the fastest measured tiles on the H200 at T=2048 (tools/results/h200_prefill/):
# weight words one step ahead in registers, the down GEMM with the weights as the dot's A operand.
# IQ2_XXS/Q2_K: gate and up as one tile; Q4_K: separate tiles (16-byte word loads) and 128-input down steps.
TRITON_TUNED_IQ2 = PrefillConfig(block_n=64, num_warps=4, num_stages=3, fuse=True, swap_down=True, block_n_down=64,
                                 block_k_down=256, num_warps_down=4, num_stages_down=3)
TUNED = {
    # the gate/up by moe_gluon where it runs (64-input steps, words one step ahead: h200_prefill/11), and the Q2_K
    # down too (64-input steps: 1.36 -> 1.21 ms, whole call 3.77-3.78 -> 3.59-3.60 ms, h200_prefill/15a-b),
    # TRITON_TUNED_IQ2's Triton tiles elsewhere. The gate/up gathers its pair selectors from a shared copy of the
    # table (2.29 -> 2.09 ms, at 80 registers: three programs per SM) and the down runs capped at 80 registers
    # (three programs per SM: 1.27 -> 1.17 ms), h200_prefill/19-20; its code and scale words loaded once per row
    # and step: 1.16 -> 1.07 ms, whole call 3.29 ms (22, 25)
    QuantFormat.IQ2_XXS: replace(TRITON_TUNED_IQ2, rega=moe_gluon.RegATile(64, prefetch=False, smem_table=True),
                                 rega_down=moe_gluon.RegATile(64, prefetch=False, maxnreg=80)),
    QuantFormat.Q4_K: PrefillConfig(block_n=64, num_warps=4, num_stages=2, swap_down=True,
                                    block_n_down=64, block_k_down=128, num_warps_down=4, num_stages_down=3),
}


def tuned_config(gate: DeviceWeight) -> PrefillConfig:
    """The tiles moe's auto variant uses for these experts: TUNED by gate/up format, else grouped_v2_n64."""
    return TUNED.get(gate.fmt, CONFIGS["grouped_v2_n64"])


def grouped_v2_default(u, gate, up, down, sel, weights, clamp, dev):
    """grouped_v2 with the tiles of tuned_config (moe's auto variant above the decode sizes)."""
    return grouped_v2(u, gate, up, down, sel, weights, clamp, dev, tuned_config(gate))


def _variant(cfg: PrefillConfig):
    def fn(u, gate, up, down, sel, weights, clamp, dev):
        return grouped_v2(u, gate, up, down, sel, weights, clamp, dev, cfg)

    return fn


# ---- registered variants (op "moe"; signature fn(u, gate, up, down, sel, weights, clamp, dev)) ---
from .registry import KernelOp, register  # noqa: E402

_FMTS = (QuantFormat.IQ2_XXS, QuantFormat.Q4_K)
for _name, _cfg in CONFIGS.items():
    register(KernelOp.MOE, _name, _variant(_cfg), formats=_FMTS,
             doc=f"prefill: expert-sorted grouped tl.dot, weights decoded once per tile per group in words "
                 f"(M{_cfg.block_m} N{_cfg.block_n} K{_cfg.block_k}, {_cfg.num_warps} warps, "
                 f"{'fp16' if _cfg.h2 else 'fp32'} scaling)")
register(KernelOp.MOE, "grouped_v2_rega", _variant(replace(TUNED[QuantFormat.Q4_K],
                                                         rega=moe_gluon.RegATile(64, prefetch=False))),
         formats=(QuantFormat.Q4_K,),
         doc="prefill: grouped_v2 with TUNED's Q4_K tiles and the gate/up by moe_gluon (the weights as wgmma's "
             "register operand) where it runs: slower than the Triton gate/up for Q4_K (h200_prefill/11f)")
register(KernelOp.MOE, "grouped_v2_triton", _variant(TRITON_TUNED_IQ2), formats=(QuantFormat.IQ2_XXS,),
         doc="prefill: grouped_v2 with TUNED's IQ2_XXS/Q2_K tiles, both stages as Triton kernels (the tuned "
             "path before the Gluon register-operand gate/up)")
register(KernelOp.MOE, "grouped_v2_tuned", grouped_v2_default, formats=_FMTS,
         doc="prefill: grouped_v2 with the per-format H200 tiles (TUNED: words prefetched in registers, "
             "swapped down dot); what auto uses above the decode sizes")
