"""Token samplers (runtime.md §3): greedy, temperature, top-k, top-p, min-p relative to the top token,
the ds4 xorshift64* generator (same seed -> same tokens), the DSML forced-greedy rule, and top-K logprobs.

Logits from any backend (numpy array, torch tensor on any device) are converted to one float64 numpy
vector once per call; every filter works on that. Must not know the model or chat templates beyond the
DSML tracker it borrows from chat.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.05
TOP_K_MAX = 1024  # ds4 clamps top_k here (sorting the whole vocab per token is not worth it)

XORSHIFT_ZERO_STATE = 0x9E3779B97F4A7C15
XORSHIFT_MULT = 0x2545F4914F6CDD1D
_MASK64 = (1 << 64) - 1
UNIFORM_BITS = 24  # ds4 takes bits 40..63 of the output as a 24-bit uniform


@dataclass
class SamplingParams:
    """Sampling knobs. temperature <= 0 means greedy; top_k = 0 means off; min_p is relative to the
    top token's probability. `dsml_greedy` turns on the forced-greedy rule for DSML structure (used
    with active tools; needs the sampler to have a tokenizer)."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 0
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    seed: int | None = None
    dsml_greedy: bool = False

    def sanitized(self, n_vocab: int) -> SamplingParams:
        """ds4's sanitization: top_p outside (0, 1] -> 1; min_p < 0 -> 0; top_k clamped to
        [0, min(1024, vocab)]."""
        top_p = self.top_p if 0.0 < self.top_p <= 1.0 else 1.0
        min_p = max(self.min_p, 0.0)
        top_k = 0 if self.top_k <= 0 else min(self.top_k, TOP_K_MAX, n_vocab)
        return SamplingParams(self.temperature, top_k, top_p, min_p, self.seed, self.dsml_greedy)


class XorShift64Star:
    """ds4's generator: xorshift64* with a 24-bit uniform float (runtime §3)."""

    def __init__(self, seed: int):
        self.state = (seed & _MASK64) or XORSHIFT_ZERO_STATE

    def next_u64(self) -> int:
        x = self.state
        x ^= x >> 12
        x ^= (x << 25) & _MASK64
        x ^= x >> 27
        self.state = x
        return (x * XORSHIFT_MULT) & _MASK64

    def uniform(self) -> float:
        """Uniform in [0, 1) with 24 bits of resolution."""
        return (self.next_u64() >> (64 - UNIFORM_BITS)) / float(1 << UNIFORM_BITS)


def to_numpy(logits) -> np.ndarray:
    """One conversion per call: torch (any device/dtype) or array-like -> float64 1-D numpy."""
    if hasattr(logits, "detach"):  # torch.Tensor, without importing torch
        logits = logits.detach().float().cpu().numpy()
    a = np.asarray(logits, dtype=np.float64)
    if a.ndim != 1:
        a = a.reshape(-1)
    return a


def _argmax(x: np.ndarray) -> int:
    """Argmax over finite values, lowest id on ties (np.argmax returns the first maximum)."""
    finite = np.isfinite(x)
    if not finite.any():
        return int(np.argmax(np.nan_to_num(x, nan=-np.inf)))
    return int(np.argmax(np.where(finite, x, -np.inf)))


def filtered_distribution(logits, params: SamplingParams) -> np.ndarray:
    """The exact distribution `Sampler.sample` draws from (probabilities over the vocab, zeros for cut
    tokens). Greedy gives a one-hot vector. Used by tests and for introspection."""
    x = to_numpy(logits)
    p = params.sanitized(x.size)
    out = np.zeros(x.size)
    if p.temperature <= 0 or not np.isfinite(x).any():
        out[_argmax(x)] = 1.0
        return out
    ids, w = _candidates(x, p)
    out[ids] = w / w.sum()
    return out


