"""The arithmetic of the Gluon register-operand gate/up and down (dsv4/kernels_triton/moe_gluon.py), emulated on the
CPU (IQ2_XXS, Q4_K and Q2_K records).

Gluon has no interpreter, so the kernel itself runs only on the GPU (tests/gpu/test_moe_gluon_gpu.py); what can be
checked here exactly is every table and bit trick it relies on, replayed in numpy word for word as the kernel
computes them: the pair-selector table (iq2_pair_selectors), the signs spread by one multiply with the parity
bit from popc, the byte permute of each 16-bit selector half into the fp16 pair (q0, q1) (its sign-replicate
mode included), then times the fp16 group scale (moe_prefill's H2 decode). Against dsv4.quant's IQ2_XXS
dequantization of random blocks (each weight rounded to fp16 with the scale rounded first: tolerance
('dequant', 'all'), exact). And the
dot-position order the activations are permuted into (permuted_activations) against input_of_dot_pos.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from dsv4.kernels_triton import blocks, moe_gluon
from dsv4.quant.dequant import dequantize_np
from dsv4.quant.formats import QuantFormat
from tests.tolerances import assert_close

# the kernel's own constants: the byte-permute sources of its pair asm, the sign spread multiplier and mask
POS, NEG = (int(re.search(rf"mov\.b32 {r}, (0x[0-9A-Fa-f]+);", moe_gluon._PAIR_ASM.value).group(1), 16)
            for r in ("p", "n"))
SIGN4 = moe_gluon._SIGN4.value
SIGN_BITS = moe_gluon._SIGN_BITS.value


def _prmt(a, b, sel):
    """PTX prmt.b32 (default mode) on uint32 values or arrays (broadcast): byte k of the result is byte
    (sel >> 4k) & 7 of b:a, or with bit 3 of that nibble set, that byte's sign bit replicated over all 8 bits."""
    a, b, sel = np.broadcast_arrays(*(np.asarray(v, dtype=np.int64) for v in (a, b, sel)))
    src = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
    out = np.zeros(sel.shape, np.int64)
    for k in range(4):
        nib = (sel >> (4 * k)) & 15
        byte = np.choose(nib & 7, src)
        byte = np.where(nib & 8, np.where(byte & 128, 255, 0), byte)
        out |= byte << (8 * k)
    return out


def _random_blocks(n_blocks: int, seed: int) -> np.ndarray:
    """IQ2_XXS blocks of random bytes (every byte pattern is a valid block) with a finite, moderate fp16 d."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, 66), dtype=np.uint8)
    d = (rng.random(n_blocks) * 2 - 1).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw


def _kernel_decode(raw: np.ndarray) -> np.ndarray:
    """The weights of each block as the kernel's _iq2_sel + _iq2_a compute them, fp16 [n_blocks, 256]."""
    psel = moe_gluon.iq2_pair_selectors("cpu").numpy().astype(np.uint64)
    n = raw.shape[0]
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    qs = raw[:, 2:].copy().view(np.uint32).reshape(n, 8, 2)  # per 32-group: aux0 (grid bytes), aux1
    out = np.zeros((n, 256), np.float16)
    for ib in range(8):
        aux0, a1 = qs[:, ib, 0], qs[:, ib, 1]
        db = (d * (0.5 + ((a1 >> 28) & 15).astype(np.float32)) * 0.25).astype(np.float16)
        for c in range(4):  # the lane's record
            gi = (aux0 >> (8 * c)) & 255
            lv = psel[gi]
            sidx = (a1 >> (7 * c)) & 127
            par = np.array([bin(int(v)).count("1") & 1 for v in sidx], np.uint32)
            sel_a = (lv & 0xFFFFFFFF).astype(np.uint32) | (((sidx & 15) * SIGN4) & SIGN_BITS)
            sel_b = (lv >> 32).astype(np.uint32) | ((((sidx >> 4) | (par << 3)) * SIGN4) & SIGN_BITS)
            for j, word in enumerate((sel_a & 0xFFFF, sel_a >> 16, sel_b & 0xFFFF, sel_b >> 16)):
                pair = _prmt(POS, NEG, word)
                for half in range(2):
                    q = ((pair >> (16 * half)) & 0xFFFF).astype(np.uint16).view(np.float16)
                    out[:, 32 * ib + 8 * c + 2 * j + half] = (q.astype(np.float32) * db.astype(np.float32)).astype(
                        np.float16)
    return out


