"""The op contract: the closed list of operations `model.py` is written against.

A backend (reference.TorchOps, kernels_triton.TritonOps, kernels_mlx.MlxOps) implements every op
for its own array type `A`. Each docstring is the exact math; the reference is its executable form.
Knows no framework: arrays are opaque here.

Dimension legend (used in every shape comment of the model and the backends):
  T tokens in the call        D model width (n_embd)      H attention heads     Dh head dim (512)
  R rope dims (64, the tail)  E routed experts            K experts per token   F expert width
  S hyper-connection streams  W raw window (128)          C compressed rows     V vocabulary
  I indexer heads             Di indexer head dim         Wc compressor width   G output groups
Positions are 0-based absolute token positions. Float arrays are the backend's compute dtype
(fp32 unless stated); integer arrays are int32/int64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from .quant.formats import QTensor

A = Any  # a backend array


@dataclass(frozen=True)
class RopeParams:
    """RoPE of one layer class (model.md §4.3.4): interleaved pairs on the last `n_dims` dims."""

    n_dims: int
    base: float
    freq_scale: float = 1.0  # 1/yarn_factor on compressed layers
    yarn: bool = False
    orig_ctx: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@runtime_checkable
class Ops(Protocol):
    """Backend operations. Methods never synchronize with the host except `numpy()`."""

    name: str

    # ---- plumbing -------------------------------------------------------------------------------
    def prepare(self, w: QTensor) -> QTensor:
        """Once per weight at load: upload / repack into the backend's form. Same math afterwards."""

    def asarray(self, x: np.ndarray) -> A:
        """Host array -> backend array (floats in the compute dtype, ints as int64)."""

    def numpy(self, x: A) -> np.ndarray:
        """Backend array -> host numpy (floats as float32). The only host sync of a decode step."""

    def weight(self, w: QTensor) -> A:
        """Small tensor (norm gains, sinks, biases, ape) dequantized to a compute-dtype array (cacheable)."""

    # ---- math -----------------------------------------------------------------------------------
    def embed(self, table: QTensor, ids: A) -> A:
        """[T] ids -> [T, D]: rows of the table, dequantized (F16 -> float, no scaling)."""

    def qmatmul(self, x: A, w: QTensor) -> A:
        """[T, in] x w[out, in] (any QuantFormat) -> [T, out] = x @ dequant(w).T, fp32 accumulation."""

    def qmatmul_grouped(self, x: A, w: QTensor, groups: int) -> A:
        """[T, G, in] with w[G*r, in] -> [T, G*r]: group g uses rows [g*r, (g+1)*r) of w on x[:, g]."""

    def rms_norm(self, x: A, w: Optional[QTensor], eps: float) -> A:
        """Over the last dim: x / sqrt(mean(x^2) + eps) * w (no gain when w is None)."""

    def hc_pre(self, X: A, fn: QTensor, scale: QTensor, base: QTensor, iters: int, eps: float,
               rms_eps: float) -> tuple[A, A, A]:
        """Hyper-connection pre (model.md §4.2). X [T, S, D] ->
        (x [T, D] = sum_s a_s X[s],  post [T, S] = b,  comb [T, S, S] = Sinkhorn(C), C[r][c] r=source).
        m = fn @ rms0(flat(X)) (24 controls); a = sigmoid(m[0:S]*scale0 + base) + eps;
        b = 2*sigmoid(m[S:2S]*scale1 + base); C = m[2S:]*scale2 + base -> row softmax + eps,
        column normalize, then iters-1 rounds of (row normalize, column normalize); denominators + eps."""

    def hc_post(self, X: A, y: A, post: A, comb: A) -> A:
        """X [T, S, D], y [T, D] -> X'[t, c] = post[t, c] * y[t] + sum_r comb[t, r, c] * X[t, r]."""

    def hc_head(self, X: A, fn: QTensor, scale: QTensor, base: QTensor, eps: float, rms_eps: float) -> A:
        """Output collapse (model.md §4.5): w = sigmoid((fn @ rms0(flat X)) * scale0 + base) + eps;
        returns [T, D] = sum_s w_s X[s]."""

    def rope_tail(self, x: A, pos: A, rope: RopeParams, inverse: bool = False) -> A:
        """x [T, N, Dh]: rotate the last rope.n_dims dims of every head at its token's position
        (interleaved pairs (2k, 2k+1), YaRN ramp, fp32 angle recipe of model.md §4.3.4). inverse flips sin."""

    def kv_fp8_sim(self, x: A, n_rot: int) -> A:
        """x [..., Dh]: FP8-E4M3 round trip of dims [0, Dh-n_rot) in 64-blocks with power-of-two scales
        (model.md §4.3.5); rope dims untouched."""

    def f16_round(self, x: A) -> A:
        """Round every element to the nearest float16 and back (cached rows)."""

    def indexer_fp4_sim(self, x: A) -> A:
        """x [..., 128]: Hadamard (Sylvester, /sqrt(128)) then FP4-E2M1 round trip in 32-blocks with
        power-of-two scales (model.md §4.3.8)."""

    def swiglu(self, gate: A, up: A, clamp: float) -> A:
        """silu(min(gate, clamp)) * clip(up, -clamp, clamp)."""

    def router(self, u: A, w: QTensor, bias: Optional[QTensor], tid2eid: Optional[QTensor], ids: A,
               k: int, scale: float, floor: float) -> tuple[A, A]:
        """Routing (model.md §4.4.2). u [T, D] -> (sel [T, K] int, weights [T, K] float).
        p = sqrt(softplus(u @ w.T)); hash layers (tid2eid given): sel = tid2eid[ids]; else
        sel = top-K of p + bias (ties -> lower expert id); weights = p[sel] / max(sum p[sel], floor) * scale."""

    def moe(self, u: A, gate: QTensor, up: QTensor, down: QTensor, sel: A, weights: A, clamp: float) -> A:
        """Routed experts for all K at once. u [T, D]; gate/up [E, F, D]; down [E, D, F]; sel, weights [T, K].
        out[t] = sum_i down[sel[t,i]] @ (swiglu(gate[e] @ u[t], up[e] @ u[t], clamp) * weights[t, i])."""

    # ---- attention and its state ------------------------------------------------------------------
    def zeros(self, shape: Sequence[int], fill: float = 0.0, integer: bool = False) -> A:
        """New array of `shape` filled with `fill` (compute dtype, or int64 when integer). State buffers."""

    def cat(self, xs: Sequence[A], axis: int = 0) -> A:
        """Concatenate along `axis`."""

    def take(self, x: A, idx: A) -> A:
        """Rows of x along dim 0: x[idx] (idx int [N])."""

    def put(self, buf: A, idx: A, rows: A) -> None:
        """In place: buf[idx[i]] = rows[i] (state writes: raw ring slots, compressed rows)."""

    def compress(self, kv: A, score: A, ape: QTensor, front_kv: A, front_score: A, p0: int,
                 ratio: int) -> A:
        """Compressor pooling with streaming frontier state (model.md §4.3.7), for T consecutive tokens
        at positions p0..p0+T-1. kv, score [T, Wc] (projections; ape[p mod ratio] is added to score here).
        Frontier (updated in place): ratio 128: front_* [128, Wc], token of phase f in row f;
        ratio 4: front_* [8, Wc] (Wc = 2*Dc), rows 0..3 = previous complete window, rows 4+f = current.
        Returns the pooled rows [M, Dc] of every window completed in the call (M = #{p: (p+1) % ratio == 0}),
        row j per channel: sum softmax(score) * value over the window's tokens (ratio 128: 128 tokens, Dc=Wc);
        ratio 4: 8 candidates = previous window's first halves [:Dc] + current window's second halves [Dc:].
        Empty frontier rows hold value 0 / score NEG_SENTINEL (weight 0); rows outside a live window are
        reset to that after the call."""

    def indexer_topk(self, q: A, w: A, keys: A, n_vis: A, top_k: int, scale: float) -> A:
        """Indexer selection (model.md §4.3.8). q [T, I, Di] (RoPE'd, Hadamard+FP4'd), w [T, I] (= W_proj n),
        keys [C, Di] indexer rows, n_vis [T] int visible rows per query (row c visible iff c < n_vis[t]).
        s[t, c] = scale * sum_i w[t, i] * relu(q[t, i] . keys[c]). Returns allowed [T, C] bool: every visible
        row when n_vis[t] <= top_k, else the top_k visible rows by s (ties -> lower index)."""

    def sink_attention(self, q: A, kv: A, allowed: A, sinks: QTensor, scale: float) -> A:
        """One-KV-head attention with per-head sinks (model.md §4.3.9). q [T, H, Dh], kv [N, Dh] (K = V),
        allowed [T, N] bool. z = scale * q . kv; mu = max(sink_h, max z); den = e^(sink_h - mu) + sum e^(z - mu);
        o[t, h] = sum e^(z - mu) kv / den (sink only in the denominator). Returns [T, H, Dh]."""


# Arrays of every backend also support `.shape`, `.reshape(...)`, basic slicing `x[a:b]`, `x[:, i]` and
# elementwise `+` / `*` between equal shapes or with a Python float: the model uses nothing else.
OP_NAMES = tuple(n for n in Ops.__dict__ if not n.startswith("_") and callable(getattr(Ops, n)))
