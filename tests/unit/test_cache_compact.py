"""Compact KV row codecs: bit-exact round trip of rows simulated exactly as model.md §4.3.5 / §4.3.8
(ml_dtypes casts, power-of-two scales, F16 rounding of cached rows), sizes at tiny and Flash shapes, and
refusal of rows that are not on the grid."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from dsv4.cache.compact import (AttnRowCodec, IndexerRowCodec, NotRepresentableError, attn_codec, indexer_codec,
                                state_bytes_per_token)
from dsv4.config import FP4_AMAX_FLOOR, FP8_AMAX_FLOOR, flash, tiny
from tests.tolerances import assert_close

FLASH_TARGET_BYTES_PER_TOKEN = 3500.0


def fp8_sim(x: np.ndarray, nope: int) -> np.ndarray:
    """model.md §4.3.5, written from the spec: 64-blocks, amax floor 1e-4, scale 2^ceil(log2(amax/448))."""
    x = x.astype(np.float32).copy()
    n = x.shape[0]
    b = x[:, :nope].reshape(n, -1, 64)
    amax = np.maximum(np.abs(b).max(-1, keepdims=True), np.float32(FP8_AMAX_FLOOR))
    scale = np.exp2(np.ceil(np.log2(amax / np.float32(448.0)))).astype(np.float32)
    q = np.clip(b / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    x[:, :nope] = (q * scale).reshape(n, nope)
    return x


def fp4_sim(x: np.ndarray) -> np.ndarray:
    """model.md §4.3.8 FP4 part: 32-blocks, amax floor, scale 2^ceil(log2(amax/6)), E2M1 ties-to-even."""
    n = x.shape[0]
    b = x.astype(np.float32).reshape(n, -1, 32)
    amax = np.maximum(np.abs(b).max(-1, keepdims=True), np.float32(FP4_AMAX_FLOOR))
    scale = np.exp2(np.ceil(np.log2(amax / np.float32(6.0)))).astype(np.float32)
    q = np.clip(b / scale, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return (q * scale).reshape(x.shape)


def f16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _rows(rng, n, dim):
    """Rows across magnitudes: rms-normed-like, tiny (amax floors, F16 subnormals), huge, zero, mixed blocks."""
    mags = rng.choice([1e-9, 1e-6, 3e-5, 1e-3, 0.05, 1.0, 7.0, 300.0, 1e4], size=(n, 1)).astype(np.float32)
    x = rng.standard_normal((n, dim)).astype(np.float32) * mags
    x[0] = 0.0
    x[1, ::2] = -0.0
    x[2, : dim // 2] *= 1e-7  # one block near zero, another large
    x[3] = np.float32(448.0) * 2.0 ** rng.integers(-30, 10)  # exact powers-of-two edge
    return x


@pytest.mark.parametrize("cfg_name,f16", [("tiny", True), ("tiny", False), ("flash", True), ("flash", False)])
def test_attention_rows_round_trip_bit_exact(cfg_name, f16):
    cfg = {"tiny": tiny, "flash": flash}[cfg_name]()
    codec = attn_codec(cfg)
    rng = np.random.default_rng(11)
    rows = fp8_sim(_rows(rng, 4000, cfg.head_dim), cfg.nope_dim)
    # rope dims are F16 in the compact form: the model caches F16-rounded rows (§4.3.3, §7)
    rows[:, cfg.nope_dim:] = f16_round(rows[:, cfg.nope_dim:])
    if f16:
        rows = f16_round(rows)
    out = np.full_like(rows, np.nan)
    out[:] = codec.decode(codec.encode(rows))
    assert_close(out, rows, "kv_cache", "bitexact", "attention rows after encode/decode")
    assert np.array_equal(out.view(np.uint32), rows.view(np.uint32)), \
        f"{int((out.view(np.uint32) != rows.view(np.uint32)).sum())} elements differ bitwise"


@pytest.mark.parametrize("f16", [True, False])
def test_indexer_rows_round_trip_bit_exact(f16):
    codec = indexer_codec(flash())
    rng = np.random.default_rng(12)
    rows = fp4_sim(_rows(rng, 4000, 128))
    if f16:
        rows = f16_round(rows)
    out = np.full_like(rows, np.nan)
    out[:] = codec.decode(codec.encode(rows))
    assert_close(out, rows, "kv_cache", "bitexact", "indexer rows after encode/decode")
    assert np.array_equal(out.view(np.uint32), rows.view(np.uint32))


def test_row_sizes_and_flash_state_per_token():
    assert attn_codec(flash()).row_bytes == 448 + 7 + 64 * 2 == 583
    assert indexer_codec(flash()).row_bytes == 64 + 4 == 68
    assert attn_codec(tiny()).row_bytes == 64 + 1 + 128
    per_tok = state_bytes_per_token(flash())
    expected = 21 * (583 + 68) / 4 + 20 * 583 / 128
    assert math.isclose(per_tok, expected), (per_tok, expected)
    assert abs(per_tok - FLASH_TARGET_BYTES_PER_TOKEN) / FLASH_TARGET_BYTES_PER_TOKEN < 0.05, per_tok


def test_layout_is_the_documented_one():
    """Byte layout pinned: [E4M3 codes | UE8M0 exponent bytes | F16 little-endian rope]."""
    codec = AttnRowCodec(nope_dim=64, rope_dim=2)
    row = np.zeros((1, 66), np.float32)
    row[0, 0] = 448.0 * 2.0 ** -3  # amax/448 = 2^-3 -> exponent byte 124, code of 448 = 0x7e
    row[0, 1] = -0.0
    row[0, 64] = 1.0
    b = codec.encode(row)[0]
    assert b[0] == 0x7E and b[1] == 0x80 and b[64] == 127 - 3
    assert bytes(b[65:67]) == np.float16(1.0).tobytes()


def test_off_grid_rows_are_refused():
    codec = attn_codec(tiny())
    rng = np.random.default_rng(13)
    rows = rng.standard_normal((8, 128)).astype(np.float32)  # not FP8-simulated
    with pytest.raises(NotRepresentableError):
        codec.encode(rows)
    idx = IndexerRowCodec(dim=128)
    with pytest.raises(NotRepresentableError):
        idx.encode(rng.standard_normal((8, 128)).astype(np.float32))


def test_zero_rows_encode_and_decode():
    """A session before its first compressed row snapshots empty row arrays."""
    a, i = attn_codec(tiny()), indexer_codec(tiny())
    assert a.encode(np.zeros((0, 128), np.float32)).shape == (0, a.row_bytes)
    assert a.decode(np.zeros((0, a.row_bytes), np.uint8)).shape == (0, 128)
    assert i.decode(i.encode(np.zeros((0, 128), np.float32))).shape == (0, 128)
