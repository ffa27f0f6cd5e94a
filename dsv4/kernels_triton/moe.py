"""Routed MoE kernels: out[t] = sum_i down[e] @ (silu(min(gate[e] u, c)) * clip(up[e] u, -c, c) * w[t,i]), e = sel[t,i].

Decode (`fused_decode`, few tokens): kernel 1 runs over (token-slot, block of F rows): gate and up
rows of the slot's expert in one pass over u, then clamp, SwiGLU and the route weight, into an fp32
scratch h [T*K, F]; kernel 2 runs over (token, block of D rows) and sums the K experts' down rows
in slot order. No atomics: the result is bitwise reproducible.
Prefill (`grouped`): (token, slot) pairs are sorted by expert on the device (stable argsort, bincount,
cumsum: no host sync), cut into BLOCK_M tiles that never straddle experts, and one grouped-GEMM
launch computes gate+up+SwiGLU for every tile, a second one the down projection; each pair's row
is written to its own slot and the K slots are summed in order.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import blocks
from .blocks import FMT_IQ2_XXS, FMT_Q2_K, DeviceWeight, _f16_from_bits, dequant_tile
from .configs import DeviceInfo, DotDtype, MoeConfig, Vendor, select_moe
from .qmatmul import dot, tl_dot_dtype


@triton.jit
def _swiglu_route(g, u, wt, clamp):
    """silu(min(g, clamp)) * clip(u, -clamp, clamp) * wt, fp32."""
    g = tl.minimum(g, clamp)
    u = tl.minimum(tl.maximum(u, -clamp), clamp)
    z = tl.exp(-tl.abs(g))  # sigmoid without overflow for very negative g
    sig = tl.where(g >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    return g * sig * u * wt


@triton.jit
def slot_rows(sel_ptr, wts_ptr, KSEL, F, BLOCK_N: tl.constexpr):
    """Program (slot, F block) of a gate/up decode kernel: (slot, token, route weight, rows within the expert
    [BLOCK_N], their mask, global rows e*F + rn of the stacked expert tensor)."""
    slot = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.load(sel_ptr + slot).to(tl.int64)
    wt = tl.load(wts_ptr + slot).to(tl.float32)
    return slot, slot // KSEL, wt, rn, rn < F, e * F + rn


@triton.jit
def _moe_gate_up_gemv_kernel(u_ptr, sel_ptr, wts_ptr, h_ptr,
                             gw_ptr, gs_ptr, uw_ptr, us_ptr, g_ptr,
                             F, D, KSEL, clamp,
                             stride_ut, stride_ht,
                             stride_gw, stride_gs, off_gs, stride_uw, stride_us, off_us,
                             FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[slot, f] = swiglu(gate[e] @ u[t], up[e] @ u[t]) * wts[slot], slot = t*KSEL + i, e = sel[slot]."""
    slot, t, wt, rn, n_ok, rows = slot_rows(sel_ptr, wts_ptr, KSEL, F, BLOCK_N)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(u_ptr + t * stride_ut + rk).to(tl.float32)
        wg = dequant_tile(gw_ptr, gs_ptr, g_ptr, rows[:, None], rk[None, :], n_ok[:, None],
                          stride_gw, stride_gs, off_gs, FMT)
        acc_g += tl.sum(wg * x[None, :], axis=1)
        wu = dequant_tile(uw_ptr, us_ptr, g_ptr, rows[:, None], rk[None, :], n_ok[:, None],
                          stride_uw, stride_us, off_us, FMT)
        acc_u += tl.sum(wu * x[None, :], axis=1)
    h = _swiglu_route(acc_g, acc_u, wt, clamp)
    tl.store(h_ptr + slot * stride_ht + rn, h, mask=n_ok)


