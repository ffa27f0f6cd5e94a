"""Q8_0 decode GEMV on packed int8 dot products with Q8_0 activations (ds4's CUDA Q8_0 matvec scheme).

ds4's CUDA path quantizes the activation per 32 values to int8 with an fp32 scale and dots it with the
Q8_0 codes by dp4a (spec/quant.md §4.1); `TorchOps(act_quant=True).qmatmul` (the ds4-exact mode) is that
semantics. Two launches: `_q8_0_quant_kernel` turns x [T, C] into Q8_0 words (four int8 codes per int32,
little-endian, one fp32 scale per 32: d = amax/127, q = round-half-even(x * (1/d)), IEEE divisions, as
TorchOps.quant_q8_0); `_q8_int8_rows_kernel` runs gemv_rows' tiling (q8_gemv) on int32 code words: per
32-code block eight dp4a of the weight words with x's words, exact, then one fp32 `isum * d_w * d_x`.
Against the float GEMV this removes the per-code decode and FMA (one dp4a per four codes) and x's byte
lanes (x arrives as words in the layout of the weight words), and reads 1.125 bytes of x per code
instead of 4. Split-K, the in-kernel fixed-order sum (the exchange tree) and programmatic dependent launch
are as in gemv_rows. Tiles per Flash shape: ROWS_INT8_T1 (H200 sweep, tools/probe_decode.py q8i).
Measured (H200, tools/results/h200_decode/17, CUDA-graph replay, quantizer launch included): not faster
than the float gemv_rows: attn_q_b 12.4 us (gemv_rows 11.3), attn_output_a/b 15.3 / 16.0 (12.9 / 13.3),
LM head 170 (159); it does beat rounding x first and then running gemv_rows on the small matrices
(attn_q_a 5.6 against 1.5 + 5.0). Its sm_90a loop has about a quarter of the float loop's instructions per
code, so instruction count is not what bounds these GEMVs; each thread here reads the x words of its own
blocks (L1 hits), twice the load instructions of the weights alone. It stays as the ds4-exact mode's decode
path: integer dots exactly as ds4 takes them. Knows the repacked Q8_0 row layout (blocks.py), not the model.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import blocks
from .blocks import DeviceWeight
from .configs import DeviceInfo, pdl_launch, use_pdl
from .moe_int8 import QUANT_LAUNCH, ROUND_MAGIC, _dp4a, use_asm
from .qmatmul import DECODE_MAX_T, _plan, gemv
from .qmatmul_fast import q8_tiles
from .q8_gemv import _row_tile, _rows_split, ROWS_MAX_SPLIT, ROWS_MIN_PROGRAMS_PER_SM

Q8_0_BLOCK = 32
QUANT_BLOCKS = 32  # 32-value blocks per quantizer program (1024 values)


def empty_i32(shape, device):
    """int32 scratch of the quantizer (tests replace this to fill it with garbage)."""
    return torch.empty(tuple(shape), device=device, dtype=torch.int32)


@triton.jit
def _q8_0_quant_kernel(x_ptr, q_ptr, d_ptr, n_blocks, stride_x, stride_q, stride_d, BLOCKS: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Row r, blocks [BLOCKS*pid1, ...) of x: as TorchOps.quant_q8_0, d = amax/127, inv = 1/d (0 if d = 0),
    q = clamp(rint(x * inv), -127, 127); codes packed four per int32 word (byte j = code 4i + j)."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    j = tl.arange(0, 32)
    ok = (b < n_blocks)[:, None]
    blocks.pdl_wait(PDL)
    x = tl.load(x_ptr + r * stride_x + b[:, None] * 32 + j[None, :], mask=ok, other=0.0).to(tl.float32)
    d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
    inv = tl.where(d > 0, tl.math.div_rn(1.0, tl.where(d > 0, d, 1.0)), 0.0)
    y = x * inv[:, None]
    q = tl.minimum(tl.maximum((y + ROUND_MAGIC) - ROUND_MAGIC, -127.0), 127.0).to(tl.int32)
    words = tl.sum(tl.reshape((q & 255) << (8 * (j[None, :] & 3)), (BLOCKS, 8, 4)), axis=2)  # disjoint: sum == or
    tl.store(q_ptr + r * stride_q + b[:, None] * 8 + tl.arange(0, 8)[None, :], words, mask=ok)
    tl.store(d_ptr + r * stride_d + b, d, mask=b < n_blocks)


def quant_q8_0(x, pdl: bool = False):
    """x [R, C] float (C % 32 == 0) -> (codes int32 [R, C/4], scales fp32 [R, C/32]): the Q8_0 of
    TorchOps.quant_q8_0 (codes * scale is its round trip)."""
    R, C = x.shape
    if C % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 activations need a multiple of {Q8_0_BLOCK} columns, got {C}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    nb = C // Q8_0_BLOCK
    q = empty_i32((R, C // 4), x.device)
    d = blocks.empty((R, nb), x.device)
    bl = min(QUANT_BLOCKS, triton.next_power_of_2(nb))
    if R:
        _q8_0_quant_kernel[(R, triton.cdiv(nb, bl))](x, q, d, nb, x.stride(0), q.stride(0), d.stride(0), BLOCKS=bl,
                                                      PDL=pdl, **QUANT_LAUNCH, **pdl_launch(pdl))
    return q, d


def dequant_q8_0(q, d):
    """fp32 [R, C] codes * scale of quant_q8_0's output (tests, debugging)."""
    codes = q.contiguous().view(torch.int8).to(torch.float32)
    return (codes.view(q.shape[0], -1, Q8_0_BLOCK) * d[:, :, None]).reshape(q.shape[0], -1)


