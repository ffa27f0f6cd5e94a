"""Quantizers: float32 rows -> raw GGUF blocks for F32, F16, BF16, Q8_0, Q2_K, Q4_K and IQ2_XXS.

One vectorized torch implementation serves CPU and GPU (`quantize_torch`); `quantize_np` is its numpy
front end (Q8_0 and the plain formats are computed in numpy, byte-identical to `gguf.quants.quantize`).
Q2_K/Q4_K follow ggml's searches (quant.md §3.2-3.4: make_qkx2 without importance, make_qkx3 +
make_qp_quants with it), vectorized across sub-blocks, then polished by least-squares (d, dmin) refits and
+-1 moves of the sub-block codes. IQ2_XXS (§3.5) keeps ggml's sign/parity rule and weighting but snaps each
octet exactly over all 256 grid entries, with the decoder's true magnitudes 8/25/43 (ggml fits 1/3/5 and
searches neighbour lists), then re-snaps once the 4-bit scales are fixed. Only Q8_0 and the plain formats
are byte-exact with ggml; the rest is quality-tested. Knows block layouts only: no model, no backends.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import QK_K, QuantFormat
from .tables import IQ2XXS_GRID, IQ2XXS_GROUP

IMPORTANCE_FLOOR = 1e-6  # added to every importance value, relative to their mean
GROUP_MAX_EPS = 1e-15  # ggml: a group whose max is below this is stored as zeros
Q8_0_MAX = 127
Q2K_SUB, Q4K_SUB = 16, 32  # weights per sub-block
Q2K_NMAX, Q4K_NMAX = 3, 15  # largest code
Q2K_SCALE_MAX, Q4K_SCALE_MAX = 15, 63  # largest scale/min code (4 and 6 bits)
K_REFINE_ROUNDS = 2  # least-squares / code-move rounds after ggml's Q2_K/Q4_K search
IQ2_SCALE_MAX = 15  # 4-bit group scale
IQ2_GROUP = 32  # weights per IQ2_XXS scale group
IQ2_GROUPS = QK_K // IQ2_GROUP  # groups per super-block
IQ2_OCTETS = IQ2_GROUP // IQ2XXS_GROUP  # grid entries per group
IQ2_TRIAL_DIVISORS = (4.0, 5.0, 6.5)  # trial unit scales = group max / divisor
IQ2_CODE_TRIES = (0, -1, 1)  # 4-bit group-scale codes tried around the rounded one
IQ2_REFINE = 2  # extra snap/refit rounds after the trial scales
IQ2_GRID_MAG = IQ2XXS_GRID.astype(np.float32) / 8  # decoded magnitudes in units of the group scale

# Super-blocks per step: bounds temporaries (IQ2_XXS builds [octets, 256] score matrices) while keeping
# a GPU busy; small CPU chunks stay in cache.
_CHUNK_SUPERBLOCKS_CPU = {QuantFormat.IQ2_XXS: 128, QuantFormat.Q2_K: 8192, QuantFormat.Q4_K: 8192}
_CHUNK_SUPERBLOCKS_GPU = {QuantFormat.IQ2_XXS: 32768, QuantFormat.Q2_K: 131072, QuantFormat.Q4_K: 131072}


def _np_roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact in float32: floor(a) + floor(2*(a - floor(a)))."""
    a = np.abs(v)
    f = np.floor(a)
    return np.sign(v) * (f + np.floor(2 * (a - f)))