@triton.jit
def _iq2_xxs_dot_g8(w_ptr, g32_ptr, rows, n_ok, kg, x3, stride_w):
    """sum over the 8*len(kg) weights of 8-weight groups kg of dequant(w)[row, k] * x[k], IQ2_XXS.

    Everything but the final sign/byte select is computed once per group of 8 (one grid record of
    two int32 words per group): about a quarter of the per-weight work of blocks.dequant_tile.
    Math: w = (d*(0.5+ls)*0.25) * grid[g][j] * sign_j; the group scale is applied after the 8-sum."""
    r = rows.to(tl.int64)[:, None]
    kg2 = kg[None, :]
    m = n_ok[:, None]
    base = r * stride_w + (kg2 >> 5) * 33
    ib = (kg2 >> 2) & 7
    kk = kg2 & 3
    d = tl.load(w_ptr + base, mask=m, other=0).to(tl.float16, bitcast=True).to(tl.float32)
    grp = base + 1 + 4 * ib
    gw = tl.load(w_ptr + grp + (kk >> 1), mask=m, other=0).to(tl.int32) & 0xFFFF
    gidx = (gw >> (8 * (kk & 1))) & 255
    a1lo = tl.load(w_ptr + grp + 2, mask=m, other=0).to(tl.int32) & 0xFFFF
    a1hi = tl.load(w_ptr + grp + 3, mask=m, other=0).to(tl.int32) & 0xFFFF
    sidx = ((a1lo | (a1hi << 16)) >> (7 * kk)) & 127
    ls = (a1hi >> 12) & 15
    signs = blocks.iq2_ksigns(sidx)
    db = d * (0.5 + ls.to(tl.float32)) * 0.25  # [BLOCK_N, G8]
    lo, hi = blocks.iq2_grid_words(g32_ptr, gidx, m)
    jj = tl.arange(0, 8)[None, None, :]
    word = tl.where(jj < 4, lo[:, :, None], hi[:, :, None])
    gv = ((word >> (8 * (jj & 3))) & 255).to(tl.float32)
    neg = ((signs[:, :, None] >> jj) & 1) != 0
    val = tl.where(neg, -gv, gv) * x3  # [BLOCK_N, G8, 8]
    return tl.sum(tl.sum(val, axis=2) * db, axis=1)


@triton.jit
def _q4_k_dot_g32(w_ptr, rows, n_ok, j32, x8, xs, stride_w):
    """sum_k dequant(w)[row, k] * x[k] over the 32-weight sub-blocks j32 (global indices), Q4_K.

    Sub-block j (of 8 per block): 6-bit sc_j/m_j from the 12 packed bytes, codes at shift 4*(j&1) of
    bytes qs[32*(j//2) + l] (8 int32 words); sum w x = d*sc * sum q x - dmin*m * sum x."""
    r = rows.to(tl.int64)[:, None]
    jb = j32[None, :]
    j = jb & 7
    base = r * stride_w + (jb >> 3) * 36
    m = n_ok[:, None]
    dw = tl.load(w_ptr + base, mask=m, other=0)
    dsc, dmm = blocks.q4_k_scale_min(tl.load(w_ptr + base + 1, mask=m, other=0),
                                     tl.load(w_ptr + base + 2, mask=m, other=0),
                                     tl.load(w_ptr + base + 3, mask=m, other=0), dw, j)
    wbase = base + 4 + 8 * (j >> 1)
    ww = tl.load(w_ptr + wbase[:, :, None] + tl.arange(0, 8)[None, None, :], mask=m[:, :, None], other=0)
    shift = 8 * tl.arange(0, 4)[None, None, None, :] + (4 * (j & 1))[:, :, None, None]
    q = (ww[:, :, :, None] >> shift) & 15  # [BN, NSB, 8 words, 4 bytes]
    s1 = tl.sum(tl.sum(q.to(tl.float32) * x8, axis=3), axis=2)
    return tl.sum(dsc * s1 - dmm * xs, axis=1)