@triton.jit
def _q8_int8_rows_kernel(xq_ptr, xd_ptr, w_ptr, s_ptr, y_ptr, slot_ptr, T, N, R, K, k_split,
                         stride_xqt, stride_xdt, stride_ot, stride_w_words, stride_s, off_s,
                         BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPED: tl.constexpr,
                         ASM: tl.constexpr, PREFETCH: tl.constexpr = True, SPLIT: tl.constexpr = 1,
                         PDL: tl.constexpr = False, X_FULL: tl.constexpr = True):
    """y[t, n] = sum over the 32-blocks b of d_w[n, b] * d_x[t, g(n), b] * (sum of the 32 code products),
    g(n) = n // R; with SPLIT > 1 each program takes one K slice and the partials are summed pairwise in a
    fixed tree order (blocks.split_sum_xchg). Each 32-code block is read as two 16-byte halves [BLOCK_N, NB, 4]
    of the same layout, so its eight dp4a chain in one thread (no cross-lane sum). X_FULL: x's words and
    scales are loaded through pointers of the weight tile's shape (each thread reads the x of its own
    blocks: L1 hits, no layout conversion); else as [1, NB, 4] and broadcast. Rows past N are clamped to
    N-1 (not stored). PREFETCH: step s+1's words and scales load while step s computes."""
    NB: tl.constexpr = BLOCK_K // 32
    pid_n, pid_k, w32, rn, r, g = _row_tile(w_ptr, N, R, BLOCK_N, GROUPED)
    b2 = tl.arange(0, NB)[None, :]
    b3 = b2[:, :, None]
    i3 = tl.arange(0, 4)[None, None, :]
    rt = tl.arange(0, BLOCK_T)
    if X_FULL:
        row0 = (r * 0)[:, None]  # [BLOCK_N, 1] zeros: x pointers in the weight tile's shape
        xw_off = row0[:, :, None] + b3 * 8 + i3
        xs_off = row0 + b2
    else:
        xw_off = b3 * 8 + i3
        xs_off = b2
    xq_base = xq_ptr + g * (K >> 2)
    xd_base = xd_ptr + g * (K >> 5)
    k_lo = pid_k * k_split
    k_hi = k_lo + k_split
    wp = w32 + r[:, None, None] * stride_w_words + (k_lo >> 2) + b3 * 8 + i3
    sp = s_ptr + r[:, None] * stride_s + off_s + (k_lo >> 5) + b2
    if PREFETCH:
        lo_next = tl.load(wp)
        hi_next = tl.load(wp + 4)
        d_next = tl.load(sp)
    acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    zero = tl.zeros([BLOCK_N, NB, 4], dtype=tl.int32)
    blocks.pdl_wait(PDL)  # x's words and scales (and the split slots) only after the quantizer is done
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            lo = lo_next
            hi = hi_next
            dw = d_next.to(tl.float32)
            wp += BLOCK_K >> 2
            sp += BLOCK_K >> 5
            more = (tl.full([1, NB, 1], 0, tl.int32) + k0 + BLOCK_K) < k_hi  # splat mask: stays vectorized
            lo_next = tl.load(wp, mask=more, other=0)
            hi_next = tl.load(wp + 4, mask=more, other=0)
            d_next = tl.load(sp, mask=(tl.full([1, NB], 0, tl.int32) + k0 + BLOCK_K) < k_hi, other=0.0)
        else:
            lo = tl.load(wp)
            hi = tl.load(wp + 4)
            dw = tl.load(sp).to(tl.float32)
            wp += BLOCK_K >> 2
            sp += BLOCK_K >> 5
        for t in tl.static_range(BLOCK_T):
            t_row = tl.minimum(T - 1, t).to(tl.int64)  # rows past T repeat the last one; not stored
            xw = xq_base + t_row * stride_xqt + (k0 >> 2) + xw_off
            xs = tl.load(xd_base + t_row * stride_xdt + (k0 >> 5) + xs_off)
            # exact int32 per (row, block): |sum| <= 32 * 128 * 127
            isum = tl.sum(_dp4a(hi, tl.load(xw + 4), _dp4a(lo, tl.load(xw), zero, ASM), ASM), axis=2)
            v = isum.to(tl.float32) * (dw * xs)
            if BLOCK_T == 1:
                acc += v
            else:
                acc_t += tl.where(rt[:, None] == t, tl.sum(v, axis=1)[None, :], 0.0)
    if BLOCK_T == 1:
        acc_t = tl.sum(acc, axis=1)[None, :]
    ok = (rt[:, None] < T) & (rn < N)[None, :]
    # as gemv_rows: split partials summed pairwise by atomic exchanges (SPLIT 1: stored as they are)
    blocks.split_sum_xchg(slot_ptr, y_ptr, pid_k, acc_t, rt, rn, ok, T, N, stride_ot, SPLIT)


