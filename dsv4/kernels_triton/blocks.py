"""GGUF block decoding inside Triton kernels, and the one-time device layout each format is read from.

`dequant_tile(...)` returns fp32 weights for broadcastable (row, k) index tensors; every kernel of
this package (GEMV, GEMM, MoE) reads weights only through it, so the formulas of quant.md §1 live
in one place. Device layouts (`DeviceWeight`, built once by `to_device`):
  * Q2_K (84 B blocks, 4-aligned), Q4_K (144 B, 16-aligned): the raw GGUF bytes, read as int32 words;
  * IQ2_XXS (66 B, 2-aligned): the raw bytes read as int16 half-words, plus the 2 KiB grid table;
  * F16 / BF16 / F32: the raw bytes viewed as 16/32-bit elements;
  * Q8_0 (34 B, 2-aligned): repacked once per row into [32*nb int8 codes | nb fp16 scales] (same bytes,
    same row size, same math) so codes are 16-byte aligned for vector loads.
No dequantized copy of a weight is ever kept. Knows block layouts only, not the model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..quant.formats import QTensor, QuantFormat
from ..quant.tables import IQ2XXS_GRID, IQ2XXS_LEVELS

# Format ids as kernel constexprs (the GGML type ids).
FMT_F32: tl.constexpr = tl.constexpr(int(QuantFormat.F32))
FMT_F16: tl.constexpr = tl.constexpr(int(QuantFormat.F16))
FMT_BF16: tl.constexpr = tl.constexpr(int(QuantFormat.BF16))
FMT_Q8_0: tl.constexpr = tl.constexpr(int(QuantFormat.Q8_0))
FMT_Q2_K: tl.constexpr = tl.constexpr(int(QuantFormat.Q2_K))
FMT_Q4_K: tl.constexpr = tl.constexpr(int(QuantFormat.Q4_K))
FMT_IQ2_XXS: tl.constexpr = tl.constexpr(int(QuantFormat.IQ2_XXS))

SUPPORTED = (QuantFormat.F32, QuantFormat.F16, QuantFormat.BF16, QuantFormat.Q8_0, QuantFormat.Q2_K,
             QuantFormat.Q4_K, QuantFormat.IQ2_XXS)

# Words per block in the view each format is read through.
Q2K_WORDS = 21  # 84 B / 4
Q4K_WORDS = 36  # 144 B / 4
IQ2_HALFWORDS = 33  # 66 B / 2
Q8_0_BLOCK = 32

# IQ2_XXS grid records as PTX byte-permute selectors (the int8 decode and the fp16 prefill decode): coordinate
# j of a record sits in nibble IQ2_SEL_NIBBLE[j] = 2 (j % 4) + j // 4 of a 32-bit selector (its level 0/1/2 in
# bits 0-1, its sign in bit 2), so one prmt of the low and one of the high 16 bits read the 8 signed magnitudes
# as coordinates (0, 4, 1, 5) and (2, 6, 3, 7). This order is the one where the 7 sign bits land in bit 4
# n(j) of s * SIGN_SPREAD (s | s << 7 | s << 14 | s << 21: disjoint, no carries).
IQ2_SEL_NIBBLE = 2 * (np.arange(8) % 4) + np.arange(8) // 4
SIGN_SPREAD: tl.constexpr = tl.constexpr(0x00204081)
# The magnitudes 8/25/43 as bytes 0-2 of the word a prmt reads for + signs and for - signs: as int8 (the dp4a
# decode), and biased by 128 (the fp16 decode reads 128 + q)
IQ2_POS_BYTES: tl.constexpr = tl.constexpr(0x002B1908)
IQ2_NEG_BYTES: tl.constexpr = tl.constexpr(0x00D5E7F8)
IQ2_POS_BIASED: tl.constexpr = tl.constexpr(0x00AB9988)
IQ2_NEG_BIASED: tl.constexpr = tl.constexpr(0x00556778)


@dataclass
class DeviceWeight:
    """A weight on the device in its kernel layout. `w`/`s` are views of one buffer; `g` the IQ2 grid and
    `sel16` its 512-byte selector table (iq2_sel16), each the weight's own buffer for other formats (a valid
    pointer the kernels never read). stride_w / stride_s: elements per row in the w / s views; off_s: offset of
    the scales inside a row."""

    fmt: QuantFormat
    shape: tuple[int, ...]
    buf: Any  # uint8 [..., row_bytes], the only storage
    w: Any
    s: Any
    g: Any
    sel16: Any
    stride_w: int
    stride_s: int
    off_s: int
    # Launch plans cached per call signature by the launchers (config, grid, constexprs chosen once),
    # so a decode step does no config search or device query per call.
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return int(self.buf.numel())


def empty(shape, device):
    """fp32 output/scratch buffer of every launcher (tests replace this to NaN-poison outputs)."""
    import torch

    return torch.empty(tuple(shape), device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def iq2_grid(device):
    """The IQ2_XXS grid as uint8 [256*8] on `device` (one copy per device)."""
    import torch

    return torch.from_numpy(np.array(IQ2XXS_GRID, dtype=np.uint8).reshape(-1)).to(device)


@functools.lru_cache(maxsize=None)
def iq2_sel16(device):
    """The IQ2_XXS grid as 16-bit compact selectors, int16 [256] (512 B, one copy per device): the level of
    coordinate j (nibble n = IQ2_SEL_NIBBLE[j] of the selector) in bits 4 (n % 4) + 2 (n // 4) and up, so
    that (v | v << 14) & 0x33333333 (iq2_levels: two instructions) is the nibble form. Half the bytes of the
    nibble form and a quarter of the 8-byte grid: the in-kernel table gathers are L1 wavefronts, and those
    grow with the distinct cache lines that 32 random indices touch."""
    import torch

    pos = 4 * (IQ2_SEL_NIBBLE % 4) + 2 * (IQ2_SEL_NIBBLE // 4)
    sel = (IQ2XXS_LEVELS.astype(np.int64) << pos[None, :]).sum(axis=1)
    return torch.from_numpy(sel.astype(np.uint16).view(np.int16).copy()).to(device)


def repack_q8_0(raw):
    """uint8 [..., nb*34] GGUF Q8_0 rows -> uint8 [..., nb*34] rows laid out [codes (32*nb) | scales (2*nb)]."""
    import torch

    lead, rb = tuple(raw.shape[:-1]), raw.shape[-1]
    nb = rb // QuantFormat.Q8_0.type_size
    blocks = raw.reshape(-1, nb, QuantFormat.Q8_0.type_size)
    return torch.cat([blocks[:, :, 2:].reshape(-1, nb * Q8_0_BLOCK), blocks[:, :, :2].reshape(-1, nb * 2)], dim=1
                     ).reshape(*lead, rb).contiguous()


def to_device(raw, fmt: QuantFormat, shape: tuple[int, ...], device, repacked: bool = False) -> DeviceWeight:
    """Build the kernel layout from raw GGUF bytes (numpy or torch uint8 [..., row_bytes]).
    `repacked` says the bytes already are in this layout (Q8_0 only)."""
    import torch

    fmt = QuantFormat(fmt)
    if fmt not in SUPPORTED:
        raise ValueError(f"no Triton kernel layout for {fmt.name}")
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.array(raw, dtype=np.uint8))  # copy: memmaps are read-only
    buf = raw.to(device).contiguous()
    k = shape[-1]
    rb = fmt.row_bytes(k)
    flat = buf.reshape(-1, rb)
    iq2 = fmt == QuantFormat.IQ2_XXS
    g, sel16 = (iq2_grid(buf.device), iq2_sel16(buf.device)) if iq2 else (buf, buf)
    if fmt == QuantFormat.Q8_0:
        if not repacked:
            buf = repack_q8_0(buf)
            flat = buf.reshape(-1, rb)
        w = flat.view(torch.int8)
        s = flat.view(torch.float16)
        return DeviceWeight(fmt, tuple(shape), buf, w, s, g, sel16, rb, rb // 2, k // 2)
    view = {
        QuantFormat.F32: torch.float32, QuantFormat.F16: torch.float16, QuantFormat.BF16: torch.int16,
        QuantFormat.Q2_K: torch.int32, QuantFormat.Q4_K: torch.int32, QuantFormat.IQ2_XXS: torch.int16,
    }[fmt]
    w = flat.view(view)
    return DeviceWeight(fmt, tuple(shape), buf, w, w, g, sel16, w.shape[1], 0, 0)


def from_qtensor(qt: QTensor, device) -> DeviceWeight:
    """The DeviceWeight of a QTensor, built once and kept in qt.cache."""
    dw = qt.cache.get("triton")
    if dw is None:
        dw = to_device(qt.data, qt.fmt, qt.shape, device)
        qt.cache["triton"] = dw
    return dw


# ---- in-kernel decoders ----------------------------------------------------------------------------

@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With programmatic dependent launch (configs.use_pdl): wait until the previous kernel has finished and
    its writes are visible, then let the next kernel launch. Everything before this call may read only
    weights and inputs older than the previous kernel; the next kernel starts its own prologue then."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def split_sum_xchg(slot_ptr, y_ptr, pid_k, part, rt, rn, ok, T, N, stride_ot, SPLIT: tl.constexpr):
    """A sum over SPLIT programs (split-K, split slots), pairwise, without a fence, a counter or a load of
    another program's partial: each partial travels inside an atomic exchange. This program holds slice pid_k's
    part [BLOCK_T, BLOCK_N] of y[rt, rn] (row stride stride_ot, T x N elements). Slot (node, t, n) (int64, zero
    between calls) belongs to node `node` of a binary tree over the SPLIT slices; slice s meets its sibling at
    level l in node SPLIT - (SPLIT >> l) + (s >> l+1). Per element, a program swaps (tag 1 | fp32 bits) into its
    node: got zero -> it came first and is done; got a partial -> it adds left + right (fixed order), zeroes the
    slot and carries the sum one level up; the carrier of the root writes y. The additions follow the tree
    whatever the arrival order: deterministic. SPLIT a power of two; SPLIT 1 stores part in y (no slot read)."""
    tl.static_assert(SPLIT <= 64, "the exchange tree has at most 6 levels")
    v = part
    live = ok
    idx = rt[:, None] * stride_ot + rn[None, :]
    for lvl in tl.static_range(6):
        if (2 << lvl) <= SPLIT:
            node = SPLIT - (SPLIT >> lvl) + (pid_k >> (lvl + 1))
            p = slot_ptr + node.to(tl.int64) * T * N + idx
            packed = v.to(tl.uint32, bitcast=True).to(tl.int64) + 4294967296  # tag 1 in the high word
            old = tl.atomic_xchg(p, packed, mask=live, sem="relaxed")
            second = live & ((old >> 32) != 0)
            other = old.to(tl.uint32).to(tl.float32, bitcast=True)
            v = tl.where(((pid_k >> lvl) & 1) == 0, v + other, other + v)
            tl.store(p, tl.zeros_like(old), mask=second)
            live = second
    tl.store(y_ptr + idx, v, mask=live)


@triton.jit
def l2_prefetch_line(p):
    """Ask L2 to fetch the line holding each element's address (PTX prefetch.global.L2; a per-lane hint)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [p.to(tl.int64)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def load4(p, VEC: tl.constexpr):
    """The int32 words p[0..3] (p an int32 pointer tensor) as four tensors shaped like p. VEC (NVIDIA; p
    16-byte aligned): one 16-byte load per element (PTX ld.global.v4); Triton does not merge four loads of one
    thread into a vector, and each load instruction costs L1 wavefronts. Ordered like any side effect (so it
    stays after griddepcontrol.wait)."""
    if VEC:
        return tl.inline_asm_elementwise("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
                                         [p.to(tl.int64)], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                         is_pure=False, pack=1)
    else:
        return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)