def _q8_0_np(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_0_ref: d = amax/127 as fp16, q = roundf(x * (1/d))."""
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(Q8_0_MAX)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _np_roundf(blocks * inv).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


def _bf16_np(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 round-to-nearest-even, NaN forced quiet (ggml_compute_fp32_to_bf16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r = np.where(is_nan, ((u >> 16) | 0x40).astype(np.uint16), r)
    return r.view(np.uint8)


def _check_input(x_shape, fmt: QuantFormat, importance) -> int:
    if len(x_shape) != 2:
        raise ValueError(f"quantize wants a 2-D [rows, n] matrix, got shape {tuple(x_shape)}")
    n = int(x_shape[1])
    fmt.row_bytes(n)  # raises ValueError when the row does not hold whole blocks
    if fmt == QuantFormat.I32:
        raise ValueError("I32 tensors are integer tables, not quantized from floats")
    if importance is not None and tuple(np.shape(importance)) != (n,):
        raise ValueError(f"importance must have one value per column ({n}), got shape {tuple(np.shape(importance))}")
    return n


def quantize_np(x: np.ndarray, fmt: QuantFormat, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, n] -> uint8 [rows, fmt.row_bytes(n)] of GGUF blocks.

    importance: optional per-column weights [n] (an imatrix slice, or column sums of squares). Q2_K/Q4_K
    use ggml's weighted search when given, the reference search otherwise; IQ2_XXS always uses one and
    defaults to the column sums of squares of `x` (as ds4 does without an imatrix)."""
    fmt = QuantFormat(fmt)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = _check_input(x.shape, fmt, importance)
    rows = x.shape[0]
    if fmt == QuantFormat.F32:
        return x.view(np.uint8).reshape(rows, -1).copy()
    if fmt == QuantFormat.F16:
        return x.astype(np.float16).view(np.uint8).reshape(rows, -1)
    if fmt == QuantFormat.BF16:
        return _bf16_np(x).reshape(rows, -1)
    if fmt == QuantFormat.Q8_0:
        if not np.isfinite(x).all():
            raise ValueError(f"cannot quantize to {fmt.name}: the input holds NaN or infinite values")
        return _q8_0_np(x).reshape(rows, fmt.row_bytes(n))
    import torch

    imp = None if importance is None else torch.from_numpy(np.ascontiguousarray(importance, dtype=np.float32))
    return quantize_torch(torch.from_numpy(x), fmt, imp).numpy()


def quantize_torch(x, fmt: QuantFormat, importance=None):
    """Torch twin of `quantize_np` on x's device: float [rows, n] -> uint8 [rows, row_bytes]."""
    import torch

    fmt = QuantFormat(fmt)
    n = _check_input(tuple(x.shape), fmt, importance)
    x = x.to(torch.float32).contiguous()
    rows = x.shape[0]
    if fmt.is_quantized and not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot quantize to {fmt.name}: the input holds NaN or infinite values")
    if fmt == QuantFormat.F32:
        return x.view(torch.uint8).reshape(rows, -1).clone()
    if fmt == QuantFormat.F16:
        return x.to(torch.float16).view(torch.uint8).reshape(rows, -1)
    if fmt == QuantFormat.BF16:
        return _bf16_t(x).reshape(rows, -1)
    if fmt == QuantFormat.Q8_0:
        return _q8_0_t(x).reshape(rows, fmt.row_bytes(n))
    imp = None
    if importance is not None:
        imp = torch.as_tensor(importance, dtype=torch.float32, device=x.device)
        if not bool((torch.isfinite(imp) & (imp >= 0)).all()):
            raise ValueError("importance values must be finite and >= 0")
    elif fmt == QuantFormat.IQ2_XXS:
        imp = (x * x).sum(0)
    if imp is not None:
        # A small floor keeps groups whose columns all have zero importance (dead inputs, all-zero
        # columns) fitted as with flat weights instead of collapsing to zero.
        mean = imp.mean()
        imp = imp + IMPORTANCE_FLOOR * mean if bool(mean > 0) else torch.ones_like(imp)
    nb = n // QK_K
    sb = x.reshape(rows * nb, QK_K)  # super-blocks; block i of a row covers columns 256*(i % nb) ...
    qw = None if imp is None else imp.reshape(nb, QK_K)
    encode = {QuantFormat.Q2_K: _q2_k_t, QuantFormat.Q4_K: _q4_k_t, QuantFormat.IQ2_XXS: _iq2_xxs_t}[fmt]
    out = torch.empty((rows * nb, fmt.type_size), dtype=torch.uint8, device=x.device)
    chunk = (_CHUNK_SUPERBLOCKS_CPU if x.device.type == "cpu" else _CHUNK_SUPERBLOCKS_GPU)[fmt]
    step = max(nb, chunk // nb * nb)  # whole rows per chunk keep importance aligned
    for s in range(0, rows * nb, step):
        blk = sb[s : s + step]
        w = None if qw is None else qw.repeat(blk.shape[0] // nb, 1)
        out[s : s + step] = encode(blk, w)
    return out.reshape(rows, fmt.row_bytes(n))


# ------------------------------------------------------------------------------------------ plain / Q8_0


def _f16_bytes(v):
    """[N] float32 -> [N, 2] uint8 of the fp16 value; and the fp16 value read back as float32."""
    import torch

    h = v.to(torch.float16)
    return h.view(torch.uint8).reshape(-1, 2), h.to(torch.float32)


def _roundf_t(v):
    import torch

    a = v.abs()
    f = torch.floor(a)
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def _q8_0_t(x):
    import torch

    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / Q8_0_MAX
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _roundf_t(blocks * inv).to(torch.int8)
    db, _ = _f16_bytes(d.reshape(-1))
    return torch.cat([db, q.view(torch.uint8)], dim=1)


def _bf16_t(x):
    import torch

    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = torch.where(is_nan, (u >> 16) | 0x40, r) & 0xFFFF
    return _u16_to_bytes(r)


def _u16_to_bytes(r):
    import torch

    lo = (r & 0xFF).to(torch.uint8)
    hi = ((r >> 8) & 0xFF).to(torch.uint8)
    return torch.stack([lo, hi], dim=-1).reshape(*r.shape[:-1], -1)


# ------------------------------------------------------------------------------ ggml search routines


def make_qkx(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """ggml make_qkx2/qkx3_quants over rows of x [M, n]: x ~ scale*L + min with min <= 0.

    Returns (scale [M], neg_min [M] >= 0, L [M, n] codes in 0..nmax), vectorized across rows."""
    import torch

    mn = x.amin(dim=1).clamp(max=0.0)
    mx = x.amax(dim=1)
    span = mx - mn
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    wx = w * x
    sum_w, sum_x, sum_x2 = w.sum(1), wx.sum(1), (wx * x).sum(1)
    xs = x - mn[:, None]

    def codes(iscale):
        return torch.clamp(torch.round(iscale[:, None] * xs), 0, nmax)

    def err(scale, mins, L, sl, sl2, sxl):
        if use_mad:
            return (w * (scale[:, None] * L + mins[:, None] - x).abs()).sum(1)
        # sum w*(scale*L + min - x)^2 expanded, from sums already at hand (saves a pass per step)
        return (scale * scale * sl2 + 2 * scale * mins * sl - 2 * scale * sxl
                + mins * mins * sum_w - 2 * mins * sum_x + sum_x2)

    def sums(L):
        wl = w * L
        return wl.sum(1), (wl * L).sum(1), (wl * x).sum(1)

    best_is = nmax / span
    scale = 1.0 / best_is
    mins = mn.clone()
    L = codes(best_is)
    best = err(scale, mins, L, *sums(L))
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / span
        La = codes(iscale)
        sl, sl2, sxl = sums(La)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        ts = (sum_w * sxl - sum_x * sl) / Ds
        tm = (sl2 * sum_x - sl * sxl) / Ds
        pos = tm > 0
        tm = torch.where(pos, torch.zeros_like(tm), tm)
        ts = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), ts)
        cur = err(ts, tm, La, sl, sl2, sxl)
        better = ok & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, ts, scale)
        mins = torch.where(better, tm, mins)
        best_is = torch.where(better, iscale, best_is)
    L = codes(best_is)  # the winning step's codes, recomputed rather than carried through every step
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -mins, L


def make_qp(x, w, nmax: int):
    """ggml make_qp_quants over rows of x [M, n] (non-negative): x ~ scale*L, L in 0..nmax, with the
    9-point inverse-scale scan and up to 5 rounds of sequential coordinate refinement.
    Returns (scale [M], L [M, n] float codes)."""
    import torch

    mx = x.amax(dim=1)
    zero = mx < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    iscale = nmax / mxs
    L = torch.round(iscale[:, None] * x)
    best = (w * (x - L / iscale[:, None]) ** 2).sum(1)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        isi = (0.1 * i + nmax) / mxs
        Li = torch.clamp(torch.round(isi[:, None] * x), max=nmax)
        mse = (w * (x - Li / isi[:, None]) ** 2).sum(1)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isi, iscale)
    L = torch.clamp(torch.round(iscale[:, None] * x), max=nmax)
    sumlx = (w * x * L).sum(1)
    suml2 = (w * L * L).sum(1)
    one = torch.ones_like(sumlx)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            nl = torch.clamp(torch.round(xi * sl2 / torch.where(ok, slx, one)), max=nmax)
            slx_n = slx + wi * xi * nl
            sl2_n = sl2 + wi * nl * nl
            acc = ok & (nl != li) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
            L[:, i] = torch.where(acc, nl, li)
            sumlx = torch.where(acc, slx_n, sumlx)
            suml2 = torch.where(acc, sl2_n, suml2)
    scale = torch.where(zero | (suml2 <= 0), torch.zeros_like(sumlx), sumlx / torch.where(suml2 > 0, suml2, one))
    return scale, torch.where(zero[:, None], torch.zeros_like(L), L)