def gemv_int8(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, block_n: int = 16, block_k: int = 256,
              num_warps: int = 1, prefetch: bool = True, allow_split: bool = True,
              min_programs_per_sm: int = ROWS_MIN_PROGRAMS_PER_SM, max_split: int = ROWS_MAX_SPLIT,
              pdl: bool | None = None, x_full: bool = True):
    """Q8_0 decode GEMV with Q8_0 activations (TorchOps(act_quant=True).qmatmul's semantics): x [T, K] (or
    [T, G, K]) float -> [T, N] fp32, T <= DECODE_MAX_T. Two launches (quantizer, GEMV); narrow matrices
    split K over programs, summed pairwise in a fixed order by atomic exchanges (deterministic).
    Rows that are not 4-byte aligned (K % 128 != 0 in the repacked layout) take qmatmul.gemv on the rounded x."""
    if dw.fmt.name != "Q8_0":
        raise ValueError(f"gemv_int8 takes Q8_0 weights, got {dw.fmt.name}")
    if x.shape[0] > DECODE_MAX_T:
        raise ValueError(f"gemv_int8 is a decode kernel (T <= {DECODE_MAX_T}), got T={x.shape[0]}")
    if dw.stride_w % 4:  # rows not 4-byte aligned (K % 128 != 0): no code words; the same math in float
        from ..reference import TorchOps

        return gemv(TorchOps.quant_q8_0(x), dw, dev, groups)

    def build():
        g = q8_tiles(x, dw, dev, groups, block_n, block_k)
        T, N, R, bn, bk, block_t, n_row_tiles = g.T, g.N, g.R, g.block_n, g.block_k, g.block_t, g.n_row_tiles
        split = _rows_split(n_row_tiles, dw.k, bk, dev, allow_split, min_programs_per_sm, max_split)
        k_split = dw.k // split
        use = use_pdl(dev, x) and pdl is not False
        asm = use_asm(dev, x)
        # split-K: one int64 slot per tree node and output, zero between calls (blocks.split_sum_xchg)
        slots = torch.zeros((split - 1, T, N), device=x.device, dtype=torch.int64) if split > 1 else None

        def launch(x):
            xq, xd = quant_q8_0(x.reshape(T, groups * dw.k), pdl=use)
            y = blocks.empty((T, N), x.device)
            _q8_int8_rows_kernel[(n_row_tiles, split)](
                xq, xd, dw.w, dw.s, y, y if slots is None else slots,  # no split: a pointer the kernel never reads
                T, N, R, dw.k, k_split, xq.stride(0), xd.stride(0), N,
                dw.stride_w // 4, dw.stride_s, dw.off_s, BLOCK_T=block_t, BLOCK_N=bn, BLOCK_K=bk,
                GROUPED=groups > 1, ASM=asm, PREFETCH=prefetch and k_split > bk, SPLIT=split, PDL=use, X_FULL=x_full,
                num_warps=num_warps, num_stages=1, **pdl_launch(use))
            return y
        launch.slots = slots  # for the tests
        return launch

    x = x if x.is_contiguous() else x.contiguous()
    key = ("gemv_int8", block_n, block_k, num_warps, prefetch, allow_split, min_programs_per_sm, max_split, pdl, x_full)
    return _plan("gemv_int8", x, dw, groups, key, build)(x)


