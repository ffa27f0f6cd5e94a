"""MTP draft step (model.md §6) on a synthetic mtp.0.* GGUF written here from the tiny model's tensors."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import dsv4
from dsv4.model import MTP_LAYER_INDEX
from dsv4.ops import RopeParams
from tests.tolerances import assert_close

torch.set_num_threads(1)

BLOCK_SUFFIXES = ("hc_attn_fn", "hc_attn_scale", "hc_attn_base", "hc_ffn_fn", "hc_ffn_scale", "hc_ffn_base",
                  "attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv", "attn_kv_a_norm", "attn_sinks",
                  "attn_output_a", "attn_output_b", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                  "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


def write_mtp(src_path, out_path, e_scale: float):
    r = gguf.GGUFReader(str(src_path))
    t = {x.name: x for x in r.tensors}
    D = int(t["output_norm.weight"].shape[0])
    w = gguf.GGUFWriter(str(out_path), "deepseek4")

    def raw(name, x):
        w.add_tensor(name, np.asarray(x.data), raw_dtype=x.tensor_type)

    for suf in BLOCK_SUFFIXES:
        raw(f"mtp.0.{suf}.weight", t[f"blk.3.{suf}.weight"])
    raw("mtp.0.exp_probs_b.bias", t["blk.3.exp_probs_b.bias"])
    raw("mtp.0.hc_head_fn.weight", t["output_hc_fn.weight"])
    raw("mtp.0.hc_head_scale.weight", t["output_hc_scale.weight"])
    raw("mtp.0.hc_head_base.weight", t["output_hc_base.weight"])
    for n in ("enorm", "hnorm", "norm"):
        raw(f"mtp.0.{n}.weight", t["output_norm.weight"])
    w.add_tensor("mtp.0.e_proj.weight", (np.eye(D) * e_scale).astype(np.float16))
    w.add_tensor("mtp.0.h_proj.weight", np.eye(D, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("e_scale", [0.0, 0.5])
def test_mtp_draft_step_wiring(tiny_q2_path, tmp_path, e_scale):
    mtp_path = tmp_path / "mtp.gguf"
    write_mtp(tiny_q2_path, mtp_path, e_scale)
    eng = dsv4.load(tiny_q2_path, backend="torch", mtp=str(mtp_path))
    s = eng.new_session(ctx=64)
    s.prefill([11, 22, 33, 44, 55])
    drafts = s.mtp_draft(2)
    # the same step composed by hand: e = E rms(embed(x); enorm), h_s = H rms(P_s; hnorm), one ratio-0 block at
    # position p on a fresh raw window, then the MTP head
    ops, model, m, cfg = eng.ops, eng.model, eng.model.mtp, eng.config
    P = s.last_hidden  # [1, S, D]
    emb = ops.embed(eng.weights.token_embd, torch.tensor([55]))
    e = ops.rms_norm(emb, m.enorm, cfg.rms_eps) * e_scale
    h = ops.rms_norm(P.reshape(cfg.n_hc, cfg.n_embd), m.hnorm, cfg.rms_eps)
    X = (h + e).reshape(1, cfg.n_hc, cfg.n_embd)
    st = model.mtp_allocate(64)
    X = model.block(m.block, MTP_LAYER_INDEX, X, torch.tensor([55]), np.array([4]), st, 0,
                    RopeParams(cfg.rope_dim, cfg.rope_base))
    want = ops.numpy(model.logits(X, m.hc_head, m.norm))[0]
    first, X2 = model.mtp_step(55, 4, P, model.mtp_allocate(64))
    assert_close(ops.numpy(first)[0], want, "model", "prefill_vs_decode", "MTP draft logits vs hand composition")
    assert drafts[0] == int(np.argmax(want))
    second, _ = model.mtp_step(drafts[0], 5, X2, model.mtp_allocate(64))
    assert len(drafts) == 2 and 0 <= drafts[1] < cfg.n_vocab
    # the main timeline is untouched by drafting
    assert s.n_past == 5


def test_mtp_missing_tensor_is_model_file_error(tiny_q2_path, tmp_path):
    from dsv4.errors import ModelFileError

    p = tmp_path / "bad_mtp.gguf"
    w = gguf.GGUFWriter(str(p), "deepseek4")
    w.add_tensor("mtp.0.norm.weight", np.ones(256, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="lacks tensor"):
        dsv4.load(tiny_q2_path, backend="torch", mtp=str(p))
