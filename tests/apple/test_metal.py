"""Metal kernels of dsv4/kernels_mlx/metal.py on Apple hardware: every kernel against its MLX twin
(outputs poisoned with NaN, so an unwritten element fails), and the full tiny model on MlxOps with
Metal against the torch reference. Runs only on macOS arm64 with Metal; skipped elsewhere."""
from __future__ import annotations

import platform

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from dsv4.kernels_mlx.metal import KernelSet, metal_supported  # noqa: E402
from dsv4.quant.formats import QuantFormat as F  # noqa: E402
from tests.kernels.test_mlx_formats import random_blocks  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(
    not metal_supported(),
    reason=f"Metal kernels need macOS arm64 with a Metal device (this is {platform.system()} {platform.machine()})",
)


@pytest.fixture(scope="module")
def pair():
    return KernelSet(use_metal=True, poison=True), KernelSet(use_metal=False)


def _same(metal, twin, what):
    m, t = np.array(metal), np.array(twin)
    assert not np.isnan(m).any(), f"{what}: Metal left unwritten (NaN) elements"
    assert_close(m, t, "mlx_metal", "twin", what)


@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
@pytest.mark.parametrize("t,out,n", [(1, 13, 1024), (4, 64, 256), (2, 7, 4096)])
def test_gemv_vs_twin(pair, fmt, t, out, n):
    rng = np.random.default_rng(t * 100 + out)
    raw = mx.array(random_blocks(rng, fmt, (out,), n))
    x = mx.array(rng.standard_normal((t, n)).astype(np.float32))
    _same(pair[0].raw_matmul(x, raw, fmt), pair[1].raw_matmul(x, raw, fmt), f"{fmt.name} GEMV T={t} out={out}")


@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
@pytest.mark.parametrize("per_pair", [False, True], ids=["shared_x", "pair_x"])
def test_gathered_vs_twin(pair, fmt, per_pair):
    rng = np.random.default_rng(7)
    e, out, n, t, k = 16, 30, 512, 3, 6
    raw = mx.array(random_blocks(rng, fmt, (e, out), n))
    sel = mx.array(rng.integers(0, e, (t, k)).astype(np.int32))
    x = mx.array(rng.standard_normal((t, k, n) if per_pair else (t, n)).astype(np.float32))
    _same(pair[0].raw_gather_matmul(x, raw, fmt, sel), pair[1].raw_gather_matmul(x, raw, fmt, sel),
          f"{fmt.name} gathered MoE")


def test_fused_moe_vs_twin(pair):
    rng = np.random.default_rng(10)
    e, d, f, t, k = 16, 512, 256, 3, 6
    gate, up = (mx.array(random_blocks(rng, F.IQ2_XXS, (e, f), d, False)) for _ in range(2))
    down = mx.array(random_blocks(rng, F.Q2_K, (e, d), f, False))
    u = mx.array(rng.standard_normal((t, d)).astype(np.float32))
    sel = mx.array(rng.integers(0, e, (t, k)).astype(np.int32))
    wt = mx.array(rng.uniform(0.1, 1, (t, k)).astype(np.float32))
    args = (u, gate, up, down, F.IQ2_XXS, F.Q2_K, sel, wt, 10.0)
    m, tw = np.array(pair[0].moe_raw(*args)), np.array(pair[1].moe_raw(*args))
    assert not np.isnan(m).any(), "fused MoE: Metal left unwritten (NaN) elements"
    assert_close(m, tw, "mlx_metal", "moe", "fused MoE (q2 recipe formats)")


def test_hc_and_swiglu_vs_twin(pair):
    rng = np.random.default_rng(8)
    t, s, d = 5, 4, 300
    m = mx.array(rng.standard_normal((t, (2 + s) * s)).astype(np.float32))
    scale = mx.array(rng.uniform(0.5, 2, 3).astype(np.float32))
    base = mx.array(rng.standard_normal((2 + s) * s).astype(np.float32))
    got = pair[0].hc_sinkhorn(m, scale, base, s, 20, 1e-6)
    want = pair[1].hc_sinkhorn(m, scale, base, s, 20, 1e-6)
    for name, g, w in zip(("pre", "post", "comb"), got, want):
        _same(g, w, f"hc_sinkhorn {name}")
    X = mx.array(rng.standard_normal((t, s, d)).astype(np.float32))
    y = mx.array(rng.standard_normal((t, d)).astype(np.float32))
    _same(pair[0].hc_weighted_sum(X, want[0]), pair[1].hc_weighted_sum(X, want[0]), "hc weighted sum")
    _same(pair[0].hc_post(X, y, want[1], want[2]), pair[1].hc_post(X, y, want[1], want[2]), "hc_post")
    g = mx.array((rng.standard_normal((3, 6, 257)) * 8).astype(np.float32))
    u = mx.array((rng.standard_normal((3, 6, 257)) * 8).astype(np.float32))
    wt = mx.array(rng.uniform(0, 1, (3, 6)).astype(np.float32))
    _same(pair[0].swiglu(g, u, 10.0, wt), pair[1].swiglu(g, u, 10.0, wt), "swiglu x route weight")


def test_fused_hc_pre_and_head_vs_twin(pair):
    rng = np.random.default_rng(9)
    t, s, d = 3, 4, 512
    X = mx.array(rng.standard_normal((t, s, d)).astype(np.float32))
    for nc, head in (((2 + s) * s, False), (s, True)):
        fn = mx.array((rng.standard_normal((nc, s * d)) * 0.05).astype(np.float16))
        scale = mx.array(rng.uniform(0.5, 2, 1 if head else 3).astype(np.float32))
        base = mx.array(rng.standard_normal(nc).astype(np.float32))
        if head:
            _same(pair[0].hc_head(X, fn, scale, base, 1e-6, 1e-6), pair[1].hc_head(X, fn, scale, base, 1e-6, 1e-6),
                  "fused hc_head")
        else:
            got = pair[0].hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6)
            want = pair[1].hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6)
            for name, g, w in zip(("x", "post", "comb"), got, want):
                _same(g, w, f"fused hc_pre {name}")


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_tiny_model_with_metal_vs_reference(recipe, request):
    pytest.importorskip("torch")
    from dsv4.kernels_mlx import MlxOps
    from dsv4.reference import TorchOps
    from tests.model.test_mlx_model import DECODE_STEPS, Q2_PROMPT, _load, _run

    w = _load(request.getfixturevalue(f"tiny_{recipe}_path"))
    ids = np.random.default_rng(4).integers(0, 129280, Q2_PROMPT + DECODE_STEPS)
    ref = _run(w, TorchOps(), ids, Q2_PROMPT)
    ops = MlxOps(use_metal=True)
    assert ops.kernels.use_metal
    got = _run(w, ops, ids, Q2_PROMPT)
    for step, (r, g) in enumerate(zip(ref, got)):
        assert_close(g, r, "mlx_model", "logits", f"{recipe} with Metal, step {step}")