# One token, tile per (rows, K, groups) of the Flash Q8_0 matrices: the fastest of the H200 sweep
# (tools/results/h200_decode/17: tools/probe_decode.py q8i, CUDA-graph replay, quantizer launch included).
# Few rows per program win here (x is read per thread, so rows do not amortize it); split-K where the
# row tiles alone give fewer than 8 programs per SM, except where no-split measured faster.
_I8 = dict(block_n=8, block_k=256, num_warps=1)
ROWS_INT8_T1 = {
    (1024, 4096, 1): _I8,  # attn_q_a 5.6 us (split 8)
    (32768, 1024, 1): dict(_I8, block_k=128, allow_split=False),  # attn_q_b 12.4 us
    (512, 4096, 1): dict(_I8, block_n=16),  # attn_kv 4.7 us (split 8)
    (8192, 4096, 8): dict(_I8, block_k=512, num_warps=2, allow_split=False),  # attn_output_a 15.3 us
    (4096, 8192, 1): dict(_I8, block_k=512),  # attn_output_b 16.0 us (split 8)
    (2048, 4096, 1): _I8,  # ffn_gate_shexp 7.9 us (split 8)
    (4096, 2048, 1): dict(_I8, block_k=128),  # ffn_down_shexp 7.7 us (split 8)
    (129280, 4096, 1): dict(_I8, block_k=512),  # LM head 170.4 us
}
DEFAULT_INT8 = _I8
DEFAULT_INT8_WIDE = dict(block_n=16, block_k=256, num_warps=2)  # T > 1 (not swept)


def int8_config(t: int, n_rows: int, k: int, groups: int) -> dict:
    """gemv_int8 keyword arguments for a T-token GEMV of this shape (CUDA)."""
    if t > 1:
        return DEFAULT_INT8_WIDE
    return ROWS_INT8_T1.get((n_rows, k, groups), DEFAULT_INT8)


def gemv_int8_default(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """gemv_int8 with the tile of int8_config (what TritonOps' ds4-exact mode runs for Q8_0 decode)."""
    return gemv_int8(x, dw, dev, groups, **int8_config(x.shape[0], dw.n_rows, dw.k, groups))


# ---- registered variant (op "qmatmul"; signature fn(x, dw, dev, groups)) ------------------------
from ..quant.formats import QuantFormat  # noqa: E402
from .registry import KernelOp, register  # noqa: E402

register(KernelOp.QMATMUL, "q8_int8", gemv_int8_default, formats=(QuantFormat.Q8_0,), max_t=DECODE_MAX_T,
         doc="Q8_0 activations + dp4a int8 dots (ds4 CUDA Q8_0 matvec; the ds4-exact mode's semantics): "
             "quantizer launch + gemv_rows tiling on code words, tiles tuned per Flash shape on the H200",
         act_quant=True)
