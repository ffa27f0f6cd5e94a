"""MLX-ops twins of the Metal kernels in metal.py: the same functions, computed with MLX array ops.

Each twin takes the same inputs as its kernel (raw GGUF blocks as uint8 arrays, float32 activations)
and returns the same result; it runs on any MLX device (the Linux CPU build included) and is what the
dispatcher uses where Metal is not available. Block decoding follows quant.md §1 in float32 and in
the oracle's order ((d*sc)*q - dmin*m; (d*(0.5+ls)*0.25)*grid*sign), so decoded weights are bit-exact.
Knows block layouts and the HC/SwiGLU formulas of ops.py; knows nothing of the model or of Metal.
"""
from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from ..quant.formats import QK_K, QuantFormat
from ..quant.tables import IQ2XXS_GRID, SIGN_VALUES

# Byte offsets inside one block (quant.md §1.1).
_Q2K_SCALES, _Q2K_QS, _Q2K_D, _Q2K_DMIN = 0, 16, 80, 82
_IQ2_QS = 2
_IQ2_GROUPS = QK_K // 32
_IQ2_SIGN_SHIFTS = (0, 7, 14, 21)
_IQ2_SCALE_SHIFT = 28
_TWIN_GATHER_BUDGET = 1 << 26  # decoded floats per gathered-expert step (256 MiB) before chunking tokens


@lru_cache(maxsize=None)
def _iq2_tables() -> tuple[mx.array, mx.array]:
    """(grid [256, 8] f32 magnitudes, signs [128, 8] f32 of +-1), built once."""
    return mx.array(IQ2XXS_GRID.astype(np.float32)), mx.array(SIGN_VALUES)


@lru_cache(maxsize=None)
def _shifts() -> tuple[mx.array, mx.array]:
    """(Q2_K bit-pair shifts [1, 1, 4, 1] uint8, IQ2_XXS sign-index shifts [4] uint32), built once."""
    return (mx.array(np.array([0, 2, 4, 6], np.uint8)).reshape(1, 1, 4, 1),
            mx.array(np.array(_IQ2_SIGN_SHIFTS, np.uint32)))


def _half(b: mx.array) -> mx.array:
    """[..., 2] uint8 little-endian half -> [...] float32."""
    return mx.view(b, mx.float16).squeeze(-1).astype(mx.float32)


def _blocks(raw: mx.array, fmt: QuantFormat) -> tuple[mx.array, tuple[int, ...], int]:
    lead = tuple(raw.shape[:-1])
    nb = raw.shape[-1] // fmt.type_size
    return raw.reshape(-1, fmt.type_size), lead, nb * fmt.block_size


def dequant_q2_k(raw: mx.array) -> mx.array:
    """Raw Q2_K rows [..., 84*nb] uint8 -> float32 [..., 256*nb] (quant.md §1.4)."""
    b, lead, n = _blocks(raw, QuantFormat.Q2_K)
    nblk = b.shape[0]
    sc = b[:, _Q2K_SCALES:_Q2K_QS]
    d = _half(b[:, _Q2K_D:_Q2K_DMIN])[:, None]
    dmin = _half(b[:, _Q2K_DMIN:])[:, None]
    dl = (d * (sc & 15).astype(mx.float32))[:, :, None]  # [N, 16, 1]
    ml = (dmin * (sc >> 4).astype(mx.float32))[:, :, None]
    shifts = _shifts()[0]
    # weight 128h + 32s + l is bit pair s of byte qs[32h + l]
    q = ((b[:, _Q2K_QS:_Q2K_D].reshape(nblk, 2, 1, 32) >> shifts) & 3).reshape(nblk, 16, 16)
    return (dl * q.astype(mx.float32) - ml).reshape(*lead, n)


def dequant_iq2_xxs(raw: mx.array) -> mx.array:
    """Raw IQ2_XXS rows [..., 66*nb] uint8 -> float32 [..., 256*nb] (quant.md §1.6)."""
    b, lead, n = _blocks(raw, QuantFormat.IQ2_XXS)
    nblk = b.shape[0]
    grid, signs = _iq2_tables()
    d = _half(b[:, :_IQ2_QS])
    g = b[:, _IQ2_QS:].reshape(nblk, _IQ2_GROUPS, 8)
    gidx = g[:, :, :4].astype(mx.uint32)  # aux0 bytes: grid indices
    a = g[:, :, 4:].astype(mx.uint32)
    aux1 = a[:, :, 0] | (a[:, :, 1] << 8) | (a[:, :, 2] << 16) | (a[:, :, 3] << 24)
    ls = (aux1 >> _IQ2_SCALE_SHIFT).astype(mx.float32)
    db = (d[:, None] * (0.5 + ls) * 0.25)[:, :, None, None]  # [N, 8, 1, 1]
    sidx = (aux1[:, :, None] >> _shifts()[1]) & 127
    w = db * mx.take(grid, gidx, axis=0) * mx.take(signs, sidx, axis=0)  # [N, 8, 4, 8]
    return w.reshape(*lead, n)


