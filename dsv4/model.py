"""DeepSeek V4 Flash, written once against the op contract (model.md §4-6).

`Model.forward(ids, p0, state)` runs T consecutive tokens at positions p0..p0+T-1 layer-major through
every layer, updating the session state in place, and returns the final HC state [T, S, D];
`Model.logits()` applies the output head. One token (decode) and a prefill chunk are the same code.
Positions and row counts are host ints (known from the token count); numpy is used only for that
index bookkeeping. Knows no framework: every array operation goes through `ops`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .cache.state import LayerState, SessionState, n_compressed
from .config import ROUTER_WEIGHT_FLOOR, Config, LayerKind
from .ops import Ops, RopeParams
from .quant.formats import QTensor
from .weights import HCWeights, LayerWeights, ModelWeights

MTP_LAYER_INDEX = 1  # ds4 runs the MTP block as layer 1: ratio 0, base 10000, no YaRN (model.md §6)


def rope_params(cfg: Config, layer: int) -> RopeParams:
    """Per-layer-class RoPE (model.md §4.3.4): layers without compression use the plain base."""
    if cfg.ratio(layer) == 0:
        return RopeParams(cfg.rope_dim, cfg.rope_base)
    return RopeParams(cfg.rope_dim, cfg.compress_rope_base, 1.0 / cfg.yarn_factor, True, cfg.yarn_orig_ctx,
                      cfg.yarn_beta_fast, cfg.yarn_beta_slow)


def raw_visibility(q_pos: np.ndarray, key_pos: np.ndarray, window: int) -> np.ndarray:
    """[T, N] bool: query at p sees raw rows of positions (p - W, p]."""
    return (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > q_pos[:, None] - window)


def comp_visible_counts(q_pos: np.ndarray, ratio: int) -> np.ndarray:
    """[T]: compressed rows visible to a query at p: floor((p + 1) / r)."""
    return (q_pos + 1) // ratio


def emitted_rows(p0: int, T: int, ratio: int) -> range:
    """Compressed row indices emitted while processing positions p0..p0+T-1 (row m at p = r m + r - 1)."""
    return range(n_compressed(p0, ratio), n_compressed(p0 + T, ratio))


@dataclass
class MtpWeights:
    """The MTP block of model.md §3.4: one ratio-0 layer plus its input projections and output head."""

    e_proj: QTensor
    h_proj: QTensor
    enorm: QTensor
    hnorm: QTensor
    norm: QTensor
    hc_head: HCWeights
    block: LayerWeights


class Model:
    def __init__(self, weights: ModelWeights, ops: Ops, mtp: Optional[MtpWeights] = None):
        self.w = weights
        self.cfg = weights.config
        self.ops = ops
        self.mtp = mtp

    # ---- building blocks --------------------------------------------------------------------------
    def _attention(self, lw: LayerWeights, layer: int, n, ids_pos: np.ndarray, st: LayerState,
                   ratio: int, rope: RopeParams):
        ops, cfg = self.ops, self.cfg
        T = n.shape[0]
        p0 = int(ids_pos[0])
        pos = ops.asarray(ids_pos)
        H, Dh, R = cfg.n_head, cfg.head_dim, cfg.rope_dim

        cq = ops.rms_norm(ops.qmatmul(n, lw.attn_q_a), lw.attn_q_a_norm, cfg.rms_eps)  # [T, q_lora]
        q = ops.qmatmul(cq, lw.attn_q_b).reshape(T, H, Dh)
        q = ops.rope_tail(ops.rms_norm(q, None, cfg.rms_eps), pos, rope)  # [T, H, Dh]
        kv = ops.rms_norm(ops.qmatmul(n, lw.attn_kv), lw.attn_kv_a_norm, cfg.rms_eps)  # [T, Dh]
        kv = ops.rope_tail(kv.reshape(T, 1, Dh), pos, rope).reshape(T, Dh)
        kv = ops.f16_round(ops.kv_fp8_sim(kv, R))

        # raw window: previous rows from the ring (logical order) + this call's rows
        W = cfg.window
        prev_pos = np.arange(max(0, p0 - (W - 1)), p0, dtype=np.int64)
        keys = [ops.take(st.raw, ops.asarray(prev_pos % W))] if len(prev_pos) else []
        keys.append(kv)
        key_pos = np.concatenate((prev_pos, ids_pos))
        allowed = [ops.asarray(raw_visibility(ids_pos, key_pos, W))]

        if ratio:
            rows = emitted_rows(p0, T, ratio)
            cpos = ops.asarray(np.asarray(rows, dtype=np.int64) * ratio)  # RoPE at each window's first token
            pooled = ops.compress(ops.qmatmul(n, lw.attn_compressor_kv), ops.qmatmul(n, lw.attn_compressor_gate),
                                  lw.attn_compressor_ape, st.comp_front_kv, st.comp_front_score, p0, ratio)
            if len(rows):
                c = ops.rms_norm(pooled, lw.attn_compressor_norm, cfg.rms_eps)
                c = ops.rope_tail(c.reshape(len(rows), 1, Dh), cpos, rope).reshape(len(rows), Dh)
                c = ops.f16_round(ops.kv_fp8_sim(c, R))
                st.put_comp(ops, np.asarray(rows, dtype=np.int64), c)
            n_end = n_compressed(p0 + T, ratio)
            n_vis = comp_visible_counts(ids_pos, ratio)
            comp_allowed = None
            if ratio == LayerKind.RATIO4:
                Di = cfg.idx_dim
                ipooled = ops.compress(ops.qmatmul(n, lw.indexer_compressor_kv),
                                       ops.qmatmul(n, lw.indexer_compressor_gate), lw.indexer_compressor_ape,
                                       st.idx_front_kv, st.idx_front_score, p0, ratio)
                if len(rows):
                    ic = ops.rms_norm(ipooled, lw.indexer_compressor_norm, cfg.rms_eps)
                    ic = ops.rope_tail(ic.reshape(len(rows), 1, Di), cpos, rope).reshape(len(rows), Di)
                    ic = ops.f16_round(ops.indexer_fp4_sim(ic))
                    ops.put(st.idx, ops.asarray(np.asarray(rows, dtype=np.int64)), ic)
                if int(n_vis.max()) > cfg.idx_topk:  # the indexer runs only once more rows than top-k exist
                    I = cfg.idx_heads
                    qi = ops.qmatmul(cq, lw.indexer_attn_q_b).reshape(T, I, Di)
                    qi = ops.indexer_fp4_sim(ops.rope_tail(qi, pos, rope))
                    wi = ops.qmatmul(n, lw.indexer_proj)  # [T, I]
                    comp_allowed = ops.indexer_topk(qi, wi, st.idx[:n_end], ops.asarray(n_vis), cfg.idx_topk,
                                                    1.0 / math.sqrt(Di * I))
            if n_end:
                if comp_allowed is None:
                    comp_allowed = ops.asarray(np.arange(n_end)[None, :] < n_vis[:, None])
                keys.append(st.comp_keys(ops, n_end, comp_allowed))
                allowed.append(comp_allowed)

        kvs = ops.cat(keys, 0) if len(keys) > 1 else keys[0]
        mask = ops.cat(allowed, 1) if len(allowed) > 1 else allowed[0]
        o = ops.sink_attention(q, kvs, mask, lw.attn_sinks, 1.0 / math.sqrt(Dh))  # [T, H, Dh]
        o = ops.rope_tail(o, pos, rope, inverse=True)
        G = cfg.o_groups
        low = ops.qmatmul_grouped(o.reshape(T, G, H // G * Dh), lw.attn_output_a, G)  # [T, G*r_o]
        y = ops.qmatmul(low, lw.attn_output_b)  # [T, D]

        # state write after attention: the ring slots of the last min(T, W) positions
        tail = ids_pos[-min(T, W):]
        ops.put(st.raw, ops.asarray(tail % W), kv[T - len(tail):])
        return y

    def _ffn(self, lw: LayerWeights, layer: int, u, ids):
        ops, cfg = self.ops, self.cfg
        hash_layer = lw.ffn_gate_tid2eid is not None
        sel, wts = ops.router(u, lw.ffn_gate_inp, None if hash_layer else lw.exp_probs_b,
                              lw.ffn_gate_tid2eid if hash_layer else None, ids, cfg.n_expert_used,
                              cfg.expert_weights_scale, ROUTER_WEIGHT_FLOOR)
        clamp = cfg.swiglu_clamp[layer] if layer < len(cfg.swiglu_clamp) else cfg.swiglu_clamp[-1]
        y = ops.moe(u, lw.ffn_gate_exps, lw.ffn_up_exps, lw.ffn_down_exps, sel, wts, clamp)
        sh = ops.swiglu(ops.qmatmul(u, lw.ffn_gate_shexp), ops.qmatmul(u, lw.ffn_up_shexp), clamp)
        return y + ops.qmatmul(sh, lw.ffn_down_shexp)

    def block(self, lw: LayerWeights, layer: int, X, ids, ids_pos: np.ndarray, st: LayerState,
              ratio: int, rope: RopeParams):
        """One transformer block on the HC state X [T, S, D] (model.md §4.3-4.4)."""
        ops, cfg = self.ops, self.cfg
        hc = lw.hc_attn
        x, post, comb = ops.hc_pre(X, hc.fn, hc.scale, hc.base, cfg.sinkhorn_iters, cfg.hc_eps, cfg.rms_eps)
        n = ops.rms_norm(x, lw.attn_norm, cfg.rms_eps)
        y = self._attention(lw, layer, n, ids_pos, st, ratio, rope)
        X = ops.hc_post(X, y, post, comb)
        hc = lw.hc_ffn
        x, post, comb = ops.hc_pre(X, hc.fn, hc.scale, hc.base, cfg.sinkhorn_iters, cfg.hc_eps, cfg.rms_eps)
        u = ops.rms_norm(x, lw.ffn_norm, cfg.rms_eps)
        return ops.hc_post(X, self._ffn(lw, layer, u, ids), post, comb)

    def embed_hc(self, ids):
        """[T] ids -> HC state [T, S, D]: every stream a copy of the embedding."""
        e = self.ops.embed(self.w.token_embd, ids)  # [T, D]
        S = self.cfg.n_hc
        return self.ops.cat([e.reshape(e.shape[0], 1, e.shape[1])] * S, 1)

    # ---- public -----------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, p0: int, state: SessionState):
        """Tokens ids [T] at positions p0.. -> final HC state [T, S, D]; state updated in place."""
        ids = np.asarray(ids, dtype=np.int64)
        ids_pos = np.arange(p0, p0 + len(ids), dtype=np.int64)
        ids_a = self.ops.asarray(ids)
        X = self.embed_hc(ids_a)
        for l, lw in enumerate(self.w.layers):
            X = self.block(lw, l, X, ids_a, ids_pos, state.layers[l], self.cfg.ratio(l), rope_params(self.cfg, l))
        return X

    def logits(self, X, hc: Optional[HCWeights] = None, norm: Optional[QTensor] = None):
        """Output head (model.md §4.5) on HC states [T, S, D] -> [T, V]."""
        ops, cfg = self.ops, self.cfg
        hc = hc or self.w.output_hc
        z = ops.hc_head(X, hc.fn, hc.scale, hc.base, cfg.hc_eps, cfg.rms_eps)
        return ops.qmatmul(ops.rms_norm(z, norm or self.w.output_norm, cfg.rms_eps), self.w.output)

    # ---- MTP draft (model.md §6) --------------------------------------------------------------------
    def mtp_allocate(self, ctx: int) -> LayerState:
        return LayerState.allocate(self.ops, self.cfg.with_layers(MTP_LAYER_INDEX + 1), MTP_LAYER_INDEX, ctx)

    def mtp_step(self, token: int, p: int, prev_X, mtp_state: LayerState):
        """One draft: previous final HC state prev_X [1, S, D] and token x_p at position p ->
        (draft logits [1, V], the block's output HC state [1, S, D] for the next recursion)."""
        assert self.mtp is not None, "no MTP weights loaded"
        ops, cfg, m = self.ops, self.cfg, self.mtp
        ids_a = ops.asarray(np.asarray([token], dtype=np.int64))
        e = ops.qmatmul(ops.rms_norm(ops.embed(self.w.token_embd, ids_a), m.enorm, cfg.rms_eps), m.e_proj)
        S, D = cfg.n_hc, cfg.n_embd
        h = ops.qmatmul(ops.rms_norm(prev_X.reshape(S, D), m.hnorm, cfg.rms_eps), m.h_proj)  # [S, D]
        X = ops.cat([e] * S, 0) + h
        X = X.reshape(1, S, D)
        # hash routing is off for the MTP block: tid2eid is absent, so the router uses top-k with bias
        X = self.block(m.block, MTP_LAYER_INDEX, X, ids_a, np.asarray([p], dtype=np.int64), mtp_state, 0,
                       RopeParams(cfg.rope_dim, cfg.rope_base))
        return self.logits(X, m.hc_head, m.norm), X

