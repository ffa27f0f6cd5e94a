"""Sampler (runtime.md §3): greedy and top-k=1 exact, seeded frequencies vs the filtered distribution
(chi-square at a fixed seed), min-p/top-p/top-k cuts on hand-built logits, the xorshift64* generator,
DSML forced-greedy, and top-K logprobs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dsv4.sampling import (
    XORSHIFT_MULT,
    XORSHIFT_ZERO_STATE,
    Sampler,
    SamplingParams,
    XorShift64Star,
    filtered_distribution,
    top_logprobs,
)
from dsv4.chat import DsmlState
from tests.tolerances import assert_close

torch = pytest.importorskip("torch")

# Chi-square critical value at p = 0.001 for df = 1..10 (fixed seed: the statistic is deterministic;
# a wrong distribution lands orders of magnitude above these).
CHI2_CRIT_P001 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59]
N_DRAWS = 20000


def test_greedy_is_argmax_lowest_id_on_ties():
    logits = np.array([0.5, 3.0, -1.0, 3.0, 2.9])
    s = Sampler(SamplingParams(temperature=0.0, seed=1))
    assert s.sample(logits) == 1
    assert s.sample(torch.tensor(logits, dtype=torch.bfloat16)) == 1
    assert s.sample(np.array([np.nan, -np.inf, 1.0, np.inf])) == 2  # non-finite logits skipped
    assert s.sample(np.full(4, -np.inf)) == 0  # nothing finite: plain argmax


def test_top_k_1_is_argmax_at_any_temperature():
    rng = np.random.default_rng(0)
    for seed in range(1, 30):
        logits = rng.normal(size=50) * 3
        s = Sampler(SamplingParams(temperature=5.0, top_k=1, min_p=0.0, seed=seed))
        assert s.sample(logits) == int(np.argmax(logits))


def test_min_p_is_relative_to_top_token():
    # p_i / p_max = exp(l_i - l_max); min_p = 0.1 keeps ratios >= 0.1: ln(0.1) = -2.303.
    logits = np.array([0.0, -2.0, -2.31, -2.29, 1.0 - 1.0, -5.0])
    d = filtered_distribution(logits, SamplingParams(temperature=1.0, min_p=0.1))
    kept = np.nonzero(d)[0].tolist()
    assert kept == [0, 1, 3, 4]
    w = np.exp(logits[kept])
    assert_close(d[kept], w / w.sum(), "softmax", "float64", "min-p renormalized")
    # Temperature scales before the cut: T=2 halves the gaps, so -2.31 (ratio 0.315) survives, -5 does not.
    d2 = filtered_distribution(logits, SamplingParams(temperature=2.0, min_p=0.1))
    assert np.nonzero(d2)[0].tolist() == [0, 1, 2, 3, 4]


def test_top_p_cuts_after_reaching_mass():
    p = np.array([0.05, 0.4, 0.3, 0.15, 0.1])
    logits = np.log(p)
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05; cumulative 0.4, 0.7, 0.85, 0.95, 1.0
    cases = {0.4: [1], 0.5: [1, 2], 0.7: [1, 2], 0.71: [1, 2, 3], 0.9: [1, 2, 3, 4], 0.99: [0, 1, 2, 3, 4]}
    for top_p, want in cases.items():
        d = filtered_distribution(logits, SamplingParams(top_p=top_p, min_p=0.0))
        assert np.nonzero(d)[0].tolist() == want, top_p
        assert_close(d[want], p[want] / p[want].sum(), "softmax", "float64", f"top-p {top_p}")
    # min-p and top-p together: min_p 0.3 drops < 0.12 (0.1 and 0.05) before top-p can reach them.
    d = filtered_distribution(logits, SamplingParams(top_p=0.99, min_p=0.3))
    assert np.nonzero(d)[0].tolist() == [1, 2, 3]
    # top-p mass is measured on the full distribution, not on the min-p survivors (.4+.3 < .8 <= .85).
    d = filtered_distribution(logits, SamplingParams(top_p=0.8, min_p=0.3))
    assert np.nonzero(d)[0].tolist() == [1, 2, 3]
    # Non-finite logits are never candidates, whatever the path.
    bad = np.array([np.nan, 1.0, -np.inf, 0.5, np.inf, 0.9])
    for params in (SamplingParams(min_p=0.0), SamplingParams(top_p=0.999, min_p=0.0),
                   SamplingParams(top_k=10, min_p=0.0)):
        assert np.nonzero(filtered_distribution(bad, params))[0].tolist() == [1, 3, 5], params


def test_top_k_keeps_earlier_id_on_ties():
    logits = np.array([1.0, 2.0, 2.0, 2.0, 0.5])
    d = filtered_distribution(logits, SamplingParams(top_k=2, min_p=0.0))
    assert np.nonzero(d)[0].tolist() == [1, 2]
    assert SamplingParams(top_k=5000, top_p=7.0, min_p=-1).sanitized(100) == SamplingParams(
        top_k=100, top_p=1.0, min_p=0.0
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, min_p=0.05, seed=11),  # path A (default)
        SamplingParams(temperature=0.7, top_p=0.9, min_p=0.02, seed=12),  # path B
        SamplingParams(temperature=1.3, top_k=4, min_p=0.0, seed=13),  # path C
    ],
    ids=["pathA", "pathB", "pathC"],
)
def test_frequencies_match_filtered_distribution(params):
    logits = np.array([1.0, 2.5, -0.5, 2.0, 0.3, -4.0, 1.7, 0.0])
    target = filtered_distribution(logits, params)
    s = Sampler(params)
    counts = np.bincount([s.sample(logits) for _ in range(N_DRAWS)], minlength=logits.size)
    assert counts[target == 0].sum() == 0, f"cut tokens were drawn: {counts} vs {target}"
    keep = target > 0
    expected = target[keep] * N_DRAWS
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    assert df >= 2
    assert chi2 < CHI2_CRIT_P001[df - 1], f"chi2={chi2:.2f} df={df}: counts {counts} expected {expected}"


def test_same_seed_same_tokens_and_torch_equals_numpy():
    logits = np.random.default_rng(3).normal(size=1000) * 2
    p = SamplingParams(temperature=1.0, min_p=0.01, seed=42)
    a = [Sampler(p).sample(logits) for _ in range(3)]
    s1, s2 = Sampler(p), Sampler(p)
    seq1 = [s1.sample(logits) for _ in range(50)]
    seq2 = [s2.sample(torch.tensor(logits)) for _ in range(50)]
    assert seq1 == seq2 and a == [seq1[0]] * 3
    s3 = Sampler(SamplingParams(temperature=1.0, min_p=0.01, seed=43))
    assert [s3.sample(logits) for _ in range(50)] != seq1
    s1.reseed(42)
    assert [s1.sample(logits) for _ in range(50)] == seq1


def test_xorshift64star_matches_the_spec_formula():
    g = XorShift64Star(0)
    assert g.state == XORSHIFT_ZERO_STATE
    x = 12345
    g = XorShift64Star(x)
    m = (1 << 64) - 1
    x ^= x >> 12
    x ^= (x << 25) & m
    x ^= x >> 27
    assert g.next_u64() == (x * XORSHIFT_MULT) & m and g.state == x
    u = [XorShift64Star(7).uniform() for _ in range(1)] + [g.uniform() for _ in range(1000)]
    assert all(0.0 <= v < 1.0 for v in u) and all(v * (1 << 24) == int(v * (1 << 24)) for v in u)


def test_top_logprobs():
    logits = np.array([0.1, 2.0, -np.inf, 2.0, -1.0, 0.7], dtype=np.float32)
    got = top_logprobs(torch.tensor(logits), 3)
    assert [g[0] for g in got] == [1, 3, 5]
    ref = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), 0).numpy()
    assert_close([g[2] for g in got], ref[[1, 3, 5]], "log_softmax", "float64", "top_logprobs")
    assert [g[1] for g in got] == [2.0, 2.0, pytest.approx(0.7)]
    assert len(top_logprobs(logits, 100)) == 5  # non-finite ids are never listed
    assert math.isclose(sum(math.exp(g[2]) for g in top_logprobs(logits, 100)), 1.0, rel_tol=1e-12)


class _FakeTok:
    """Minimal tokenizer for the DSML tracker: each id is one fixed text piece."""

    def __init__(self, pieces):
        self.pieces = pieces

    def stream(self):
        pieces = self.pieces

        class S:
            def push(self, i):
                return pieces[i]

        return S()


def test_dsml_structural_tokens_are_forced_greedy():
    pieces = ["<", "｜DSML｜", "tool_calls>\n", 'invoke name="x">\n', 'parameter name="a" string="true">',
              "hello", "</", "world", "zzz"]
    tok = _FakeTok(pieces)
    BODY = (0, 1, 2, 0, 1, 3, 0, 1, 4, 5)  # <｜DSML｜tool_calls> <｜DSML｜invoke ..> <｜DSML｜parameter ..>hello
    logits = np.zeros(len(pieces))
    logits[8] = 0.2  # argmax is 8 but at T=5 sampling is nearly uniform
    p = SamplingParams(temperature=5.0, min_p=0.0, seed=9, dsml_greedy=True)
    s = Sampler(p, tokenizer=tok)
    draws_outside = {s.sample(logits) for _ in range(40)}
    assert len(draws_outside) > 3  # normal sampling outside a block
    s.reset()
    for i in (0, 1):  # "<｜DSML｜": inside a DSML tag
        s.observe(i)
    assert {s.sample(logits) for _ in range(8)} == {8}  # "zzz" x 8 keeps the tag open (< 32 chars)
    s.reset()
    for i in BODY:  # inside a string="true" body
        s.observe(i)
    assert s.dsml_state is DsmlState.STRING_BODY
    draws = [s.sample(logits)]
    s.reset()  # the draw above moved the tracker on; replay the prefix for each draw
    for _ in range(30):
        for i in BODY:
            s.observe(i)
        draws.append(s.sample(logits))
        s.reset()
    assert len(set(draws)) > 3  # payload text keeps normal sampling
    s.reset()
    for i in BODY + (6,):  # "</" pending: a closing tag may be starting
        s.observe(i)
    assert s.sample(logits) == 8
    with pytest.raises(ValueError, match="tokenizer"):
        Sampler(p)
