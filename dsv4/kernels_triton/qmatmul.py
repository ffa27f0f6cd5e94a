"""Dequant-matmul kernels: out[T, N] = x[T, K] @ dequant(w[N, K]).T for Q8_0, Q2_K, Q4_K, IQ2_XXS, F16/BF16/F32.

Decode (T = 1..8), `gemv`: one program per BLOCK_N output rows (times SPLIT_K slices of K when the
matrix has too few rows to fill the SMs); each step loads a [BLOCK_N, BLOCK_K] weight tile, decodes
it in registers (blocks.dequant_tile) and FMAs it against all T activation rows in fp32. Split-K
partials go to a [SPLIT_K, T, N] scratch summed in fixed order (deterministic).
Prefill (larger T), `gemm`: [BLOCK_M, BLOCK_N] output tiles; per K step the weight tile is decoded to
the dot dtype (fp16 by default) and fed to tl.dot with fp32 accumulation.
Both take an optional group axis (x [T, G, K], rows [g*R, (g+1)*R) use x[:, g]) for attn_output_a.
"""
from __future__ import annotations

from dataclasses import replace

import triton
import triton.language as tl

from . import blocks
from .blocks import DeviceWeight, dequant_tile
from .configs import DeviceInfo, DotDtype, GemmConfig, GemvConfig, Vendor, pow2_divisor, select_gemm, select_gemv

DECODE_MAX_T = 8  # at or below this many tokens the GEMV path is used by the "auto" variant
DOT_GEMV_M = 16  # token tile of the tl.dot decode path (tl.dot needs >= 16)
DOT_GEMV_DEFAULT = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=4, dot_m=DOT_GEMV_M)
GEMV_MIN_BLOCK_K = 64  # smallest K step the GEMV shrinks to for T > 1

_TL_DOT = {DotDtype.FP16: tl.float16, DotDtype.BF16: tl.bfloat16, DotDtype.FP32_IEEE: tl.float32}


