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
from .configs import DeviceInfo, DotDtype, GemmConfig, GemvConfig, pow2_divisor, select_gemm, select_gemv

DECODE_MAX_T = 8  # at or below this many tokens the GEMV path is used by the "auto" variant
GEMV_MIN_BLOCK_K = 64  # smallest K step the GEMV shrinks to for T > 1

_TL_DOT = {DotDtype.FP16: tl.float16, DotDtype.BF16: tl.bfloat16, DotDtype.FP32_IEEE: tl.float32}


def tl_dot_dtype(d: DotDtype):
    if d in _TL_DOT:
        return _TL_DOT[d]
    return getattr(tl, d.value)  # fp8 flavours (tl.float8e4nv / tl.float8e4b8)


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
    out += d_b * s_b (one scale load and multiply per block instead of per weight)."""
    NB: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_T)
    g = (pid_n * BLOCK_N) // R
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    k_start = pid_s * k_per_split
    for k0 in range(0, k_per_split, BLOCK_K):
        kb = k_start + k0
        rk = kb + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + rn64[:, None] * stride_w + rk[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
        q3 = tl.reshape(q, (BLOCK_N, NB, 32))
        rb = (kb >> 5) + tl.arange(0, NB)
        d = tl.load(s_ptr + rn64[:, None] * stride_s + off_s + rb[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
        for t in tl.static_range(BLOCK_T):
            t_row = tl.minimum(T - 1, t)  # rows past T repeat the last one; their results are not stored
            xt = tl.load(x_ptr + t_row.to(tl.int64) * stride_xt + g * stride_xg + rk).to(tl.float32)
            part = tl.sum(q3 * tl.reshape(xt, (1, NB, 32)), axis=2)  # [BLOCK_N, NB] per-block dots
            contrib = tl.sum(part * d, axis=1)  # [BLOCK_N]
            acc = tl.where(rt[:, None] == t, acc + contrib[None, :], acc)
    out = out_ptr + pid_s * stride_os + rt[:, None] * stride_ot + rn[None, :]
    tl.store(out, acc, mask=(rt[:, None] < T) & n_ok[None, :])


@triton.jit
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, g_ptr, out_ptr,
                  T, N, R, K,
                  stride_xt, stride_xg, stride_ot,
                  stride_w, stride_s, off_s,
                  FMT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t, n] = sum_k x[t, g(n), k] * dequant(w)[n, k]; tiles of dequantized weights in DOT dtype
    through tl.dot, fp32 accumulation (IEEE: fp32 operands without tf32 rounding). Token tiles vary
    fastest so a weight tile is reused from L2."""
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
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K  # K need not be a multiple of BLOCK_K (tl.dot wants BLOCK_K >= 16)
        x = tl.load(x_row + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)  # [BLOCK_M, BLOCK_K]
        w = dequant_tile(w_ptr, s_ptr, g_ptr, rn[None, :], rk[:, None], n_ok[None, :] & k_ok[:, None],
                         stride_w, stride_s, off_s, FMT).to(DOT)  # [BLOCK_K, BLOCK_N]
        acc += dot(x, w, IEEE)
    out = out_ptr + rm[:, None].to(tl.int64) * stride_ot + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


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