TWIN_DECODERS = {QuantFormat.Q2_K: dequant_q2_k, QuantFormat.IQ2_XXS: dequant_iq2_xxs}


def raw_matmul(x: mx.array, raw: mx.array, fmt: QuantFormat) -> mx.array:
    """Twin of the decode GEMV kernels: x [T, in] @ dequant(raw [out, rb]).T -> [T, out], fp32."""
    return x @ TWIN_DECODERS[fmt](raw).T


def raw_gather_matmul(x: mx.array, raw: mx.array, fmt: QuantFormat, sel: mx.array) -> mx.array:
    """Twin of the expert-gathered kernels. raw [E, out, rb]; sel [T, K] expert ids;
    x [T, in] (shared by the K experts of a token) or [T, K, in] (one input per pair) -> [T, K, out].
    Many pairs (prefill): decode every expert once and gather_mm; few (decode): decode only the
    selected experts' blocks, in token chunks that bound the decoded floats."""
    t, k = sel.shape
    e, out_dim, n_in = raw.shape[0], raw.shape[1], x.shape[-1]
    xb = x[:, None, None, :] if x.ndim == 2 else x[:, :, None, :]  # [T, 1|K, 1, in]
    per_expert = out_dim * n_in
    if t * k >= e and e * per_expert <= _TWIN_GATHER_BUDGET:
        w = TWIN_DECODERS[fmt](raw)  # [E, out, in]
        return mx.gather_mm(xb, w.swapaxes(-1, -2), rhs_indices=sel).squeeze(-2)
    step = max(1, _TWIN_GATHER_BUDGET // max(1, k * per_expert))  # tokens per step
    parts = []
    for s in range(0, t, step):
        w = TWIN_DECODERS[fmt](raw[sel[s : s + step]])  # [t', K, out, in]
        parts.append((w @ xb[s : s + step].swapaxes(-1, -2)).squeeze(-1))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------- HC chain

def hc_sinkhorn(m: mx.array, scale: mx.array, base: mx.array, n_hc: int, iters: int, eps: float):
    """Controls m [T, (2+S)*S] -> (pre [T, S], post [T, S], comb [T, S, S]) as in ops.hc_pre."""
    s = n_hc
    pre = mx.sigmoid(m[:, :s] * scale[0] + base[:s]) + eps
    post = 2.0 * mx.sigmoid(m[:, s : 2 * s] * scale[1] + base[s : 2 * s])
    c = (m[:, 2 * s :] * scale[2] + base[2 * s :]).reshape(-1, s, s)
    c = mx.softmax(c, axis=-1, precise=True) + eps
    c = c / (c.sum(axis=1, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(axis=2, keepdims=True) + eps)
        c = c / (c.sum(axis=1, keepdims=True) + eps)
    return pre, post, c


def hc_weighted_sum(X: mx.array, a: mx.array) -> mx.array:
    """X [T, S, D], a [T, S] -> [T, D] = sum_s a_s X[s]."""
    return (a[:, :, None] * X).sum(axis=1)


def hc_post(X: mx.array, y: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """X [T, S, D], y [T, D] -> X'[t, c] = post[t, c] * y[t] + sum_r comb[t, r, c] * X[t, r]."""
    return post[:, :, None] * y[:, None, :] + mx.einsum("trc,trd->tcd", comb, X)


# ------------------------------------------------------------------------------ elementwise chains

def swiglu(gate: mx.array, up: mx.array, clamp: float, weights: mx.array | None = None) -> mx.array:
    """silu(min(gate, clamp)) * clip(up, -clamp, clamp) [* weights[..., None]]."""
    g = mx.minimum(gate, clamp)
    h = g * mx.sigmoid(g) * mx.clip(up, -clamp, clamp)
    return h if weights is None else h * weights[..., None]