@triton.jit
def _block_dot(w_ptr, g32_ptr, rows, n_ok, k0, x, stride_w, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N] partial sums of dequant(w)[rows, k0:k0+BLOCK_K] @ x with per-group decoding:
    IQ2_XXS per 8 weights, Q2_K per 16, Q4_K per 32 (scales applied once per group)."""
    if FMT == FMT_IQ2_XXS:
        G8: tl.constexpr = BLOCK_K // 8
        return _iq2_xxs_dot_g8(w_ptr, g32_ptr, rows, n_ok, (k0 >> 3) + tl.arange(0, G8),
                               tl.reshape(x, (1, G8, 8)), stride_w)
    elif FMT == FMT_Q2_K:
        G16: tl.constexpr = BLOCK_K // 16
        xs = tl.sum(tl.reshape(x, (G16, 16)), axis=1)[None, :]
        return _q2_k_dot_g16(w_ptr, rows, n_ok, (k0 >> 4) + tl.arange(0, G16),
                             tl.reshape(x, (1, G16, 4, 4)), xs, stride_w)
    else:
        G32: tl.constexpr = BLOCK_K // 32
        xs = tl.sum(tl.reshape(x, (G32, 32)), axis=1)[None, :]
        return _q4_k_dot_g32(w_ptr, rows, n_ok, (k0 >> 5) + tl.arange(0, G32),
                             tl.reshape(x, (1, G32, 8, 4)), xs, stride_w)


@triton.jit
def _moe_gate_up_blockdot_kernel(u_ptr, sel_ptr, wts_ptr, h_ptr, gw_ptr, uw_ptr, g32_ptr,
                                 F, D, KSEL, clamp, stride_ut, stride_ht, stride_w,
                                 FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """As _moe_gate_up_gemv_kernel, decoding per group (_block_dot): IQ2_XXS or Q4_K gate/up."""
    slot, t, wt, rn, n_ok, rows = slot_rows(sel_ptr, wts_ptr, KSEL, F, BLOCK_N)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        x = tl.load(u_ptr + t * stride_ut + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        acc_g += _block_dot(gw_ptr, g32_ptr, rows, n_ok, k0, x, stride_w, FMT, BLOCK_K)
        acc_u += _block_dot(uw_ptr, g32_ptr, rows, n_ok, k0, x, stride_w, FMT, BLOCK_K)
    h = _swiglu_route(acc_g, acc_u, wt, clamp)
    tl.store(h_ptr + slot * stride_ht + rn, h, mask=n_ok)


@triton.jit
def _moe_down_blockdot_kernel(h_ptr, sel_ptr, out_ptr, dw_ptr, g32_ptr, F, D, KSEL, stride_ht, stride_ot, stride_dw,
                              FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """As _moe_down_gemv_kernel, decoding per group (_block_dot): Q2_K or Q4_K down."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < D
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, KSEL):
        slot = t * KSEL + i
        e = tl.load(sel_ptr + slot).to(tl.int64)
        rows = e * D + rn
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            x = tl.load(h_ptr + slot * stride_ht + k0 + tl.arange(0, BLOCK_K))
            acc += _block_dot(dw_ptr, g32_ptr, rows, n_ok, k0, x, stride_dw, FMT, BLOCK_K)
        total += acc
    tl.store(out_ptr + t * stride_ot + rn, total, mask=n_ok)


@triton.jit
def _q2_k_dot_g16(w_ptr, rows, n_ok, j16, x4, xs, stride_w):
    """sum_k dequant(w)[row, k] * x[k] over the 16-weight sub-blocks j16 (global indices), Q2_K.

    Sub-block j (of 16 per block) = 8h + 2s + half holds weights 128h + 32s + 16half + p, p = 0..15,
    the 2-bit fields at shift 2s of bytes qs[32h + 16half + p] (4 int32 words). Dot identity of
    quant.md §1.4: sum w x = d*sc * sum q x - dmin*m * sum x, so per weight only shift/and/convert/FMA."""
    r = rows.to(tl.int64)[:, None]
    jb = j16[None, :]
    jl = jb & 15
    base = r * stride_w + (jb >> 4) * 21
    m = n_ok[:, None]
    sc = (tl.load(w_ptr + base + (jl >> 2), mask=m, other=0) >> (8 * (jl & 3))) & 255
    dw = tl.load(w_ptr + base + 20, mask=m, other=0)
    dsc = _f16_from_bits(dw) * (sc & 15).to(tl.float32)
    dmm = _f16_from_bits(dw >> 16) * (sc >> 4).to(tl.float32)
    wbase = base + 4 + 8 * (jl >> 3) + 4 * (jl & 1)
    ww = tl.load(w_ptr + wbase[:, :, None] + tl.arange(0, 4)[None, None, :], mask=m[:, :, None], other=0)  # [BN, NSB, 4]
    shift = 8 * tl.arange(0, 4)[None, None, None, :] + (2 * ((jl >> 1) & 3))[:, :, None, None]
    q = (ww[:, :, :, None] >> shift) & 3  # [BN, NSB, 4 words, 4 bytes]
    s1 = tl.sum(tl.sum(q.to(tl.float32) * x4, axis=3), axis=2)
    return tl.sum(dsc * s1 - dmm * xs, axis=1)


