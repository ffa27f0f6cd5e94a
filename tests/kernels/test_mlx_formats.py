"""MLX backend formats: exact repacks and the MLX-ops twins of the Metal kernels (CPU MLX).

Oracle: `dsv4.quant.dequant.dequantize_np` on random blocks (random bytes with finite scale fields,
plus zero, negative, subnormal and large scales); matmuls against float64 dequantize-then-matmul.
"""
from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from dsv4.kernels_mlx import twins  # noqa: E402
from dsv4.kernels_mlx.metal import KernelSet, metal_supported  # noqa: E402
from dsv4.kernels_mlx.repack import dequantize_affine, repack_affine  # noqa: E402
from dsv4.quant.dequant import dequantize_np  # noqa: E402
from dsv4.quant.formats import QuantFormat as F  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

# byte offsets of the fp16 scale fields per format (quant.md §1.1)
HALF_FIELDS = {F.Q8_0: (0,), F.Q4_K: (0, 2), F.Q2_K: (80, 82), F.IQ2_XXS: (0,)}
SPECIAL_SCALES = np.array([0.0, -0.0137, 6.0e-8, 3.1e-5, 1024.0, -2.5], np.float16)  # zero, neg, subnormal, big


def random_blocks(rng, fmt: F, lead: tuple[int, ...], n: int) -> np.ndarray:
    """Random raw rows [*lead, row_bytes(n)] whose fp16 fields are finite (some special)."""
    raw = rng.integers(0, 256, (*lead, fmt.row_bytes(n)), dtype=np.uint8)
    b = raw.reshape(-1, fmt.type_size)
    for off in HALF_FIELDS[fmt]:
        h = (rng.standard_normal(b.shape[0]) * 0.02).astype(np.float16)
        h[: len(SPECIAL_SCALES)] = SPECIAL_SCALES[: min(len(h), len(SPECIAL_SCALES))]
        b[:, off : off + 2] = h.view(np.uint8).reshape(-1, 2)
    return raw


# ------------------------------------------------------------------------------------- repacks

@pytest.mark.parametrize("fmt", [F.Q8_0, F.Q4_K])
@pytest.mark.parametrize("lead", [(5,), (3, 7)], ids=["2d", "experts"])
def test_repack_dequantizes_exactly(fmt, lead):
    rng = np.random.default_rng(int(fmt) * 10 + len(lead))
    n = 512
    raw = random_blocks(rng, fmt, lead, n)
    ref = dequantize_np(raw, fmt, n)
    got = np.array(dequantize_affine(repack_affine(raw, fmt, n)))
    assert got.shape == ref.shape
    assert_close(got, ref, "dequant", "all", f"MLX affine repack of {fmt.name}")
    # equal as numbers everywhere; the only allowed bit difference is the sign of a zero
    differ = got.view(np.uint32) != ref.view(np.uint32)
    assert np.all(ref[differ] == 0), f"{fmt.name}: non-zero weights differ in bits"


@pytest.mark.parametrize("fmt", [F.Q8_0, F.Q4_K])
def test_repack_quantized_matmul(fmt):
    rng = np.random.default_rng(3)
    n, out = 512, 24
    raw = random_blocks(rng, fmt, (out,), n)
    ref_w = dequantize_np(raw, fmt, n).astype(np.float64)
    aw = repack_affine(raw, fmt, n)
    x = rng.standard_normal((3, n)).astype(np.float32)
    y = mx.quantized_matmul(mx.array(x), aw.wq, aw.scales, aw.biases, transpose=True, group_size=32, bits=aw.bits)
    assert_close(np.array(y), x.astype(np.float64) @ ref_w.T, "mlx_qmatmul", "fp32", f"{fmt.name} quantized_matmul")


def test_repack_gather_qmm_selects_experts():
    rng = np.random.default_rng(4)
    e, out, n, t, k = 5, 16, 256, 3, 2
    raw = random_blocks(rng, F.Q4_K, (e, out), n)
    ref_w = dequantize_np(raw, F.Q4_K, n).astype(np.float64)
    aw = repack_affine(raw, F.Q4_K, n)
    x = rng.standard_normal((t, n)).astype(np.float32)
    sel = np.array([[4, 0], [1, 1], [3, 2]], np.int32)
    y = mx.gather_qmm(mx.array(x)[:, None, None, :], aw.wq, aw.scales, aw.biases, rhs_indices=mx.array(sel),
                      transpose=True, group_size=32, bits=4)
    expect = np.einsum("tkoi,ti->tko", ref_w[sel], x.astype(np.float64))
    assert_close(np.array(y).squeeze(2), expect, "mlx_qmatmul", "fp32", "Q4_K gather_qmm")


# --------------------------------------------------------------------------------------- twins

@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
def test_twin_dequant_bit_exact(fmt):
    rng = np.random.default_rng(int(fmt))
    raw = random_blocks(rng, fmt, (2, 6), 768)
    ref = dequantize_np(raw, fmt, 768)
    got = np.array(twins.TWIN_DECODERS[fmt](mx.array(raw)))
    assert got.shape == ref.shape
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), f"{fmt.name} twin decode differs in bits"


