"""Hand-checkable numerics of the reference ops (model.md §4): Sinkhorn, FP8/FP4 simulations, Hadamard,
YaRN ramp, compressor emission and visibility, router tie-break, hash routing by the input token."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: threads only add contention

from dsv4.config import NEG_SENTINEL
from dsv4.model import comp_visible_counts, emitted_rows, raw_visibility
from dsv4.ops import RopeParams
from dsv4.quant.formats import QTensor, QuantFormat
from dsv4.reference import TorchOps, hadamard, yarn_corr_dims
from tests.tolerances import assert_close


def _qt(a: np.ndarray, fmt=QuantFormat.F32) -> QTensor:
    dt = {QuantFormat.F32: np.float32, QuantFormat.F16: np.float16, QuantFormat.I32: np.int32}[fmt]
    a = np.ascontiguousarray(a.astype(dt))
    return QTensor.from_bytes(a.view(np.uint8), fmt, a.shape)


@pytest.fixture(scope="module")
def ops():
    return TorchOps()


def _sinkhorn64(C: np.ndarray, iters: int, eps: float) -> np.ndarray:
    C = C.astype(np.float64)
    C = np.exp(C - C.max(-1, keepdims=True))
    C = C / C.sum(-1, keepdims=True) + eps
    C = C / (C.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        C = C / (C.sum(-1, keepdims=True) + eps)
        C = C / (C.sum(-2, keepdims=True) + eps)
    return C


def test_sinkhorn_doubly_stochastic_and_matches_float64(ops):
    rng = np.random.default_rng(0)
    S, D, T = 4, 32, 5
    # controls of the size a trained model produces (|C| ~ 1): 20 rounds converge to 1e-5
    fn = (rng.standard_normal((24, S * D)) / math.sqrt(S * D)).astype(np.float16)
    scale = np.array([0.7, 0.4, 0.5], np.float32)
    base = (rng.standard_normal(24) * 0.5).astype(np.float32)
    X = torch.from_numpy(rng.standard_normal((T, S, D)).astype(np.float32))
    x, post, comb = ops.hc_pre(X, _qt(fn, QuantFormat.F16), _qt(scale), _qt(base), 20, 1e-6, 1e-6)
    c = comb.numpy().astype(np.float64)
    assert_close(c.sum(-2), np.ones((T, S)), "sinkhorn", "stochastic", "column sums")
    assert_close(c.sum(-1), np.ones((T, S)), "sinkhorn", "stochastic", "row sums")
    # float64 recomputation from the same controls
    flat = X.numpy().reshape(T, -1).astype(np.float64)
    m = (flat / np.sqrt((flat ** 2).mean(-1, keepdims=True) + 1e-6)) @ fn.astype(np.float64).T
    C = (m[:, 2 * S:] * scale[2] + base[2 * S:]).reshape(T, S, S)
    assert_close(c, _sinkhorn64(C, 20, 1e-6), "sinkhorn", "fp32_vs_fp64", "comb")
    a = 1 / (1 + np.exp(-(m[:, :S] * scale[0] + base[:S]))) + 1e-6
    assert_close(x.numpy(), (a[:, :, None] * X.numpy()).sum(1), "sinkhorn", "fp32_vs_fp64", "pre-weighted sum")
    b = 2 / (1 + np.exp(-(m[:, S:2 * S] * scale[1] + base[S:2 * S])))
    assert_close(post.numpy(), b, "sinkhorn", "fp32_vs_fp64", "post gates")


def _fp8_ref(x: np.ndarray) -> np.ndarray:
    xb = x.reshape(-1, 64).astype(np.float32)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), np.float32(1e-4))
    scale = np.exp2(np.ceil(np.log2(amax / np.float32(448.0)))).astype(np.float32)
    q = np.clip(xb / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    return q.reshape(x.shape)


def test_fp8_sim_equals_ml_dtypes(ops):
    rng = np.random.default_rng(1)
    n_rot = 64
    rows = 100_000 // 448 + 1
    x = (rng.standard_normal((rows, 512)) * np.exp(rng.uniform(-12, 6, (rows, 1)))).astype(np.float32)
    out = ops.kv_fp8_sim(torch.from_numpy(x), n_rot).numpy()
    assert_close(out[:, :448], _fp8_ref(x[:, :448]), "fp8_sim", "bitexact", "nope dims")
    assert_close(out[:, 448:], x[:, 448:], "fp8_sim", "bitexact", "rope dims untouched")


def test_fp4_sim_equals_ml_dtypes_after_hadamard(ops):
    rng = np.random.default_rng(2)
    rows = 100_000 // 128 + 1
    x = (rng.standard_normal((rows, 128)) * np.exp(rng.uniform(-8, 4, (rows, 1)))).astype(np.float32)
    out = ops.indexer_fp4_sim(torch.from_numpy(x)).numpy()
    h = (torch.from_numpy(x) @ hadamard(128, torch.float32)).numpy().reshape(-1, 32)
    amax = np.maximum(np.abs(h).max(-1, keepdims=True), np.float32(7.052966104933725e-38))
    scale = np.exp2(np.ceil(np.log2(amax / np.float32(6.0)))).astype(np.float32)
    ref = np.clip(h / scale, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * scale
    assert_close(out, ref.reshape(out.shape), "fp4_sim", "bitexact", "hadamard+fp4")


def test_hadamard_orthonormal_sylvester():
    H = hadamard(128).numpy()
    assert_close(H @ H.T, np.eye(128), "hadamard", "orthonormal", "H H^T")
    assert H[0].min() > 0 and H[3, 5] == pytest.approx((-1) ** bin(3 & 5).count("1") / math.sqrt(128))


def test_yarn_ramp_lo_hi_for_base_160000():
    lo, hi = yarn_corr_dims(RopeParams(64, 160000.0, 1 / 16, True))
    assert (lo, hi) == (15, 25)


def test_rope_yarn_angles_hand_values(ops):
    """Pair 0 is pure extrapolation (angle p), pair 31 pure interpolation (p * b^(-62/64) / 16)."""
    rope = RopeParams(64, 160000.0, 1 / 16, True)
    p = 1000
    cos, sin = ops.rope_cos_sin(torch.tensor([p]), rope)
    ang = np.arctan2(sin.numpy()[0], cos.numpy()[0])
    assert_close(ang[0], math.remainder(p, 2 * math.pi), "rope", "angle", "pair 0")
    assert_close(ang[31], p * 160000.0 ** (-62 / 64) / 16, "rope", "angle", "pair 31")
    k = 20  # ramp 0.5 at k=20 for (lo, hi) = (15, 25)
    ext = p * 160000.0 ** (-2 * k / 64)
    assert_close(ang[k], math.remainder(0.5 * ext + 0.5 * ext / 16, 2 * math.pi), "rope", "angle", "pair 20")


def test_compressor_emission_positions_and_visibility():
    assert list(emitted_rows(0, 4, 4)) == [0]
    assert list(emitted_rows(0, 3, 4)) == []
    assert list(emitted_rows(3, 1, 4)) == [0]
    assert list(emitted_rows(5, 8, 4)) == [1, 2]  # p = 7, 11
    assert list(emitted_rows(0, 256, 128)) == [0, 1]
    assert list(emitted_rows(126, 1, 128)) == []
    q = np.array([0, 2, 3, 4, 127, 128, 255])
    assert comp_visible_counts(q, 4).tolist() == [0, 0, 1, 1, 32, 32, 64]
    assert comp_visible_counts(q, 128).tolist() == [0, 0, 0, 0, 1, 1, 2]
    vis = raw_visibility(np.array([200]), np.arange(60, 201), 128)[0]
    assert vis.sum() == 128 and not vis[72 - 60] and vis[73 - 60]  # (p - W, p] = 73..200


def test_compressor_pooling_ratio4_hand_values(ops):
    """Ratio 4: row m pools the previous window's first halves and the current window's second halves."""
    Dc = 2
    T = 8
    kv = torch.arange(T * 2 * Dc, dtype=torch.float32).reshape(T, 2 * Dc)
    score = torch.zeros(T, 2 * Dc)
    ape = _qt(np.zeros((4, 2 * Dc), np.float16), QuantFormat.F16)
    fk, fs = ops.zeros((8, 2 * Dc)), ops.zeros((8, 2 * Dc), NEG_SENTINEL)
    out = ops.compress(kv, score, ape, fk, fs, 0, 4).numpy()
    k = kv.numpy()
    row0 = k[0:4, Dc:].mean(0)  # m = 0: no previous window, current second halves only
    row1 = np.concatenate((k[0:4, :Dc], k[4:8, Dc:])).mean(0)
    assert_close(out, np.stack((row0, row1)), "compressor", "pool", "ratio-4 rows")
    # streaming the same tokens one at a time gives the same rows and frontier
    gk, gs = ops.zeros((8, 2 * Dc)), ops.zeros((8, 2 * Dc), NEG_SENTINEL)
    rows = [ops.compress(kv[t:t + 1], score[t:t + 1], ape, gk, gs, t, 4) for t in range(T)]
    assert_close(torch.cat(rows).numpy(), out, "compressor", "pool", "streamed vs batched")
    assert torch.equal(gk, fk) and torch.equal(gs, fs)


def test_router_tie_break_to_lower_expert(ops):
    E, D = 8, 4
    w = np.zeros((E, D), np.float16)  # every logit 0: all scores tie
    u = torch.ones(2, D)
    sel, wts = ops.router(u, _qt(w, QuantFormat.F16), None, None, None, 3, 1.5, 2 ** -14)
    assert sel.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert_close(wts.numpy(), np.full((2, 3), 0.5), "router", "weights", "equal weights x 1.5 / 3")
    bias = np.zeros(E, np.float32)
    bias[5] = bias[6] = 0.25
    sel, _ = ops.router(u, _qt(w, QuantFormat.F16), _qt(bias), None, None, 3, 1.5, 2 ** -14)
    assert sel.tolist()[0] == [5, 6, 0]


def test_hash_layer_uses_input_token_row(ops):
    V, E, K = 10, 8, 3
    table = np.stack([np.roll(np.arange(E), -v)[:K] for v in range(V)]).astype(np.int32)
    w = np.random.default_rng(3).standard_normal((E, 4)).astype(np.float16)
    ids = torch.tensor([7, 2])
    sel, wts = ops.router(torch.ones(2, 4), _qt(w, QuantFormat.F16), None, _qt(table, QuantFormat.I32), ids,
                          K, 1.5, 2 ** -14)
    assert sel.tolist() == [table[7].tolist(), table[2].tolist()]
    p = np.sqrt(np.log1p(np.exp(np.ones(4) @ w.astype(np.float64).T)))
    ref = p[table[7]] / p[table[7]].sum() * 1.5
    assert_close(wts.numpy()[0], ref, "router", "weights", "hash weights from unbiased probs")


def test_act_quant_q8_0_and_q8_k_round_trip():
    x = torch.tensor([[0.0] * 31 + [127.0] + [1.5] * 32], dtype=torch.float32)
    q = TorchOps.quant_q8_0(x)
    assert q[0, 31] == 127.0 and q[0, 0] == 0.0 and q[0, 40] == pytest.approx(1.5, abs=1.5 / 127)
    y = torch.linspace(-2, 3, 256).reshape(1, 256)
    qk = TorchOps.quant_q8_k(y)
    assert float(qk[0, -1]) == pytest.approx(3.0, rel=1e-6)  # the signed max maps to -127 * d exactly
    assert_close(qk.numpy(), y.numpy(), "act_quant", "q8_k", "Q8_K round trip within half a step")