@triton.jit
def _moe_down_gemv_kernel(h_ptr, sel_ptr, out_ptr,
                          dw_ptr, ds_ptr, g_ptr,
                          F, D, KSEL,
                          stride_ht, stride_ot, stride_dw, stride_ds, off_ds,
                          FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t, d] = sum_{i < KSEL, in order} down[sel[t, i]][d, :] @ h[t*KSEL + i, :]."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < D
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, KSEL):
        slot = t * KSEL + i
        e = tl.load(sel_ptr + slot).to(tl.int64)
        rows = e * D + rn
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(h_ptr + slot * stride_ht + rk)
            w = dequant_tile(dw_ptr, ds_ptr, g_ptr, rows[:, None], rk[None, :], n_ok[:, None],
                             stride_dw, stride_ds, off_ds, FMT)
            acc += tl.sum(w * x[None, :], axis=1)
        total += acc
    tl.store(out_ptr + t * stride_ot + rn, total, mask=n_ok)


@triton.jit
def _moe_gate_up_grouped_kernel(u_ptr, order_ptr, wts_ptr, h_ptr,
                                tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                                gw_ptr, gs_ptr, uw_ptr, us_ptr, g_ptr,
                                F, D, KSEL, clamp,
                                stride_ut, stride_ht,
                                stride_gw, stride_gs, off_gs, stride_uw, stride_us, off_us,
                                FMT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """For sorted rows r in a tile of expert e (pair p = order[r], token p // KSEL):
    h[r, f] = swiglu(u[t] @ gate[e].T, u[t] @ up[e].T)[f] * wts[p]. Unused tiles run zero K steps."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + tile).to(tl.int64)
    lo = tl.load(tile_lo_ptr + tile)
    hi = tl.load(tile_hi_ptr + tile)
    rm = lo + tl.arange(0, BLOCK_M)
    m_ok = rm < hi
    pair = tl.load(order_ptr + rm, mask=m_ok, other=0)
    tok = (pair // KSEL).to(tl.int64)
    wt = tl.load(wts_ptr + pair, mask=m_ok, other=0.0).to(tl.float32)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < F
    rows = e * F + rn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_steps = tl.where(hi > lo, D // BLOCK_K, 0)
    for step in range(0, n_steps):
        rk = step * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(u_ptr + tok[:, None] * stride_ut + rk[None, :], mask=m_ok[:, None], other=0.0).to(DOT)
        wg = dequant_tile(gw_ptr, gs_ptr, g_ptr, rows[None, :], rk[:, None], n_ok[None, :],
                          stride_gw, stride_gs, off_gs, FMT).to(DOT)
        acc_g += dot(x, wg, IEEE)
        wu = dequant_tile(uw_ptr, us_ptr, g_ptr, rows[None, :], rk[:, None], n_ok[None, :],
                          stride_uw, stride_us, off_us, FMT).to(DOT)
        acc_u += dot(x, wu, IEEE)
    h = _swiglu_route(acc_g, acc_u, wt[:, None], clamp)
    tl.store(h_ptr + rm[:, None].to(tl.int64) * stride_ht + rn[None, :], h, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_grouped_kernel(h_ptr, order_ptr, y_ptr,
                             tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                             dw_ptr, ds_ptr, g_ptr,
                             F, D,
                             stride_ht, stride_yp, stride_dw, stride_ds, off_ds,
                             FMT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[order[r], d] = h[r, :] @ down[e][d, :] for the sorted rows r of each tile (one writer per row)."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + tile).to(tl.int64)
    lo = tl.load(tile_lo_ptr + tile)
    hi = tl.load(tile_hi_ptr + tile)
    rm = lo + tl.arange(0, BLOCK_M)
    m_ok = rm < hi
    pair = tl.load(order_ptr + rm, mask=m_ok, other=0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < D
    rows = e * D + rn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_steps = tl.where(hi > lo, F // BLOCK_K, 0)
    for step in range(0, n_steps):
        rk = step * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(h_ptr + rm[:, None].to(tl.int64) * stride_ht + rk[None, :], mask=m_ok[:, None], other=0.0).to(DOT)
        w = dequant_tile(dw_ptr, ds_ptr, g_ptr, rows[None, :], rk[:, None], n_ok[None, :],
                         stride_dw, stride_ds, off_ds, FMT).to(DOT)
        acc += dot(x, w, IEEE)
    tl.store(y_ptr + pair[:, None] * stride_yp + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def _check(u, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight, sel, weights):
    E, F, D = gate.shape
    assert up.shape == gate.shape and up.fmt == gate.fmt, "gate and up must share shape and format"
    assert down.shape == (E, D, F), f"down {down.shape} does not match gate {gate.shape}"
    assert u.shape[-1] == D and sel.shape == weights.shape and sel.shape[0] == u.shape[0]
    u = u if u.stride(-1) == 1 else u.contiguous()
    return u, sel.contiguous(), weights.contiguous().float(), E, F, D


def fused_decode(u, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight, sel, weights, clamp: float,
                 dev: DeviceInfo, cfg: MoeConfig | None = None):
    """Routed MoE for few tokens: u [T, D], sel/weights [T, K] -> [T, D] fp32 (two launches)."""
    u, sel, weights, E, F, D = _check(u, gate, up, down, sel, weights)
    T, K = sel.shape
    cfg = cfg or select_moe(gate.fmt, down.fmt, F, D, dev)
    h = blocks.empty((T * K, F), u.device)
    gu = cfg.decode_gate_up
    _moe_gate_up_gemv_kernel[(T * K, triton.cdiv(F, gu.block_n))](
        u, sel, weights, h, gate.w, gate.s, up.w, up.s, gate.g, F, D, K, float(clamp),
        u.stride(0), h.stride(0), gate.stride_w, gate.stride_s, gate.off_s, up.stride_w, up.stride_s, up.off_s,
        FMT=int(gate.fmt), BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, num_warps=gu.num_warps)
    out = blocks.empty((T, D), u.device)
    dn = cfg.decode_down
    _moe_down_gemv_kernel[(T, triton.cdiv(D, dn.block_n))](
        h, sel, out, down.w, down.s, down.g, F, D, K,
        h.stride(0), out.stride(0), down.stride_w, down.stride_s, down.off_s,
        FMT=int(down.fmt), BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, num_warps=dn.num_warps)
    return out


BLOCKDOT_GATE_UP = ("IQ2_XXS", "Q4_K")
BLOCKDOT_DOWN = ("Q2_K", "Q4_K")


def _moe_cfg(gate: DeviceWeight, down: DeviceWeight, T: int, dev: DeviceInfo, cfg: MoeConfig | None) -> MoeConfig:
    """The config for this call, chosen once per (T, device) and cached on the gate weight."""
    if cfg is not None:
        return cfg
    key = ("moe_cfg", T, dev)
    c = gate.plans.get(key)
    if c is None:
        E, F, D = gate.shape
        c = gate.plans[key] = select_moe(gate.fmt, down.fmt, F, D, dev, tokens=T)
    return c


def fused_blockdot(u, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight, sel, weights, clamp: float,
                   dev: DeviceInfo, cfg: MoeConfig | None = None):
    """fused_decode with group-wise decoding (_block_dot): IQ2_XXS per 8 weights, Q2_K per 16, Q4_K per
    32, scales applied once per group. Stages in other formats use the per-weight kernels.
    With cfg.down_per_slot the down projection runs one program per (slot, row block) into [T*K, D]
    and the K slots are summed after in fixed order (more programs in flight; still deterministic)."""
    u, sel, weights, E, F, D = _check(u, gate, up, down, sel, weights)
    T, K = sel.shape
    cfg = _moe_cfg(gate, down, T, dev, cfg)
    gu, dn = cfg.decode_gate_up, cfg.decode_down
    h = blocks.empty((T * K, F), u.device)
    if gate.fmt.name in BLOCKDOT_GATE_UP and gu.block_k % 32 == 0:
        g32 = gate.g.view(torch.int32) if gate.fmt.name == "IQ2_XXS" else gate.w  # grid only read for IQ2
        _moe_gate_up_blockdot_kernel[(T * K, triton.cdiv(F, gu.block_n))](
            u, sel, weights, h, gate.w, up.w, g32, F, D, K, float(clamp), u.stride(0), h.stride(0), gate.stride_w,
            FMT=int(gate.fmt), BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, num_warps=gu.num_warps,
            num_stages=gu.num_stages)
    else:
        _moe_gate_up_gemv_kernel[(T * K, triton.cdiv(F, gu.block_n))](
            u, sel, weights, h, gate.w, gate.s, up.w, up.s, gate.g, F, D, K, float(clamp),
            u.stride(0), h.stride(0), gate.stride_w, gate.stride_s, gate.off_s, up.stride_w, up.stride_s, up.off_s,
            FMT=int(gate.fmt), BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, num_warps=gu.num_warps)
    # per slot: the kernels see T*K "tokens" of one expert each (KSEL = 1)
    rows_out, ksel = (T * K, 1) if cfg.down_per_slot else (T, K)
    out = blocks.empty((rows_out, D), u.device)
    if down.fmt.name in BLOCKDOT_DOWN and dn.block_k % 32 == 0:
        _moe_down_blockdot_kernel[(rows_out, triton.cdiv(D, dn.block_n))](
            h, sel, out, down.w, down.w, F, D, ksel, h.stride(0), out.stride(0), down.stride_w,
            FMT=int(down.fmt), BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, num_warps=dn.num_warps,
            num_stages=dn.num_stages)
    else:
        _moe_down_gemv_kernel[(rows_out, triton.cdiv(D, dn.block_n))](
            h, sel, out, down.w, down.s, down.g, F, D, ksel,
            h.stride(0), out.stride(0), down.stride_w, down.stride_s, down.off_s,
            FMT=int(down.fmt), BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, num_warps=dn.num_warps)
    if cfg.down_per_slot:
        out = out.view(T, K, D).sum(1)  # fixed reduction order for a given shape: deterministic
    return out


@triton.jit
def _chunk_ranks_kernel(sel_ptr, rank_ptr, hist_ptr, n_pairs, BLOCK_E: tl.constexpr, CH: tl.constexpr):
    """Per chunk of CH pairs: each pair's rank among the same-expert pairs before it in the chunk, and
    the chunk's pairs per expert (hist row)."""
    c = tl.program_id(0)
    ar = tl.arange(0, CH)
    i = c * CH + ar
    e = tl.load(sel_ptr + i, mask=i < n_pairs, other=-1).to(tl.int32)
    same = e[:, None] == e[None, :]
    tl.store(rank_ptr + i, tl.sum((same & (ar[None, :] < ar[:, None])).to(tl.int32), axis=1), mask=i < n_pairs)
    ar_e = tl.arange(0, BLOCK_E)
    tl.store(hist_ptr + c * BLOCK_E + ar_e, tl.sum((e[:, None] == ar_e[None, :]).to(tl.int32), axis=0))


@triton.jit
def _expert_rows_kernel(hist_ptr, te_ptr, lo_ptr, hi_ptr, n_chunks, n_tiles, E, BLOCK_E: tl.constexpr,
                        BLOCK_M: tl.constexpr, CB: tl.constexpr, TB: tl.constexpr):
    """One program: hist [chunk, expert] becomes each chunk's first row per expert (in place: the experts'
    starts plus the pairs of earlier chunks); then tile ids map to (expert, row range), a search over the
    experts' tile ends."""
    ar_e = tl.arange(0, BLOCK_E)
    e_ok = ar_e < E
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, n_chunks, CB):
        rows = c0 + tl.arange(0, CB)
        counts += tl.sum(tl.load(hist_ptr + rows[:, None] * BLOCK_E + ar_e[None, :], mask=(rows < n_chunks)[:, None],
                                 other=0), axis=0)
    starts = tl.cumsum(counts, 0) - counts
    run = starts
    for c0 in range(0, n_chunks, CB):
        rows = c0 + tl.arange(0, CB)
        ptrs = hist_ptr + rows[:, None] * BLOCK_E + ar_e[None, :]
        h = tl.load(ptrs, mask=(rows < n_chunks)[:, None], other=0)
        tl.store(ptrs, run[None, :] + tl.cumsum(h, 0) - h, mask=(rows < n_chunks)[:, None])
        run += tl.sum(h, 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    first = tile_end - tiles
    total = tl.sum(tiles, 0)
    for j0 in range(0, n_tiles, TB):
        j = j0 + tl.arange(0, TB)
        te = tl.minimum(tl.sum(((tile_end[None, :] <= j[:, None]) & e_ok[None, :]).to(tl.int32), axis=1), E - 1)
        hot = te[:, None] == ar_e[None, :]
        st = tl.sum(tl.where(hot, starts[None, :], 0), axis=1)
        lo = st + (j - tl.sum(tl.where(hot, first[None, :], 0), axis=1)) * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, st + tl.sum(tl.where(hot, counts[None, :], 0), axis=1))
        used = j < total
        tl.store(te_ptr + j, te, mask=j < n_tiles)
        tl.store(lo_ptr + j, tl.where(used, lo, 0), mask=j < n_tiles)
        tl.store(hi_ptr + j, tl.where(used, hi, 0), mask=j < n_tiles)


