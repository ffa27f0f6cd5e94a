"""Exact lowering of Q8_0 and Q4_K GGUF blocks to MLX's affine quantized layout (group size 32).

MLX affine dequantization is `w = scale * q + bias` per group of 32, with q unsigned and packed
little-endian into uint32 words (element i of a word at bits bits*i). Both formats fit exactly:
  Q8_0: w = d*q (q int8)            -> q' = q + 128 (= q XOR 0x80), scale = d,    bias = -128*d
  Q4_K: w = (d*sc)*q - dmin*m       -> q' = q,                       scale = d*sc, bias = -(dmin*m)
Scales and biases are float32: d*sc and dmin*m carry 17 significant bits, which fp16/bf16 cannot
hold (quant.md §6 q9), while float32 holds every product exactly, so `scale*q + bias` rounds once,
exactly like the oracle's `dl*q - ml`. Knows the block layouts; knows nothing of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..quant.formats import QK_K, QuantFormat

AFFINE_GROUP = 32  # MLX group size used for both formats (the Q8_0 block / the Q4_K sub-block)
_Q8_SIGN_FLIP = np.uint8(0x80)  # int8 q -> uint8 q + 128 is a flip of the sign bit
_Q8_OFFSET = np.float32(-128.0)
_Q4K_D, _Q4K_DMIN, _Q4K_SCALES, _Q4K_QS = 0, 2, 4, 16
_REPACK_CHUNK_ROWS = 4096  # rows converted per numpy step: bounds temporaries on large tensors


@dataclass
class AffineWeight:
    """One weight in MLX affine form: wq uint32 [..., out, in*bits/32], scales/biases f32 [..., out, in/32]."""

    wq: Any
    scales: Any
    biases: Any
    bits: int
    group_size: int = AFFINE_GROUP

    @property
    def nbytes(self) -> int:
        return int(self.wq.nbytes + self.scales.nbytes + self.biases.nbytes)


def _f16_field(b: np.ndarray, off: int) -> np.ndarray:
    """[..., nb, block] uint8 -> [..., nb] float32 of the little-endian half at byte `off` of each block."""
    return np.ascontiguousarray(b[..., off : off + 2]).view("<f2")[..., 0].astype(np.float32)


def _q8_0_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = raw.shape[0]
    b = raw.reshape(r, -1, QuantFormat.Q8_0.type_size)
    d = _f16_field(b, 0)  # [r, nb]
    codes = b[:, :, 2:] ^ _Q8_SIGN_FLIP  # [r, nb, 32] uint8 = q + 128
    wq = np.ascontiguousarray(codes).reshape(r, -1).view("<u4")
    return wq, d, d * _Q8_OFFSET


def q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] packed Q4_K scale bytes -> (sc, m), each [..., 8] uint8 (quant.md §1.5)."""
    lo, mid, hi = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def _q4_k_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = raw.shape[0]
    b = raw.reshape(r, -1, QuantFormat.Q4_K.type_size)
    nb = b.shape[1]
    d = _f16_field(b, _Q4K_D)[..., None]
    dmin = _f16_field(b, _Q4K_DMIN)[..., None]
    sc, m = q4_k_scale_min(b[..., _Q4K_SCALES:_Q4K_QS])
    scale = d * sc.astype(np.float32)  # [r, nb, 8], exact in float32
    bias = -(dmin * m.astype(np.float32))
    # sub-block 2c = low nibbles of qs[32c:32c+32], 2c+1 = high nibbles: codes in weight order
    qs = b[..., _Q4K_QS:].reshape(r, nb, 4, 1, 32)
    codes = ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15).reshape(r, nb * QK_K)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # MLX: element 2i low nibble, 2i+1 high
    wq = np.ascontiguousarray(packed).view("<u4")
    return wq, scale.reshape(r, -1), bias.reshape(r, -1)


_ROW_REPACKERS = {QuantFormat.Q8_0: (_q8_0_rows, 8), QuantFormat.Q4_K: (_q4_k_rows, 4)}
EXACT_AFFINE_FORMATS = frozenset(_ROW_REPACKERS)


def repack_affine_np(raw: np.ndarray, fmt: QuantFormat, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Raw GGUF rows [..., row_bytes(n)] of Q8_0 or Q4_K -> numpy (wq, scales, biases, bits) in MLX layout."""
    fmt = QuantFormat(fmt)
    if fmt not in _ROW_REPACKERS:
        raise ValueError(f"{fmt.name} has no exact MLX affine layout (only {sorted(f.name for f in _ROW_REPACKERS)})")
    raw = np.asarray(raw)
    assert raw.dtype == np.uint8 and raw.shape[-1] == fmt.row_bytes(n), (raw.shape, fmt, n)
    lead = raw.shape[:-1]
    rows = raw.reshape(-1, raw.shape[-1])
    fn, bits = _ROW_REPACKERS[fmt]
    wq = np.empty((rows.shape[0], n * bits // 32), np.uint32)
    scales = np.empty((rows.shape[0], n // AFFINE_GROUP), np.float32)
    biases = np.empty_like(scales)
    for s in range(0, rows.shape[0], _REPACK_CHUNK_ROWS):
        wq[s : s + _REPACK_CHUNK_ROWS], scales[s : s + _REPACK_CHUNK_ROWS], biases[s : s + _REPACK_CHUNK_ROWS] = fn(
            rows[s : s + _REPACK_CHUNK_ROWS]
        )
    return wq.reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1), bits


def repack_affine(raw: np.ndarray, fmt: QuantFormat, n: int) -> AffineWeight:
    """Raw GGUF rows of Q8_0 / Q4_K -> AffineWeight of MLX arrays (for mx.quantized_matmul / gather_qmm)."""
    import mlx.core as mx

    wq, scales, biases, bits = repack_affine_np(raw, fmt, n)
    return AffineWeight(mx.array(wq), mx.array(scales), mx.array(biases), bits)


def dequantize_affine(w: AffineWeight):
    """The MLX dequantization of a repacked weight (float32), used to prove the repack exact."""
    import mlx.core as mx

    return mx.dequantize(w.wq, w.scales, w.biases, group_size=w.group_size, bits=w.bits)