def _requantize(x, d_sub, m_sub, L, nmax: int):
    """Codes for the stored (fp16-rounded) sub-block scale/min: x [B, S, n]; d_sub, m_sub [B, S].
    A sub-block whose decoded scale is 0 keeps the codes of the search (as ggml)."""
    import torch

    dz = d_sub == 0
    ds = torch.where(dz, torch.ones_like(d_sub), d_sub)
    q = torch.clamp(torch.round((x + m_sub[..., None]) / ds[..., None]), 0, nmax)
    return torch.where(dz[..., None], L, q)


def _scale_codes_ref(v, code_max: int, clamp: bool):
    """ggml ref: codes nearest_int(code_max/max * v), superscale = max/code_max (0 if max <= 0)."""
    import torch

    vmax = v.amax(dim=1)
    pos = vmax > 0
    inv = torch.where(pos, code_max / torch.where(pos, vmax, torch.ones_like(vmax)), torch.zeros_like(vmax))
    codes = torch.round(inv[:, None] * v)
    if clamp:
        codes = torch.clamp(codes, max=code_max)
    return codes, torch.where(pos, vmax / code_max, torch.zeros_like(vmax))


def _weights_k(x, qw, sigma_mult: float):
    """ggml impl weights qw * sqrt(sigma2 + x^2), sigma2 = sigma_mult * mean(x^2) of the super-block."""
    import torch

    sigma2 = sigma_mult * (x * x).sum(1, keepdim=True) / QK_K
    return qw * torch.sqrt(sigma2 + x * x)