def gemv(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, cfg: GemvConfig | None = None,
         allow_split: bool = True):
    """Decode-shaped qmatmul: x [T, K] (or [T, G, K]) float -> [T, N] fp32. T must be <= 16."""
    x, T, N, R, stride_xg, torch = _check(x, dw, groups)
    cfg = cfg or select_gemv(dw.fmt, N, dw.k, dev, allow_split)
    block_n = cfg.block_n if groups == 1 else pow2_divisor(R, cfg.block_n)
    block_t = max(1, triton.next_power_of_2(T))
    # keep the [BLOCK_T, BLOCK_N, BLOCK_K] product within the registers: shrink K per step as T grows
    block_k = max(min(cfg.block_k, GEMV_MIN_BLOCK_K), cfg.block_k // block_t)
    split = cfg.split_k
    k_per_split = dw.k // split
    assert k_per_split % block_k == 0, (dw.k, split, block_k)
    out = blocks.empty((split, T, N), x.device)
    grid = (triton.cdiv(N, block_n), split)
    _qgemv_kernel[grid](x, dw.w, dw.s, dw.g, out, T, N, R, k_per_split,
                        x.stride(0), stride_xg, out.stride(0), out.stride(1),
                        dw.stride_w, dw.stride_s, dw.off_s,
                        FMT=int(dw.fmt), BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out[0] if split == 1 else out.sum(0)


def gemv_q8_0_blocked(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, cfg: GemvConfig | None = None):
    """Q8_0 decode GEMV in block-dot form (see _q8_0_gemv_blocked_kernel); other formats -> gemv."""
    if dw.fmt.name != "Q8_0":
        return gemv(x, dw, dev, groups, cfg)
    x, T, N, R, stride_xg, torch = _check(x, dw, groups)
    cfg = cfg or select_gemv(dw.fmt, N, dw.k, dev)
    block_n = cfg.block_n if groups == 1 else pow2_divisor(R, cfg.block_n)
    block_t = max(1, triton.next_power_of_2(T))
    block_k = max(32, cfg.block_k)
    split = cfg.split_k
    while split > 1 and (dw.k // split) % block_k:
        split //= 2
    k_per_split = dw.k // split
    if k_per_split % block_k:
        return gemv(x, dw, dev, groups, cfg)
    out = blocks.empty((split, T, N), x.device)
    _q8_0_gemv_blocked_kernel[(triton.cdiv(N, block_n), split)](
        x, dw.w, dw.s, out, T, N, R, k_per_split, x.stride(0), stride_xg, out.stride(0), out.stride(1),
        dw.stride_w, dw.stride_s, dw.off_s, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out[0] if split == 1 else out.sum(0)


def gemm(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, cfg: GemmConfig | None = None):
    """Prefill-shaped qmatmul: x [T, K] (or [T, G, K]) -> [T, N] fp32 via tl.dot on dequantized tiles."""
    x, T, N, R, stride_xg, torch = _check(x, dw, groups)
    cfg = cfg or select_gemm(dw.fmt, T, N, dw.k, dev)
    block_n = cfg.block_n if groups == 1 else max(16, pow2_divisor(R, cfg.block_n))
    assert groups == 1 or R % block_n == 0, f"group rows {R} must be a multiple of {block_n}"
    out = blocks.empty((T, N), x.device)
    grid = (triton.cdiv(T, cfg.block_m) * triton.cdiv(N, block_n),)
    _qgemm_kernel[grid](x, dw.w, dw.s, dw.g, out, T, N, R, dw.k,
                        x.stride(0), stride_xg, out.stride(0),
                        dw.stride_w, dw.stride_s, dw.off_s,
                        FMT=int(dw.fmt), DOT=tl_dot_dtype(cfg.dot), IEEE=cfg.dot == DotDtype.FP32_IEEE,
                        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def qmatmul_auto(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """GEMV for decode-sized T, GEMM above."""
    if x.shape[0] <= DECODE_MAX_T:
        return gemv(x, dw, dev, groups)
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

register(KernelOp.QMATMUL, AUTO, qmatmul_auto, doc=f"gemv for T <= {DECODE_MAX_T}, gemm above")
register(KernelOp.QMATMUL, "gemv", gemv, max_t=DECODE_MAX_T,
         doc="row-parallel GEMV, fp32 FMA, split-K when rows are few")
register(KernelOp.QMATMUL, "gemv_nosplit", lambda x, dw, dev, groups=1: gemv(x, dw, dev, groups, allow_split=False),
         max_t=DECODE_MAX_T, doc="row-parallel GEMV without split-K (for comparison)")
register(KernelOp.QMATMUL, "gemv_q8blk", gemv_q8_0_blocked, formats=(QuantFormat.Q8_0,), max_t=DECODE_MAX_T,
         doc="Q8_0 GEMV as per-block dots scaled once per 32 weights")
register(KernelOp.QMATMUL, "gemm", gemm, doc="tl.dot on dequantized fp16 tiles, fp32 accumulation")
register(KernelOp.QMATMUL, "gemm_ieee", gemm_ieee, doc="tl.dot on fp32 tiles with IEEE products (accurate, slower)")
register(KernelOp.QMATMUL, "auto_ieee", qmatmul_auto_ieee, doc=f"gemv for T <= {DECODE_MAX_T}, gemm_ieee above")
register(KernelOp.QMATMUL, "dequant_torch", qmatmul_dequant_torch,
         doc="baseline: per-call torch dequantize + torch.matmul (no fused kernel)")