@triton.jit
def prmt(a, b, sel, ASM: tl.constexpr):
    """Bytes 0-3 of the PTX byte permute: byte k of the result is byte (sel >> 4k) & 7 of the 8-byte
    value b:a (no sign-replicate mode: bit 3 of each nibble is 0 here)."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = tl.zeros(sel.shape, dtype=tl.int32)
        for k in tl.static_range(4):
            nib = (sel >> (4 * k)) & 7
            src = tl.where(nib >= 4, b, a)
            r |= ((src >> (8 * (nib & 3))) & 255) << (8 * k)
        return r


@triton.jit
def iq2_levels(sel16_ptr, gi):
    """The selector of grid records gi (int32 0..255, any shape) from iq2_sel16's table, levels only (bits
    0-1 of each nibble): nibbles 0-3 are read in place, nibbles 4-7 from bits 2-3 of nibbles 0-3 shifted by
    14 (the entry is zero-extended, so nothing else lands under the mask)."""
    v = tl.load(sel16_ptr + gi).to(tl.uint16, bitcast=True).to(tl.int32)
    return (v | (v << 14)) & 0x33333333


@triton.jit
def iq2_ksigns(sidx):
    """The 8 sign bits (bit j set: coordinate j negative) of grid records with 7-bit sign indices sidx (int32):
    bit 7 is the parity of the 7 (ksigns: an even count of minus signs)."""
    p = sidx ^ (sidx >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return sidx | ((p & 1) << 7)


@triton.jit
def iq2_grid_words(g32_ptr, gi, mask=None):
    """The two int32 words (magnitudes of coordinates 0-3, 4-7, a byte each) of grid records gi from the 8-byte
    grid table viewed as int32 pairs (masked-off records read 0)."""
    if mask is None:
        lo = tl.load(g32_ptr + gi * 2)
        hi = tl.load(g32_ptr + gi * 2 + 1)
    else:
        lo = tl.load(g32_ptr + gi * 2, mask=mask, other=0)
        hi = tl.load(g32_ptr + gi * 2 + 1, mask=mask, other=0)
    return lo, hi


@triton.jit
def iq2_signs(sidx):
    """Bit 2 of nibble n(j) set where coordinate j is negative, from the 7-bit sign indices sidx (int32): the
    8th sign is the parity of the 7 (ksigns rule, an even count of minus signs). The nibble sum of
    P & 0x11111111, gathered into the top nibble by * 0x11111111 (at most 7: no carries), has that parity in
    its low bit, bit 28, which is n(7)'s slot in P."""
    p = sidx * SIGN_SPREAD
    p = p | (((p & 0x11111111) * 0x11111111) & 0x10000000)
    return (p << 2) & 0x44444444