def _sse(x, w, d_sub, m_sub, q):
    """Weighted squared error per super-block of the decode d_sub*q - m_sub: x, w, q [B, S, n]."""
    diff = d_sub[..., None] * q - m_sub[..., None] - x
    return (w * diff * diff).sum((1, 2))


def _refine_k(x, w, d, dmin, sc, mc, L, nmax: int, code_max: int):
    """Polish a K-quant super-block beyond ggml's search (format-legal, never worse in weighted error):
    alternately refit (d, dmin) by weighted least squares for the current codes, and move each
    sub-block's scale/min code by -1/0/+1 where that lowers the error.
    x, w, L [B, S, n]; d, dmin [B]; sc, mc [B, S] float codes. Returns (d16, m16, sc, mc, q)."""
    import torch

    _, d16 = _f16_bytes(d)
    _, m16 = _f16_bytes(dmin)
    q = _requantize(x, d16[:, None] * sc, m16[:, None] * mc, L, nmax)
    best = _sse(x, w, d16[:, None] * sc, m16[:, None] * mc, q)
    for _ in range(K_REFINE_ROUNDS):
        # (1) least squares for (d, dmin): x ~ d*(sc*q) - dmin*m
        a = sc[..., None] * q
        b = -mc[..., None].expand_as(q)
        saa, sab, sbb = (w * a * a).sum((1, 2)), (w * a * b).sum((1, 2)), (w * b * b).sum((1, 2))
        sax, sbx = (w * a * x).sum((1, 2)), (w * b * x).sum((1, 2))
        det = saa * sbb - sab * sab
        ok = det > 0
        dets = torch.where(ok, det, torch.ones_like(det))
        nd = torch.where(ok, (sbb * sax - sab * sbx) / dets, d16)
        nm = torch.where(ok, (saa * sbx - sab * sax) / dets, m16)
        _, nd16 = _f16_bytes(nd)
        _, nm16 = _f16_bytes(nm)
        nq = _requantize(x, nd16[:, None] * sc, nm16[:, None] * mc, L, nmax)
        err = _sse(x, w, nd16[:, None] * sc, nm16[:, None] * mc, nq)
        better = torch.isfinite(err) & (err < best)
        d16, m16 = torch.where(better, nd16, d16), torch.where(better, nm16, m16)
        q = torch.where(better[:, None, None], nq, q)
        best = torch.where(better, err, best)
        # (2) per sub-block code moves
        ebest = (w * (d16[:, None, None] * sc[..., None] * q - m16[:, None, None] * mc[..., None] - x) ** 2).sum(2)
        for da in (-1, 0, 1):
            for db in (-1, 0, 1):
                if da == 0 and db == 0:
                    continue
                tsc = torch.clamp(sc + da, 0, code_max)
                tmc = torch.clamp(mc + db, 0, code_max)
                ds, ms = d16[:, None] * tsc, m16[:, None] * tmc
                tq = _requantize(x, ds, ms, L, nmax)
                e = (w * (ds[..., None] * tq - ms[..., None] - x) ** 2).sum(2)
                bt = e < ebest
                ebest = torch.where(bt, e, ebest)
                sc, mc = torch.where(bt, tsc, sc), torch.where(bt, tmc, mc)
                q = torch.where(bt[..., None], tq, q)
        best = ebest.sum(1)
    return d16, m16, sc, mc, q