@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
@pytest.mark.parametrize("t", [1, 5])
def test_twin_gemv(fmt, t):
    rng = np.random.default_rng(10 + t)
    n, out = 1024, 13
    raw = random_blocks(rng, fmt, (out,), n)
    x = rng.standard_normal((t, n)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize_np(raw, fmt, n).astype(np.float64).T
    got = KernelSet(use_metal=False).raw_matmul(mx.array(x), mx.array(raw), fmt)
    assert_close(np.array(got), ref, "mlx_qmatmul", "fp32", f"{fmt.name} GEMV twin, T={t}")


@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
@pytest.mark.parametrize("per_pair", [False, True], ids=["shared_x", "pair_x"])
@pytest.mark.parametrize("e", [6, 40], ids=["all_experts", "selected_blocks"])  # T*K=12 >= E or < E
def test_twin_gathered_moe(fmt, per_pair, e):
    rng = np.random.default_rng(20 + per_pair)
    out, n, t, k = 10, 512, 4, 3
    raw = random_blocks(rng, fmt, (e, out), n)
    w = dequantize_np(raw, fmt, n).astype(np.float64)
    sel = rng.integers(0, e, (t, k)).astype(np.int32)
    sel[0] = [5, 5, 0]  # a repeated expert in one token
    x = rng.standard_normal((t, k, n) if per_pair else (t, n)).astype(np.float32)
    xk = x if per_pair else np.broadcast_to(x[:, None], (t, k, n))
    ref = np.einsum("tkoi,tki->tko", w[sel], xk.astype(np.float64))
    got = KernelSet(use_metal=False).raw_gather_matmul(mx.array(x), mx.array(raw), fmt, mx.array(sel))
    assert_close(np.array(got), ref, "mlx_qmatmul", "fp32", f"{fmt.name} gathered twin")


def _sinkhorn_f64(m, scale, base, s, iters, eps):
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    pre = sig(m[:, :s] * scale[0] + base[:s]) + eps
    post = 2.0 * sig(m[:, s : 2 * s] * scale[1] + base[s : 2 * s])
    c = (m[:, 2 * s :] * scale[2] + base[2 * s :]).reshape(-1, s, s)
    c = np.exp(c - c.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + eps
    c = c / (c.sum(1, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(2, keepdims=True) + eps)
        c = c / (c.sum(1, keepdims=True) + eps)
    return pre, post, c


def test_twin_hc_chain():
    rng = np.random.default_rng(30)
    t, s, d, iters, eps = 3, 4, 64, 20, 1e-6
    m = rng.standard_normal((t, (2 + s) * s)).astype(np.float32) * 2
    scale = rng.uniform(0.5, 2, 3).astype(np.float32)
    base = rng.standard_normal((2 + s) * s).astype(np.float32)
    X = rng.standard_normal((t, s, d)).astype(np.float32)
    y = rng.standard_normal((t, d)).astype(np.float32)
    ks = KernelSet(use_metal=False)
    got = ks.hc_sinkhorn(mx.array(m), mx.array(scale), mx.array(base), s, iters, eps)
    ref = _sinkhorn_f64(m.astype(np.float64), scale.astype(np.float64), base.astype(np.float64), s, iters, eps)
    for name, g, r in zip(("pre", "post", "comb"), got, ref):
        assert_close(np.array(g), r, "mlx_hc", "fp32", f"sinkhorn {name}")
    pre, post, comb = ref
    X64 = X.astype(np.float64)
    assert_close(np.array(ks.hc_weighted_sum(mx.array(X), mx.array(pre.astype(np.float32)))),
                 (pre[:, :, None] * X64).sum(1), "mlx_hc", "fp32", "hc weighted sum")
    want = post[:, :, None] * y[:, None, :] + np.einsum("trc,trd->tcd", comb, X64)
    got_post = ks.hc_post(mx.array(X), mx.array(y), mx.array(post.astype(np.float32)),
                          mx.array(comb.astype(np.float32)))
    assert_close(np.array(got_post), want, "mlx_hc", "fp32", "hc post")


def test_twin_swiglu_weighted():
    rng = np.random.default_rng(31)
    g = (rng.standard_normal((4, 3, 40)) * 8).astype(np.float32)  # crosses the clamp
    u = (rng.standard_normal((4, 3, 40)) * 8).astype(np.float32)
    wt = rng.uniform(0, 1, (4, 3)).astype(np.float32)
    gc = np.minimum(g.astype(np.float64), 10.0)
    ref = gc / (1 + np.exp(-gc)) * np.clip(u, -10, 10) * wt[..., None]
    got = KernelSet(use_metal=False).swiglu(mx.array(g), mx.array(u), 10.0, mx.array(wt))
    assert_close(np.array(got), ref, "mlx_hc", "fp32", "swiglu x route weight")


def test_dispatcher_uses_twins_off_apple():
    assert KernelSet().use_metal == metal_supported()
    if not metal_supported():
        assert KernelSet().use_metal is False