@triton.jit
def _place_kernel(sel_ptr, rank_ptr, first_ptr, order_ptr, n_pairs, BLOCK_E: tl.constexpr, CH: tl.constexpr):
    """order[first[chunk, e] + rank] = pair, for the pairs of one chunk."""
    c = tl.program_id(0)
    i = c * CH + tl.arange(0, CH)
    m = i < n_pairs
    e = tl.load(sel_ptr + i, mask=m, other=0).to(tl.int32)
    pos = tl.load(first_ptr + c * BLOCK_E + e, mask=m, other=0) + tl.load(rank_ptr + i, mask=m, other=0)
    tl.store(order_ptr + pos, i, mask=m)


EXPERT_CHUNK = 64  # pairs per program of the grouping kernels (a CH x CH compare per program)


def expert_tiles(sel, n_expert: int, block_m: int):
    """Device-side grouping of (token, slot) pairs by expert, with no host sync: three launches of a
    counting sort (ranks and per-chunk counts in parallel, one program for the prefix sums and the
    tiles, then the scatter), deterministic and stable.

    Returns (order [T*K] pair ids sorted by expert (stable), tile_e, tile_lo, tile_hi [n_tiles] int32):
    tile j covers sorted rows [tile_lo, tile_hi) of expert tile_e; n_tiles = ceil(T*K/block_m) + E is
    an upper bound known on the host, and unused tiles are empty (lo == hi, expert E-1)."""
    import torch

    flat = sel.reshape(-1)
    n_pairs = flat.numel()
    n_tiles = triton.cdiv(n_pairs, block_m) + n_expert
    n_chunks = triton.cdiv(n_pairs, EXPERT_CHUNK)
    block_e = triton.next_power_of_2(n_expert)
    dev = flat.device
    rank = torch.empty(n_pairs, device=dev, dtype=torch.int32)
    hist = torch.empty((n_chunks, block_e), device=dev, dtype=torch.int32)
    order = torch.empty(n_pairs, device=dev, dtype=torch.int32)
    te, lo, hi = (torch.empty(n_tiles, device=dev, dtype=torch.int32) for _ in range(3))
    _chunk_ranks_kernel[(n_chunks,)](flat, rank, hist, n_pairs, BLOCK_E=block_e, CH=EXPERT_CHUNK, num_warps=4)
    _expert_rows_kernel[(1,)](hist, te, lo, hi, n_chunks, n_tiles, n_expert, BLOCK_E=block_e, BLOCK_M=block_m,
                              CB=16, TB=32, num_warps=8)
    _place_kernel[(n_chunks,)](flat, rank, hist, order, n_pairs, BLOCK_E=block_e, CH=EXPERT_CHUNK, num_warps=2)
    return order, te, lo, hi


