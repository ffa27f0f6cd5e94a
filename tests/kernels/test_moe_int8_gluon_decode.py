"""The lane layout and decode arithmetic of moe_int8_gluon's IQ2_XXS gate/up (_iq2_gate_up_kernel), emulated on the
CPU.

Gluon has no interpreter, so the kernel itself runs only on the GPU (tests/gpu/test_moe_int8_gluon_gpu.py) and is
compiled offline here (test_moe_int8_gluon_compile.py). What this file checks exactly, replayed in numpy word for word
as the kernel computes it: each lane's (pair, block, group) word offsets inside the 33-word block pairs (block 0's
groups straddle words and are funnel-shifted by 16, block 1's are word-aligned; d in the low half of word 0 or the
high half of word 16), the selector decode of every record (16-bit level selector spread to nibbles, the 7 signs
spread by one multiply and the 8th from popc, two byte permutes of {8, 25, 43} / {-8, -25, -43}), and the activation
words the lane dots them with (quant_q8_k's iq2_order). Against dsv4.quant's dequantization: each lane's integer
dot equals the dot of the grid values with the same codes, and d (2 ls + 1) / 8 times each decoded byte equals the
dequantized weight (tolerance ('dequant', 'all'): exact).
"""
from __future__ import annotations

import numpy as np

from dsv4.kernels_triton import blocks, moe_int8
from dsv4.quant.dequant import dequantize_np
from dsv4.quant.formats import QuantFormat
from tests.kernels.test_moe_gluon_decode import _prmt, _random_blocks
from tests.tolerances import assert_close

PAIR_WORDS = 33


def _lane_words(pairs_words: np.ndarray, p: int, h: int, g: int):
    """_iq2_offsets' four words of lane (p, h, g) in a row's pair words [n_pairs * 33]: three aux words, d's word."""
    base = p * PAIR_WORDS
    aux = [base + 2 * g + 17 * h + min(i, 2 - h) for i in range(3)]
    return [int(pairs_words[a]) for a in aux] + [int(pairs_words[base + 16 * h])]


def _funnel(lo: int, hi: int, sh: int) -> int:
    """PTX shf.r.clamp.b32: the 32 bits of hi:lo from bit sh (sh <= 32)."""
    return ((hi << 32 | lo) >> sh) & 0xFFFFFFFF


def _record(aux0: int, aux1: int, k: int, sel16: np.ndarray) -> np.ndarray:
    """_iq2_record: the 8 signed bytes (selector order: coordinates 0, 4, 1, 5, 2, 6, 3, 7) of record k."""
    gi = (aux0 >> (8 * k)) & 255
    v = int(sel16[gi]) & 0xFFFF
    sidx = (aux1 >> (7 * k)) & 127
    par = bin(sidx).count("1")
    sel = (((v | (v << 14)) & 0x33333333) | (((sidx * blocks.SIGN_SPREAD.value) << 2) & 0x44444444)
           | ((par & 1) << 30)) & 0xFFFFFFFF
    lo = int(_prmt(blocks.IQ2_POS_BYTES.value, blocks.IQ2_NEG_BYTES.value, sel))
    hi = int(_prmt(blocks.IQ2_POS_BYTES.value, blocks.IQ2_NEG_BYTES.value, sel >> 16))
    return np.array([lo, hi], np.uint32).view(np.int8)


def test_iq2_lane_decode_and_activation_words_match_dequant():
    n_pairs = 4  # one row of 2048 inputs: two kernel steps of 2 pairs (one warp along K)
    raw = _random_blocks(2 * n_pairs, seed=5)
    words = raw.reshape(-1).view(np.uint32).astype(np.int64)
    w = dequantize_np(raw.reshape(-1), QuantFormat.IQ2_XXS, 2 * n_pairs * 256).reshape(2 * n_pairs, 8, 32)
    d = raw[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
    sel16 = blocks.iq2_sel16("cpu").numpy()
    rng = np.random.default_rng(3)
    codes = rng.integers(-127, 128, size=(2 * n_pairs, 256))  # one plane of u's codes, natural order
    # quant_q8_k(iq2_order=True)'s packing: code j of each 8 at byte IQ2_ORDER[j] of its two words
    packed = np.zeros((2 * n_pairs, 256), np.int64)
    for j, pos in enumerate(moe_int8.IQ2_ORDER):
        packed.reshape(2 * n_pairs, 32, 8)[:, :, pos] = codes.reshape(2 * n_pairs, 32, 8)[:, :, j]
    act_words = packed.astype(np.int8).view(np.int32).reshape(-1)  # 64 words per super-block
    kernel_w = np.zeros_like(w)
    for p in range(n_pairs):  # the pairs of every step, in order
        for h in range(2):
            for g in range(8):
                w0, w1, w2, wd = _lane_words(words, p, h, g)
                sh = 16 - 16 * h
                aux0, aux1 = _funnel(w0, w1, sh), _funnel(w1, w2, sh)
                dbits = (wd >> (16 - sh)) & 0xFFFF
                assert dbits == raw[2 * p + h, :2].view(np.uint16)[0]
                sb = 2 * p + h  # _iq2_offsets' xo: the group's 8 words of its super-block's 64
                xw = act_words[sb * 64 + 8 * g: sb * 64 + 8 * g + 8].view(np.int8).astype(np.int64)
                isum = 0
                ls = (aux1 >> 28) & 15
                for k in range(4):
                    q = _record(aux0, aux1, k, sel16).astype(np.int64)
                    isum += int((q * xw[8 * k: 8 * k + 8]).sum())  # two dp4a: words 2k, 2k + 1
                    dval = np.float64(np.array([dbits], np.uint16).view(np.float16)[0])
                    kernel_w[sb, g, 8 * k: 8 * k + 8] = dval * (2 * ls + 1) / 8 * q[list(moe_int8.IQ2_ORDER)]
                grid = np.rint(w[sb, g] / (d[sb] * (2 * ls + 1) / 8)) if d[sb] != 0 else np.zeros(32)
                assert isum == int((grid * codes[sb, 32 * g: 32 * g + 32]).sum()), (p, h, g)
    assert_close(kernel_w, w.astype(np.float64), "dequant", "all", "moe_int8_gluon IQ2_XXS lane decode")