def _oracle(raw: np.ndarray) -> np.ndarray:
    """dsv4.quant's dequantization with moe_prefill's H2 rounding: the group scale to fp16, then q * s to fp16."""
    n = raw.shape[0]
    w = dequantize_np(raw.reshape(-1), QuantFormat.IQ2_XXS, n * 256).reshape(n, 8, 32)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    ls = (raw[:, 2:].copy().view(np.uint32).reshape(n, 8, 2)[:, :, 1] >> 28).astype(np.float32)
    db32 = d[:, None] * (0.5 + ls) * 0.25
    q = np.rint(w / np.where(db32 == 0, 1, db32)[:, :, None])  # the signed grid values (+-8, 25, 43)
    db16 = db32.astype(np.float16).astype(np.float32)
    return (q * db16[:, :, None]).astype(np.float16).reshape(n, 256)


def test_pair_selector_decode_matches_dequant():
    raw = _random_blocks(512, seed=11)
    got = _kernel_decode(raw)
    ref = _oracle(raw)
    assert_close(got.astype(np.float64), ref.astype(np.float64), "dequant", "all", "moe_gluon IQ2_XXS pair decode")


def test_pair_selector_table_layout():
    """Each entry: coordinate j's level (0..2) in the high nibble of byte j, bit 2 of it clear (where the kernel ORs
    the sign in), and the low byte's selector of that level below it; the permute of a plain entry gives the
    positive grid values as fp16."""
    psel = moe_gluon.iq2_pair_selectors("cpu").numpy().astype(np.uint64)
    levels = np.array([[(int(v) >> (8 * j + 4)) & 0xF for j in range(8)] for v in psel])
    lows = np.array([[(int(v) >> (8 * j)) & 0xF for j in range(8)] for v in psel])
    grid = np.array(blocks.IQ2XXS_GRID, dtype=np.uint8).reshape(256, 8)
    assert np.array_equal(np.array([8, 25, 43])[levels], grid)
    assert np.array_equal(np.array(moe_gluon.PAIR_LOW_SELECTORS)[levels], lows)
    vals = np.stack([_prmt(POS, NEG, (psel >> (16 * i)) & 0xFFFF) for i in range(4)], 1).astype(np.uint32)
    assert np.array_equal(vals.view(np.float16).reshape(256, 8).astype(np.float32), grid.astype(np.float32))


