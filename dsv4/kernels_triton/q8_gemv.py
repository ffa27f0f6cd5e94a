"""Q8_0 decode GEMV with many small programs ("gemv_rows", the CUDA default at T <= 8) and comparison variants.

Why a third Q8_0 GEMV: the block-dot / tl.dot / persistent kernels measured 28-45 % of H200 read
bandwidth. Here every program loads a [BLOCK_N, BLOCK_K] tile of code words (16-byte vectors) and the
next step's tile while it computes this one (register double buffer), so the SM's many resident
programs keep bytes in flight; codes are decoded without an int->float conversion (magic-number
trick of qmatmul_fast) and x is read in natural order and split into the four byte lanes in registers
(no word-permuted copy, no extra launch). Measured (tools/results/h200_q8/): decode is free, the x-lane
handling costs ~20 % (a no-x diagnostic ran at 61 % / 91 % of bandwidth where the real kernel runs at
49 % / 71 %). Tiles per Flash shape (ROWS_T1, from tools/results/h200_decode/): small one-warp programs
win (for T > 1 too: ROWS_TN, one warp x 32 rows x 128 codes); on sm_90+ launches use programmatic dependent launch
(the first weight tile loads before griddepcontrol.wait, x after it), worth 0.5-1.6 us per GEMV in CUDA-graph
replay; split-K partials are summed inside the kernel by a tree of atomic exchanges (blocks.split_sum_xchg: no
fence, counter or second launch, deterministic). Also here: `gemv_mma` (tensor-core decode, codes to fp16 by
byte permutes, per-block sums as the dot's N axis), a persistent variant, and `gemm_f16w` (fp16 dequant + tl.dot
reading fp32 x), all measured slower than the defaults and kept for comparison. Knows the repacked Q8_0 row
layout, not the model.
"""
from __future__ import annotations

import enum

import triton
import triton.language as tl

from . import blocks
from .blocks import DeviceWeight
from .configs import TRITON_VERSION, DeviceInfo, Vendor, hopper_plus, pdl_launch, pow2_divisor, use_pdl
from .qmatmul import DECODE_MAX_T, _check, _plan, _reduce_split, gemv
from .qmatmul_fast import Q8_BIAS, F32_MAGIC_BITS, _q8_accumulate, _q8_words4, dequant_q8_rows, q8_tiles

ROWS_BLOCK_N = 8  # rows per program
ROWS_BLOCK_K = 1024  # codes per row per step (a power-of-two divisor of K)
ROWS_WARPS = 4
ROWS_MIN_PROGRAMS_PER_SM = 8  # fewer row tiles than this per SM: split K (fixed-order second pass)
ROWS_MAX_SPLIT = 8


@triton.jit
def _x_words(x_ptr, k0, NB: tl.constexpr):
    """x[k0 + 32b + 4i + j] as one [NB, 8, 4] tensor, in natural order (16-byte runs)."""
    return tl.load(x_ptr + k0 + tl.arange(0, NB)[:, None, None] * 32 + tl.arange(0, 8)[None, :, None] * 4
                   + tl.arange(0, 4)[None, None, :])


@triton.jit
def _x_lanes(x_ptr, k0, NB: tl.constexpr):
    """x[k0 + 32b + 4i + j] as four [1, NB, 8] tensors (lane j = byte j of code word i of block b)."""
    return _x_split(_x_words(x_ptr, k0, NB), NB)


@triton.jit
def _x_split(xv, NB: tl.constexpr):
    """_x_words' [NB, 8, 4] tensor as its four byte lanes [1, NB, 8]."""
    even, odd = tl.split(tl.reshape(xv, (NB, 8, 2, 2)))  # j = 2*j1 + j0: split j0, then j1
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0[None], x1[None], x2[None], x3[None]


class WeightCache(enum.IntEnum):
    """How gemv_rows' code and scale loads use the SMs' L1 and L2 (x's loads: always the default). Measured in
    tools/results/h200_decode/52-52d; value 3 (x's loads evict_last on top of EVICT_FIRST, no gain) was dropped."""

    DEFAULT = 0  # ld.global: the weight lines are allocated in L1 like x's
    L2_ONLY = 1  # .cg: the weight stream bypasses L1 (each line is read once), leaving L1 to x
    EVICT_FIRST = 2  # L1::evict_first (and an L2 evict_first cache policy): allocated, first to go
    EVICT_FIRST_CODES = 4  # EVICT_FIRST on the code words only (the scales as DEFAULT)


_WC_DEFAULT: tl.constexpr = tl.constexpr(int(WeightCache.DEFAULT))
_WC_L2_ONLY: tl.constexpr = tl.constexpr(int(WeightCache.L2_ONLY))
_WC_EVICT_FIRST: tl.constexpr = tl.constexpr(int(WeightCache.EVICT_FIRST))
_WC_EVICT_FIRST_CODES: tl.constexpr = tl.constexpr(int(WeightCache.EVICT_FIRST_CODES))


@triton.jit
def _wload(p, mask, other, WCACHE: tl.constexpr):
    """A weight load (codes or scales) with the L1 policy WCACHE (WeightCache)."""
    if WCACHE == _WC_L2_ONLY:
        return tl.load(p, mask=mask, other=other, cache_modifier=".cg")
    elif WCACHE == _WC_EVICT_FIRST or WCACHE == _WC_EVICT_FIRST_CODES:
        return tl.load(p, mask=mask, other=other, eviction_policy="evict_first")
    else:
        return tl.load(p, mask=mask, other=other)


@triton.jit
def _step_ok(k_next, k_hi, NB: tl.constexpr, KFLAT: tl.constexpr):
    """The load mask of a K step that starts at k_next: a splat (so the loads stay vectorized), shaped as the
    code-word pointers (KFLAT: [1, NB * 8], else [1, NB, 1])."""
    if KFLAT:
        return (tl.full([1, NB * 8], 0, tl.int32) + k_next) < k_hi
    else:
        return (tl.full([1, NB, 1], 0, tl.int32) + k_next) < k_hi


@triton.jit
def _scales_ok(k_next, k_hi, NB: tl.constexpr):
    """_step_ok for the step's scales ([1, NB], as their pointers)."""
    return (tl.full([1, NB], 0, tl.int32) + k_next) < k_hi


