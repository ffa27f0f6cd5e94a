"""Compact lossless row codecs for the KV state (model.md §5.3).

Attention rows (raw window and compressed) = nope E4M3 bytes + one UE8M0 exponent byte per 64-block +
rope dims as F16; indexer rows = E2M1 nibbles + one UE8M0 exponent per 32-block. The model's FP8/FP4
simulations (model.md §4.3.5, §4.3.8) and F16 rounding already put every cached value on these grids, so
`decode(encode(x))` reproduces x bit for bit; `encode` verifies that and refuses rows that are not.
Owns byte layouts and state-size arithmetic; knows nothing of attention math, pages or files.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..config import FP4_BLOCK, FP8_BLOCK, Config, LayerKind

E4M3_MAX = 448.0
E2M1_MAX = 6.0
UE8M0_BIAS = 127  # exponent byte b encodes the scale 2**(b - 127)
UE8M0_MIN_EXP = -127
UE8M0_MAX_EXP = 127  # byte 255 is NaN in UE8M0: never written
F16_BYTES = 2

_E4M3_LUT = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_E2M1_LUT = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


class NotRepresentableError(ValueError):
    """A row that is not on the compact grid (it did not pass the model's FP8/FP4 + F16 rounding)."""


def _block_exponents(blocks: np.ndarray, qmax: float) -> np.ndarray:
    """Smallest power-of-two exponent e per block with max|x| / 2**e <= qmax (all-zero blocks: e = 0)."""
    amax = np.abs(blocks).max(axis=-1).astype(np.float64)  # [N, B]
    nz = amax > 0
    safe = np.where(nz, amax, 1.0)
    e = np.ceil(np.log2(safe / qmax)).astype(np.int64)
    # log2 is inexact near powers of two: fix by exact ldexp comparisons
    e = np.where(np.ldexp(safe, -e) > qmax, e + 1, e)
    e = np.where(np.ldexp(safe, -(e - 1)) <= qmax, e - 1, e)
    e = np.where(nz, e, 0)
    return np.clip(e, UE8M0_MIN_EXP, UE8M0_MAX_EXP)


def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row bitwise equality of float32 arrays [N, ...] (distinguishes -0.0 and +0.0)."""
    eq = a.view(np.uint32) == b.view(np.uint32)
    return eq.reshape(a.shape[0], int(np.prod(a.shape[1:]))).all(axis=1)


def _check(rows: np.ndarray, back: np.ndarray, what: str) -> None:
    ok = _same_bits(np.ascontiguousarray(rows), back)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise NotRepresentableError(
            f"{len(bad)} of {len(ok)} {what} rows are not on the compact grid (first: row {int(bad[0])}); "
            "cache only rows that passed the model's FP8/FP4 simulation and F16 rounding")


@dataclass(frozen=True)
class AttnRowCodec:
    """Attention KV row [nope | rope]: nope dims FP8 E4M3 with per-64-block UE8M0 scale, rope dims F16."""

    nope_dim: int
    rope_dim: int
    block: int = FP8_BLOCK

    def __post_init__(self):
        assert self.nope_dim % self.block == 0, "nope dims must be whole FP8 blocks"

    @property
    def n_blocks(self) -> int:
        return self.nope_dim // self.block

    @property
    def head_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    @property
    def row_bytes(self) -> int:
        return self.nope_dim + self.n_blocks + self.rope_dim * F16_BYTES

    def encode(self, rows: np.ndarray, verify: bool = True) -> np.ndarray:
        """float32 [N, Dh] -> uint8 [N, row_bytes]; raises NotRepresentableError unless exact."""
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, self.head_dim)
        n = rows.shape[0]
        nope = rows[:, : self.nope_dim].reshape(n, self.n_blocks, self.block)
        e = _block_exponents(nope, E4M3_MAX)  # [N, B]
        q = np.ldexp(nope.astype(np.float64), -e[..., None]).astype(np.float32)
        out = np.empty((n, self.row_bytes), dtype=np.uint8)
        out[:, : self.nope_dim] = q.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).reshape(n, self.nope_dim)
        out[:, self.nope_dim : self.nope_dim + self.n_blocks] = (e + UE8M0_BIAS).astype(np.uint8)
        rope = rows[:, self.nope_dim :].astype(np.float16)
        out[:, self.nope_dim + self.n_blocks :] = rope.astype("<f2").view(np.uint8).reshape(n, self.rope_dim * F16_BYTES)
        if verify:
            _check(rows, self.decode(out), "attention")
        return out

    def decode(self, buf: np.ndarray) -> np.ndarray:
        """uint8 [N, row_bytes] -> float32 [N, Dh]."""
        buf = np.asarray(buf, dtype=np.uint8).reshape(-1, self.row_bytes)
        n = buf.shape[0]
        q = _E4M3_LUT[buf[:, : self.nope_dim]].reshape(n, self.n_blocks, self.block)
        e = buf[:, self.nope_dim : self.nope_dim + self.n_blocks].astype(np.int32) - UE8M0_BIAS
        out = np.empty((n, self.head_dim), dtype=np.float32)
        # q has <= 4 significant bits and the scale is a power of two: the float32 product is exact
        out[:, : self.nope_dim] = np.ldexp(q, e[..., None]).reshape(n, self.nope_dim)
        rope = np.ascontiguousarray(buf[:, self.nope_dim + self.n_blocks :]).view("<f2")
        out[:, self.nope_dim :] = rope.astype(np.float32)
        return out


@dataclass(frozen=True)
class IndexerRowCodec:
    """Indexer key row: E2M1 codes packed two per byte (element 2i in the low nibble), UE8M0 per 32-block."""

    dim: int
    block: int = FP4_BLOCK

    def __post_init__(self):
        assert self.dim % self.block == 0 and self.dim % 2 == 0

    @property
    def n_blocks(self) -> int:
        return self.dim // self.block

    @property
    def row_bytes(self) -> int:
        return self.dim // 2 + self.n_blocks

    def encode(self, rows: np.ndarray, verify: bool = True) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, self.dim)
        n = rows.shape[0]
        blocks = rows.reshape(n, self.n_blocks, self.block)
        e = _block_exponents(blocks, E2M1_MAX)
        q = np.ldexp(blocks.astype(np.float64), -e[..., None]).astype(np.float32)
        codes = q.astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(n, self.dim) & 0xF
        out = np.empty((n, self.row_bytes), dtype=np.uint8)
        out[:, : self.dim // 2] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        out[:, self.dim // 2 :] = (e + UE8M0_BIAS).astype(np.uint8)
        if verify:
            _check(rows, self.decode(out), "indexer")
        return out

    def decode(self, buf: np.ndarray) -> np.ndarray:
        buf = np.asarray(buf, dtype=np.uint8).reshape(-1, self.row_bytes)
        n = buf.shape[0]
        packed = buf[:, : self.dim // 2]
        codes = np.empty((n, self.dim), dtype=np.uint8)
        codes[:, 0::2] = packed & 0xF
        codes[:, 1::2] = packed >> 4
        q = _E2M1_LUT[codes].reshape(n, self.n_blocks, self.block)
        e = buf[:, self.dim // 2 :].astype(np.int32) - UE8M0_BIAS
        return np.ldexp(q, e[..., None]).reshape(n, self.dim).astype(np.float32)


def attn_codec(cfg: Config) -> AttnRowCodec:
    return AttnRowCodec(nope_dim=cfg.nope_dim, rope_dim=cfg.rope_dim)


def indexer_codec(cfg: Config) -> IndexerRowCodec:
    return IndexerRowCodec(dim=cfg.idx_dim)


def state_bytes_per_token(cfg: Config) -> float:
    """Compact bytes of state growth per token (compressed attention + indexer rows; model.md §5.3)."""
    a, ix = attn_codec(cfg).row_bytes, indexer_codec(cfg).row_bytes
    total = 0.0
    for layer in range(cfg.n_layer):
        kind = cfg.kind(layer)
        if kind == LayerKind.RATIO4:
            total += (a + ix) / kind.value
        elif kind == LayerKind.RATIO128:
            total += a / kind.value
    return total


def fp32_state_bytes_per_token(cfg: Config) -> float:
    """The same growth stored as float32 rows (ds4's layout, 13,760 B/token at Flash shapes)."""
    total = 0.0
    for layer in range(cfg.n_layer):
        kind = cfg.kind(layer)
        if kind == LayerKind.RATIO4:
            total += 4 * (cfg.head_dim + cfg.idx_dim) / kind.value
        elif kind == LayerKind.RATIO128:
            total += 4 * cfg.head_dim / kind.value
    return total