def _candidates(x: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Kept token ids (order matters for the draw) and their unnormalized weights."""
    finite = np.isfinite(x)
    all_finite = bool(finite.all())
    top = float(x.max() if all_finite else x[finite].max())
    # min-p keeps w = exp((x - top)/T) >= min_p, i.e. x >= top + T ln(min_p). A slightly loose logit
    # threshold picks a superset cheaply; the exact weight test below decides.
    if p.min_p > 0:
        thr = top + p.temperature * math.log(p.min_p)
        near = (x >= thr - 1e-9 * (1.0 + abs(thr))) & finite
    else:
        near = finite
    if p.top_k == 0 and p.top_p >= 1.0:
        # Path A: weights in id order, no sorting.
        ids = np.nonzero(near)[0]
        w = np.exp((x[ids] - top) / p.temperature)
        keep = w >= p.min_p
        return ids[keep], w[keep]
    xs = x if all_finite else np.where(finite, x, -np.inf)  # -inf weighs exp(-inf) = 0
    if p.top_k > 0:
        # Path C: the top_k by logit (earlier id first on ties); probabilities normalized over them.
        k = min(p.top_k, xs.size)
        kth = np.partition(xs, xs.size - k)[xs.size - k]
        above = np.nonzero(xs > kth)[0]
        ties = np.nonzero(xs == kth)[0][: k - above.size]  # a tie group cut by k: lowest ids win
        cand = np.concatenate([above, ties])
        cand = cand[finite[cand]]
        z = float(np.exp((xs[cand] - top) / p.temperature).sum())
        cand = cand[near[cand]]
    else:
        # Path B: probabilities normalized over every finite token; only the min-p survivors are sorted.
        z = float(np.exp((xs - top) / p.temperature).sum())
        cand = np.nonzero(near)[0]
    cand = cand[np.lexsort((cand, -x[cand]))]
    w = np.exp((x[cand] - top) / p.temperature)
    n = int(np.count_nonzero(w >= p.min_p))  # sorted descending: the survivors are a prefix
    n = max(n, 1)  # the top token is always kept
    if p.top_p < 1.0:
        reached = np.nonzero(np.cumsum(w[:n] / z) >= p.top_p)[0]
        if reached.size:
            n = int(reached[0]) + 1
    return cand[:n], w[:n]


class Sampler:
    """Draws token ids from logits with `SamplingParams`; one generator per sampler (seeded from
    params.seed, else from the OS). With `params.dsml_greedy` and a tokenizer, every sampled token is
    fed to a DSML tracker and structural DSML positions are decoded greedily."""

    def __init__(self, params: SamplingParams | None = None, tokenizer=None):
        self.params = params or SamplingParams()
        self.tokenizer = tokenizer
        self.reseed(self.params.seed)
        self._tracker = None
        self._stream = None
        if self.params.dsml_greedy:
            if tokenizer is None:
                raise ValueError("dsml_greedy needs the tokenizer to follow the generated text")
            self.reset()

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream (the CLI does this every REPL turn, so a seed replays each turn)."""
        if seed is None:
            seed = int.from_bytes(np.random.SeedSequence().generate_state(2, np.uint32).tobytes(), "little")
        self.rng = XorShift64Star(seed)

    def reset(self) -> None:
        """Start of a new generated turn: the DSML tracker forgets earlier text."""
        if self.params.dsml_greedy:
            from .chat import DsmlTracker

            self._tracker = DsmlTracker()
            self._stream = self.tokenizer.stream()

    @property
    def dsml_state(self):
        return None if self._tracker is None else self._tracker.state

    def observe(self, token_id: int) -> None:
        """Feed a token that was emitted without sampling (forced) to the DSML tracker."""
        if self._tracker is not None:
            self._tracker.feed(self._stream.push(int(token_id)))

    def sample(self, logits) -> int:
        x = to_numpy(logits)
        p = self.params.sanitized(x.size)
        greedy = p.temperature <= 0 or (self._tracker is not None and self._tracker.greedy)
        if greedy or not np.isfinite(x).any():
            tok = _argmax(x)
        else:
            ids, w = _candidates(x, p)
            r = self.rng.uniform() * float(w.sum())
            i = int(np.searchsorted(np.cumsum(w), r, side="right"))
            tok = int(ids[i]) if i < ids.size else _argmax(x)
        self.observe(tok)
        return tok


def top_logprobs(logits, k: int) -> list[tuple[int, float, float]]:
    """Top-k tokens by logit (lowest id first on ties) as (id, logit, logprob), logprob = logit -
    logsumexp over all finite logits in float64 (ds4's `--dump-logprobs`)."""
    x = to_numpy(logits)
    finite = np.isfinite(x)
    if not finite.any():
        return []
    xf = x[finite]
    m = xf.max()
    lse = m + math.log(float(np.exp(xf - m).sum()))
    cand = np.nonzero(finite)[0]
    k = min(max(0, k), cand.size)
    if k == 0:
        return []
    if k < cand.size:  # everything >= the k-th largest logit, then sort that small set
        kth = np.partition(x[cand], cand.size - k)[cand.size - k]
        cand = cand[x[cand] >= kth]
    order = np.lexsort((cand, -x[cand]))[:k]
    return [(int(cand[j]), float(x[cand[j]]), float(x[cand[j]] - lse)) for j in order]
