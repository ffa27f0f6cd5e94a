"""MlxOps (CPU MLX, Metal twins) against the torch reference: every op of the contract on the same
inputs, and the tiny model (q2 and q4) end to end, prefill and decode, by logits."""
from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from dsv4.cache.state import SessionState  # noqa: E402
from dsv4.config import NEG_SENTINEL, ROUTER_WEIGHT_FLOOR  # noqa: E402
from dsv4.kernels_mlx import MlxOps  # noqa: E402
from dsv4.model import Model, rope_params  # noqa: E402
from dsv4.ops import OP_NAMES  # noqa: E402
from dsv4.reference import TorchOps  # noqa: E402
from dsv4.weights import load_weights  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

Q2_PROMPT = 134  # crosses the 128-token window: ratio-128 rows are emitted and the indexer selects (n_comp > 32)
Q4_PROMPT = 24
DECODE_STEPS = 2
MODEL_LAYERS = 4


def _load(path):
    w = load_weights(path)
    # layers 0-3 hold every layer class (raw, ratio 4 + indexer, ratio 128; hash and top-k routing)
    w.layers, w.config = w.layers[:MODEL_LAYERS], w.config.with_layers(MODEL_LAYERS)
    return w


@pytest.fixture(scope="module")
def tiny_weights(request):
    """recipe -> the tiny model's weights (4 layers), loaded once: backends cache their forms on the tensors."""
    cache = {}

    def get(recipe):
        if recipe not in cache:
            cache[recipe] = _load(request.getfixturevalue(f"tiny_{recipe}_path"))
        return cache[recipe]

    return get


@pytest.fixture(scope="module")
def q2(tiny_weights):
    return tiny_weights("q2")


@pytest.fixture(scope="module")
def ops_pair():
    return TorchOps(), MlxOps()


def _both(ops_pair, fn, *host_args):
    """Run fn(ops, *args) on both backends with host arrays converted; returns host results (ref, mlx)."""
    out = []
    for ops in ops_pair:
        args = [ops.asarray(a) if isinstance(a, np.ndarray) else a for a in host_args]
        r = fn(ops, *args)
        out.append(tuple(ops.numpy(x) for x in r) if isinstance(r, tuple) else ops.numpy(r))
    return out


def test_every_contract_op_is_implemented():
    missing = [n for n in OP_NAMES if not callable(getattr(MlxOps, n, None))]
    assert not missing, f"MlxOps lacks ops {missing}"


