"""Faster Q8_0 qmatmul variants: a conversion-free persistent decode GEMV and a hybrid prefill path.

Why: the measured Q8_0 kernels plateau at ~45% of H200 read bandwidth because every weight goes
through an int->float conversion (I2F, 16/clk/SM on sm_90: ~1 per byte already fills that pipe at
full bandwidth). `gemv_persist` decodes codes with bit ops (one PTX byte permute per code on CUDA)
+ one fp32 add (exact), loads codes as 32-bit words (16-byte vectors), scales once per 32-weight
block, prefetches the next step into registers, and runs a persistent grid.
`gemm_hybrid` picks per shape between that GEMV (small T), the fused tl.dot GEMM and a transient
fp16 dequant + cuBLAS matmul (large T). Knows the Q8_0 repacked row layout (blocks.py), not the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from . import blocks
from .blocks import DeviceWeight
from .configs import DeviceInfo, Vendor, pow2_divisor
from .qmatmul import DECODE_MAX_T, _check, _plan, _reduce_split, gemm, gemv

# 0x80808080 as a signed int32: xor flips each code byte's sign bit (signed q -> unsigned q + 128)
Q8_BIAS: tl.constexpr = tl.constexpr(0x80808080 - (1 << 32))
F32_MAGIC_BITS: tl.constexpr = tl.constexpr(0x4B000000)  # 2^23: low mantissa byte holds an unsigned byte exactly
F32_MAGIC_OFFSET: tl.constexpr = tl.constexpr(8388736.0)  # 2^23 + 128: subtracting it leaves the signed code

PERSIST_BLOCK_N = 4  # rows per tile; each thread holds all of them (x reused from registers)
PERSIST_BLOCK_K = 2048  # codes per row per step (at most; a power-of-two divisor of K)
CODES_PER_WARP = 512  # 32 threads x 16 B: warps per program = BLOCK_K / 512 keeps the x slices [1, NB, 8]
# at 4 elements per thread, the same 16-byte layout as the code words (else Triton converts via smem)
PERSIST_WARPS_PER_SM = 16  # first-launch guess of resident warps (~118-124 registers/thread at T=1 on sm_90);
# after the first launch the grid is resized from the compiled kernel's register count (below)
SM_REGISTERS = 65536  # per SM on sm_80/sm_90, allocated per warp in units of REG_ALLOC_UNIT
REG_ALLOC_UNIT = 256
SM_MAX_WARPS = 64
PERSIST_MIN_TILES_PER_SM = 4  # below this many row tiles per SM, split K (deterministic second pass)
PERSIST_MAX_SPLIT = 8
CPU_PROGRAMS = 4  # interpreter: a few persistent programs so the tile loop runs more than once

HYBRID_GEMV_MAX_T = 32  # up to here: exact fp32 GEMV in token chunks (weight-read bound anyway)
HYBRID_DEQUANT_MIN_T = 256  # from here: transient fp16 dequant + cuBLAS (GEMM dwarfs the extra pass)
DEQUANT_CHUNK_BYTES = 1 << 30  # transient fp16 weight buffer per chunk of rows (1 GiB)
DEQUANT_BLOCK_N = 16
DEQUANT_BLOCKS = 8  # 32-code blocks per program step (256 codes)


@triton.jit
def _q8_word_codes(u, j: tl.constexpr, PRMT: tl.constexpr, magic_bits):
    """Signed code j (0..3) of biased int32 words `u`, as fp32, without an int->float conversion:
    put the unsigned byte into the mantissa of 2^23 and subtract 2^23 + 128 (exact in fp32).
    PRMT (CUDA): one byte-permute instruction builds the bits (else shift/and/or, which ptxas
    lowers to ~1.5 instructions per code)."""
    if PRMT:
        # selector 0x765j: byte 0 <- byte j of u, bytes 1..3 <- bytes 1..3 of 0x4B000000. The magic
        # comes as a kernel argument so ptxas keeps it in a register and the selector immediate
        # (folded, it moves the selector into a register per use: a MOV per code).
        magic = tl.full(u.shape, 0, tl.int32) + magic_bits
        if j == 0:
            b = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7650;", "=r,r,r", [u, magic], dtype=tl.int32,
                                          is_pure=True, pack=1)
        elif j == 1:
            b = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7651;", "=r,r,r", [u, magic], dtype=tl.int32,
                                          is_pure=True, pack=1)
        elif j == 2:
            b = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7652;", "=r,r,r", [u, magic], dtype=tl.int32,
                                          is_pure=True, pack=1)
        else:
            b = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7653;", "=r,r,r", [u, magic], dtype=tl.int32,
                                          is_pure=True, pack=1)
    else:
        b = ((u >> (8 * j)) & 0xFF) | F32_MAGIC_BITS
    return b.to(tl.float32, bitcast=True) - F32_MAGIC_OFFSET


@triton.jit
def _q8_words4(u, PRMT: tl.constexpr, magic_bits):
    """The four signed codes (bytes 0..3) of biased int32 words `u`, as fp32 (_q8_word_codes of each)."""
    return (_q8_word_codes(u, 0, PRMT, magic_bits), _q8_word_codes(u, 1, PRMT, magic_bits),
            _q8_word_codes(u, 2, PRMT, magic_bits), _q8_word_codes(u, 3, PRMT, magic_bits))


@triton.jit
def _q8_accumulate(acc, acc_t, p, d, t, rt, BLOCK_T: tl.constexpr):
    """Add token t's per-word products p [BLOCK_N, NB, 8] times the block scales d: for one token keep
    them per (row, block, word) in acc (reduced once per tile), else reduce now into acc_t[t]."""
    if BLOCK_T == 1:
        acc += p * d
    else:
        c = tl.sum(tl.sum(p * d, axis=2), axis=1)
        acc_t = tl.where(rt[:, None] == t, acc_t + c[None, :], acc_t)
    return acc, acc_t


@triton.jit
def _q8_tile_start(tile, n_row_tiles, k_split, N, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """(rows clamped to N-1 as int64 [BLOCK_N], first code index) of `tile` = split * n_row_tiles + row tile."""
    if SPLIT:
        tn = tile % n_row_tiles
        k = (tile // n_row_tiles) * k_split
    else:
        tn = tile
        k = tile * 0
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.minimum(rn, N - 1).to(tl.int64), k


@triton.jit
def _q8_step_ptrs(w32, s_ptr, r, k, stride_w_words, stride_s, off_s, b3, i3, BLOCK_K: tl.constexpr):
    """Code-word ([BLOCK_N, NB, 8]) and scale ([BLOCK_N, NB], contiguous per row) pointers of rows r
    from code index k."""
    wp = w32 + r[:, None, None] * stride_w_words + (k >> 2) + b3 * 8 + i3
    sp = s_ptr + r[:, None] * stride_s + off_s + (k >> 5) + tl.arange(0, BLOCK_K // 32)[None, :]
    return wp, sp


@triton.jit
def _q8_gemv_persist_kernel(x_ptr, w_ptr, s_ptr, out_ptr,
                            T, N, R, k_split, n_row_tiles, n_tiles,
                            stride_xt, stride_xg, stride_os, stride_ot,
                            stride_w_words, stride_s, off_s, magic_bits,
                            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT: tl.constexpr, GROUPED: tl.constexpr, PRMT: tl.constexpr = False):
    """out[split, t, n] = sum_{k in split} x[t, g(n), k] * d[n, k//32] * q[n, k], g(n) = n // R.

    Persistent: program p owns tiles p, p + P, ...; the next K step's code words and scales are
    loaded (register prefetch) while this one is computed, across tile boundaries too. Codes are read
    as [BLOCK_N, NB, 8] int32 words (4 codes each); x comes word-permuted (xw[32b + 8j + i] =
    x[32b + 4i + j]) so its four slices load with the same 16-byte layout as the words. Partial
    products stay per (row, block, word) in fp32 and are reduced once per tile. Integer divisions
    only per tile and only when SPLIT / GROUPED. Rows past N are clamped to N-1 (not stored)."""
    NB: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    b3 = tl.arange(0, NB)[None, :, None]
    i3 = tl.arange(0, 8)[None, None, :]
    rt = tl.arange(0, BLOCK_T)
    steps = k_split // BLOCK_K
    r, k = _q8_tile_start(pid, n_row_tiles, k_split, N, BLOCK_N, SPLIT)
    wp, sp = _q8_step_ptrs(w32, s_ptr, r, k, stride_w_words, stride_s, off_s, b3, i3, BLOCK_K)
    u_next = tl.load(wp)
    d_next = tl.load(sp)
    for tile in range(pid, n_tiles, n_prog):
        if SPLIT:
            tn = tile % n_row_tiles
            ts = tile // n_row_tiles
        else:
            tn = tile
            ts = 0
        if GROUPED:
            g = (tn * BLOCK_N) // R
        else:
            g = 0
        x_tile = x_ptr + g * stride_xg + ts * k_split + b3 * 32 + i3  # [1, NB, 8]
        r, k = _q8_tile_start(tile, n_row_tiles, k_split, N, BLOCK_N, SPLIT)
        nxt = tile + n_prog
        has_next = nxt < n_tiles
        r_n, k_n = _q8_tile_start(tl.minimum(nxt, n_tiles - 1), n_row_tiles, k_split, N, BLOCK_N, SPLIT)
        acc = tl.zeros([BLOCK_N, NB, 8], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for ks in range(0, steps):
            u = u_next ^ Q8_BIAS
            d = d_next.to(tl.float32)[:, :, None]  # one scale per block, broadcast over its 8 words
            last = ks == steps - 1
            more = tl.where(has_next | (ks + 1 < steps), 1, 0)
            r_p = tl.where(last, r_n, r)  # prefetch: next step of this tile, or the next tile's first
            k_p = tl.where(last, k_n, k + (ks + 1) * BLOCK_K)
            wp, sp = _q8_step_ptrs(w32, s_ptr, r_p, k_p, stride_w_words, stride_s, off_s, b3, i3, BLOCK_K)
            # splat masks keep the prefetch vectorized
            u_next = tl.load(wp, mask=(tl.full([1, NB, 8], 0, tl.int32) + more) != 0, other=0)
            d_next = tl.load(sp, mask=(tl.full([1, NB], 0, tl.int32) + more) != 0, other=0.0)
            q0, q1, q2, q3 = _q8_words4(u, PRMT, magic_bits)
            for t in tl.static_range(BLOCK_T):
                t_row = tl.minimum(T - 1, t)  # rows past T repeat the last one; not stored
                xp = x_tile + t_row.to(tl.int64) * stride_xt + ks * BLOCK_K
                p = q0 * tl.load(xp)  # a serial FMA chain: 1 FMUL + 3 FFMA per word
                p += q1 * tl.load(xp + 8)
                p += q2 * tl.load(xp + 16)
                p += q3 * tl.load(xp + 24)
                acc, acc_t = _q8_accumulate(acc, acc_t, p, d, t, rt, BLOCK_T)
        if BLOCK_T == 1:
            acc_t = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
        rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        out = out_ptr + ts * stride_os + rt[:, None] * stride_ot + rn[None, :]
        tl.store(out, acc_t, mask=(rt[:, None] < T) & (rn < N)[None, :])


@triton.jit
def _q8_dequant_tile(w_ptr, s_ptr, out_ptr, pid_n, pid_b, N, K, row0, stride_w, stride_s, off_s, stride_o,
                     BLOCK_N: tl.constexpr, NBLK: tl.constexpr):
    """out[n - row0, k] = fp16(d * q) for the [BLOCK_N, NBLK*32] tile (pid_n, pid_b) of rows [row0, N):
    codes as [BLOCK_N, NBLK, 32] with one scale load per 32-weight block (the generic dequant_tile
    gathers the scale per weight)."""
    rn = row0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    blk = pid_b * NBLK + tl.arange(0, NBLK)
    r3 = rn.to(tl.int64)[:, None, None]
    b3 = blk[None, :, None]
    j3 = tl.arange(0, 32)[None, None, :]
    ok = (rn < N)[:, None, None] & (b3 * 32 < K)
    q = tl.load(w_ptr + r3 * stride_w + b3 * 32 + j3, mask=ok, other=0).to(tl.float32)
    d = tl.load(s_ptr + r3 * stride_s + off_s + b3, mask=ok, other=0).to(tl.float32)
    tl.store(out_ptr + (r3 - row0) * stride_o + b3 * 32 + j3, (q * d).to(tl.float16), mask=ok)


@triton.jit
def _q8_dequant_rows_kernel(w_ptr, s_ptr, out_ptr, N, K, row0, stride_w, stride_s, off_s, stride_o,
                            BLOCK_N: tl.constexpr, NBLK: tl.constexpr):
    """_q8_dequant_tile over a (row tiles, block groups) grid."""
    _q8_dequant_tile(w_ptr, s_ptr, out_ptr, tl.program_id(0), tl.program_id(1), N, K, row0, stride_w, stride_s,
                     off_s, stride_o, BLOCK_N, NBLK)


CAST_BLOCK = 4096  # activations cast per program of the fused cast + dequant launch
CAST_WARPS = 8  # warps per program of that launch (both kinds of program): 2-4 % faster than 4 on the large
# shapes, equal on the narrow ones (tools/results/h200_q8/11_*)


@triton.jit
def _cast_dequant_kernel(x_ptr, x16_ptr, n_x, w_ptr, s_ptr, out_ptr, N, K, row0, stride_w, stride_s, off_s, stride_o,
                         n_deq, n_kblk, CAST: tl.constexpr, BLOCK_N: tl.constexpr, NBLK: tl.constexpr,
                         BLOCK_X: tl.constexpr):
    """One launch for both inputs of the fp16 GEMM: programs [0, n_deq) dequantize [BLOCK_N, NBLK*32] weight
    tiles (_q8_dequant_tile); with CAST the remaining programs round x (flat, contiguous) to fp16.
    (Two launches cost a kernel gap each; at T=2048 the cast alone is ~a third of a narrow GEMM's time.)"""
    pid = tl.program_id(0)
    if pid < n_deq:
        _q8_dequant_tile(w_ptr, s_ptr, out_ptr, pid // n_kblk, pid % n_kblk, N, K, row0, stride_w, stride_s, off_s,
                         stride_o, BLOCK_N, NBLK)
    elif CAST:
        offs = (pid - n_deq).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
        m = offs < n_x
        tl.store(x16_ptr + offs, tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float16), mask=m)


@dataclass(frozen=True)
class Q8Tiles:
    """Shape facts every Q8_0 GEMV launcher derives the same way (built once per plan)."""

    T: int
    N: int
    R: int  # rows per group
    stride_xg: int
    block_n: int  # rows per tile (a divisor of R when grouped, so a tile never straddles groups)
    block_k: int  # codes per step (a power-of-two divisor of K)
    block_t: int  # token tile (next power of two of T)
    n_row_tiles: int
    prmt: bool  # PTX byte permute available (CUDA device; not the interpreter or ROCm)
    lead: tuple  # x's leading dims: (T,) or (T, groups)


def q8_tiles(x, dw: DeviceWeight, dev: DeviceInfo, groups: int, block_n: int, block_k: int) -> Q8Tiles:
    _, T, N, R, stride_xg, _t = _check(x, dw, groups)
    bn = min(block_n, triton.next_power_of_2(N)) if groups == 1 else pow2_divisor(R, block_n)
    return Q8Tiles(T, N, R, stride_xg, bn, pow2_divisor(dw.k, block_k), max(1, triton.next_power_of_2(T)),
                   triton.cdiv(N, bn), dev.vendor == Vendor.NVIDIA and x.is_cuda, (T, groups) if groups > 1 else (T,))


def _persist_grid(n_row_tiles: int, k: int, block_k: int, dev: DeviceInfo, allow_split: bool,
                  num_warps: int) -> tuple[int, int]:
    """(split_k, programs): split K while there are fewer than PERSIST_MIN_TILES_PER_SM row tiles per
    SM (narrow matrices would leave SMs idle); programs = resident slots, at most one per tile."""
    split = 1
    if allow_split and dev.vendor != Vendor.CPU:
        while (n_row_tiles * split < dev.n_sm * PERSIST_MIN_TILES_PER_SM and split * 2 <= PERSIST_MAX_SPLIT
               and k % (split * 2 * block_k) == 0):
            split *= 2
    slots = CPU_PROGRAMS if dev.vendor == Vendor.CPU else dev.n_sm * max(1, PERSIST_WARPS_PER_SM // num_warps)
    return split, max(1, min(n_row_tiles * split, slots))


def _resident_programs(n_regs: int, num_warps: int) -> int:
    """Programs of `num_warps` warps that fit on one SM by registers and warp slots: a persistent grid
    larger than that would run its last programs in a second wave (about doubling the time)."""
    per_warp = -(-max(1, n_regs) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    return max(1, min(SM_REGISTERS // (per_warp * num_warps), SM_MAX_WARPS // num_warps))


def gemv_persist(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, allow_split: bool = True,
                 block_n: int = PERSIST_BLOCK_N, block_k: int = PERSIST_BLOCK_K):
    """Q8_0 decode GEMV (exact fp32: codes decoded by bit ops, fp32 FMA): x [T, K] (or [T, G, K])
    float -> [T, N] fp32, T <= DECODE_MAX_T. Persistent grid; split-K (fixed-order second pass) for
    narrow matrices. Two launches per call (three with split-K): a tiny copy that word-permutes x
    (T*K floats), the kernel, the split sum. Other formats, or K not a multiple of 32, go to qmatmul.gemv.
    sm_90 compile (ptxas, not run): 118 registers at T=1, no spills; ~5.2 instructions per code in
    the K loop (1 PRMT + 1 FADD + 1 FFMA per code, the rest per word/row/block), ~6-7 per code
    with the per-tile work; at 4.2 TB/s an SM must take ~18 codes/clock, so the issue slots
    (128/clock) are ~85% busy at full bandwidth: expect ~65-80% of bandwidth where the old kernels'
    int->float conversions capped them at ~45%."""
    if dw.fmt.name != "Q8_0" or dw.k % 32 or dw.stride_w % 4:
        return gemv(x, dw, dev, groups)

    def build():
        g = q8_tiles(x, dw, dev, groups, block_n, block_k)
        T, N, R, bn, bk, block_t, n_row_tiles, prmt, lead = (g.T, g.N, g.R, g.block_n, g.block_k, g.block_t,
                                                             g.n_row_tiles, g.prmt, g.lead)
        warps = max(1, bk // CODES_PER_WARP)
        split, programs = _persist_grid(n_row_tiles, dw.k, bk, dev, allow_split, warps)
        k_split = dw.k // split
        stride_xt, stride_xg = groups * dw.k, (dw.k if groups > 1 else 0)
        n_tiles = n_row_tiles * split
        grid = [programs]

        def launch(x):
            # word-permuted fp32 copy of x (T*K floats): xw[.., 32b + 8j + i] = x[.., 32b + 4i + j]
            xw = x.float().reshape(*lead, dw.k // 32, 8, 4).transpose(-1, -2).contiguous()
            out = blocks.empty((split, T, N), x.device)
            compiled = _q8_gemv_persist_kernel[(grid[0],)](
                xw, dw.w, dw.s, out, T, N, R, k_split, n_row_tiles, n_tiles,
                stride_xt, stride_xg, T * N, N, dw.stride_w // 4, dw.stride_s, dw.off_s, F32_MAGIC_BITS.value,
                BLOCK_T=block_t, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split > 1, GROUPED=groups > 1, PRMT=prmt,
                num_warps=warps, num_stages=1)
            n_regs = getattr(compiled, "n_regs", 0)
            if dev.vendor == Vendor.NVIDIA and n_regs:  # later launches: the grid that is all resident
                grid[0] = max(1, min(n_tiles, dev.n_sm * _resident_programs(n_regs, warps)))
            return _reduce_split(out, split)
        return launch

    key = ("gemv_persist", allow_split, block_n, block_k)
    return _plan("gemv_persist", x, dw, groups, key, build)(x)


_OUT_DTYPE_OK: dict[tuple, bool] = {}  # (device type, torch op) -> op(..., out_dtype=fp32) works there


def _matmul_fp32(op, a, b, out=None):
    """op(a, b) (torch.mm / torch.bmm on fp16) with an fp32 result, into `out` (a strided fp32 view) when
    given: cuBLAS writes fp32 directly where torch offers out_dtype, else fp16 then a widening copy.
    Probed once per (device type, op) on a 1x1 problem (the benchmark's first call is eager, so never
    inside a graph capture)."""
    import torch

    key = (a.device.type, op.__name__)
    if key not in _OUT_DTYPE_OK:
        try:
            one = (slice(None),) * (a.dim() - 2) + (slice(0, 1), slice(0, 1))
            probe = op(a[one], b[one], out_dtype=torch.float32)
            _OUT_DTYPE_OK[key] = probe.dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_OK[key] = False
    if _OUT_DTYPE_OK[key]:
        if out is None:
            return op(a, b, out_dtype=torch.float32)
        try:
            return op(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError):  # this torch refuses a strided fp32 out: copy instead
            out.copy_(op(a, b, out_dtype=torch.float32))
            return out
    r = op(a, b).float()
    if out is None:
        return r
    out.copy_(r)
    return out


def gemm_dequant_q8(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, cast_block: int = CAST_BLOCK,
                    cast_warps: int = CAST_WARPS):
    """Prefill: dequantize rows to a transient fp16 buffer (block-scaled Triton pass at memory speed,
    in chunks of <= DEQUANT_CHUNK_BYTES, usually one; the first chunk's launch also rounds x to fp16),
    then cuBLAS fp16 matmul with fp32 output written in place (grouped: one strided-batch bmm into the
    [T, G, R] output, no transposing copy). fp16 activations and fp16-rounded weights (q*d rounded
    once), fp32 accumulation."""
    import torch

    x, T, N, R, stride_xg, _t = _check(x, dw, groups)
    x = x if x.is_contiguous() else x.contiguous()
    x16 = x if x.dtype == torch.float16 else None
    step = N if groups > 1 else max(DEQUANT_BLOCK_N, min(N, DEQUANT_CHUNK_BYTES // (2 * dw.k)))
    y = torch.empty((T, N), device=x.device, dtype=torch.float32) if step < N or groups > 1 else None
    n_kblk = triton.cdiv(dw.k, 32 * DEQUANT_BLOCKS)
    for row0 in range(0, N, step):
        rows = min(step, N - row0)
        w16 = torch.empty((rows, dw.k), device=x.device, dtype=torch.float16)
        cast = x16 is None
        if cast:
            x16 = torch.empty(x.shape, device=x.device, dtype=torch.float16)
        n_deq = triton.cdiv(rows, DEQUANT_BLOCK_N) * n_kblk
        n_cast = triton.cdiv(x.numel(), cast_block) if cast else 0
        _cast_dequant_kernel[(n_deq + n_cast,)](
            x, x16, x.numel(), dw.w, dw.s, w16, row0 + rows, dw.k, row0, dw.stride_w, dw.stride_s, dw.off_s,
            w16.stride(0), n_deq, n_kblk, CAST=cast, BLOCK_N=DEQUANT_BLOCK_N, NBLK=DEQUANT_BLOCKS, BLOCK_X=cast_block,
            num_warps=cast_warps)
        part = fp16_gemm(x16, w16, groups, None if y is None else y[:, row0:row0 + rows])
        if y is None:
            return part
    return y


def dequant_q8_rows(dw: DeviceWeight, w16):
    """w16 [N, K] fp16 = every row of the Q8_0 weight dw dequantized (q*d rounded once; one launch)."""
    _q8_dequant_rows_kernel[(triton.cdiv(dw.n_rows, DEQUANT_BLOCK_N), triton.cdiv(dw.k, 32 * DEQUANT_BLOCKS))](
        dw.w, dw.s, w16, dw.n_rows, dw.k, 0, dw.stride_w, dw.stride_s, dw.off_s, w16.stride(0),
        BLOCK_N=DEQUANT_BLOCK_N, NBLK=DEQUANT_BLOCKS)
    return w16


def fp16_gemm(x16, w16, groups: int = 1, out=None):
    """The cuBLAS step of gemm_dequant_q8: [T, N] fp32 = x16 @ w16^T, x16 [T, K] (grouped: [T, G, K] against
    w16 viewed [G, N/G, K]), into `out` (a [T, N] view, or for groups == 1 a column slice) when given."""
    import torch

    if groups == 1:
        return _matmul_fp32(torch.mm, x16, w16.T, out=out)
    T, N, K = x16.shape[0], w16.shape[0], w16.shape[1]
    R = N // groups
    y = torch.empty((T, N), device=x16.device, dtype=torch.float32) if out is None else out
    # y viewed [G, T, R] (batch stride R, row stride N): cuBLAS writes the [T, N] layout directly
    _matmul_fp32(torch.bmm, x16.transpose(0, 1), w16.view(groups, R, K).transpose(1, 2),
                 out=y.view(T, groups, R).transpose(0, 1))
    return y


def gemm_hybrid(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """Per-shape choice for Q8_0 (other formats: qmatmul.gemm): T <= HYBRID_GEMV_MAX_T the exact fp32
    persistent GEMV in chunks of DECODE_MAX_T tokens (weights re-read per chunk; still read-bound);
    T >= HYBRID_DEQUANT_MIN_T transient fp16 dequant + cuBLAS (measured faster than the fused GEMM on
    3 of 4 large-T shapes on H200, and this dequant pass is block-scaled); between, the fused GEMM."""
    import torch

    T = x.shape[0]
    if dw.fmt.name != "Q8_0":
        return gemm(x, dw, dev, groups)
    if T <= HYBRID_GEMV_MAX_T:
        if T <= DECODE_MAX_T:
            return gemv_persist(x, dw, dev, groups)
        return torch.cat([gemv_persist(x[t0:t0 + DECODE_MAX_T], dw, dev, groups)
                          for t0 in range(0, T, DECODE_MAX_T)], dim=0)
    if T >= HYBRID_DEQUANT_MIN_T:
        return gemm_dequant_q8(x, dw, dev, groups)
    return gemm(x, dw, dev, groups)


# ---- registered variants (op "qmatmul"; signature fn(x, dw, dev, groups)) ------------------------
from ..quant.formats import QuantFormat  # noqa: E402
from .registry import KernelOp, register  # noqa: E402

register(KernelOp.QMATMUL, "gemv_persist", gemv_persist, formats=(QuantFormat.Q8_0,), max_t=DECODE_MAX_T,
         doc="Q8_0 persistent GEMV, codes decoded by bit ops (no I2F), block-scaled fp32, split-K if narrow")
register(KernelOp.QMATMUL, "gemv_persist_nosplit",
         lambda x, dw, dev, groups=1: gemv_persist(x, dw, dev, groups, allow_split=False),
         formats=(QuantFormat.Q8_0,), max_t=DECODE_MAX_T, doc="gemv_persist without split-K (no split-sum pass)")
register(KernelOp.QMATMUL, "gemv_persist_n8", lambda x, dw, dev, groups=1: gemv_persist(x, dw, dev, groups, block_n=8),
         formats=(QuantFormat.Q8_0,), max_t=DECODE_MAX_T,
         doc="gemv_persist with 8-row tiles: fewer instructions per code, ~168 registers (fewer resident)")
register(KernelOp.QMATMUL, "gemm_hybrid", gemm_hybrid, formats=(QuantFormat.Q8_0,),
         doc=f"Q8_0: gemv_persist for T <= {HYBRID_GEMV_MAX_T}, dequant+cuBLAS for T >= {HYBRID_DEQUANT_MIN_T}, "
             "fused gemm between")
