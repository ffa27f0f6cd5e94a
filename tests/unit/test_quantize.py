"""Quantizers: Q8_0 / plain formats byte-identical to gguf-py; K and IQ2_XXS quality against ggml's
reference figures (issue #9) on seeded Gaussian and Student-t (nu=4) 512x4096 matrices, decoded with
gguf's own dequantizer; importance weights act where they should; degenerate rows stay exact.

Run with -s to see the relative RMSE and throughput table.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from dsv4.quant.dequant import dequantize_np
from dsv4.quant.formats import QuantFormat as F
from dsv4.quant.quantize import quantize_np, quantize_torch
from tests.tolerances import assert_close, tol

ROWS, COLS = 512, 4096
# ggml reference relative RMSE (Gaussian, Student-t nu=4), issue #9
REFERENCE = {
    (F.Q8_0, False): (0.00535, 0.00731),
    (F.Q4_K, False): (0.0713, 0.0866),
    (F.Q4_K, True): (0.0708, 0.0861),
    (F.Q2_K, False): (0.296, 0.343),
    (F.Q2_K, True): (0.268, 0.302),
    (F.IQ2_XXS, True): (0.344, 0.420),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two spinning intra-op threads on a shared 2-core box stall badly; results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def matrices():
    rng = np.random.default_rng(1234)
    return {
        "gauss": rng.standard_normal((ROWS, COLS)).astype(np.float32),
        "student4": rng.standard_t(4, (ROWS, COLS)).astype(np.float32),
    }


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


def gguf_decode(q: np.ndarray, fmt: F) -> np.ndarray:
    return gguf_dequantize(q, GGMLQuantizationType(int(fmt)))


@pytest.mark.parametrize("fmt,use_imp", list(REFERENCE), ids=lambda v: v.name if isinstance(v, F) else ("imp" if v else "plain"))
def test_quality_vs_ggml_reference(matrices, fmt, use_imp):
    bound = 1.0 + tol("quant_rmse", "vs_ggml").rtol
    lines = []
    for (name, x), ref in zip(matrices.items(), REFERENCE[(fmt, use_imp)]):
        imp = (x * x).sum(0) if use_imp else None
        t0 = time.perf_counter()
        q = quantize_np(x, fmt, imp)
        dt = time.perf_counter() - t0
        assert q.dtype == np.uint8 and q.shape == (ROWS, fmt.row_bytes(COLS))
        y = gguf_decode(q, fmt)  # the standard decoder must accept the blocks
        assert np.isfinite(y).all()
        err = rel_rmse(x, y)
        lines.append(f"{fmt.name:8s} {'imp' if use_imp else '   '} {name:9s} rel RMSE {err:.5f} "
                     f"(ggml {ref:.5f}, ratio {err / ref:.3f}) {x.size / dt / 1e6:7.2f} Mw/s")
        assert err <= ref * bound, f"{lines[-1]}: above {bound:.2f}x the ggml reference"
        if name == "gauss":  # our decoder agrees with gguf's on what we wrote
            assert_close(dequantize_np(q[:64], fmt, COLS).view(np.uint32), y[:64].view(np.uint32), "dequant", "all",
                         f"{fmt.name} own decode of quantized rows")
    print("\n" + "\n".join(lines))


def test_q8_0_bytes_identical_to_gguf():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 1024)).astype(np.float32) * 3
    x[0] = 0.0  # all-zero blocks: d = 0
    x[1, :32] = np.arange(32) - 15.5  # values landing on .5 after scaling (roundf ties)
    x[2] = rng.standard_t(2, 1024).astype(np.float32) * 1e4
    x[3, ::7] = -1e-30  # tiny magnitudes
    expected = gguf_quantize(x, GGMLQuantizationType.Q8_0)
    got = quantize_np(x, F.Q8_0)
    assert got.shape == expected.shape and np.array_equal(got, expected), \
        f"{int((got != expected).sum())} bytes differ from gguf.quants.quantize"
    got_t = quantize_torch(torch.from_numpy(x), F.Q8_0).numpy()
    assert np.array_equal(got_t, expected), f"torch: {int((got_t != expected).sum())} bytes differ"


@pytest.mark.parametrize("fmt", [F.F32, F.F16, F.BF16], ids=lambda f: f.name)
def test_plain_formats_match_gguf(fmt):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 96)) * 100).astype(np.float32)
    x[0, :4] = [np.inf, -np.inf, np.nan, 1e-42]
    expected = np.ascontiguousarray(gguf_quantize(x, GGMLQuantizationType(int(fmt)))).view(np.uint8).reshape(8, -1)
    for got in (quantize_np(x, fmt), quantize_torch(torch.from_numpy(x), fmt).numpy()):
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("fmt", [F.Q2_K, F.Q4_K, F.IQ2_XXS], ids=lambda f: f.name)
def test_importance_steers_error(fmt):
    """Columns given 100x the importance come out with clearly lower error than with flat importance."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    hot = (np.arange(512) % 8) == 0  # one column in eight, spread over all sub-blocks
    flat = np.ones(512, np.float32)
    steer = np.where(hot, 100.0, 1.0).astype(np.float32)
    e_flat = gguf_decode(quantize_np(x, fmt, flat), fmt) - x
    e_steer = gguf_decode(quantize_np(x, fmt, steer), fmt) - x
    mse_flat, mse_steer = float((e_flat[:, hot] ** 2).mean()), float((e_steer[:, hot] ** 2).mean())
    assert mse_steer < 0.8 * mse_flat, f"{fmt.name}: hot-column MSE {mse_steer:.4g} vs flat {mse_flat:.4g}"