@triton.jit
def iq2_signed(lv, sidx, POS: tl.constexpr, NEG: tl.constexpr, ASM: tl.constexpr):
    """The 8 signed magnitudes of grid records with level selectors lv (iq2_levels) and 7-bit sign indices
    sidx, as two words of bytes in selector order: coordinates (0, 4, 1, 5) and (2, 6, 3, 7). POS / NEG: the
    byte form of +m / -m (IQ2_POS_BYTES / IQ2_NEG_BYTES, or the _BIASED pair)."""
    sel = lv | iq2_signs(sidx)
    pos = tl.full(sel.shape, POS, tl.int32)
    neg = tl.full(sel.shape, NEG, tl.int32)
    return prmt(pos, neg, sel, ASM), prmt(pos, neg, sel >> 16, ASM)


@triton.jit
def q4_k_scale_min(lo, mid, hi, dd, j):
    """(d * sc_j, dmin * m_j) fp32 of Q4_K sub-blocks j (0..7, a tensor) from the 12 packed 6-bit scale bytes
    (words lo/mid/hi) and the d|dmin word dd: both packings computed, the one for j selected."""
    jm = 8 * (j & 3)
    a = (lo >> jm) & 255
    b = (mid >> jm) & 255
    c = (hi >> jm) & 255
    low = j < 4
    sc = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return _f16_from_bits(dd) * sc.to(tl.float32), _f16_from_bits(dd >> 16) * mn.to(tl.float32)


