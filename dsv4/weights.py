"""Binding GGUF tensors (model.md §3) to typed per-layer weights of QTensor.

Opens the file with gguf.GGUFReader (memory-mapped, zero copy), builds the Config from metadata,
and binds and validates every tensor (name, logical shape, format). Knows no math.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import Config
from .quant.formats import QTensor, QuantFormat


@dataclass
class HCWeights:
    fn: QTensor  # [n_ctrl, S*D] F16
    scale: QTensor  # [3] or [1] F32
    base: QTensor  # [n_ctrl] F32


@dataclass
class LayerWeights:
    index: int
    hc_attn: HCWeights
    hc_ffn: HCWeights
    attn_norm: QTensor
    attn_q_a: QTensor  # [q_lora, D]
    attn_q_a_norm: QTensor
    attn_q_b: QTensor  # [H*Dh, q_lora]
    attn_kv: QTensor  # [Dh, D]
    attn_kv_a_norm: QTensor
    attn_sinks: QTensor  # [H]
    attn_output_a: QTensor  # [G*r_o, H/G*Dh]
    attn_output_b: QTensor  # [D, G*r_o]
    ffn_norm: QTensor
    ffn_gate_inp: QTensor  # [E, D]
    ffn_gate_exps: QTensor  # [E, F, D]
    ffn_up_exps: QTensor  # [E, F, D]
    ffn_down_exps: QTensor  # [E, D, F]
    ffn_gate_shexp: QTensor  # [F, D]
    ffn_up_shexp: QTensor
    ffn_down_shexp: QTensor  # [D, F]
    exp_probs_b: Optional[QTensor] = None  # [E] F32, optional
    ffn_gate_tid2eid: Optional[QTensor] = None  # [V, K] I32, hash layers only
    # compressed layers (ratio 4 and 128)
    attn_compressor_ape: Optional[QTensor] = None  # [r, Wc]
    attn_compressor_kv: Optional[QTensor] = None  # [Wc, D]
    attn_compressor_gate: Optional[QTensor] = None  # [Wc, D]
    attn_compressor_norm: Optional[QTensor] = None  # [Dh]
    # ratio-4 layers only
    indexer_attn_q_b: Optional[QTensor] = None  # [I*Di, q_lora]
    indexer_proj: Optional[QTensor] = None  # [I, D]
    indexer_compressor_ape: Optional[QTensor] = None  # [4, 2*Di]
    indexer_compressor_kv: Optional[QTensor] = None  # [2*Di, D]
    indexer_compressor_gate: Optional[QTensor] = None
    indexer_compressor_norm: Optional[QTensor] = None  # [Di]


@dataclass
class ModelWeights:
    config: Config
    token_embd: QTensor  # [V, D] F16
    output_hc: HCWeights  # fn [S, S*D], scale [1], base [S]
    output_norm: QTensor
    output: QTensor  # [V, D]
    layers: list[LayerWeights]
    path: str = ""
    reader: object = field(default=None, repr=False)  # keeps the memmap alive


# GGUF suffix -> LayerWeights attribute, for the tensors every layer has.
LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm",
    "attn_q_a.weight": "attn_q_a",
    "attn_q_a_norm.weight": "attn_q_a_norm",
    "attn_q_b.weight": "attn_q_b",
    "attn_kv.weight": "attn_kv",
    "attn_kv_a_norm.weight": "attn_kv_a_norm",
    "attn_sinks.weight": "attn_sinks",
    "attn_output_a.weight": "attn_output_a",
    "attn_output_b.weight": "attn_output_b",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate_inp.weight": "ffn_gate_inp",
    "ffn_gate_exps.weight": "ffn_gate_exps",
    "ffn_up_exps.weight": "ffn_up_exps",
    "ffn_down_exps.weight": "ffn_down_exps",
    "ffn_gate_shexp.weight": "ffn_gate_shexp",
    "ffn_up_shexp.weight": "ffn_up_shexp",
    "ffn_down_shexp.weight": "ffn_down_shexp",
}
OPTIONAL_LAYER_TENSORS = {
    "exp_probs_b.bias": "exp_probs_b",
    "ffn_gate_tid2eid.weight": "ffn_gate_tid2eid",
    "attn_compressor_ape.weight": "attn_compressor_ape",
    "attn_compressor_kv.weight": "attn_compressor_kv",
    "attn_compressor_gate.weight": "attn_compressor_gate",
    "attn_compressor_norm.weight": "attn_compressor_norm",
    "indexer.attn_q_b.weight": "indexer_attn_q_b",
    "indexer.proj.weight": "indexer_proj",
    "indexer_compressor_ape.weight": "indexer_compressor_ape",
    "indexer_compressor_kv.weight": "indexer_compressor_kv",
    "indexer_compressor_gate.weight": "indexer_compressor_gate",
    "indexer_compressor_norm.weight": "indexer_compressor_norm",
}


# --------------------------------------------------------------------------------------------
# Minimal binder (to be hardened: strict metadata types, every bad-input case of issue #2).
# --------------------------------------------------------------------------------------------

def _field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def config_from_reader(reader, path: str = "") -> Config:
    p = "deepseek4."
    g = lambda k: _field(reader, p + k)  # noqa: E731
    n_layer = int(g("block_count"))
    return Config(
        n_layer=n_layer, n_embd=int(g("embedding_length")), n_vocab=int(g("vocab_size")),
        n_head=int(g("attention.head_count")), head_dim=int(g("attention.key_length")),
        rope_dim=int(g("rope.dimension_count")), q_lora_rank=int(g("attention.q_lora_rank")),
        o_lora_rank=int(g("attention.output_lora_rank")), o_groups=int(g("attention.output_group_count")),
        n_expert=int(g("expert_count")), n_expert_used=int(g("expert_used_count")),
        expert_ff=int(g("expert_feed_forward_length")), n_shared=int(g("expert_shared_count")),
        n_hash_layers=int(g("hash_layer_count")), window=int(g("attention.sliding_window")),
        idx_heads=int(g("attention.indexer.head_count")), idx_dim=int(g("attention.indexer.key_length")),
        idx_topk=int(g("attention.indexer.top_k")), n_hc=int(g("hyper_connection.count")),
        sinkhorn_iters=int(g("hyper_connection.sinkhorn_iterations")),
        compress_ratios=tuple(int(x) for x in g("attention.compress_ratios"))[:n_layer],
        swiglu_clamp=tuple(float(x) for x in g("swiglu_clamp_exp"))[:n_layer],
        hc_eps=float(g("hyper_connection.epsilon")), rms_eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_base=float(g("rope.freq_base")), compress_rope_base=float(g("attention.compress_rope_freq_base")),
        yarn_factor=float(g("rope.scaling.factor")), yarn_beta_fast=float(g("rope.scaling.yarn_beta_fast")),
        yarn_beta_slow=float(g("rope.scaling.yarn_beta_slow")),
        yarn_orig_ctx=int(g("rope.scaling.original_context_length")),
        expert_weights_scale=float(g("expert_weights_scale")), expert_weights_norm=bool(g("expert_weights_norm")),
        context_length=int(g("context_length") or 0), name=str(_field(reader, "general.name") or ""),
    )


def _qtensor(t) -> QTensor:
    fmt = QuantFormat(int(t.tensor_type))
    shape = tuple(int(x) for x in reversed([int(v) for v in t.shape]))  # GGUF ne0-first -> math order
    return QTensor.from_bytes(t.data, fmt, shape, t.name)


def load_weights(path: str | Path) -> ModelWeights:
    import gguf

    path = str(path)
    reader = gguf.GGUFReader(path, "r")
    cfg = config_from_reader(reader, path)
    tensors = {t.name: _qtensor(t) for t in reader.tensors}

    def hc(prefix: str) -> HCWeights:
        return HCWeights(tensors[prefix + "_fn.weight"], tensors[prefix + "_scale.weight"], tensors[prefix + "_base.weight"])

    layers = []
    for l in range(cfg.n_layer):
        b = f"blk.{l}."
        kw = {attr: tensors[b + suf] for suf, attr in LAYER_TENSORS.items()}
        kw.update({attr: tensors[b + suf] for suf, attr in OPTIONAL_LAYER_TENSORS.items() if b + suf in tensors})
        layers.append(LayerWeights(index=l, hc_attn=hc(b + "hc_attn"), hc_ffn=hc(b + "hc_ffn"), **kw))
    return ModelWeights(
        config=cfg, token_embd=tensors["token_embd.weight"], output_hc=hc("output_hc"),
        output_norm=tensors["output_norm.weight"], output=tensors["output.weight"], layers=layers,
        path=path, reader=reader,
    )