def grouped(u, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight, sel, weights, clamp: float,
            dev: DeviceInfo, cfg: MoeConfig | None = None):
    """Routed MoE for many tokens: sort by expert, one grouped GEMM launch per projection stage."""
    u, sel, weights, E, F, D = _check(u, gate, up, down, sel, weights)
    T, K = sel.shape
    cfg = _moe_cfg(gate, down, T, dev, cfg)
    pf = cfg.prefill
    order, te, lo, hi = expert_tiles(sel, E, pf.block_m)
    n_tiles = te.numel()
    dot_t = tl_dot_dtype(pf.dot)
    ieee = pf.dot == DotDtype.FP32_IEEE
    h = blocks.empty((T * K, F), u.device)
    _moe_gate_up_grouped_kernel[(n_tiles, triton.cdiv(F, pf.block_n))](
        u, order, weights.reshape(-1), h, te, lo, hi,
        gate.w, gate.s, up.w, up.s, gate.g, F, D, K, float(clamp),
        u.stride(0), h.stride(0), gate.stride_w, gate.stride_s, gate.off_s, up.stride_w, up.stride_s, up.off_s,
        FMT=int(gate.fmt), DOT=dot_t, IEEE=ieee, BLOCK_M=pf.block_m, BLOCK_N=pf.block_n, BLOCK_K=pf.block_k,
        num_warps=pf.num_warps, num_stages=pf.num_stages)
    y = blocks.empty((T * K, D), u.device)
    _moe_down_grouped_kernel[(n_tiles, triton.cdiv(D, pf.block_n))](
        h, order, y, te, lo, hi, down.w, down.s, down.g, F, D,
        h.stride(0), y.stride(0), down.stride_w, down.stride_s, down.off_s,
        FMT=int(down.fmt), DOT=dot_t, IEEE=ieee, BLOCK_M=pf.block_m, BLOCK_N=pf.block_n, BLOCK_K=pf.block_k,
        num_warps=pf.num_warps, num_stages=pf.num_stages)
    return y.view(T, K, D).sum(1)  # fixed reduction order for a given shape: deterministic