def tl_dot_dtype(d: DotDtype):
    if d in _TL_DOT:
        return _TL_DOT[d]
    return tl.dtype(d.value)  # fp8 flavours by Triton's dtype name (fp8e4nv = tl.float8e4nv, fp8e4b8 = tl.float8e4b8)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot; IEEE selects full fp32 products (no tf32) for fp32 operands."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, s_ptr, g_ptr, out_ptr,
                  T, N, R, k_per_split,
                  stride_xt, stride_xg, stride_os, stride_ot,
                  stride_w, stride_s, off_s,
                  FMT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, t, n] = sum_{k in split} x[t, g(n), k] * dequant(w)[n, k], g(n) = n // R.

    Matches x @ dequantize_np(w).T (float64 reference) to fp32-accumulation error."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_T)
    g = (pid_n * BLOCK_N) // R
    n_ok = rn < N
    t_ok = rt < T
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    k_start = pid_s * k_per_split
    x_row = x_ptr + rt[:, None].to(tl.int64) * stride_xt + g * stride_xg
    for k0 in range(0, k_per_split, BLOCK_K):
        rk = k_start + k0 + tl.arange(0, BLOCK_K)
        w = dequant_tile(w_ptr, s_ptr, g_ptr, rn[:, None], rk[None, :], n_ok[:, None],
                         stride_w, stride_s, off_s, FMT)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_row + rk[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_K]
        if BLOCK_T == 1:  # plain 2-D reduction: no 3-D broadcast for the common decode case
            acc += tl.sum(w * x, axis=1)[None, :]
        else:
            acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
    out = out_ptr + pid_s * stride_os + rt[:, None] * stride_ot + rn[None, :]
    tl.store(out, acc, mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _q8_0_gemv_blocked_kernel(x_ptr, w_ptr, s_ptr, out_ptr,
                              T, N, R, k_per_split,
                              stride_xt, stride_xg, stride_os, stride_ot,
                              stride_w, stride_s, off_s,
                              BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q8_0-only GEMV in the block-dot form: per 32-weight block s_b = sum_i q[i] * x[i], then
    out += d_b * s_b (one scale load and multiply per block instead of per weight).

    Codes are read as a 3-D [BLOCK_N, NB, 32] tile straight from the repacked rows (16-byte vector
    loads along the 32-code axis, no in-register reshape); rows past N are clamped to N-1 so the
    loads need no mask (their results are not stored)."""
    NB: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_T)
    g = (pid_n * BLOCK_N) // R
    n_ok = rn < N
    r3 = tl.minimum(rn, N - 1).to(tl.int64)[:, None, None]
    b3 = tl.arange(0, NB)[None, :, None]
    j3 = tl.arange(0, 32)[None, None, :]
    k_start = pid_s * k_per_split
    w_base = w_ptr + r3 * stride_w + k_start + b3 * 32 + j3  # [BLOCK_N, NB, 32]
    s_base = s_ptr + r3 * stride_s + off_s + (k_start >> 5) + b3  # [BLOCK_N, NB, 1]
    x_base = x_ptr + g * stride_xg + k_start + b3 * 32 + j3  # [1, NB, 32]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        q = tl.load(w_base + k0).to(tl.float32)
        d = tl.sum(tl.load(s_base + (k0 >> 5)).to(tl.float32), axis=2)  # [BLOCK_N, NB]
        for t in tl.static_range(BLOCK_T):
            t_row = tl.minimum(T - 1, t)  # rows past T repeat the last one; their results are not stored
            xt = tl.load(x_base + t_row.to(tl.int64) * stride_xt + k0).to(tl.float32)
            part = tl.sum(q * xt, axis=2)  # [BLOCK_N, NB] per-block dots
            contrib = tl.sum(part * d, axis=1)  # [BLOCK_N]
            if BLOCK_T == 1:
                acc += contrib[None, :]
            else:
                acc = tl.where(rt[:, None] == t, acc + contrib[None, :], acc)
    out = out_ptr + pid_s * stride_os + rt[:, None] * stride_ot + rn[None, :]
    tl.store(out, acc, mask=(rt[:, None] < T) & n_ok[None, :])


@triton.jit
def _round_e4m3(v):
    """fp32 v rounded to 3 mantissa bits, to nearest even, in fp32 (normal range): every value is then exact in
    e4m3, so the cast to either fp8 flavour rounds nothing and the result does not depend on how a backend
    converts (the interpreter's fp32 -> fp8 cast mis-rounds, e.g. 127 -> 64)."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & -0x100000  # drop the low 20 of fp32's 23 mantissa bits, ties to even
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, g_ptr, out_ptr,
                  T, N, R, K,
                  stride_xt, stride_xg, stride_ot,
                  stride_w, stride_s, off_s,
                  FMT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, Q8_FAST: tl.constexpr = False,
                  stride_os=0, XS: tl.constexpr = False, xs_ptr=None):
    """out[s, t, n] = sum_{k in slice s} x[t, g(n), k] * dequant(w)[n, k]; tiles of dequantized weights in
    DOT dtype through tl.dot, fp32 accumulation (IEEE: fp32 operands without tf32 rounding). K is the
    length of one split-K slice (program axis 1). Token tiles vary fastest so a weight tile is reused
    from L2. Also the decode path for Q8_0 (BLOCK_M = 16): its pipelined loads keep more bytes in
    flight than the FMA GEMV. XS (Q8_FAST, fp8 DOT): x arrives scaled per token into the fp8 range; the codes
    go to DOT as they are (exact up to |q| = 16), each 32-wide chunk's dot is scaled by its d afterwards, and the
    result by xs[t] (the inverse of token t's power-of-two scale)."""
    k_start = tl.program_id(1) * K
    out_ptr += tl.program_id(1) * stride_os
    x_ptr += k_start
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    g = (pid_n * BLOCK_N) // R
    m_ok = rm < T
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xt + g * stride_xg
    if Q8_FAST:
        # Q8_0 with K % BLOCK_K == 0: per 32-wide chunk, codes [32, BLOCK_N] and one scale per row
        # (no per-weight scale gather); q*d is exact in fp32 and rounded once to DOT, as in dequant_tile.
        rn_c = tl.minimum(rn, N - 1).to(tl.int64)
        w_col = w_ptr + rn_c[None, :] * stride_w + tl.arange(0, 32)[:, None]
        s_col = s_ptr + rn_c * stride_s + off_s + (k_start >> 5)
        w_col += k_start
        x_c = x_row + tl.arange(0, 32)[None, :]
        for k0 in range(0, K, BLOCK_K):
            for c in tl.static_range(BLOCK_K // 32):
                kc = k0 + 32 * c
                x = tl.load(x_c + kc, mask=m_ok[:, None], other=0.0).to(DOT)
                q = tl.load(w_col + kc).to(tl.float32)
                d = tl.load(s_col + (kc >> 5)).to(tl.float32)
                if XS:
                    acc += dot(x, _round_e4m3(q).to(DOT), IEEE) * d[None, :]
                else:
                    acc += dot(x, (q * d[None, :]).to(DOT), IEEE)
    else:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K  # K need not be a multiple of BLOCK_K (tl.dot wants BLOCK_K >= 16)
            x = tl.load(x_row + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)  # [BLOCK_M, BLOCK_K]
            w = dequant_tile(w_ptr, s_ptr, g_ptr, rn[None, :], k_start + rk[:, None], n_ok[None, :] & k_ok[:, None],
                             stride_w, stride_s, off_s, FMT).to(DOT)  # [BLOCK_K, BLOCK_N]
            acc += dot(x, w, IEEE)
    if XS:
        acc = acc * tl.load(xs_ptr + rm, mask=m_ok, other=0.0)[:, None]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_ot + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_rows_kernel(w_ptr, s_ptr, g_ptr, out_ptr, N, K, row0, stride_w, stride_s, off_s, stride_o,
                         FMT: tl.constexpr, OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n - row0, k] = dequant(w)[n, k] in OUT dtype for rows [row0, N) (one transient chunk)."""
    rn = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    w = dequant_tile(w_ptr, s_ptr, g_ptr, rn[:, None], rk[None, :], mask, stride_w, stride_s, off_s, FMT)
    tl.store(out_ptr + (rn - row0)[:, None].to(tl.int64) * stride_o + rk[None, :], w.to(OUT), mask=mask)


def _check(x, dw: DeviceWeight, groups: int):
    import torch

    T = x.shape[0]
    K = dw.k
    assert dw.n_rows % groups == 0, f"{dw.n_rows} rows not divisible into {groups} groups"
    assert x.shape[-1] == K, f"x has {x.shape[-1]} inputs, weight {dw.shape} wants {K}"
    if groups > 1:
        assert x.dim() == 3 and x.shape[1] == groups, f"grouped x must be [T, {groups}, {K}], got {tuple(x.shape)}"
    x = x if x.stride(-1) == 1 else x.contiguous()
    stride_xg = x.stride(1) if groups > 1 else 0
    return x, T, dw.n_rows, dw.n_rows // groups, stride_xg, torch


def _plan(name: str, x, dw: DeviceWeight, groups: int, cfg, build):
    """The cached launcher of (variant, T, groups, x strides, cfg) for this weight: `build()` runs
    once (shape checks, config choice, grid); later calls only allocate the output and launch."""
    key = (name, x.shape[0], groups, x.stride(), x.dtype, cfg)
    launch = dw.plans.get(key)
    if launch is None:
        launch = dw.plans[key] = build()
    return launch


def _reduce_split(out, split: int):
    """Deterministic second pass of split-K: fixed-order sum over the split axis."""
    return out[0] if split == 1 else out.sum(0)


def gemv(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, cfg: GemvConfig | None = None,
         allow_split: bool = True):
    """Decode-shaped qmatmul: x [T, K] (or [T, G, K]) float -> [T, N] fp32. T must be <= 16."""
    if x.stride(-1) != 1:
        x = x.contiguous()

    def build():
        _, T, N, R, stride_xg, _t = _check(x, dw, groups)
        c = cfg or select_gemv(dw.fmt, N, dw.k, dev, allow_split, tokens=T)
        block_n = c.block_n if groups == 1 else pow2_divisor(R, c.block_n)
        block_t = max(1, triton.next_power_of_2(T))
        # keep the [BLOCK_T, BLOCK_N, BLOCK_K] product within the registers: shrink K per step as T grows
        block_k = max(min(c.block_k, GEMV_MIN_BLOCK_K), c.block_k // block_t)
        split = c.split_k
        k_per_split = dw.k // split
        assert k_per_split % block_k == 0, (dw.k, split, block_k)
        grid = (triton.cdiv(N, block_n), split)
        kern = _qgemv_kernel[grid]
        stride_xt, fmt = x.stride(0), int(dw.fmt)

        def launch(x):
            out = blocks.empty((split, T, N), x.device)
            kern(x, dw.w, dw.s, dw.g, out, T, N, R, k_per_split, stride_xt, stride_xg, T * N, N,
                 dw.stride_w, dw.stride_s, dw.off_s, FMT=fmt, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
                 num_warps=c.num_warps, num_stages=c.num_stages)
            return _reduce_split(out, split)
        return launch

    return _plan("gemv" if allow_split else "gemv_nosplit", x, dw, groups, cfg, build)(x)


def gemv_q8_0_blocked(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, cfg: GemvConfig | None = None):
    """Q8_0 decode GEMV in block-dot form (see _q8_0_gemv_blocked_kernel); other formats -> gemv."""
    if dw.fmt.name != "Q8_0":
        return gemv(x, dw, dev, groups, cfg)
    if x.stride(-1) != 1:
        x = x.contiguous()

    def build():
        _, T, N, R, stride_xg, _t = _check(x, dw, groups)
        c = cfg or select_gemv(dw.fmt, N, dw.k, dev, tokens=T, dot_ok=False)
        block_n = c.block_n if groups == 1 else pow2_divisor(R, c.block_n)
        block_t = max(1, triton.next_power_of_2(T))
        block_k = max(32, pow2_divisor(dw.k, c.block_k))
        split = c.split_k
        while split > 1 and (dw.k // split) % block_k:
            split //= 2
        k_per_split = dw.k // split
        if k_per_split % block_k:
            return lambda x: gemv(x, dw, dev, groups, c)
        kern = _q8_0_gemv_blocked_kernel[(triton.cdiv(N, block_n), split)]
        stride_xt = x.stride(0)

        def launch(x):
            out = blocks.empty((split, T, N), x.device)
            kern(x, dw.w, dw.s, out, T, N, R, k_per_split, stride_xt, stride_xg, T * N, N,
                 dw.stride_w, dw.stride_s, dw.off_s, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
                 num_warps=c.num_warps, num_stages=c.num_stages)
            return _reduce_split(out, split)
        return launch

    return _plan("gemv_q8blk", x, dw, groups, cfg, build)(x)


# the fp8 dot flavours gemm takes: torch's dtype and the largest finite value
FP8_FLAVOURS = {DotDtype.FP8_E4M3: ("float8_e4m3fn", 448.0), DotDtype.FP8_E4M3_FNUZ: ("float8_e4m3fnuz", 240.0)}


def _fp8_scaled(x, dot: DotDtype):
    """x [T, ...] -> (x * 2^e_t in `dot`'s fp8 flavour, fp32 2^-e_t per token): the largest power of two that
    keeps token t's max |x| within the flavour's range, so scaling is exact and only the fp8 rounding is lost."""
    import torch

    name, fmax = FP8_FLAVOURS[dot]
    amax = x.detach().abs().reshape(x.shape[0], -1).amax(1).float()
    scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(fmax / amax.clamp_min(1e-30)))),
                        torch.ones_like(amax))
    xq = (x.float() * scale.view(-1, *([1] * (x.dim() - 1)))).to(getattr(torch, name))
    return xq, (1.0 / scale).contiguous()


def gemm(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, cfg: GemmConfig | None = None, split_k: int = 1):
    """Prefill-shaped qmatmul: x [T, K] (or [T, G, K]) -> [T, N] fp32 via tl.dot on dequantized tiles.
    fp32 activations are rounded to the dot dtype once up front (the kernel would round them per tile); with an
    fp8 dot (gemm_fp8; Q8_0 in whole 32-code chunks only) they are first scaled per token (_fp8_scaled).
    split_k > 1 (K a multiple of split_k * BLOCK_K): K slices in parallel, summed after in fixed order."""
    import torch

    c0 = cfg or select_gemm(dw.fmt, x.shape[0], dw.n_rows, dw.k, dev)
    fp8 = c0.dot in FP8_FLAVOURS
    xs = None
    if fp8:
        x, xs = _fp8_scaled(x, c0.dot)
    elif x.dtype == torch.float32 and c0.dot in (DotDtype.FP16, DotDtype.BF16) and x.shape[0] > DOT_GEMV_M:
        x = x.to(torch.float16 if c0.dot == DotDtype.FP16 else torch.bfloat16)
    elif x.stride(-1) != 1:
        x = x.contiguous()

    def build():
        _, T, N, R, stride_xg, _t = _check(x, dw, groups)
        c = c0
        block_n = c.block_n if groups == 1 else max(16, pow2_divisor(R, c.block_n))
        assert groups == 1 or R % block_n == 0, f"group rows {R} must be a multiple of {block_n}"
        split = split_k if dw.k % (split_k * c.block_k) == 0 else 1
        k_slice = dw.k // split
        q8_fast = dw.fmt.name == "Q8_0" and c.block_k % 32 == 0 and k_slice % c.block_k == 0
        if fp8 and not q8_fast:
            raise ValueError(f"an fp8 dot takes Q8_0 rows in whole 32-code chunks, not {dw.fmt.name} K={dw.k} "
                             f"at BLOCK_K={c.block_k}")
        grid = (triton.cdiv(T, c.block_m) * triton.cdiv(N, block_n), split)
        kern = _qgemm_kernel[grid]
        stride_xt, fmt, dot_t, ieee = x.stride(0), int(dw.fmt), tl_dot_dtype(c.dot), c.dot == DotDtype.FP32_IEEE

        def launch(x, xs=None):
            out = blocks.empty((split, T, N), x.device)
            kern(x, dw.w, dw.s, dw.g, out, T, N, R, k_slice, stride_xt, stride_xg, N,
                 dw.stride_w, dw.stride_s, dw.off_s, FMT=fmt, DOT=dot_t, IEEE=ieee,
                 BLOCK_M=c.block_m, BLOCK_N=block_n, BLOCK_K=c.block_k, Q8_FAST=q8_fast, stride_os=T * N,
                 XS=fp8, xs_ptr=xs, num_warps=c.num_warps, num_stages=c.num_stages)
            return _reduce_split(out, split)
        return launch

    return _plan("gemm", x, dw, groups, (c0, split_k), build)(x, xs)


def gemm_fp8(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """Prefill with an fp8 dot (opt-in, lossy; `kernels_hip`'s fp8 flavours, e4m3 from sm_89): Q8_0 codes as
    fp8 (exact up to |q| = 16, 3 mantissa bits above), x scaled per token by a power of two into the fp8 range,
    fp32 accumulation, the block scales applied after each 32-wide dot. Decode-sized T, other formats and devices
    without fp8 dots run the auto variant."""
    c = select_gemm(dw.fmt, x.shape[0], dw.n_rows, dw.k, dev, fp8=True)
    if dw.fmt.name != "Q8_0" or c.dot not in FP8_FLAVOURS or x.shape[0] <= DECODE_MAX_T or dw.k % 32:
        return qmatmul_auto(x, dw, dev, groups)
    return gemm(x, dw, dev, groups, replace(c, block_k=max(32, c.block_k)))


def gemv_dot(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, cfg: GemvConfig | None = None):
    """Decode-shaped qmatmul through the tl.dot kernel with a 16-token tile (tokens past T are masked):
    its loads are software-pipelined (num_stages), which the FMA GEMV's are not, so more weight bytes
    are in flight. Q8_0 with the chunked-scale path; cfg.block_n/block_k/num_warps/num_stages/split_k."""
    if x.shape[0] > DOT_GEMV_M:
        return gemm(x, dw, dev, groups)
    c = cfg or select_gemv(dw.fmt, dw.n_rows, dw.k, dev, tokens=x.shape[0])
    if not c.dot_m:
        c = replace(c, dot_m=DOT_GEMV_M, block_n=DOT_GEMV_DEFAULT.block_n, block_k=DOT_GEMV_DEFAULT.block_k,
                    num_warps=DOT_GEMV_DEFAULT.num_warps, num_stages=DOT_GEMV_DEFAULT.num_stages)
    gc = GemmConfig(c.dot_m, c.block_n, c.block_k, c.num_warps, c.num_stages)
    return gemm(x, dw, dev, groups, gc, split_k=c.split_k)


DEQUANT_CHUNK_ROWS = 16384  # transient fp16 rows per chunk of gemm_dequant (16384 x 4096 x 2 B = 128 MiB)
DEQUANT_TILE = (32, 128)


def gemm_dequant(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """Prefill alternative: dequantize a chunk of rows to a transient fp16 buffer (one Triton pass at
    memory speed), then torch.matmul (cuBLAS tensor cores); repeat per chunk. Nothing is kept between
    calls. Worth it when T is large enough that the GEMM dwarfs the extra 2 B/weight write + read."""
    import torch

    x, T, N, R, stride_xg, _t = _check(x, dw, groups)
    x16 = x.to(torch.float16)
    bn, bk = DEQUANT_TILE
    step = N if groups > 1 else DEQUANT_CHUNK_ROWS
    outs = []
    for row0 in range(0, N, step):
        rows = min(step, N - row0)
        w16 = torch.empty((rows, dw.k), device=x.device, dtype=torch.float16)
        _dequant_rows_kernel[(triton.cdiv(rows, bn), triton.cdiv(dw.k, bk))](
            dw.w, dw.s, dw.g, w16, row0 + rows, dw.k, row0, dw.stride_w, dw.stride_s, dw.off_s, w16.stride(0),
            FMT=int(dw.fmt), OUT=tl.float16, BLOCK_N=bn, BLOCK_K=bk)
        if groups > 1:
            y = torch.bmm(x16.transpose(0, 1), w16.view(groups, R, dw.k).transpose(1, 2))  # [G, T, R]
            outs.append(y.transpose(0, 1).reshape(T, N))
        else:
            outs.append(x16 @ w16.T)
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return y.float()


def qmatmul_auto(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """GEMV for decode-sized T (for Q8_0 the block-dot kernel, or the 16-token tl.dot kernel where the
    per-shape table says so); above, Q8_0 goes to gemm_hybrid and the other formats to the fused GEMM."""
    if x.shape[0] <= DECODE_MAX_T:
        if dw.fmt.name == "Q8_0":
            c = select_gemv(dw.fmt, dw.n_rows, dw.k, dev, tokens=x.shape[0])
            if dev.vendor == Vendor.NVIDIA and x.is_cuda and (x.shape[0] == 1 or not c.dot_m):
                # H200 (2026-11-28, tools/results/h200_decode, h200_final4): gemv_rows with per-shape tiles
                # and PDL runs at 58-81 % of read bandwidth on the large matrices at T=1 vs 28-45 % for the
                # block-dot / tl.dot kernels (and is fp32-exact); for 2..8 tokens the tuned table may still
                # send a shape (the LM head) to the tl.dot kernel. One token on sm_90+: the Gluon kernel where
                # its table has the shape (q8_gluon.TUNED_T1)
                from .q8_gluon import gemv_q8_t1  # late: q8_gemv / q8_gluon build on this module

                return gemv_q8_t1(x, dw, dev, groups)
            if c.dot_m:
                return gemv_dot(x, dw, dev, groups, c)
            return gemv_q8_0_blocked(x, dw, dev, groups)
        return gemv(x, dw, dev, groups)
    if dw.fmt.name == "Q8_0":
        # H200 (2026-11-28, tools/results/h200_variants): at T=2048 the hybrid (fused gemm up to 256 tokens,
        # transient fp16 dequant + cuBLAS above) runs at 47-73 % of bf16 matmul vs 18-37 % for the fused gemm.
        from .qmatmul_fast import gemm_hybrid  # late: qmatmul_fast builds on this module

        return gemm_hybrid(x, dw, dev, groups)
    return gemm(x, dw, dev, groups)


def gemm_ieee(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """GEMM with fp32 operands and IEEE products: no fp16/tf32 rounding of x or the weights."""
    cfg = select_gemm(dw.fmt, x.shape[0], dw.n_rows, dw.k, dev)
    return gemm(x, dw, dev, groups, replace(cfg, dot=DotDtype.FP32_IEEE))


def qmatmul_auto_ieee(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """Like auto, with the accurate fp32 GEMM for prefill."""
    if x.shape[0] <= DECODE_MAX_T:
        return gemv(x, dw, dev, groups)
    return gemm_ieee(x, dw, dev, groups)


def qmatmul_dequant_torch(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """Baseline variant: dequantize to the activation dtype per call (torch), then torch.matmul.
    Not a kept copy; used to measure what the fused kernels buy."""
    from ..quant.dequant import dequantize_torch
    import torch

    if dw.fmt.name == "Q8_0":  # our layout is repacked; rebuild GGUF rows for the torch decoder
        rb = dw.stride_w
        nb = rb // 34
        flat = dw.buf.reshape(-1, rb)
        raw = torch.cat([flat[:, 32 * nb:].reshape(-1, nb, 2), flat[:, :32 * nb].reshape(-1, nb, 32)], dim=2)
        raw = raw.reshape(-1, rb)
    else:
        raw = dw.buf.reshape(-1, dw.buf.shape[-1])
    w = dequantize_torch(raw, dw.fmt, dw.k, dtype=x.dtype)  # [N, K]
    if groups == 1:
        return (x.reshape(x.shape[0], -1) @ w.T).float()
    r = w.shape[0] // groups
    return torch.einsum("tgk,grk->tgr", x, w.reshape(groups, r, -1)).reshape(x.shape[0], -1).float()


# ---- registered variants (op "qmatmul"; signature fn(x, dw, dev, groups)) ------------------------
from ..quant.formats import QuantFormat  # noqa: E402
from .registry import AUTO, KernelOp, register  # noqa: E402

register(KernelOp.QMATMUL, AUTO, qmatmul_auto,
         doc=f"T <= {DECODE_MAX_T}: Q8_0 gemv_rows on CUDA (else gemv_q8blk / gemv_dot by table), gemv for other "
             "formats; above: gemm_hybrid for Q8_0, gemm otherwise")
register(KernelOp.QMATMUL, "gemv", gemv, max_t=DECODE_MAX_T,
         doc="row-parallel GEMV, fp32 FMA, split-K when rows are few")
register(KernelOp.QMATMUL, "gemv_nosplit", lambda x, dw, dev, groups=1: gemv(x, dw, dev, groups, allow_split=False),
         max_t=DECODE_MAX_T, doc="row-parallel GEMV without split-K (for comparison)")
register(KernelOp.QMATMUL, "gemv_q8blk", gemv_q8_0_blocked, formats=(QuantFormat.Q8_0,), max_t=DECODE_MAX_T,
         doc="Q8_0 GEMV as per-block dots scaled once per 32 weights")
register(KernelOp.QMATMUL, "gemv_dot", gemv_dot, formats=(QuantFormat.Q8_0,), max_t=DOT_GEMV_M,
         doc="decode through tl.dot with a 16-token tile: pipelined weight loads")
register(KernelOp.QMATMUL, "gemm", gemm, doc="tl.dot on dequantized fp16 tiles, fp32 accumulation")
register(KernelOp.QMATMUL, "gemm_dequant", gemm_dequant,
         doc="per-call transient fp16 dequant of row chunks + torch.matmul (not yet measured on GPU)")
register(KernelOp.QMATMUL, "gemm_fp8", gemm_fp8, formats=(QuantFormat.Q8_0,),
         doc="prefill through an fp8 dot (opt-in, lossy): Q8_0 codes and per-token power-of-two-scaled x in the "
             "device's fp8 flavour (CDNA3 e4m3fnuz, OCP e4m3 on CDNA4/RDNA4/sm_89+), block scales after each "
             "32-wide dot; auto where the device has no fp8 dot and for decode")
register(KernelOp.QMATMUL, "gemm_ieee", gemm_ieee, doc="tl.dot on fp32 tiles with IEEE products (accurate, slower)")
register(KernelOp.QMATMUL, "auto_ieee", qmatmul_auto_ieee, doc=f"gemv for T <= {DECODE_MAX_T}, gemm_ieee above")
register(KernelOp.QMATMUL, "dequant_torch", qmatmul_dequant_torch,
         doc="baseline: per-call torch dequantize + torch.matmul (no fused kernel)")
