"""Dequantizers (numpy oracle and torch) bit-exact against `gguf.quants.dequantize`.

Random blocks (>= 10,000 per format, finite f16 scales of every sign and magnitude incl. zero and
subnormals) plus hand-built edge blocks: zero/negative d and dmin, all-max nibbles, and every
IQ2_XXS grid index x sign pattern x group scale. Floats are compared as bit patterns (NaN-safe).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import IQ2_XXS as GgufIQ2XXS
from gguf.quants import dequantize as gguf_dequantize

from dsv4.quant.dequant import dequantize, dequantize_np, dequantize_torch
from dsv4.quant.formats import QTensor, QuantFormat
from dsv4.quant.tables import IQ2XXS_GRID, IQ2XXS_GRID_U64, KSIGNS_IQ2XS
from tests.tolerances import assert_close

N_RANDOM_BLOCKS = 10240
BLOCK_FORMATS = [QuantFormat.Q8_0, QuantFormat.Q2_K, QuantFormat.Q4_K, QuantFormat.IQ2_XXS]
# byte offsets of the fp16 fields (d, dmin) inside each block
F16_FIELDS = {QuantFormat.Q8_0: (0,), QuantFormat.Q2_K: (80, 82), QuantFormat.Q4_K: (0, 2), QuantFormat.IQ2_XXS: (0,)}
CANON_NAN = np.uint32(0x7FC00000)


def as_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint32 bit patterns with every NaN mapped to one canonical pattern."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.isnan(x), CANON_NAN, x.view(np.uint32))


def assert_bit_exact(actual, expected, what: str) -> None:
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN positions differ"
    assert_close(as_bits(actual), as_bits(expected), "dequant", "all", what)


def finite_f16_bits(rng, n: int) -> np.ndarray:
    """Random finite half-precision bit patterns (both signs, zeros, subnormals, up to 65504)."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    exp_all_ones = (bits & 0x7C00) == 0x7C00
    bits[exp_all_ones] &= 0xBFFF  # clear the top exponent bit: finite, same sign
    return bits


def random_blocks(fmt: QuantFormat, n_blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        raw[:, off : off + 2] = finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw


def set_f16(raw: np.ndarray, off: int, values) -> None:
    raw[:, off : off + 2] = np.asarray(values, dtype=np.float16).reshape(-1).view(np.uint8).reshape(-1, 2)


def edge_blocks(fmt: QuantFormat) -> np.ndarray:
    """Blocks with zero/negative/extreme scales and all-zero / all-max codes."""
    scale_values = [0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 6e-8, -3.5e-5, 0.0123]
    fills = [0x00, 0xFF, 0x55, 0xAA, 0x0F, 0xF0]
    rows = []
    for dv in scale_values:
        for mv in scale_values[:4]:
            for fill in fills:
                b = np.full((1, fmt.type_size), fill, dtype=np.uint8)
                offs = F16_FIELDS[fmt]
                set_f16(b, offs[0], [dv])
                if len(offs) > 1:
                    set_f16(b, offs[1], [mv])
                rows.append(b)
    return np.concatenate(rows)


def iq2_all_patterns() -> np.ndarray:
    """Every (grid index, sign index) pair once, cycling the 16 group scales: 256*128/32 = 1024 blocks."""
    g = np.repeat(np.arange(256), 128)
    s = np.tile(np.arange(128), 256)
    n_blocks = g.size // 32
    g = g.reshape(n_blocks, 8, 4)
    s = s.reshape(n_blocks, 8, 4).astype(np.uint32)
    ls = (np.arange(n_blocks * 8) % 16).reshape(n_blocks, 8).astype(np.uint32)
    aux0 = (g.astype(np.uint32) << np.array([0, 8, 16, 24], np.uint32)).sum(-1, dtype=np.uint32)
    aux1 = (s << np.array([0, 7, 14, 21], np.uint32)).sum(-1, dtype=np.uint32) | (ls << 28)
    words = np.stack([aux0, aux1], -1).astype("<u4").reshape(n_blocks, 16)
    raw = np.empty((n_blocks, 66), dtype=np.uint8)
    d = np.where(np.arange(n_blocks) % 2 == 0, 0.75, -1.25).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(n_blocks, 2)
    raw[:, 2:] = words.view(np.uint8)
    return raw


def check_against_gguf(raw_blocks: np.ndarray, fmt: QuantFormat, what: str) -> None:
    """Decode as rows of several blocks with numpy and torch and compare both to gguf, bit for bit."""
    per_row = 4 if raw_blocks.shape[0] % 4 == 0 else 1
    rows = raw_blocks.reshape(-1, per_row * fmt.type_size)
    n = per_row * fmt.block_size
    expected = gguf_dequantize(rows, GGMLQuantizationType(int(fmt)))
    got_np = dequantize_np(rows, fmt, n)
    assert got_np.dtype == np.float32 and got_np.shape == (rows.shape[0], n)
    assert_bit_exact(got_np, expected, f"{what} numpy")
    got_t = dequantize_torch(torch.from_numpy(rows.copy()), fmt, n)
    assert got_t.dtype == torch.float32
    assert_bit_exact(got_t.numpy(), expected, f"{what} torch")


@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=lambda f: f.name)
def test_random_blocks_bit_exact(fmt):
    raw = random_blocks(fmt, N_RANDOM_BLOCKS, seed=int(fmt))
    check_against_gguf(raw, fmt, f"{fmt.name} random")