def moe_float(u, gate, up, down, sel, weights, clamp, dev, decode_max_t: int = 8):
    """fused_blockdot for few tokens (it falls back to the per-weight kernels per stage where a format
    has no group decoder), grouped above. The fallback of moe_prefill for formats it does not take."""
    if u.shape[0] <= decode_max_t:
        return fused_blockdot(u, gate, up, down, sel, weights, clamp, dev)
    return grouped(u, gate, up, down, sel, weights, clamp, dev)


def moe_auto(u, gate, up, down, sel, weights, clamp, dev, decode_max_t: int = 8):
    """Few tokens: moe_int8 on fp32-grade activations (three int8 planes, variant int8_limb3, TUNED_LIMB3 tiles;
    H200, graph replay, T=1: q2 40.0 / q4 50.2 us against fused_blockdot's 88.6 / 91.6, tools/results/h200_final27),
    which hands formats and shapes it does not take to fused_blockdot; on ROCm fused_blockdot (the dp4a path is
    PTX, the plain-Triton byte products there are unmeasured). Above: moe_prefill's grouped GEMM with per-group decoding
    and its per-format tiles (H200, 2026-11-28, T=2048: 4.2 / 3.5 ms for q2 / q4, tools/results/h200_final5;
    `grouped`: 19.6 / 20.8 ms), which hands formats it does not decode to moe_float."""
    if u.shape[0] <= decode_max_t:
        if dev.vendor == Vendor.AMD:
            return fused_blockdot(u, gate, up, down, sel, weights, clamp, dev)
        from . import moe_int8  # late: moe_int8 builds on this module

        return moe_int8.fused_int8(u, gate, up, down, sel, weights, clamp, dev, limbs=moe_int8.LIMBS_FP32)
    from .moe_prefill import grouped_v2_default  # late: moe_prefill builds on this module

    return grouped_v2_default(u, gate, up, down, sel, weights, clamp, dev)