# ---------------------------------------------------------------------------------- Q2_K and Q4_K


@dataclass(frozen=True)
class KSearch:
    """What differs between the Q2_K and Q4_K scale/min searches (ggml's parameters per format)."""

    n_sub: int  # sub-blocks per 256-block
    sub: int  # weights per sub-block
    nmax: int  # largest code
    scale_max: int  # largest scale/min code
    plain_avg_weight: bool  # without importance: weight |x| + rms(x) (Q4_K) or |x| (Q2_K)
    plain_search: tuple  # make_qkx (rmin, rdelta, nstep, use_mad) without importance
    plain_clamp: bool  # clamp of the scale codes without importance
    imp_power: float  # exponent of the importance weighting (_weights_k)


IMP_SEARCH = (-0.9, 0.05, 36, False)  # make_qkx parameters with importance (both formats)


def _k_quant_search(x, qw, k: KSearch):
    """x [B, 256] (+ importance qw) -> (d bytes [B, 2], dmin bytes [B, 2], scale codes, min codes, codes):
    ggml's scale/min search for the format, then the joint refinement (_refine_k)."""
    import torch

    B = x.shape[0]
    xs = x.reshape(B * k.n_sub, k.sub)
    if qw is None:
        w = xs.abs()
        if k.plain_avg_weight:
            w = torch.sqrt((xs * xs).mean(1, keepdim=True)) + w
        scale, mins, L = make_qkx(xs, w, k.nmax, *k.plain_search)
        sc, d = _scale_codes_ref(scale.reshape(B, k.n_sub), k.scale_max, clamp=k.plain_clamp)
        mc, dmin = _scale_codes_ref(mins.reshape(B, k.n_sub), k.scale_max, clamp=k.plain_clamp)
    else:
        w = _weights_k(x, qw, k.imp_power).reshape(B * k.n_sub, k.sub)
        scale, mins, L = make_qkx(xs, w, k.nmax, *IMP_SEARCH)
        sw = w.sum(1).reshape(B, k.n_sub)
        d, sc = make_qp(scale.reshape(B, k.n_sub), sw, k.scale_max)
        dmin, mc = make_qp(mins.reshape(B, k.n_sub), sw, k.scale_max)
    x3 = x.reshape(B, k.n_sub, k.sub)
    w3 = torch.ones_like(x3) if qw is None else w.reshape(B, k.n_sub, k.sub)
    d16, m16, sc, mc, q = _refine_k(x3, w3, d, dmin, sc, mc, L.reshape(B, k.n_sub, k.sub), k.nmax, k.scale_max)
    d_b, _ = _f16_bytes(d16)
    m_b, _ = _f16_bytes(m16)
    return d_b, m_b, sc, mc, q