def test_dense_ops_match_reference(q2, ops_pair):
    rng = np.random.default_rng(0)
    cfg, lw = q2.config, q2.layers[3]
    T, S, D = 5, cfg.n_hc, cfg.n_embd
    X = rng.standard_normal((T, S, D)).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    hc = lw.hc_attn
    ref, got = _both(ops_pair, lambda o, X: o.hc_pre(X, hc.fn, hc.scale, hc.base, cfg.sinkhorn_iters, cfg.hc_eps,
                                                     cfg.rms_eps), X)
    for name, r, g in zip(("x", "post", "comb"), ref, got):
        assert_close(g, r, "mlx_ops", "fp32", f"hc_pre {name}")
    post, comb = ref[1], ref[2]
    ref, got = _both(ops_pair, lambda o, X, y, p, c: o.hc_post(X, y, p, c), X, x, post, comb)
    assert_close(got, ref, "mlx_ops", "fp32", "hc_post")
    oh = q2.output_hc
    ref, got = _both(ops_pair, lambda o, X: o.hc_head(X, oh.fn, oh.scale, oh.base, cfg.hc_eps, cfg.rms_eps), X)
    assert_close(got, ref, "mlx_ops", "fp32", "hc_head")
    for w in (lw.attn_norm, None):
        ref, got = _both(ops_pair, lambda o, x: o.rms_norm(x, w, cfg.rms_eps), x)
        assert_close(got, ref, "mlx_ops", "fp32", f"rms_norm gain={w is not None}")
    for name, w in (("Q8_0", lw.attn_kv), ("F16", lw.attn_compressor_kv), ("Q8_0 head", q2.output)):
        ref, got = _both(ops_pair, lambda o, x: o.qmatmul(x, w), x)
        assert_close(got, ref, "mlx_ops", "fp32", f"qmatmul {name}")
    G = cfg.o_groups
    o_in = rng.standard_normal((T, G, cfg.n_head // G * cfg.head_dim)).astype(np.float32)
    ref, got = _both(ops_pair, lambda o, a: o.qmatmul_grouped(a, lw.attn_output_a, G), o_in)
    assert_close(got, ref, "mlx_ops", "fp32", "qmatmul_grouped")
    ids = np.array([5, 0, 129279, 77, 5], np.int64)
    ref, got = _both(ops_pair, lambda o, i: o.embed(q2.token_embd, i), ids)
    assert_close(got, ref, "dequant", "all", "embed (F16 rows)")


def test_rope_and_simulated_formats_match_reference(q2, ops_pair):
    rng = np.random.default_rng(1)
    cfg = q2.config
    q = (rng.standard_normal((6, cfg.n_head, cfg.head_dim)) * 3).astype(np.float32)
    pos = np.array([0, 1, 127, 2051, 65536, 1000003], np.int64)
    for layer in (0, 3):
        for inverse in (False, True):
            ref, got = _both(ops_pair, lambda o, q, p: o.rope_tail(q, p, rope_params(cfg, layer), inverse), q, pos)
            assert_close(got, ref, "mlx_ops", "fp32", f"rope_tail layer {layer} inverse={inverse}")
    # exact roundings: FP8/FP4 simulations and the F16 round must agree bit for bit on the same input
    ref, got = _both(ops_pair, lambda o, a: o.kv_fp8_sim(a, cfg.rope_dim), q)
    assert_close(got, ref, "dequant", "all", "kv_fp8_sim")
    ref, got = _both(ops_pair, lambda o, a: o.f16_round(a), q)
    assert_close(got, ref, "dequant", "all", "f16_round")
    qi = (rng.standard_normal((6, cfg.idx_heads, cfg.idx_dim)) * 2).astype(np.float32)
    ref, got = _both(ops_pair, lambda o, a: o.indexer_fp4_sim(a), qi)
    assert_close(got, ref, "mlx_ops", "fp32", "indexer_fp4_sim")
    g = (rng.standard_normal((5, 40)) * 8).astype(np.float32)
    u = (rng.standard_normal((5, 40)) * 8).astype(np.float32)
    ref, got = _both(ops_pair, lambda o, g, u: o.swiglu(g, u, 10.0), g, u)
    assert_close(got, ref, "mlx_ops", "fp32", "swiglu")


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_router_and_moe_match_reference(recipe, tiny_weights, ops_pair):
    w = tiny_weights(recipe)
    cfg = w.config
    rng = np.random.default_rng(2)
    u = rng.standard_normal((7, cfg.n_embd)).astype(np.float32)
    ids = rng.integers(0, cfg.n_vocab, 7)
    K = cfg.n_expert_used
    for layer in (0, cfg.n_hash_layers):  # hash routing, then top-k with bias
        lw = w.layers[layer]
        tid = lw.ffn_gate_tid2eid
        bias = None if tid is not None else lw.exp_probs_b
        (rs, rw), (gs, gw) = _both(ops_pair, lambda o, u, i: o.router(u, lw.ffn_gate_inp, bias, tid, i, K,
                                                                      cfg.expert_weights_scale,
                                                                      ROUTER_WEIGHT_FLOOR), u, ids)
        assert np.array_equal(gs, rs), f"router selection differs on layer {layer}: {gs} vs {rs}"
        assert_close(gw, rw, "mlx_ops", "fp32", f"router weights layer {layer}")
        ref, got = _both(ops_pair, lambda o, u, s, ww: o.moe(u, lw.ffn_gate_exps, lw.ffn_up_exps, lw.ffn_down_exps,
                                                               s, ww, cfg.swiglu_clamp[layer]), u, rs, rw)
        assert_close(got, ref, "mlx_ops", "fp32", f"{recipe} moe layer {layer}")
        ref, got = _both(ops_pair, lambda o, u, s, ww: o.moe(u[:1], lw.ffn_gate_exps, lw.ffn_up_exps,
                                                               lw.ffn_down_exps, s[:1], ww[:1], 10.0), u, rs, rw)
        assert_close(got, ref, "mlx_ops", "fp32", f"{recipe} moe decode (T=1) layer {layer}")


def test_ds4_exact_activation_quantization_matches_reference(q2):
    rng = np.random.default_rng(5)
    pair = (TorchOps(act_quant=True), MlxOps(act_quant=True))
    lw, cfg = q2.layers[3], q2.config
    x = rng.standard_normal((4, cfg.n_embd)).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero Q8_0 block and a zero-max Q8_K half: the d = 0 branches
    ref, got = _both(pair, lambda o, x: o.qmatmul(x, lw.attn_q_a), x)
    assert_close(got, ref, "mlx_ops", "fp32", "Q8_0 qmatmul with Q8_0 activations")
    sel = np.array([[0, 3, 5, 7, 9, 15]] * 4, np.int64)
    wts = rng.uniform(0.1, 0.5, (4, 6)).astype(np.float32)
    ref, got = _both(pair, lambda o, u, s, w: o.moe(u, lw.ffn_gate_exps, lw.ffn_up_exps, lw.ffn_down_exps, s, w,
                                                    10.0), x, sel, wts)
    assert_close(got, ref, "mlx_ops", "fp32", "moe with Q8_K activations")


def test_router_ties_pick_lower_expert(q2):
    ops = MlxOps()
    score = np.zeros((2, 16), np.float32)
    score[0, [3, 9, 12]] = 1.0
    score[1, [15, 2]] = 2.0
    from dsv4.kernels_mlx.ops import _stable_top

    sel = ops.numpy(_stable_top(ops.asarray(score), 4))
    assert sel.tolist() == [[3, 9, 12, 0], [2, 15, 0, 1]]


def test_state_ops_match_reference(q2, ops_pair):
    rng = np.random.default_rng(3)
    lw = q2.layers[2]  # ratio 4
    for ratio, ape, wc in ((4, lw.attn_compressor_ape, 2 * q2.config.head_dim),
                           (128, q2.layers[3].attn_compressor_ape, q2.config.head_dim)):
        rows = 8 if ratio == 4 else 128
        fronts = [(o.zeros((rows, wc)), o.zeros((rows, wc), NEG_SENTINEL)) for o in ops_pair]
        p0 = 0
        for t in (3, 6, 1, 130 if ratio == 128 else 9):  # chunks across window boundaries
            kv = rng.standard_normal((t, wc)).astype(np.float32)
            sc = rng.standard_normal((t, wc)).astype(np.float32)
            res = []
            for o, (fk, fs) in zip(ops_pair, fronts):
                res.append([o.numpy(o.compress(o.asarray(kv), o.asarray(sc), ape, fk, fs, p0, ratio)),
                            o.numpy(fk), o.numpy(fs)])
            for name, r, g in zip(("pooled", "front_kv", "front_score"), *res):
                assert_close(g, r, "mlx_ops", "fp32", f"compress ratio {ratio} p0={p0} t={t} {name}")
            p0 += t
    C, T = 50, 4
    q = rng.standard_normal((T, 4, 128)).astype(np.float32)
    wts = rng.standard_normal((T, 4)).astype(np.float32)
    keys = rng.standard_normal((C, 128)).astype(np.float32)
    n_vis = np.array([10, 33, 40, 50], np.int64)
    ref, got = _both(ops_pair, lambda o, q, w, k, n: o.indexer_topk(q, w, k, n, 32, 0.05), q, wts, keys, n_vis)
    assert np.array_equal(got, ref), "indexer_topk selection differs"
    kvr = rng.standard_normal((C, 128)).astype(np.float32)
    allowed = rng.random((T, C)) < 0.6
    allowed[0] = False  # a query that sees nothing: only the sink
    qa = rng.standard_normal((T, 4, 128)).astype(np.float32)
    ref, got = _both(ops_pair, lambda o, q, k, a: o.sink_attention(q, k, a, lw.attn_sinks, 0.088), qa, kvr, allowed)
    assert_close(got, ref, "mlx_ops", "fp32", "sink_attention")
    ops = ops_pair[1]
    buf = ops.zeros((6, 3), float("nan"))  # poisoned: untouched rows must stay NaN
    ops.put(buf, ops.asarray(np.array([4, 1])), ops.asarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    h = ops.numpy(buf)
    assert np.isnan(h[[0, 2, 3, 5]]).all() and h[4].tolist() == [0, 1, 2] and h[1].tolist() == [3, 4, 5]
    assert ops.numpy(ops.take(buf, ops.asarray(np.array([1])))).tolist() == [[3, 4, 5]]


def _run(w, ops, ids, n_prefill):
    m = Model(w, ops)
    st = SessionState.allocate(ops, w.config, 256)
    logits = [ops.numpy(m.logits(m.forward(ids[:n_prefill], 0, st)[-8:]))]
    for p in range(n_prefill, len(ids)):
        logits.append(ops.numpy(m.logits(m.forward(ids[p : p + 1], p, st))))
    return logits


@pytest.mark.parametrize("recipe,n_prefill", [("q2", Q2_PROMPT), ("q4", Q4_PROMPT)])
def test_tiny_model_logits_match_reference(recipe, n_prefill, tiny_weights, ops_pair):
    w = tiny_weights(recipe)
    ids = np.random.default_rng(4).integers(0, 129280, n_prefill + DECODE_STEPS)
    ref = _run(w, ops_pair[0], ids, n_prefill)
    got = _run(w, ops_pair[1], ids, n_prefill)
    for step, (r, g) in enumerate(zip(ref, got)):
        what = f"{recipe} prefill (last 8 positions)" if step == 0 else f"{recipe} decode step {step}"
        assert_close(g, r, "mlx_model", "logits", what)
