"""Tiny model, torch reference: prefill == token-by-token decode, chunked == unchunked, extending a live
session == one prefill, fp32 vs fp64, bad input. One decode run per model is shared by all N."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dsv4
from tests.tolerances import assert_close

torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: more threads only add contention

N_LIST = (1, 5, 127, 128, 129, 131, 300, 700)  # window crossing, ratio-128 emission, indexer (> 4*32 rows)
CTX = 1024


def _ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 129280, n).tolist()


@pytest.fixture(scope="module")
def q2(tiny_q2_path):
    return dsv4.load(tiny_q2_path, backend="torch")


@pytest.fixture(scope="module")
def q4(tiny_q4_path):
    return dsv4.load(tiny_q4_path, backend="torch")


@pytest.fixture(scope="module")
def q2_seed1(tiny_q2_seed1_path):
    return dsv4.load(tiny_q2_seed1_path, backend="torch")


def _decode_trace(engine, ids, at):
    s = engine.new_session(ctx=CTX)
    out = {}
    for i, t in enumerate(ids):
        lg = s.decode(t)
        if i + 1 in at:
            out[i + 1] = lg.copy()
    return out


@pytest.mark.parametrize("which,n_max", [("q2", 700), ("q4", 131), ("q2_seed1", 129)])
def test_prefill_equals_decode(request, which, n_max):
    engine = request.getfixturevalue(which)
    ns = [n for n in N_LIST if n <= n_max]
    ids = _ids(n_max, seed=len(which))
    trace = _decode_trace(engine, ids, set(ns))
    for n in ns:
        got = engine.new_session(ctx=CTX).prefill(ids[:n])
        assert got.dtype == np.float32 and got.shape == (engine.config.n_vocab,)
        assert_close(got, trace[n], "model", "prefill_vs_decode", f"{which} N={n}")


@pytest.mark.parametrize("chunk", [64, 100])
def test_chunked_prefill_equals_unchunked(q2, chunk):
    ids = _ids(300, seed=11)
    full = q2.new_session(ctx=CTX).prefill(ids)
    s = q2.new_session(ctx=CTX, prefill_chunk=chunk)
    assert_close(s.prefill(ids), full, "model", "chunked", f"chunk {chunk}")
    assert s.n_past == 300 and s.tokens == ids


def test_extending_session_equals_one_prefill(q4):
    ids = _ids(260, seed=12)
    full = q4.new_session(ctx=CTX).prefill(ids)
    s = q4.new_session(ctx=CTX)
    for a, b in ((0, 3), (3, 130), (130, 131), (131, 260)):  # odd splits cross window, emission, ratio phase
        out = s.prefill(ids[a:b])
    assert_close(out, full, "model", "chunked", "extended in pieces")
    assert s.tokens == ids


def test_fp32_vs_fp64_reference(tiny_q2_path):
    # 22 tokens (the fixture prompt's length): measured 2e-5. Longer prompts reach 1.4e-4 (N=60) because
    # ulp differences flip FP8/F16 roundings of cached rows; see the H4 report.
    n = 22
    ids = _ids(n, seed=13)
    a = dsv4.load(tiny_q2_path, backend="torch").new_session(ctx=256).prefill(ids)
    e64 = dsv4.load(tiny_q2_path, backend="torch", dtype="fp64")
    s64 = e64.new_session(ctx=256)
    s64.prefill(ids[:-1])
    X = e64.model.forward(np.asarray(ids[-1:]), n - 1, s64.state)
    b = e64.model.logits(X).detach().numpy()[0]  # fp64 logits (Session would hand back float32)
    rel = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b)
    assert_close(np.array([rel]), np.array([0.0]), "model", "fp32_vs_fp64", "norm-wise relative error")
    assert int(np.argmax(a)) == int(np.argmax(b))


def test_bad_input_raises_value_error(q2):
    s = q2.new_session(ctx=8)
    with pytest.raises(ValueError, match="at least one"):
        s.prefill([])
    with pytest.raises(ValueError, match="out of range"):
        s.prefill([1, q2.config.n_vocab])
    with pytest.raises(ValueError, match="out of range"):
        s.decode(-1)
    with pytest.raises(ValueError, match="exceed"):
        s.prefill(list(range(9)))
    assert s.n_past == 0  # a refused call leaves the session untouched
    s.prefill([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="exceed"):
        s.prefill([1, 2, 3, 4])
    assert s.n_past == 5


def test_generate_streams_greedy_and_reports_stats(q2):
    s = q2.new_session(ctx=64)
    events = list(s.generate(_ids(10, seed=14), None, max_tokens=4))
    ref = q2.new_session(ctx=64)
    lg = ref.prefill(_ids(10, seed=14))
    want = []
    for _ in range(4):
        want.append(int(np.argmax(lg)))
        lg = ref.decode(want[-1])
    assert [e.token_id for e in events] == want
    st = s.last_stats
    assert st.prompt_tokens == 10 and st.gen_tokens == 4 and st.prefill_s > 0 and st.gen_s > 0
    stop = list(q2.new_session(ctx=64).generate(_ids(10, seed=14), None, max_tokens=4, stop_ids=[want[1]]))
    assert [e.token_id for e in stop] == want[:2]