@triton.jit
def _codes(wp, mask, WCACHE: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, KFLAT: tl.constexpr):
    """One K step's code words as [BLOCK_N, NB, 8] (zero where masked off). KFLAT: loaded through [BLOCK_N, NB * 8]
    pointers, then reshaped. Why: Triton orders a load's lanes by its pointers' contiguity and breaks ties by axis,
    ascending up to 3.6 and descending from 3.7; the [BLOCK_N, NB, 8] pointers tie rows with blocks, so 3.6 lays
    the lanes of a warp over rows (one 32-byte block of each of 8-16 rows per load) where 3.7+ lays them along K (up
    to 512 contiguous bytes of one or two rows). The flat pointers give the K-first order on every version."""
    if mask is None:
        u = _wload(wp, None, None, WCACHE)
    else:
        u = _wload(wp, mask, 0, WCACHE)
    if KFLAT:
        u = tl.reshape(u, (BLOCK_N, NB, 8))
    return u


@triton.jit
def _row_tile(w_ptr, N, R, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    """The row tile of a (rows, K slice) GEMV program: (pid_n, pid_k, w_ptr as int32 words, rows [BLOCK_N],
    the same clamped to N-1 as int64 (for addressing), group g of the tile's rows (R rows per group))."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if GROUPED:
        g = (pid_n * BLOCK_N) // R
    else:
        g = 0
    return pid_n, pid_k, w_ptr.to(tl.pointer_type(tl.int32)), rn, tl.minimum(rn, N - 1).to(tl.int64), g


@triton.jit
def _q8_rows_kernel(x_ptr, w_ptr, s_ptr, out_ptr, y_ptr, cnt_ptr, T, N, R, k_split,
                    stride_xt, stride_xg, stride_os, stride_ot, stride_w_words, stride_s, off_s, magic_bits,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                    GROUPED: tl.constexpr, PRMT: tl.constexpr, XPERM: tl.constexpr = 0,
                    PREFETCH: tl.constexpr = False, SPLIT: tl.constexpr = 1, PDL: tl.constexpr = False,
                    XPF: tl.constexpr = False, SPLIT_SUM: tl.constexpr = 4, L2PF: tl.constexpr = 0,
                    WCACHE: tl.constexpr = 0, KFLAT: tl.constexpr = False):
    """out[split, t, n] = sum_{k in split} x[t, g(n), k] * d[n, k//32] * q[n, k], g(n) = n // R; with
    SPLIT > 1 also y[t, n] = the SPLIT partials summed in a fixed order inside the kernel (SPLIT_SUM).
    Code words [BLOCK_N, NB, 8] (4 codes each), one scale per 32-code block, fp32 FMA; rows past N
    are clamped to N-1 (not stored). PREFETCH: 1 (or True) loads step s+1's codes and scales while step s
    computes, 2 steps s+1 and s+2. XPF (one token, natural x): x of step s+1 is loaded during step s too.
    SPLIT_SUM (SPLIT > 1; 4 by default, as gemv_rows): 0 the last program sums, counter reset acq_rel; 1 the
    same with a relaxed reset (the next launch is ordered by the kernel boundary); 2 only the partials (a
    _sum_splits_kernel launch sums); 4 pairwise by atomic exchanges that carry the partials
    (blocks.split_sum_xchg; cnt_ptr: its int64 slots).
    L2PF > 1 (NVIDIA sm_90+): step s also asks L2 for the 128-byte lines of step s + L2PF's codes (one
    prefetch.global.L2 per line; steps 2 .. L2PF - 1 before griddepcontrol.wait): bytes in flight without registers."""
    NB: tl.constexpr = BLOCK_K // 32
    SCACHE: tl.constexpr = _WC_DEFAULT if WCACHE == _WC_EVICT_FIRST_CODES else WCACHE  # the scales as DEFAULT
    pid_n, pid_k, w32, rn, r, g = _row_tile(w_ptr, N, R, BLOCK_N, GROUPED)
    b3 = tl.arange(0, NB)[None, :, None]
    i3 = tl.arange(0, 8)[None, None, :]
    rt = tl.arange(0, BLOCK_T)
    x_base = x_ptr + g * stride_xg
    acc = tl.zeros([BLOCK_N, NB, 8], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_split
    if KFLAT:  # code words as [BLOCK_N, NB * 8]: lanes run along K first on every Triton (see _codes)
        wp = w32 + r[:, None] * stride_w_words + (k_lo >> 2) + tl.arange(0, NB * 8)[None, :]
    else:
        wp = w32 + r[:, None, None] * stride_w_words + (k_lo >> 2) + b3 * 8 + i3
    sp = s_ptr + r[:, None] * stride_s + off_s + (k_lo >> 5) + tl.arange(0, NB)[None, :]
    k_hi = k_lo + k_split
    if PREFETCH:  # register double buffer: step s+1's codes and scales are in flight while step s computes
        u_next = _codes(wp, None, WCACHE, BLOCK_N, NB, KFLAT)
        d_next = _wload(sp, None, None, SCACHE)
        if PREFETCH == 2:
            u_next2 = _codes(wp + (BLOCK_K >> 2), _step_ok(k_lo + BLOCK_K, k_hi, NB, KFLAT), WCACHE, BLOCK_N, NB,
                             KFLAT)
            d_next2 = _wload(sp + (BLOCK_K >> 5), _scales_ok(k_lo + BLOCK_K, k_hi, NB), 0.0, SCACHE)
    if L2PF > 1:  # the lines of steps 2 .. L2PF - 1 (step 1 is the register prefetch's); weights only
        lines = tl.arange(0, BLOCK_K // 128)[None, :] * 128
        codes_row = (w32 + r * stride_w_words).to(tl.pointer_type(tl.int8))[:, None] + lines
        for j in tl.static_range(2, L2PF):
            if k_lo + j * BLOCK_K < k_hi:
                blocks.l2_prefetch_line(codes_row + k_lo + j * BLOCK_K)
    blocks.pdl_wait(PDL)  # x (and the split counters) only after the previous kernel is done
    if XPF:
        xv_next = _x_words(x_base, k_lo, NB)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        if L2PF > 1:
            if k0 + L2PF * BLOCK_K < k_hi:
                blocks.l2_prefetch_line(codes_row + k0 + L2PF * BLOCK_K)
        if PREFETCH == 2:
            u = u_next ^ Q8_BIAS
            d = d_next.to(tl.float32)
            u_next = u_next2
            d_next = d_next2
            wp += BLOCK_K >> 2
            sp += BLOCK_K >> 5
            u_next2 = _codes(wp + (BLOCK_K >> 2), _step_ok(k0 + 2 * BLOCK_K, k_hi, NB, KFLAT), WCACHE, BLOCK_N, NB,
                             KFLAT)
            d_next2 = _wload(sp + (BLOCK_K >> 5), _scales_ok(k0 + 2 * BLOCK_K, k_hi, NB), 0.0, SCACHE)
        elif PREFETCH:
            u = u_next ^ Q8_BIAS
            d = d_next.to(tl.float32)
            wp += BLOCK_K >> 2
            sp += BLOCK_K >> 5
            u_next = _codes(wp, _step_ok(k0 + BLOCK_K, k_hi, NB, KFLAT), WCACHE, BLOCK_N, NB, KFLAT)
            d_next = _wload(sp, _scales_ok(k0 + BLOCK_K, k_hi, NB), 0.0, SCACHE)
        else:
            u = _codes(wp, None, WCACHE, BLOCK_N, NB, KFLAT) ^ Q8_BIAS
            d = _wload(sp, None, None, SCACHE).to(tl.float32)
            wp += BLOCK_K >> 2
            sp += BLOCK_K >> 5
        d = d[:, :, None]
        q0, q1, q2, q3 = _q8_words4(u, PRMT, magic_bits)
        for t in tl.static_range(BLOCK_T):
            t_row = tl.minimum(T - 1, t)  # rows past T repeat the last one; not stored
            if XPERM == 1:  # x word-permuted by the caller: lane j of word i of block b at 32b + 8j + i
                xp = x_base + t_row.to(tl.int64) * stride_xt + k0 + b3 * 32 + i3
                x0 = tl.load(xp)
                x1 = tl.load(xp + 8)
                x2 = tl.load(xp + 16)
                x3 = tl.load(xp + 24)
            elif XPERM == 2:  # natural x, lanes gathered with stride 4 (L1 hits; no layout conversion)
                xp = x_base + t_row.to(tl.int64) * stride_xt + k0 + b3 * 32 + i3 * 4
                x0 = tl.load(xp)
                x1 = tl.load(xp + 1)
                x2 = tl.load(xp + 2)
                x3 = tl.load(xp + 3)
            elif XPF:  # BLOCK_T == 1: this step's x arrived during the previous one (last step re-reads itself)
                x0, x1, x2, x3 = _x_split(xv_next, NB)
                xv_next = _x_words(x_base, tl.minimum(k0 + BLOCK_K, k_hi - BLOCK_K), NB)
            else:
                x0, x1, x2, x3 = _x_lanes(x_base + t_row.to(tl.int64) * stride_xt, k0, NB)
            p = q0 * x0 + q1 * x1 + q2 * x2 + q3 * x3
            acc, acc_t = _q8_accumulate(acc, acc_t, p, d, t, rt, BLOCK_T)
    if BLOCK_T == 1:
        acc_t = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    out = out_ptr + pid_k * stride_os + rt[:, None] * stride_ot + rn[None, :]
    ok = (rt[:, None] < T) & (rn < N)[None, :]
    if SPLIT > 1 and SPLIT_SUM == 4:
        blocks.split_sum_xchg(cnt_ptr, y_ptr, pid_k, acc_t, rt, rn, ok, T, N, stride_ot, SPLIT)
    else:
        tl.store(out, acc_t, mask=ok)
    if SPLIT > 1 and SPLIT_SUM < 2:
        _split_sum_last(out_ptr, y_ptr, cnt_ptr, pid_n, rt, rn, ok, stride_os, stride_ot, BLOCK_T, BLOCK_N, SPLIT,
                        SPLIT_SUM == 1)


@triton.jit
def _split_sum_last(out_ptr, y_ptr, cnt_ptr, pid_n, rt, rn, ok, stride_os, stride_ot, BLOCK_T: tl.constexpr,
                    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, RELAXED_RESET: tl.constexpr):
    """Split-K without a second launch, deterministic: after storing its partial out[split, rt, rn], the
    program that finishes row tile pid_n last (counter per tile) sums the SPLIT partials in slice order into
    y and resets the counter (RELAXED_RESET: a relaxed reset, the next launch is ordered by the kernel
    boundary). The barrier orders every thread's partial store before the (one-thread) release; readers
    bypass L1."""
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
    if arrived == SPLIT - 1:
        total = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for sk in tl.static_range(SPLIT):
            total += tl.load(out_ptr + sk * stride_os + rt[:, None] * stride_ot + rn[None, :], mask=ok,
                             other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + rt[:, None] * stride_ot + rn[None, :], total, mask=ok)
        if RELAXED_RESET:
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
        else:
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _sum_splits_kernel(out_ptr, y_ptr, M, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y[m] = sum over s < SPLIT of out[s, m] in slice order (the second launch of SPLIT_SUM=2)."""
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = m < M
    blocks.pdl_wait(PDL)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        total += tl.load(out_ptr + s * M + m, mask=ok, other=0.0)
    tl.store(y_ptr + m, total, mask=ok)


SUM_SPLITS_BLOCK = 512


@triton.jit
def _q8_item(pid, item, n_prog, steps, n_row_tiles, k_split, N, R, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUPED: tl.constexpr):
    """Work item `item` of program pid in the persistent GEMV: (clamped rows [BLOCK_N] int64, first row,
    split index, code index k, group g, step within the tile)."""
    j = item // steps
    ks = item - j * steps
    t = pid + j * n_prog
    sidx = t // n_row_tiles
    tn = t - sidx * n_row_tiles
    rn0 = tn * BLOCK_N
    r = tl.minimum(rn0 + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
    if GROUPED:
        g = rn0 // R
    else:
        g = rn0 * 0
    return r, rn0, sidx, sidx * k_split + ks * BLOCK_K, g, ks


@triton.jit
def _q8_rows_persist_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, R, k_split, n_row_tiles, n_tiles,
                            stride_xg, stride_os, stride_w_words, stride_s, off_s, magic_bits,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPED: tl.constexpr, PRMT: tl.constexpr):
    """T=1 gemv_rows with a resident grid: program p walks row tiles p, p+P, ... (and their K steps) and
    loads the next item's code words and scales while it computes the current one, across tile ends."""
    NB: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    b3 = tl.arange(0, NB)[None, :, None]
    i3 = tl.arange(0, 8)[None, None, :]
    rb = tl.arange(0, NB)[None, :]
    steps = k_split // BLOCK_K
    n_items = ((n_tiles - pid + n_prog - 1) // n_prog) * steps
    r, rn0, sidx, k, g, ks = _q8_item(pid, 0, n_prog, steps, n_row_tiles, k_split, N, R, BLOCK_N, BLOCK_K, GROUPED)
    u_next = tl.load(w32 + r[:, None, None] * stride_w_words + (k >> 2) + b3 * 8 + i3)
    d_next = tl.load(s_ptr + r[:, None] * stride_s + off_s + (k >> 5) + rb)
    acc = tl.zeros([BLOCK_N, NB, 8], dtype=tl.float32)
    for item in range(0, n_items):
        u = u_next ^ Q8_BIAS
        d = d_next.to(tl.float32)[:, :, None]
        xk = k
        xg = g
        rn_cur = rn0
        s_cur = sidx
        last = ks == steps - 1
        r, rn0, sidx, k, g, ks = _q8_item(pid, tl.minimum(item + 1, n_items - 1), n_prog, steps, n_row_tiles,
                                          k_split, N, R, BLOCK_N, BLOCK_K, GROUPED)
        more = (tl.full([1, NB], 0, tl.int32) + item + 1) < n_items  # splat mask: stays vectorized
        u_next = tl.load(w32 + r[:, None, None] * stride_w_words + (k >> 2) + b3 * 8 + i3, mask=more[:, :, None],
                         other=0)
        d_next = tl.load(s_ptr + r[:, None] * stride_s + off_s + (k >> 5) + rb, mask=more, other=0.0)
        x0, x1, x2, x3 = _x_lanes(x_ptr + xg * stride_xg, xk, NB)
        q0, q1, q2, q3 = _q8_words4(u, PRMT, magic_bits)
        p = q0 * x0 + q1 * x1 + q2 * x2 + q3 * x3
        acc += p * d
        if last:
            rn = rn_cur + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + s_cur * stride_os + rn, tl.sum(tl.sum(acc, axis=2), axis=1), mask=rn < N)
            acc = tl.zeros([BLOCK_N, NB, 8], dtype=tl.float32)


def _rows_split(n_row_tiles: int, k: int, block_k: int, dev: DeviceInfo, allow_split: bool,
                min_programs_per_sm: int = ROWS_MIN_PROGRAMS_PER_SM, max_split: int = ROWS_MAX_SPLIT) -> int:
    split = 1
    if allow_split and dev.vendor != Vendor.CPU:
        while (n_row_tiles * split < dev.n_sm * min_programs_per_sm and split * 2 <= max_split
               and k % (split * 2 * block_k) == 0):
            split *= 2
    return split


def gemv_rows(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, block_n: int = ROWS_BLOCK_N,
              block_k: int = ROWS_BLOCK_K, num_warps: int = ROWS_WARPS, stages: int = 1, allow_split: bool = True,
              prefetch: bool | int = False, x_mode: int = 0, min_programs_per_sm: int = ROWS_MIN_PROGRAMS_PER_SM,
              max_split: int = ROWS_MAX_SPLIT, pdl: bool | None = None, x_prefetch: bool = False,
              split_sum: int = 4, l2_prefetch: int = 0, w_cache: int = WeightCache.DEFAULT, k_flat: bool = False):
    """Q8_0 decode GEMV (exact fp32 products of exactly decoded codes): x [T, K] (or [T, G, K]) float
    -> [T, N] fp32, T <= DECODE_MAX_T. One launch; narrow matrices split K over programs whose partials are
    summed in a fixed order inside the kernel (deterministic, no second launch).
    x_mode: how x reaches the four byte lanes: 0 loaded in order and split in registers (Triton moves it
    through shared memory), 1 a word-permuted copy made first (one more launch), 2 four stride-4 gathers
    (L1 hits). split_sum: how split-K slices are summed (_q8_rows_kernel's SPLIT_SUM): 0/1 the tile's last
    program, in slice order (1, the relaxed counter reset, is 0.3-0.5 us faster than 0, h200_decode/28); 2 a second
    launch; 4 (default) pairwise in a tree, the partials carried by atomic exchanges: no fence, no counter, no
    reload of the others' partials, 0.1-0.4 us faster than 1 on every split Flash shape and faster on every split
    tile tried (h200_decode/42).
    l2_prefetch: L2 prefetch distance in K steps (_q8_rows_kernel's L2PF; NVIDIA sm_90+ only, else ignored).
    w_cache: the L1 policy of the weight loads (WeightCache).
    k_flat: the code words through [rows, codes] pointers, so that a warp's lanes run along K on every Triton
    (_codes; the default [rows, blocks, words] pointers put them over rows on Triton 3.6).
    Other formats, or K not a multiple of 32, go to qmatmul.gemv."""
    if dw.fmt.name != "Q8_0" or dw.k % 32 or dw.stride_w % 4:
        return gemv(x, dw, dev, groups)

    def build():
        import torch

        g = q8_tiles(x, dw, dev, groups, block_n, block_k)
        T, N, R, stride_xg, bn, bk, block_t, n_row_tiles, prmt, lead = (
            g.T, g.N, g.R, g.stride_xg, g.block_n, g.block_k, g.block_t, g.n_row_tiles, g.prmt, g.lead)
        split = _rows_split(n_row_tiles, dw.k, bk, dev, allow_split, min_programs_per_sm, max_split)
        k_split = dw.k // split
        use = use_pdl(dev, x) and pdl is not False
        l2pf = l2_prefetch if hopper_plus(dev, x) and bk >= 128 else 0  # whole 128-byte lines per row and step
        stride_xt, stride_xg_k = (x.stride(0), stride_xg) if x_mode != 1 else (groups * dw.k, dw.k if groups > 1 else 0)
        tree = split > 1 and split_sum == 4  # the exchange tree sums the slices

        def launch(x):
            if x_mode == 1:  # xw[.., 32b + 8j + i] = x[.., 32b + 4i + j]
                x = x.float().reshape(*lead, dw.k // 32, 8, 4).transpose(-1, -2).contiguous()
            if split == 1:
                out = blocks.empty((1, T, N), x.device)
                y = out[0]
            elif tree:  # the tree keeps no partials in memory: out is only a placeholder argument
                y = blocks.empty((T, N), x.device)
                out = y[None]
            else:
                out, y = blocks.empty((split, T, N), x.device), blocks.empty((T, N), x.device)
            _q8_rows_kernel[(n_row_tiles, split)](
                x, dw.w, dw.s, out, y, sync, T, N, R, k_split, stride_xt, stride_xg_k, T * N, N,
                dw.stride_w // 4, dw.stride_s, dw.off_s, F32_MAGIC_BITS.value,
                BLOCK_T=block_t, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, GROUPED=groups > 1, PRMT=prmt,
                PREFETCH=int(prefetch) if dw.k // split > bk else 0, XPERM=x_mode, SPLIT=split, PDL=use,
                XPF=x_prefetch and block_t == 1 and x_mode == 0, SPLIT_SUM=split_sum, L2PF=l2pf,
                WCACHE=int(w_cache), KFLAT=bool(k_flat), num_warps=num_warps,
                num_stages=1, **pdl_launch(use))
            if split > 1 and split_sum == 2:
                _sum_splits_kernel[(triton.cdiv(T * N, SUM_SPLITS_BLOCK),)](
                    out, y, T * N, SPLIT=split, BLOCK=SUM_SPLITS_BLOCK, PDL=use, num_warps=4, **pdl_launch(use))
            return y
        if tree:  # one int64 slot per tree node and output, zero between calls (each node's carrier resets it)
            sync = torch.zeros((split - 1, T, N), device=x.device, dtype=torch.int64)
        else:  # one arrival counter per row tile, zero between calls (the last program of a tile resets it)
            sync = torch.zeros(n_row_tiles if split > 1 else 1, device=x.device, dtype=torch.int32)
        launch.slots = sync if tree else None  # for the tests
        return launch

    x = x if x.dtype.is_floating_point and x.stride(-1) == 1 else x.contiguous()
    key = ("gemv_rows", allow_split, block_n, block_k, num_warps, stages, prefetch, x_mode, min_programs_per_sm,
           max_split, pdl, x_prefetch, split_sum, l2_prefetch, int(w_cache), bool(k_flat))
    return _plan("gemv_rows", x, dw, groups, key, build)(x)


ROWS_PERSIST_PROGRAMS_PER_SM = 6  # resident programs per SM at ~72-96 registers x 4 warps on sm_90


def gemv_rows_persist(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, block_n: int = 16, block_k: int = 256,
                      num_warps: int = 4, programs_per_sm: int = ROWS_PERSIST_PROGRAMS_PER_SM,
                      allow_split: bool = True):
    """gemv_rows for one token with a resident (persistent) grid and cross-tile prefetch. T > 1 or
    K not a multiple of 32 go to gemv_rows."""
    if dw.fmt.name != "Q8_0" or x.shape[0] != 1 or dw.k % 32 or dw.stride_w % 4:
        return gemv_rows(x, dw, dev, groups)

    def build():
        g = q8_tiles(x, dw, dev, groups, block_n, block_k)
        N, R, stride_xg, bn, bk, n_row_tiles, prmt = g.N, g.R, g.stride_xg, g.block_n, g.block_k, g.n_row_tiles, g.prmt
        split = _rows_split(n_row_tiles, dw.k, bk, dev, allow_split)
        n_tiles = n_row_tiles * split
        programs = min(n_tiles, 4 if dev.vendor == Vendor.CPU else dev.n_sm * programs_per_sm)

        def launch(x):
            out = blocks.empty((split, 1, N), x.device)
            _q8_rows_persist_kernel[(programs,)](
                x, dw.w, dw.s, out, N, R, dw.k // split, n_row_tiles, n_tiles, stride_xg, N,
                dw.stride_w // 4, dw.stride_s, dw.off_s, F32_MAGIC_BITS.value,
                BLOCK_N=bn, BLOCK_K=bk, GROUPED=groups > 1, PRMT=prmt, num_warps=num_warps, num_stages=1)
            return _reduce_split(out, split)
        return launch

    x = x if x.stride(-1) == 1 else x.contiguous()
    key = ("gemv_rows_persist", block_n, block_k, num_warps, programs_per_sm, allow_split)
    return _plan("gemv_rows_persist", x, dw, groups, key, build)(x)


DEFAULT_ROWS = dict(block_n=16, block_k=256, num_warps=2, prefetch=True)  # T=1, shapes not in ROWS_T1
DEFAULT_ROWS_WIDE = dict(DEFAULT_ROWS, num_warps=4)  # T > 1, few rows (attn_q_a, attn_kv)
# T > 1 on every larger Flash Q8_0 matrix: one warp, 32 rows x 128 codes, split-K below 8 programs per SM; at T=4
# and 8 it is 1.3-2.0x faster than DEFAULT_ROWS_WIDE (tools/results/h200_decode/20: probe_decode q8t, 18 tiles),
# while on the few-row matrices DEFAULT_ROWS_WIDE stays within 10 % of the best tile
ROWS_TN = dict(block_n=32, block_k=128, num_warps=1, prefetch=True)
ROWS_TN_FEW_ROWS = 1024  # at most this many rows: DEFAULT_ROWS_WIDE
# One token, tile per (rows, K, groups) of the Flash Q8_0 matrices: the fastest of the H200 sweeps
# (tools/results/h200_decode/: probe_decode q8, pdl, q8x, q8o; CUDA-graph replay with programmatic dependent
# launch). allow_split=False: the row tiles alone fill the GPU (or splitting measured slower).
_ONE_WARP = dict(block_k=128, num_warps=1, prefetch=True)
# attn_output_a/b and ffn_gate_shexp: the code-word loads L1/L2 evict_first, the scales as before
# (WeightCache.EVICT_FIRST_CODES): attn_output_a 12.3 -> 12.0 us (68.4-68.7 -> 70.1-70.2 %), attn_output_b 12.2 ->
# 11.8 us (69.1-69.2 -> 71.1-71.2 %), ffn_gate_shexp 5.3 -> 4.9 us, two interleaved passes; evict_first on the
# scales too gains half as much; slower on attn_q_b and the LM head (tools/results/h200_decode/52, 52b, 52c)
_EF = dict(w_cache=WeightCache.EVICT_FIRST_CODES)
ROWS_T1_WIDE_K = dict(block_n=16, block_k=256, num_warps=2, prefetch=True)  # K >= 4096, few rows: split-K 8
# Triton 3.6: the code words through [rows, codes] pointers (k_flat), so that a warp's lanes run along K as they do from
# Triton 3.7 on (h200_decode/109, 110: H200, CUDA-graph replay, two interleaved passes each, every tile against itself
# without k_flat): attn_q_b 10.7-10.9 -> 9.7 us (75.8-77.3 -> 85.3-85.6 %; 16 rows, codes evict_first), attn_output_a
# 11.9-12.0 -> 10.1-10.2 us (69.4-69.7 -> 81.6-81.9 %; the same tile), attn_output_b 11.7-12.3 -> 10.4 us (67.3-71.0 ->
# 79.8-80.0 %; 16 rows split 8, ROWS_T1_TRITON37's tile; the previous 32-row tile gains nothing), ffn_gate_shexp 4.9 ->
# 4.3 us, attn_kv 2.7 -> 2.6 us. Not at T > 1: ROWS_TN with it is 1-7 % slower at T=4 on 7 of the 8 shapes (109)
ROWS_T1 = {
    (32768, 1024, 1): dict(_ONE_WARP, block_n=16, **_EF, k_flat=True),  # attn_q_b: 2048 one-warp programs
    (4096, 8192, 1): dict(_ONE_WARP, block_n=16, **_EF, k_flat=True),  # attn_output_b: split-K 8
    (8192, 4096, 8): dict(block_n=16, block_k=512, num_warps=4, prefetch=True, allow_split=False, **_EF,
                          k_flat=True),  # attn_output_a
    # LM head: also an L2 prefetch two steps ahead (85.3-85.4 % against 82.3-82.5 % without, h200_decode/26b; it
    # slows the 35.7 MB matrices, whose split tiles are latency-bound, not issue-bound)
    (129280, 4096, 1): dict(_ONE_WARP, block_n=32, allow_split=False, l2_prefetch=2),
    (4096, 2048, 1): dict(block_n=16, block_k=512, num_warps=4, prefetch=True, allow_split=False),  # ffn_down_shexp
    (2048, 4096, 1): dict(ROWS_T1_WIDE_K, **_EF, k_flat=True),  # ffn_gate_shexp: the wide-K tile, evict_first
    (512, 4096, 1): dict(ROWS_T1_WIDE_K, k_flat=True),  # attn_kv
}


# Triton 3.7 on: the same source compiles to other code for these tiles (sm_90a, offline: attn_output_a's ROWS_T1 tile
# 768 SASS instructions at 120 registers on 3.6, 1184-1224 at 164-166 on 3.7-3.9; h200_decode/107; the code-word
# loads' lanes run along K there without k_flat, see _codes), and other tiles win. k_flat is not taken here (measured
# on 3.6 only; from 3.7 it gives the loads the layout they already have). Measured natively on Triton 3.9 (H200,
# CUDA-graph replay, rotation held 8 times, h200_decode/103, 103b, with ROWS_T1's tile and policy of then beside them)
# and checked on 3.7 (108: 9.8 / 9.8 / 10.5 us, ROWS_T1's attn_output_b tile of then 12.4); 3.8 takes it by its code's
# resemblance to 3.7's and 3.9's, not measured. On 3.9: attn_q_b 10.3-10.4 -> 10.0 us (auto with the default policy
# against 8 rows, codes evict_first); attn_output_a 11.4 -> 10.0 us (8 rows x 256 codes, split 2 from 8 programs per
# SM: 14.6 us on Triton 3.6 without k_flat, h200_decode/52d); attn_output_b 12.3 -> 10.5 us (16 rows, split 8: 12.4 on
# 3.6 without k_flat)
ROWS_T1_TRITON37 = {
    **{shape: {k: v for k, v in kw.items() if k != "k_flat"} for shape, kw in ROWS_T1.items()},  # attn_output_b too
    (32768, 1024, 1): dict(_ONE_WARP, block_n=8, **_EF),  # attn_q_b
    (8192, 4096, 8): dict(block_n=8, block_k=256, num_warps=1, prefetch=True, **_EF),  # attn_output_a: split-K 2
}


def rows_t1_table() -> dict:
    """The one-token tiles for the Triton this runs on (ROWS_T1 tuned on 3.6, ROWS_T1_TRITON37 on 3.9)."""
    return ROWS_T1_TRITON37 if TRITON_VERSION >= (3, 7) else ROWS_T1


def rows_config(t: int, n_rows: int, k: int, groups: int) -> dict:
    """gemv_rows keyword arguments for a T-token GEMV of this shape (CUDA)."""
    if t > 1:
        return DEFAULT_ROWS_WIDE if n_rows <= ROWS_TN_FEW_ROWS else ROWS_TN
    return rows_t1_table().get((n_rows, k, groups), ROWS_T1_WIDE_K if k >= 4096 else DEFAULT_ROWS)


def gemv_rows_default(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """gemv_rows with the config qmatmul's auto variant uses on CUDA (rows_config; with programmatic dependent
    launch on sm_90+). H200, T=1, CUDA-graph replay: attn_q_b 72 %, the LM head 82 %, attn_output_a/b 61-65 %
    of the streaming read (tools/results/h200_decode/)."""
    return gemv_rows(x, dw, dev, groups, **rows_config(x.shape[0], dw.n_rows, dw.k, groups))


# ---- prefill: transient fp16 weight + tl.dot on fp32 activations ------------------------------------
F16W_BLOCK_M = 128
F16W_BLOCK_N = 128
F16W_BLOCK_K = 64
F16W_WARPS = 8
F16W_STAGES = 3


@triton.jit
def _mm_x32_w16_kernel(x_ptr, w_ptr, out_ptr, M, N, K, R, stride_xm, stride_xg, stride_wn, stride_om, stride_os,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       GROUPED: tl.constexpr):
    """out[s, m, n] = sum_{k in slice s} fp16(x[m, g(n), k]) * w[n, k] (w fp16, fp32 accumulation); K is the
    slice length (program axis 1), a multiple of BLOCK_K."""
    pid = tl.program_id(0)
    k_start = tl.program_id(1) * K
    out_ptr += tl.program_id(1) * stride_os
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n  # grouped launch order: neighbouring programs share x tiles in L2
    first_m = (pid // per_group) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if GROUPED:
        g = (pid_n * BLOCK_N) // R
    else:
        g = 0
    xp = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm + g * stride_xg + k_start + rk[None, :]
    wp = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[None, :] * stride_wn + k_start + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _k in range(0, K, BLOCK_K):
        a = tl.load(xp).to(tl.float16)
        b = tl.load(wp)
        acc = tl.dot(a, b, acc)
        xp += BLOCK_K
        wp += BLOCK_K
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc,
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def gemm_f16w(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, block_m: int = F16W_BLOCK_M,
              block_n: int = F16W_BLOCK_N, block_k: int = F16W_BLOCK_K, num_warps: int = F16W_WARPS,
              num_stages: int = F16W_STAGES, split_k: int = 1):
    """Q8_0 prefill: block-scaled fp16 dequant of the whole weight (transient) + a tl.dot GEMM that
    reads x in fp32 and rounds it to fp16 in registers. Same rounding as qmatmul_fast.gemm_dequant_q8
    (x and q*d rounded once to fp16, fp32 accumulation). split_k > 1: K slices in separate programs
    (more programs for narrow matrices), summed after in fixed order. Other formats: qmatmul_fast.gemm_hybrid."""
    import torch

    from .qmatmul_fast import gemm_hybrid

    if dw.fmt.name != "Q8_0" or dw.k % (block_k * split_k):
        return gemm_hybrid(x, dw, dev, groups)
    x, T, N, R, stride_xg, _t = _check(x, dw, groups)
    if groups > 1 and R % block_n:
        return gemm_hybrid(x, dw, dev, groups)
    w16 = dequant_q8_rows(dw, torch.empty((N, dw.k), device=x.device, dtype=torch.float16))
    out = blocks.empty((split_k, T, N), x.device)
    grid = (triton.cdiv(T, block_m) * triton.cdiv(N, block_n), split_k)
    _mm_x32_w16_kernel[grid](x, w16, out, T, N, dw.k // split_k, R, x.stride(0), stride_xg, w16.stride(0),
                             out.stride(1), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             GROUP_M=8, GROUPED=groups > 1, num_warps=num_warps, num_stages=num_stages)
    return _reduce_split(out, split_k)


# ---- registered variants (op "qmatmul"; signature fn(x, dw, dev, groups)) ------------------------
from ..quant.formats import QuantFormat  # noqa: E402
from .registry import KernelOp, register  # noqa: E402

_Q8 = (QuantFormat.Q8_0,)
ROWS_VARIANTS = {  # name: (block_n, block_k, num_warps, prefetch, x_mode)
    "gemv_rows": (ROWS_BLOCK_N, ROWS_BLOCK_K, ROWS_WARPS, False, 0),
    "gemv_rows_pf": (16, 256, 4, True, 0),
    "gemv_rows_pf_w2": (16, 256, 2, True, 0),
    "gemv_rows_x1": (16, 256, 4, True, 1),
    "gemv_rows_x2": (16, 256, 4, True, 2),
}
PERSIST_VARIANTS = {  # name: (block_n, block_k, warps, programs per SM)
    "gemv_rows_persist": (16, 256, 4, 4),
}
for _name, (_bn, _bk, _w, _pp) in PERSIST_VARIANTS.items():
    register(KernelOp.QMATMUL, _name,
             lambda x, dw, dev, groups=1, _bn=_bn, _bk=_bk, _w=_w, _pp=_pp:
             gemv_rows_persist(x, dw, dev, groups, _bn, _bk, _w, _pp),
             formats=_Q8, max_t=DECODE_MAX_T,
             doc=f"Q8_0 T=1 GEMV, resident grid ({_pp} programs/SM), {_bn} rows x {_bk} codes, cross-tile prefetch")
for _name, (_bn, _bk, _w, _pf, _xm) in ROWS_VARIANTS.items():
    register(KernelOp.QMATMUL, _name,
             lambda x, dw, dev, groups=1, _bn=_bn, _bk=_bk, _w=_w, _pf=_pf, _xm=_xm:
             gemv_rows(x, dw, dev, groups, _bn, _bk, _w, prefetch=_pf, x_mode=_xm),
             formats=_Q8, max_t=DECODE_MAX_T,
             doc=f"Q8_0 GEMV, {_bn} rows x {_bk} codes per program step, {_w} warps, x lanes mode {_xm}"
                 + (", next step prefetched" if _pf else "") + ", split-K if narrow")
F16W_VARIANTS = {  # name: (block_m, block_n, block_k, warps, stages, split_k)
    "gemm_f16w": (F16W_BLOCK_M, F16W_BLOCK_N, F16W_BLOCK_K, F16W_WARPS, F16W_STAGES, 1),
    "gemm_f16w_m64": (64, 128, 64, 4, 4, 1),
}
for _name, (_bm, _bn, _bk, _w, _st, _sk) in F16W_VARIANTS.items():
    register(KernelOp.QMATMUL, _name,
             lambda x, dw, dev, groups=1, _bm=_bm, _bn=_bn, _bk=_bk, _w=_w, _st=_st, _sk=_sk:
             gemm_f16w(x, dw, dev, groups, _bm, _bn, _bk, _w, _st, _sk),
             formats=_Q8, doc=f"Q8_0 prefill: fp16 dequant + tl.dot on fp32 x, tiles {_bm}x{_bn}x{_bk}, {_w} warps, "
                              f"split-K {_sk}")


# ---- decode through tensor cores: codes -> fp16 by bit ops, per-block sums as the dot's N axis ------
MMA_NSUB = 8  # 32-code blocks per step: the dot's N axis (x2 with the hi/lo split; tl.dot needs N >= 16)
MMA_BLOCK_N = 64
MMA_WARPS = 4
MMA_STAGES = 4
# x = hi + lo / 2^11 with hi = fp16(x), lo = fp16((x - hi) * 2^11): ~2^-22 relative
X_LO_SCALE: tl.constexpr = tl.constexpr(2048.0)


@triton.jit
def _codes_f16(q, PRMT: tl.constexpr):
    """int8 codes -> exact fp16 values without a conversion instruction: (q + 128) in the low byte of
    fp16 1024 (0x64XX = 1024 + XX), minus 1152. CUDA: per 4 codes one xor, two byte permutes and two
    packed fp16 subtractions (inline PTX; element i of the pack is byte i / half i)."""
    if PRMT:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 u, m; xor.b32 u, $2, 0x80808080; mov.b32 m, 0x64806480;"
            " prmt.b32 $0, u, 0x64646464, 0x5140; prmt.b32 $1, u, 0x64646464, 0x5342;"
            " sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m; }",
            "=r,=r,r", [q], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return ((q.to(tl.int16) + 128) | 0x6400).to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def _xdiag_kernel(x_ptr, xd_ptr, K, stride_xg, BLOCK_K: tl.constexpr, NSUB: tl.constexpr, X_SPLIT: tl.constexpr):
    """xd[g, step, k, j] = x[g, step*BLOCK_K + k] if k // 32 == j else 0, fp16; with X_SPLIT the columns
    NSUB + j hold the low parts ((x - hi) * 2^11). One program per (step, group)."""
    step = tl.program_id(0)
    g = tl.program_id(1)
    MX: tl.constexpr = 2 * NSUB if X_SPLIT else NSUB
    rk = tl.arange(0, BLOCK_K)
    rj = tl.arange(0, MX)
    x = tl.load(x_ptr + g * stride_xg + step * BLOCK_K + rk).to(tl.float32)
    hi = x.to(tl.float16)
    lo = ((x - hi.to(tl.float32)) * X_LO_SCALE).to(tl.float16)
    blk = (rk // 32)[:, None]
    val = tl.where(rj[None, :] < NSUB, hi[:, None], lo[:, None])
    val = tl.where(blk == (rj[None, :] % NSUB), val, 0.0)
    base = xd_ptr + (g * (K // BLOCK_K) + step).to(tl.int64) * (BLOCK_K * MX)
    tl.store(base + rk[:, None] * MX + rj[None, :], val)


@triton.jit
def _q8_mma_kernel(xd_ptr, w_ptr, s_ptr, out_ptr, N, K, R, k_split, stride_w, stride_s, off_s, stride_os,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NSUB: tl.constexpr, X_SPLIT: tl.constexpr,
                   STAGES: tl.constexpr, GROUPED: tl.constexpr, PRMT: tl.constexpr):
    """out[split, 0, n] = sum_k x[g(n), k] d[n, k//32] q[n, k]: per step S = codes [BLOCK_N, BLOCK_K] (fp16,
    exact) @ xd [BLOCK_K, NSUB(x2)] (block-diagonal x) -> per-block sums [BLOCK_N, NSUB]; acc += S * d."""
    MX: tl.constexpr = 2 * NSUB if X_SPLIT else NSUB
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.minimum(rn, N - 1).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rj = tl.arange(0, MX)
    rs = tl.arange(0, NSUB)
    if GROUPED:
        g = (pid_n * BLOCK_N) // R
    else:
        g = 0
    k_lo = pid_k * k_split
    wp = w_ptr + rc[:, None] * stride_w + k_lo + rk[None, :]
    sp = s_ptr + rc[:, None] * stride_s + off_s + (k_lo // 32) + rs[None, :]
    xp = xd_ptr + (g * (K // BLOCK_K) + k_lo // BLOCK_K).to(tl.int64) * (BLOCK_K * MX) + rk[:, None] * MX + rj[None, :]
    acc = tl.zeros([BLOCK_N, NSUB], dtype=tl.float32)
    for _k in tl.range(0, k_split, BLOCK_K, num_stages=STAGES):
        q = _codes_f16(tl.load(wp), PRMT)
        xd = tl.load(xp)
        s = tl.dot(q, xd)  # [BLOCK_N, MX] fp32
        if X_SPLIT:
            s_hi, s_lo = tl.split(tl.permute(tl.reshape(s, (BLOCK_N, 2, NSUB)), (0, 2, 1)))
            s = s_hi + s_lo * (1.0 / X_LO_SCALE)
        acc += s * tl.load(sp).to(tl.float32)
        wp += BLOCK_K
        sp += BLOCK_K // 32
        xp += BLOCK_K * MX
    tl.store(out_ptr + pid_k * stride_os + rn, tl.sum(acc, axis=1), mask=rn < N)


def gemv_mma(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, block_n: int = MMA_BLOCK_N,
             num_warps: int = MMA_WARPS, stages: int = MMA_STAGES, x_split: bool = True, allow_split: bool = True,
             nsub: int = MMA_NSUB):
    """Q8_0 decode GEMV for ONE token through tl.dot: exact codes and fp32 scales; x enters as fp16
    (x_split: hi + lo, ~2^-22 relative, fp32-grade; else rounded once to fp16, ~2^-11). Two launches
    (block-diagonal x, then the GEMV) plus the split sum for narrow matrices. T > 1, other formats or
    K not a multiple of 32*nsub go to gemv_rows. The A operand (codes) lives in registers for the wgmma,
    so BLOCK_N x 32*nsub fp16 values per program bound the tile (nsub 8: 64 registers a thread at 64 x 256)."""
    import torch

    if not x_split and nsub < 16:
        nsub = 16  # the dot's N axis must reach 16
    block_k = 32 * nsub
    if dw.fmt.name != "Q8_0" or x.shape[0] != 1 or dw.k % block_k:
        return gemv_rows(x, dw, dev, groups)

    def build():
        _, T, N, R, stride_xg, _t = _check(x, dw, groups)
        bn = min(block_n, max(16, triton.next_power_of_2(N))) if groups == 1 else pow2_divisor(R, block_n)
        n_tiles = triton.cdiv(N, bn)
        split = _rows_split(n_tiles, dw.k, block_k, dev, allow_split)
        prmt = dev.vendor == Vendor.NVIDIA and x.is_cuda
        mx = 2 * nsub if x_split else nsub
        steps = dw.k // block_k

        def launch(x):
            xd = torch.empty((groups, steps, block_k, mx), device=x.device, dtype=torch.float16)
            _xdiag_kernel[(steps, groups)](x, xd, dw.k, stride_xg, BLOCK_K=block_k, NSUB=nsub,
                                           X_SPLIT=x_split, num_warps=4)
            out = blocks.empty((split, 1, N), x.device)
            _q8_mma_kernel[(n_tiles, split)](
                xd, dw.w, dw.s, out, N, dw.k, R, dw.k // split, dw.stride_w, dw.stride_s, dw.off_s, N,
                BLOCK_N=bn, BLOCK_K=block_k, NSUB=nsub, X_SPLIT=x_split, STAGES=stages,
                GROUPED=groups > 1, PRMT=prmt, num_warps=num_warps, num_stages=stages)
            return _reduce_split(out, split)
        return launch

    x = x if x.stride(-1) == 1 else x.contiguous()
    key = ("gemv_mma", block_n, num_warps, stages, x_split, allow_split, nsub)
    return _plan("gemv_mma", x, dw, groups, key, build)(x)


MMA_VARIANTS = {  # name: (block_n, warps, stages, x_split, nsub)
    "gemv_mma": (MMA_BLOCK_N, MMA_WARPS, MMA_STAGES, True, MMA_NSUB),
    "gemv_mma_n32": (32, 4, 6, True, 8),
}
for _name, (_bn, _w, _st, _xs, _ns) in MMA_VARIANTS.items():
    register(KernelOp.QMATMUL, _name,
             lambda x, dw, dev, groups=1, _bn=_bn, _w=_w, _st=_st, _xs=_xs, _ns=_ns:
             gemv_mma(x, dw, dev, groups, _bn, _w, _st, _xs, nsub=_ns),
             formats=_Q8, max_t=DECODE_MAX_T,
             doc=f"Q8_0 T=1 GEMV on tensor cores: {_bn} rows x {32 * _ns} codes per step, {_w} warps, {_st} stages, "
                 + ("x as fp16 hi+lo" if _xs else "x rounded to fp16"))