def test_permuted_activations_follow_the_dot_positions():
    x = torch.arange(2 * 256, dtype=torch.float16).reshape(2, 256)
    p = moe_gluon.permuted_activations(x)
    order = torch.tensor([moe_gluon.input_of_dot_pos(i) for i in range(256)])
    assert torch.equal(p, x[:, order])
    assert sorted(order.tolist()) == list(range(256))  # a permutation, within each 32
    assert all(order[i] // 32 == i // 32 for i in range(256))


def _random_q4_k(n_blocks: int, seed: int) -> np.ndarray:
    """Q4_K blocks of random bytes with finite, moderate fp16 d and dmin."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
    dd = (rng.random((n_blocks, 2)) * 0.02).astype(np.float16)
    raw[:, :4] = dd.view(np.uint8).reshape(n_blocks, 4)
    return raw


def _code_pairs(codes: np.ndarray, s16: np.ndarray, nm16: np.ndarray) -> np.ndarray:
    """The Q4_K pair asm (_Q4_LO_ASM, _Q4_HI_ASM) on a word of 4 codes (< 16, one per byte): per pair the byte
    permute into fp16 1024 + q, minus 1024 (exact), one fp16 fma with the scale and the negated min; [n, 4] fp16."""
    out = np.zeros((codes.shape[0], 4), np.float16)
    for p, a in enumerate((moe_gluon._Q4_LO_ASM, moe_gluon._Q4_HI_ASM)):
        sel = int(re.search(r"prmt\.b32 t, \$1, mg, (0x[0-9A-Fa-f]+);", a.value).group(1), 16)
        pair = _prmt(codes, 0x64646464, sel)
        for e in range(2):
            t = ((pair >> (16 * e)) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
            out[:, 2 * p + e] = ((t - 1024.0) * s16 + nm16).astype(np.float16)
    return out


def _q4_kernel_decode(raw: np.ndarray) -> np.ndarray:
    """Q4_K weights as _q4_words, _q4_head, _q4_sel and the Q4_K pair asm compute them, fp16 [n_blocks, 256]."""
    n = raw.shape[0]
    words = raw.view("<i4").reshape(n, 36).astype(np.int64) & 0xFFFFFFFF
    hd, hlo, hmid, hhi = words[:, 0], words[:, 1], words[:, 2], words[:, 3]
    d = (hd & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
    dmin = (hd >> 16).astype(np.uint16).view(np.float16).astype(np.float32)
    out = np.zeros((n, 256), np.float16)
    for jj in range(8):
        jm = 8 * (jj & 3)
        a, b, cc = (hlo >> jm) & 255, (hmid >> jm) & 255, (hhi >> jm) & 255
        sc = np.where(jj < 4, a & 63, (cc & 15) | ((a >> 6) << 4))
        mn = np.where(jj < 4, b & 63, (cc >> 4) | ((b >> 6) << 4))
        s16 = (d * sc.astype(np.float32)).astype(np.float16).astype(np.float64)
        m16 = (-(dmin * mn.astype(np.float32))).astype(np.float16).astype(np.float64)
        for c in range(4):
            cw = 4 + 8 * (jj >> 1) + 2 * c
            for half, w in enumerate((words[:, cw], words[:, cw + 1])):
                q4 = _code_pairs((w >> (4 * (jj & 1))) & 0x0F0F0F0F, s16, m16)
                out[:, 32 * jj + 8 * c + 4 * half: 32 * jj + 8 * c + 4 * half + 4] = q4
    return out


def test_q4_k_decode_matches_dequant():
    """The Q4_K stages against the GGUF layout: codes from qs (sub-block 2p + n: nibble n of bytes 32p..32p+31),
    scales and mins from dsv4.quant's unpacking, scale and min rounded to fp16 then one fp16 fma (H2): exact."""
    from dsv4.quant.dequant import q4_k_scale_min_np

    raw = _random_q4_k(256, seed=5)
    n = raw.shape[0]
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = q4_k_scale_min_np(raw[:, 4:16])
    s16 = (d * sc.astype(np.float32)).astype(np.float16).astype(np.float64)  # [n, 8]
    m16 = (dmin * m.astype(np.float32)).astype(np.float16).astype(np.float64)
    q = ((raw[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(n, 8, 32)
    ref = (q * s16[:, :, None] - m16[:, :, None]).astype(np.float16).reshape(n, 256)
    assert_close(_q4_kernel_decode(raw).astype(np.float64), ref.astype(np.float64), "dequant", "all",
                 "moe_gluon Q4_K pair decode")


def _random_q2_k(n_blocks: int, seed: int) -> np.ndarray:
    """Q2_K blocks of random bytes (scales, codes) with finite, moderate fp16 d and dmin (bytes 80-83)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, 84), dtype=np.uint8)
    dd = (rng.random((n_blocks, 2)) * 0.02).astype(np.float16)
    raw[:, 80:84] = dd.view(np.uint8).reshape(n_blocks, 4)
    return raw


def _q2_kernel_decode(raw: np.ndarray) -> np.ndarray:
    """Q2_K weights as _q2_words, _q2_sel and the Q4_K pair asm compute them (a record: 32-group gg of the block,
    lane c), fp16 [n_blocks, 256]."""
    n = raw.shape[0]
    words = raw.view("<i4").reshape(n, 21).astype(np.int64) & 0xFFFFFFFF
    hd = words[:, 20]
    d = (hd & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
    dmin = (hd >> 16).astype(np.uint16).view(np.float16).astype(np.float32)
    out = np.zeros((n, 256), np.float16)
    for gg in range(8):
        hh, sh = (gg >> 2) & 1, 2 * (gg & 3)
        for c in range(4):
            cw = 4 + 8 * hh + 2 * c
            j = 8 * hh + 2 * (gg & 3) + (c >> 1)
            sc = (words[:, j >> 2] >> (8 * (j & 3))) & 255
            s16 = (d * (sc & 15).astype(np.float32)).astype(np.float16).astype(np.float64)
            nm16 = (-(dmin * (sc >> 4).astype(np.float32))).astype(np.float16).astype(np.float64)
            for half, w in enumerate((words[:, cw], words[:, cw + 1])):
                q4 = _code_pairs((w >> sh) & 0x03030303, s16, nm16)
                out[:, 32 * gg + 8 * c + 4 * half: 32 * gg + 8 * c + 4 * half + 4] = q4
    return out


def test_q2_k_decode_matches_dequant():
    """The Q2_K stages of the down kernel against the GGUF layout: weight 128h + 32s + l is bits 2s of code byte
    32h + l, in 16-weight sub-block (128h + 32s + l) // 16 (scale in the low nibble, min in the high one); that
    reading checked against dsv4.quant's dequantization (fp32, exact), then scale and min rounded to fp16 and one
    fp16 fma (H2) against the kernel's arithmetic: exact."""
    raw = _random_q2_k(256, seed=7)
    n = raw.shape[0]
    d = raw[:, 80:82].copy().view(np.float16).astype(np.float32)
    dmin = raw[:, 82:84].copy().view(np.float16).astype(np.float32)
    k = np.arange(256)
    q = (raw[:, 16 + 32 * (k // 128) + k % 32] >> (2 * ((k % 128) // 32))) & 3  # [n, 256]
    sc = raw[:, k // 16]
    s32, m32 = d * (sc & 15).astype(np.float32), dmin * (sc >> 4).astype(np.float32)
    assert_close((s32 * q - m32).astype(np.float64), dequantize_np(raw.reshape(-1), QuantFormat.Q2_K, n * 256)
                 .reshape(n, 256).astype(np.float64), "dequant", "all", "Q2_K layout reading")
    ref = (q * s32.astype(np.float16).astype(np.float64) - m32.astype(np.float16).astype(np.float64)).astype(np.float16)
    assert_close(_q2_kernel_decode(raw).astype(np.float64), ref.astype(np.float64), "dequant", "all",
                 "moe_gluon Q2_K pair decode")


def test_down_tile_conditions(monkeypatch):
    """supports_down's host-side decisions (the GPU check itself patched to pass): the down formats only, whole
    Q2_K/Q4_K blocks along F, output rows in whole programs of 2 ROWS, the registered step widths and expert tile
    heights, and an even step count for the prefetching (two-step) loop."""
    from types import SimpleNamespace

    if not moe_gluon.HAVE_GLUON:
        import pytest

        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(moe_gluon, "hopper_plus", lambda dev, x: True)
    h = torch.empty(1)
    flash = (256, 4096, 2048)  # experts, D (output rows), F (inputs)

    def ok(tile, bm=64, shape=flash, fmt=QuantFormat.Q2_K):
        return moe_gluon.supports_down(h, SimpleNamespace(fmt=fmt, shape=shape), None, tile, bm)

    nopf = moe_gluon.RegATile(64, prefetch=False)
    assert ok(nopf) and ok(moe_gluon.RegATile(128)) and ok(nopf, fmt=QuantFormat.Q4_K)
    assert not ok(nopf, fmt=QuantFormat.IQ2_XXS) and not ok(nopf, fmt=QuantFormat.Q8_0)
    assert ok(moe_gluon.RegATile(256, prefetch=False), shape=(256, 4096, 768))
    assert not ok(moe_gluon.RegATile(256), shape=(256, 4096, 768))  # 3 steps: the PF loop takes two at a time
    assert not ok(nopf, shape=(256, 4096, 2000))  # not whole 256-weight blocks
    assert not ok(nopf, shape=(256, 4000, 2048))  # not whole 128-row programs
    assert not ok(moe_gluon.RegATile(96, prefetch=False))
    assert not ok(nopf, bm=12) and not ok(nopf, bm=512) and ok(nopf, bm=32)

def test_gate_up_table_fits(monkeypatch):
    """supports' shared-memory condition for the gate/up's shared selector table (the GPU check patched to pass):
    the table beside 48 KiB of activation buffers (64 x 128 tiles) does not launch (h200_prefill/19); without the
    table (or for Q4_K, which never reads it) those tiles stay taken."""
    from types import SimpleNamespace

    if not moe_gluon.HAVE_GLUON:
        import pytest

        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(moe_gluon, "hopper_plus", lambda dev, x: True)
    monkeypatch.setattr("dsv4.kernels_triton.moe_prefill._up_delta", lambda gate, up: 0)
    u = torch.empty(1)
    gate = SimpleNamespace(fmt=QuantFormat.IQ2_XXS, shape=(256, 2048, 4096))

    def ok(tile, bm=64):
        return moe_gluon.supports(u, gate, gate, None, tile, bm)

    assert ok(moe_gluon.RegATile(64, smem_table=True)) and ok(moe_gluon.RegATile(64, prefetch=False, smem_table=True))
    assert ok(moe_gluon.RegATile(128, smem_table=True), bm=32)
    assert not ok(moe_gluon.RegATile(128, smem_table=True)) and not ok(moe_gluon.RegATile(256, smem_table=True))
    assert ok(moe_gluon.RegATile(128)) and ok(moe_gluon.RegATile(256, prefetch=False))
    # Q4_K has no table: its tiles launch without it, so smem_table does not hold them to the table's budget
    q4 = SimpleNamespace(fmt=QuantFormat.Q4_K, shape=(256, 2048, 4096))
    assert moe_gluon.supports(u, q4, q4, None, moe_gluon.RegATile(128, smem_table=True), 64)