@triton.jit
def _f16_from_bits(b):
    """Low 16 bits of an int32 tensor as an fp16 value, widened to fp32."""
    return (b & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def dequant_tile(w_ptr, s_ptr, g_ptr, row, k, mask, stride_w, stride_s, off_s, FMT: tl.constexpr):
    """fp32 weight[row, k] for broadcastable int tensors row/k (masked-off elements give 0).

    Formulas (quant.md §1), evaluated in the oracle's order (dsv4.quant.dequant):
      Q8_0    d*q;  Q2_K (d*sc)*q - dmin*m (16-weight sub-blocks);  Q4_K (d*sc)*q - dmin*m (32-weight,
      6-bit packed scales);  IQ2_XXS (d*(0.5+ls)*0.25)*grid[g][j]*sign, sign bit from ksigns parity rule.
    """
    r = row.to(tl.int64)
    if FMT == FMT_Q8_0:
        q = tl.load(w_ptr + r * stride_w + k, mask=mask, other=0).to(tl.float32)
        d = tl.load(s_ptr + r * stride_s + off_s + (k >> 5), mask=mask, other=0).to(tl.float32)
        return q * d
    elif FMT == FMT_F16:
        return tl.load(w_ptr + r * stride_w + k, mask=mask, other=0).to(tl.float32)
    elif FMT == FMT_F32:
        return tl.load(w_ptr + r * stride_w + k, mask=mask, other=0).to(tl.float32)
    elif FMT == FMT_BF16:
        bits = tl.load(w_ptr + r * stride_w + k, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    elif FMT == FMT_Q2_K:
        i = k & 255
        base = r * stride_w + (k >> 8) * 21
        h = i >> 7
        s = (i >> 5) & 3
        l = i & 31
        qw = tl.load(w_ptr + base + 4 + 8 * h + (l >> 2), mask=mask, other=0)
        q = (qw >> (8 * (l & 3) + 2 * s)) & 3
        j = i >> 4
        sw = tl.load(w_ptr + base + (j >> 2), mask=mask, other=0)
        sc = (sw >> (8 * (j & 3))) & 255
        dw = tl.load(w_ptr + base + 20, mask=mask, other=0)
        d = _f16_from_bits(dw)
        dmin = _f16_from_bits(dw >> 16)
        return (d * (sc & 15).to(tl.float32)) * q.to(tl.float32) - dmin * (sc >> 4).to(tl.float32)
    elif FMT == FMT_Q4_K:
        i = k & 255
        base = r * stride_w + (k >> 8) * 36
        j = i >> 5
        l = i & 31
        dw = tl.load(w_ptr + base, mask=mask, other=0)
        dsc, dmm = q4_k_scale_min(tl.load(w_ptr + base + 1, mask=mask, other=0),
                                  tl.load(w_ptr + base + 2, mask=mask, other=0),
                                  tl.load(w_ptr + base + 3, mask=mask, other=0), dw, j)
        qw = tl.load(w_ptr + base + 4 + 8 * (j >> 1) + (l >> 2), mask=mask, other=0)
        q = (qw >> (8 * (l & 3) + 4 * (j & 1))) & 15
        return dsc * q.to(tl.float32) - dmm
    else:  # IQ2_XXS, int16 half-word view
        i = k & 255
        base = r * stride_w + (k >> 8) * 33
        ib = i >> 5
        kk = (i >> 3) & 3
        jj = i & 7
        d = tl.load(w_ptr + base, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
        grp = base + 1 + 4 * ib
        gw = tl.load(w_ptr + grp + (kk >> 1), mask=mask, other=0).to(tl.int32) & 0xFFFF
        gidx = (gw >> (8 * (kk & 1))) & 255
        a1lo = tl.load(w_ptr + grp + 2, mask=mask, other=0).to(tl.int32) & 0xFFFF
        a1hi = tl.load(w_ptr + grp + 3, mask=mask, other=0).to(tl.int32) & 0xFFFF
        aux1 = a1lo | (a1hi << 16)
        sidx = (aux1 >> (7 * kk)) & 127
        ls = (a1hi >> 12) & 15
        neg = ((iq2_ksigns(sidx) >> jj) & 1) != 0
        gv = tl.load(g_ptr + gidx * 8 + jj, mask=mask, other=0).to(tl.float32)
        db = d * (0.5 + ls.to(tl.float32)) * 0.25
        val = db * gv
        return tl.where(neg, -val, val)


# Byte offsets of the fp16 scale fields inside a block, per format (quant.md §1.1).
_F16_FIELDS = {
    QuantFormat.Q8_0: (0,),
    QuantFormat.Q2_K: (80, 82),
    QuantFormat.Q4_K: (0, 2),
    QuantFormat.IQ2_XXS: (0,),
}
SYNTH_SCALE = (2.0**-10, 2.0**-6)  # range of synthetic block scales: finite, model-like magnitudes


def synthetic_raw(fmt: QuantFormat, shape: tuple[int, ...], device="cpu", seed: int = 0):
    """Random but valid GGUF bytes for a weight of logical `shape` (torch uint8 [..., row_bytes]):
    random codes, finite positive fp16 scales. For tests and benchmarks (values don't change speed)."""
    import torch

    fmt = QuantFormat(fmt)
    gen = torch.Generator(device=device).manual_seed(seed)
    lead, k = tuple(shape[:-1]), shape[-1]
    n = int(np.prod(lead, dtype=np.int64))
    if fmt in (QuantFormat.F16, QuantFormat.BF16, QuantFormat.F32):
        dt = {QuantFormat.F16: torch.float16, QuantFormat.BF16: torch.bfloat16, QuantFormat.F32: torch.float32}[fmt]
        v = (torch.randn((n, k), generator=gen, device=device) * 0.05).to(dt)
        return v.view(torch.uint8).reshape(*lead, fmt.row_bytes(k))
    rb = fmt.row_bytes(k)
    raw = torch.randint(0, 256, (n * rb,), generator=gen, device=device, dtype=torch.uint8)
    blocks = raw.reshape(-1, fmt.type_size)
    lo, hi = SYNTH_SCALE
    for off in _F16_FIELDS[fmt]:
        d = (torch.rand((blocks.shape[0],), generator=gen, device=device) * (hi - lo) + lo).to(torch.float16)
        blocks[:, off:off + 2] = d.view(torch.uint8).reshape(-1, 2)
    return raw.reshape(*lead, rb)