@pytest.mark.parametrize("fmt", [F.Q2_K, F.Q4_K, F.IQ2_XXS], ids=lambda f: f.name)
def test_zero_importance_columns_still_fitted(fmt):
    """Columns with zero importance (dead imatrix inputs) are fitted as with flat weights, not zeroed."""
    x = np.random.default_rng(6).standard_normal((8, 512)).astype(np.float32)
    imp = np.r_[np.zeros(256), np.ones(256)].astype(np.float32)
    for w in (imp, np.zeros(512, np.float32)):
        y = gguf_decode(quantize_np(x, fmt, w), fmt)
        assert rel_rmse(x[:, :256], y[:, :256]) < 1.1 * REFERENCE[(fmt, True)][0]


def test_iq2_xxs_default_importance_is_column_energy():
    x = np.random.default_rng(9).standard_normal((16, 512)).astype(np.float32)
    assert np.array_equal(quantize_np(x, F.IQ2_XXS), quantize_np(x, F.IQ2_XXS, (x * x).sum(0)))


@pytest.mark.parametrize("fmt", [F.Q8_0, F.Q2_K, F.Q4_K, F.IQ2_XXS], ids=lambda f: f.name)
def test_degenerate_rows(fmt):
    """Zero rows decode to exact zeros; constant, one-outlier and tiny rows decode finite and close."""
    rng = np.random.default_rng(11)
    x = np.zeros((5, 512), np.float32)
    x[1] = 0.25  # constant
    x[2] = rng.standard_normal(512).astype(np.float32) * 1e-3
    x[2, 100] = 50.0  # one outlier
    x[3] = rng.standard_normal(512).astype(np.float32) * 1e-3  # small: scales in the fp16 subnormal range
    x[4] = -np.abs(rng.standard_normal(512)).astype(np.float32)  # all negative
    imp = np.ones(512, np.float32)
    y = gguf_decode(quantize_np(x, fmt, imp if fmt != F.Q8_0 else None), fmt)
    assert np.isfinite(y).all()
    assert np.array_equal(y[0], np.zeros(512, np.float32)), "zero row must stay exactly zero"
    assert abs(y[2, 100] - 50.0) < 0.2 * 50.0, f"outlier decoded as {y[2, 100]}"
    limit = {F.Q8_0: 0.01, F.Q4_K: 0.1, F.Q2_K: 0.5, F.IQ2_XXS: 0.6}[fmt]
    for r in (3, 4):
        assert rel_rmse(x[r], y[r]) < limit, f"row {r}: rel RMSE {rel_rmse(x[r], y[r]):.3f}"
    if fmt != F.IQ2_XXS:  # IQ2_XXS has no zero level: a constant row costs ~|c|/3
        assert rel_rmse(x[1], y[1]) < limit


def test_bad_inputs():
    x = np.zeros((2, 100), np.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_np(x, F.Q4_K)
    with pytest.raises(ValueError, match="one value per column"):
        quantize_np(np.zeros((2, 256), np.float32), F.Q2_K, np.ones(128, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_np(np.zeros(256, np.float32), F.Q8_0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        quantize_np(np.zeros((2, 256), np.float32), F.Q4_K, -np.ones(256, np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_np(np.full((2, 256), np.nan, np.float32), F.IQ2_XXS)