Q2K_K_SEARCH = KSearch(16, Q2K_SUB, Q2K_NMAX, Q2K_SCALE_MAX, False, (-0.5, 0.1, 15, True), False, 1.0)
Q4K_K_SEARCH = KSearch(8, Q4K_SUB, Q4K_NMAX, Q4K_SCALE_MAX, True, (-1.0, 0.1, 20, False), True, 2.0)


# ---------------------------------------------------------------------------------------------- Q2_K


def _q2_k_t(x, qw):
    """x [B, 256], qw [B, 256] or None -> [B, 84] Q2_K blocks."""
    import torch

    B = x.shape[0]
    d_b, m_b, sc, mc, q = _k_quant_search(x, qw, Q2K_K_SEARCH)
    # weight 128h + 32s + l -> bit pair s of byte qs[32h + l]
    q = q.to(torch.uint8).reshape(B, 2, 4, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    scales = sc.to(torch.uint8) | (mc.to(torch.uint8) << 4)
    return torch.cat([scales, qs.reshape(B, 64), d_b, m_b], dim=1)


# ---------------------------------------------------------------------------------------------- Q4_K


def _q4_k_t(x, qw):
    """x [B, 256], qw [B, 256] or None -> [B, 144] Q4_K blocks."""
    import torch

    B = x.shape[0]
    d_b, m_b, sc, mc, q = _k_quant_search(x, qw, Q4K_K_SEARCH)
    q = q.to(torch.uint8).reshape(B, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(B, 128)
    sc, mc = sc.to(torch.uint8), mc.to(torch.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)  # bytes 0-3: scale j, top bits of scale j+4
    mid = mc[:, :4] | ((mc[:, 4:] >> 4) << 6)  # bytes 4-7: min j, top bits of min j+4
    hi = (sc[:, 4:] & 15) | ((mc[:, 4:] & 15) << 4)  # bytes 8-11: low nibbles of scale/min j+4
    return torch.cat([d_b, m_b, lo, mid, hi, qs], dim=1)


# ------------------------------------------------------------------------------------------- IQ2_XXS

_IQ2_TABLES: dict[str, tuple] = {}


def _iq2_tables(device):
    """(grid magnitudes [256, 8], their squares [256, 8]) as float32 on device."""
    import torch

    key = str(device)
    if key not in _IQ2_TABLES:
        g = torch.from_numpy(IQ2_GRID_MAG.copy()).to(device)
        _IQ2_TABLES[key] = (g, g * g)
    return _IQ2_TABLES[key]


def _iq2_snap(A, B2, s):
    """Best candidate per octet at unit scale s: argmin_c s^2*A_c - s*B2_c (B2 = 2*B).
    A, B2 [G, 4, C]; s [G] -> (candidate [G, 4], sumA [G], sumB [G]) over the group's 4 octets."""
    import torch

    score = torch.addcmul(-B2, A, s[:, None, None])  # s*A - 2B: same argmin as the error for s > 0
    idx = score.argmin(dim=2, keepdim=True)
    a = torch.gather(A, 2, idx).squeeze(2)
    b = torch.gather(B2, 2, idx).squeeze(2)
    return idx.squeeze(2), a.sum(1), 0.5 * b.sum(1)


def _iq2_xxs_t(x, qw):
    """x [B, 256], qw [B, 256] (required) -> [B, 66] IQ2_XXS blocks."""
    import torch

    nsb = x.shape[0]
    G = nsb * IQ2_GROUPS  # 32-weight groups
    grid, grid2 = _iq2_tables(x.device)
    w = _weights_k(x, qw, 1.0).reshape(G, IQ2_OCTETS, IQ2XXS_GROUP)
    xo = x.reshape(G, IQ2_OCTETS, IQ2XXS_GROUP)
    # Signs per octet; an odd count of negatives is made even by giving the least important element
    # (smallest w*x^2) the wrong sign: it is then fitted as -|x|.
    neg = xo < 0
    ax = xo.abs()
    odd = (neg.sum(2) % 2) == 1
    flip = torch.nn.functional.one_hot((w * xo * xo).argmin(2), IQ2XXS_GROUP).bool() & odd[..., None]
    neg = neg ^ flip
    xval = torch.where(flip, -ax, ax)
    bitw = (1 << torch.arange(7, device=x.device, dtype=torch.int64))
    sign7 = (neg[..., :7].to(torch.int64) * bitw).sum(2)  # [G, 4]; bit 7 is implied by parity

    # Weighted least squares per octet and grid entry: err(s) = s^2*A - 2s*B + const.
    A = torch.matmul(w, grid2.T)  # [G, 4, 256]
    B2 = torch.matmul(2.0 * w * xval, grid.T)
    mx = xval.reshape(G, IQ2_GROUP).amax(1)
    live = mx >= GROUP_MAX_EPS
    # Trial unit scales put the group max at a few levels around the top magnitude 43/8; each trial
    # snaps exactly and is scored by its least-squares fit (ggml derives its 13 trials from a
    # make_qp_quants fit instead: slower, and no better once the snap is exact).
    mxs = torch.where(live, mx, torch.ones_like(mx))
    best_gain = torch.zeros_like(mx)
    best_s = torch.zeros_like(mx)
    for t in IQ2_TRIAL_DIVISORS:
        s = mxs / t
        _, sa, sb = _iq2_snap(A, B2, s)
        ok = (sa > 0) & (sb > 0)
        gain = torch.where(ok, sb * sb / torch.where(ok, sa, torch.ones_like(sa)), torch.zeros_like(sa))
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_s = torch.where(better, sb / torch.where(ok, sa, torch.ones_like(sa)), best_s)
    for _ in range(IQ2_REFINE):
        _, sa, sb = _iq2_snap(A, B2, torch.where(best_s > 0, best_s, torch.ones_like(best_s)))
        ok = (sa > 0) & (sb > 0) & (best_s > 0)
        best_s = torch.where(ok, sb / torch.where(ok, sa, torch.ones_like(sa)), best_s)
    best_s = torch.where(live, best_s, torch.zeros_like(best_s)).reshape(nsb, IQ2_GROUPS)

    # Super-block scale d = max/31 (fp16), 4-bit group codes; then re-snap at the stored scales.
    d = best_s.amax(1) / (2 * IQ2_SCALE_MAX + 1)
    d_b, d16 = _f16_bytes(d)
    dz = d16 <= 0
    dsafe = torch.where(dz, torch.ones_like(d16), d16)
    ls0 = torch.clamp(torch.round(0.5 * (best_s / dsafe[:, None] - 1.0)), 0, IQ2_SCALE_MAX).reshape(G)
    # The rounded code is not always the best once the octets re-snap: try its neighbours too.
    best_err = torch.full_like(ls0, float("inf"))
    ls = ls0.clone()
    idx = torch.zeros((G, IQ2_OCTETS), dtype=torch.int64, device=x.device)
    d16g = d16[:, None].expand(nsb, IQ2_GROUPS).reshape(G)
    for delta in IQ2_CODE_TRIES:
        lt = torch.clamp(ls0 + delta, 0, IQ2_SCALE_MAX)
        st = d16g * (2 * lt + 1)
        it, sa, sb = _iq2_snap(A, B2, torch.where(st > 0, st, torch.ones_like(st)))
        err = st * st * sa - 2 * st * sb
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        ls = torch.where(better, lt, ls)
        idx = torch.where(better[:, None], it, idx)
    ls = ls.reshape(nsb, IQ2_GROUPS)
    zero_sb = dz[:, None].expand(nsb, IQ2_GROUPS).reshape(G)
    idx = torch.where(zero_sb[:, None], torch.zeros_like(idx), idx)
    sign7 = torch.where(zero_sb[:, None], torch.zeros_like(sign7), sign7)
    ls = torch.where(dz[:, None], torch.zeros_like(ls), ls).reshape(G).to(torch.int64)

    aux1 = (sign7 << torch.tensor([0, 7, 14, 21], device=x.device)).sum(1) | (ls << 28)  # [G]
    aux0_bytes = idx.to(torch.uint8)  # [G, 4]: byte k of aux0 = grid index of octet k
    aux1_bytes = torch.stack([((aux1 >> (8 * k)) & 0xFF) for k in range(4)], 1).to(torch.uint8)
    qs = torch.cat([aux0_bytes, aux1_bytes], 1).reshape(nsb, QuantFormat.IQ2_XXS.type_size - 2)
    return torch.cat([d_b, qs], 1)
