"""Dequantization of GGUF rows: the numpy oracle (`dequantize_np`) and a vectorized torch twin
(`dequantize_torch`, any device) for F32, F16, BF16, I32, Q8_0, Q2_K, Q4_K and IQ2_XXS.

Both evaluate the decode formulas of quant.md §1 in float32 in the same order as `gguf.quants`
(e.g. Q2_K: (d*sc)*q - (dmin*m); IQ2_XXS: (d*(0.5+ls)*0.25)*grid*sign), so they are bit-exact with
it and with each other. Layouts only; knows nothing of backends, kernels or the model.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .formats import QK_K, QTensor, QuantFormat
from .tables import IQ2XXS_GRID, SIGN_VALUES

_CHUNK_BLOCKS = 1 << 16  # blocks decoded per numpy step: bounds temporaries on huge tensors

# Byte offsets inside one block (quant.md §1.1).
_Q2K_SCALES, _Q2K_QS, _Q2K_D, _Q2K_DMIN = 0, 16, 80, 82
_Q4K_D, _Q4K_DMIN, _Q4K_SCALES, _Q4K_QS = 0, 2, 4, 16
_IQ2_QS = 2
_IQ2_GROUPS = QK_K // 32  # 32-weight groups per super-block
_SIGN_SHIFTS = (0, 7, 14, 21)  # bit offset of the four 7-bit sign indices in aux1
_IQ2_SCALE_SHIFT = 28


def _f16(b: np.ndarray) -> np.ndarray:
    """[N, 2] uint8 little-endian half -> [N] float32."""
    return np.ascontiguousarray(b).view("<f2").reshape(b.shape[0]).astype(np.float32)


def _q8_0_np(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, :2])[:, None]
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    return q * d


def _q2_k_np(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc = b[:, _Q2K_SCALES:_Q2K_QS]
    d = _f16(b[:, _Q2K_D:_Q2K_DMIN])[:, None]
    dmin = _f16(b[:, _Q2K_DMIN:])[:, None]
    dl = (d * (sc & 15).astype(np.float32))[:, :, None]  # [N, 16, 1]
    ml = (dmin * (sc >> 4).astype(np.float32))[:, :, None]
    # weight 128h + 32s + l is bit pair s of byte qs[32h + l]
    qs = b[:, _Q2K_QS:_Q2K_D].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (qs & 3).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def q4_k_scale_min_np(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 12] packed Q4_K scale bytes -> (sc, m), each [N, 8] uint8 of 6-bit values."""
    s = scales.reshape(-1, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, m


def _q4_k_np(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _f16(b[:, _Q4K_D:_Q4K_DMIN])[:, None]
    dmin = _f16(b[:, _Q4K_DMIN:_Q4K_SCALES])[:, None]
    sc, m = q4_k_scale_min_np(b[:, _Q4K_SCALES:_Q4K_QS])
    dl = (d * sc.astype(np.float32))[:, :, None]  # [N, 8, 1]
    ml = (dmin * m.astype(np.float32))[:, :, None]
    # sub-block 2c is the low nibbles of qs[32c:32c+32], 2c+1 the high nibbles
    qs = b[:, _Q4K_QS:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 15).reshape(n, 8, 32).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


_GRID_F32 = IQ2XXS_GRID.astype(np.float32)


def _iq2_xxs_np(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _f16(b[:, :_IQ2_QS])
    words = np.ascontiguousarray(b[:, _IQ2_QS:]).view("<u4").reshape(n, _IQ2_GROUPS, 2)
    aux1 = words[:, :, 1]
    ls = (aux1 >> _IQ2_SCALE_SHIFT).astype(np.float32)
    db = (d[:, None] * (np.float32(0.5) + ls) * np.float32(0.25))[:, :, None, None]  # [N, 8, 1, 1]
    gidx = b[:, _IQ2_QS:].reshape(n, _IQ2_GROUPS, 8)[:, :, :4]  # aux0 bytes = grid indices
    sidx = (aux1[:, :, None] >> np.array(_SIGN_SHIFTS, np.uint32)) & 127
    return (db * _GRID_F32[gidx] * SIGN_VALUES[sidx]).reshape(n, QK_K)


_BLOCK_DECODERS_NP = {
    QuantFormat.Q8_0: _q8_0_np,
    QuantFormat.Q2_K: _q2_k_np,
    QuantFormat.Q4_K: _q4_k_np,
    QuantFormat.IQ2_XXS: _iq2_xxs_np,
}
_PLAIN_DTYPES = {
    QuantFormat.F32: np.dtype("<f4"),
    QuantFormat.F16: np.dtype("<f2"),
    QuantFormat.I32: np.dtype("<i4"),
}


def _check_raw(shape: tuple[int, ...], fmt: QuantFormat, n: int) -> int:
    rb = fmt.row_bytes(n)
    if not shape or shape[-1] != rb:
        raise ValueError(f"{fmt.name} rows of {n} weights take {rb} bytes, got raw array of shape {tuple(shape)}")
    return rb


def dequantize_np(raw: np.ndarray, fmt: QuantFormat, n: int) -> np.ndarray:
    """Raw uint8 rows [..., fmt.row_bytes(n)] -> float32 [..., n] (I32 -> int32). The test oracle."""
    fmt = QuantFormat(fmt)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    _check_raw(raw.shape, fmt, n)
    lead = raw.shape[:-1]
    if fmt in _PLAIN_DTYPES:
        vals = np.ascontiguousarray(raw).view(_PLAIN_DTYPES[fmt])
        out_dtype = np.int32 if fmt == QuantFormat.I32 else np.float32
        return vals.astype(out_dtype).reshape(*lead, n)
    if fmt == QuantFormat.BF16:
        bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(*lead, n)
    decode = _BLOCK_DECODERS_NP[fmt]
    blocks = raw.reshape(-1, fmt.type_size)
    out = np.empty((blocks.shape[0], fmt.block_size), dtype=np.float32)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[s : s + _CHUNK_BLOCKS] = decode(blocks[s : s + _CHUNK_BLOCKS])
    return out.reshape(*lead, n)


def dequantize(qt: QTensor) -> np.ndarray:
    """A QTensor's weights as float32 (int32 for I32) of shape qt.shape."""
    return dequantize_np(np.asarray(qt.data), qt.fmt, qt.shape[-1]).reshape(qt.shape)


# ---------------------------------------------------------------------------------------------- torch

_TORCH_TABLES: dict[Any, tuple[Any, Any]] = {}


def _torch_tables(device):
    """(grid float32 [256, 8], signs float32 [128, 8]) on `device`, built once per device."""
    import torch

    key = str(device)
    if key not in _TORCH_TABLES:
        _TORCH_TABLES[key] = (
            torch.from_numpy(_GRID_F32.copy()).to(device),
            torch.from_numpy(SIGN_VALUES.copy()).to(device),
        )
    return _TORCH_TABLES[key]


def _f16_t(b):
    import torch

    return b.contiguous().view(torch.float16).reshape(b.shape[0]).float()


def _u32_t(b):
    """[..., 4] uint8 little-endian -> int64 values of the uint32 words."""
    import torch

    b = b.to(torch.int64)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _q8_0_t(b):
    import torch

    d = _f16_t(b[:, :2])[:, None]
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _q2_k_t(b):
    import torch

    n = b.shape[0]
    sc = b[:, _Q2K_SCALES:_Q2K_QS]
    d = _f16_t(b[:, _Q2K_D:_Q2K_DMIN])[:, None]
    dmin = _f16_t(b[:, _Q2K_DMIN:])[:, None]
    dl = (d * (sc & 15).float())[:, :, None]
    ml = (dmin * (sc >> 4).float())[:, :, None]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    q = ((b[:, _Q2K_QS:_Q2K_D].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q4_k_t(b):
    import torch

    n = b.shape[0]
    d = _f16_t(b[:, _Q4K_D:_Q4K_DMIN])[:, None]
    dmin = _f16_t(b[:, _Q4K_DMIN:_Q4K_SCALES])[:, None]
    s = b[:, _Q4K_SCALES:_Q4K_QS].reshape(n, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    dl = (d * sc.float())[:, :, None]
    ml = (dmin * m.float())[:, :, None]
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1)
    q = ((b[:, _Q4K_QS:].reshape(n, 4, 1, 32) >> shifts) & 15).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _iq2_xxs_t(b):
    import torch

    n = b.shape[0]
    grid, signs = _torch_tables(b.device)
    d = _f16_t(b[:, :_IQ2_QS])
    qs = b[:, _IQ2_QS:].reshape(n, _IQ2_GROUPS, 8)
    aux1 = _u32_t(qs[:, :, 4:8])  # [N, 8]
    ls = (aux1 >> _IQ2_SCALE_SHIFT).float()
    db = (d[:, None] * (0.5 + ls) * 0.25)[:, :, None, None]
    shifts = torch.tensor(_SIGN_SHIFTS, dtype=torch.int64, device=b.device)
    sidx = (aux1[:, :, None] >> shifts) & 127
    gidx = qs[:, :, :4].to(torch.int64)
    return (db * grid[gidx] * signs[sidx]).reshape(n, QK_K)


_BLOCK_DECODERS_T = {
    QuantFormat.Q8_0: _q8_0_t,
    QuantFormat.Q2_K: _q2_k_t,
    QuantFormat.Q4_K: _q4_k_t,
    QuantFormat.IQ2_XXS: _iq2_xxs_t,
}


def dequantize_torch(raw, fmt: QuantFormat, n: int, dtype=None):
    """Raw uint8 tensor [..., fmt.row_bytes(n)] on any device -> [..., n] of `dtype` (default float32;
    I32 always gives int32). Computed in float32 like the oracle, then cast."""
    import torch

    fmt = QuantFormat(fmt)
    dtype = torch.float32 if dtype is None else dtype
    if raw.dtype != torch.uint8:
        raise TypeError(f"dequantize_torch wants a uint8 tensor of raw GGUF bytes, got {raw.dtype}")
    _check_raw(tuple(raw.shape), fmt, n)
    lead = tuple(raw.shape[:-1])
    if fmt == QuantFormat.I32:
        return raw.contiguous().view(torch.int32).reshape(*lead, n)
    if fmt in (QuantFormat.F32, QuantFormat.F16, QuantFormat.BF16):
        tdt = {QuantFormat.F32: torch.float32, QuantFormat.F16: torch.float16, QuantFormat.BF16: torch.bfloat16}[fmt]
        return raw.contiguous().view(tdt).reshape(*lead, n).to(torch.float32).to(dtype)
    blocks = raw.reshape(-1, fmt.type_size)
    out = _BLOCK_DECODERS_T[fmt](blocks)
    return out.to(dtype).reshape(*lead, n)