def grouped_ieee(u, gate, up, down, sel, weights, clamp, dev):
    """grouped with fp32 operands and IEEE products (no rounding of u, h or the weights)."""
    cfg = select_moe(gate.fmt, down.fmt, gate.shape[1], gate.shape[2], dev)
    cfg = replace(cfg, prefill=replace(cfg.prefill, dot=DotDtype.FP32_IEEE))
    return grouped(u, gate, up, down, sel, weights, clamp, dev, cfg)


def moe_auto_ieee(u, gate, up, down, sel, weights, clamp, dev, decode_max_t: int = 8):
    if u.shape[0] <= decode_max_t:
        return fused_decode(u, gate, up, down, sel, weights, clamp, dev)
    return grouped_ieee(u, gate, up, down, sel, weights, clamp, dev)


# ---- registered variants (op "moe"; signature fn(u, gate, up, down, sel, weights, clamp, dev)) ---
from ..quant.formats import QuantFormat  # noqa: E402
from .registry import AUTO, KernelOp, register  # noqa: E402

register(KernelOp.MOE, AUTO, moe_auto, doc="moe_int8 on three int8 activation planes (fp32-grade; ROCm: "
         "fused_blockdot) for T <= 8, moe_prefill.grouped_v2 (TUNED tiles) above")
register(KernelOp.MOE, "fused_decode", fused_decode, max_t=64,
         doc="gate+up+SwiGLU+route weight per (slot, F block), then down summed over K in order")
register(KernelOp.MOE, "fused_blockdot", fused_blockdot, formats=(QuantFormat.IQ2_XXS, QuantFormat.Q4_K), max_t=64,
         doc="fused decode decoding per group (IQ2_XXS 8, Q2_K 16, Q4_K 32 weights), scales once per group")
register(KernelOp.MOE, "grouped", grouped, doc="device sort by expert, grouped tl.dot GEMMs, ordered K sum")
register(KernelOp.MOE, "grouped_ieee", grouped_ieee, doc="grouped with fp32 IEEE tl.dot (accurate, slower)")
register(KernelOp.MOE, "auto_ieee", moe_auto_ieee, doc="fused_decode for T <= 8, grouped_ieee above")