@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=lambda f: f.name)
def test_edge_blocks_bit_exact(fmt):
    raw = edge_blocks(fmt)
    check_against_gguf(raw, fmt, f"{fmt.name} edge")
    # the edge set really holds the cases it claims
    d = raw[:, F16_FIELDS[fmt][0] : F16_FIELDS[fmt][0] + 2].copy().view(np.float16).ravel()
    code_bytes = np.ones(fmt.type_size, bool)
    for off in F16_FIELDS[fmt]:
        code_bytes[off : off + 2] = False
    assert (d == 0).any() and (d < 0).any() and (raw[:, code_bytes] == 0xFF).all(axis=1).any()


def test_iq2_xxs_every_grid_index_and_sign():
    raw = iq2_all_patterns()
    check_against_gguf(raw, QuantFormat.IQ2_XXS, "IQ2_XXS all grid x sign")
    # the builder really covers all 256 x 128 (grid index, sign index) pairs
    words = raw[:, 2:].copy().view("<u4").reshape(-1, 8, 2)
    g = raw[:, 2:].reshape(-1, 8, 8)[:, :, :4].astype(np.int64)
    s = (words[:, :, 1:2] >> np.array([0, 7, 14, 21], np.uint32)) & 127
    assert np.unique(g * 128 + s).size == 256 * 128


@pytest.mark.parametrize("fmt", [QuantFormat.F32, QuantFormat.F16, QuantFormat.BF16], ids=lambda f: f.name)
def test_plain_float_formats(fmt):
    rng = np.random.default_rng(int(fmt) + 100)
    n = 96
    raw = rng.integers(0, 256, (N_RANDOM_BLOCKS // 16, n * fmt.type_size), dtype=np.uint8)
    expected = gguf_dequantize(raw.view({QuantFormat.F32: np.float32, QuantFormat.F16: np.float16,
                                         QuantFormat.BF16: np.uint8}[fmt]) if fmt != QuantFormat.BF16 else raw,
                               GGMLQuantizationType(int(fmt))).astype(np.float32)
    got_np = dequantize_np(raw, fmt, n)
    assert_bit_exact(got_np, expected, f"{fmt.name} numpy")
    got_t = dequantize_torch(torch.from_numpy(raw), fmt, n)
    assert_bit_exact(got_t.numpy(), expected, f"{fmt.name} torch")


def test_i32_is_integer():
    vals = np.array([[0, -1, 2**31 - 1, -(2**31), 129279, 7]], dtype="<i4")
    raw = vals.view(np.uint8)
    got = dequantize_np(raw, QuantFormat.I32, 6)
    assert got.dtype == np.int32 and np.array_equal(got, vals)
    got_t = dequantize_torch(torch.from_numpy(raw.copy()), QuantFormat.I32, 6)
    assert got_t.dtype == torch.int32 and np.array_equal(got_t.numpy(), vals)


def test_qtensor_3d_and_torch_dtype():
    """A 3-D expert tensor through `dequantize(QTensor)`, and a non-float32 torch output dtype."""
    fmt = QuantFormat.Q4_K
    raw = random_blocks(fmt, 3 * 5 * 2, seed=11).reshape(3, 5, 2 * fmt.type_size)
    qt = QTensor.from_bytes(raw, fmt, (3, 5, 512))
    expected = gguf_dequantize(raw, GGMLQuantizationType.Q4_K)
    assert_bit_exact(dequantize(qt), expected, "Q4_K 3-D QTensor")
    half = dequantize_torch(torch.from_numpy(raw.copy()), fmt, 512, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.shape == (3, 5, 512)
    with np.errstate(over="ignore"):  # huge random scales overflow f16 to inf, in both
        expected_half = expected.astype(np.float16).astype(np.float32)
    assert_bit_exact(half.float().numpy(), expected_half, "Q4_K -> f16")


def test_wrong_row_bytes_rejected():
    with pytest.raises(ValueError, match="Q2_K rows of 256 weights take 84 bytes"):
        dequantize_np(np.zeros((2, 85), np.uint8), QuantFormat.Q2_K, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        dequantize_np(np.zeros((2, 84), np.uint8), QuantFormat.Q2_K, 100)


def test_tables_match_gguf():
    GgufIQ2XXS.init_grid()
    assert np.array_equal(GgufIQ2XXS.grid.reshape(256, 8), IQ2XXS_GRID.astype(np.float32))
    assert np.array_equal(np.frombuffer(GgufIQ2XXS.ksigns, np.uint8), KSIGNS_IQ2XS)
    assert int(IQ2XXS_GRID_U64[0]) == 0x0808080808080808
    assert set(np.unique(IQ2XXS_GRID)) == {8, 25, 43}
