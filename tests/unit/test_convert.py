"""The official HF checkpoint layout (dsv4.quant.convert): FP8/FP4/E8M0 decoders against torch and
hand-packed bytes, the model.md §3.5 name map, config.json round trip, and a written checkpoint read back
tensor by tensor (experts stacked in id order).

Also owns `artifacts()`: the HF checkpoint and quantized files the quant tests share, built once per run
(test_requant.py, test_quality.py and test_notebooks.py import it).
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv4.config import tiny
from dsv4.errors import ModelFileError
from dsv4.quant import convert
from dsv4.quant.convert import (
    HfCheckpoint, config_from_hf, config_to_hf, dequant_fp4, dequant_fp8, e8m0_to_f32, encode_fp4, encode_fp8,
    hf_name, iter_hf_tensors, write_hf_checkpoint,
)
from dsv4.weights import expected_tensors
from tests.tolerances import assert_close

# Tiny widths (design.md §4), 3 layers = raw, raw, ratio-4 (compressor + indexer), 2 hash-routed layers and
# one top-k layer: every tensor family of the layout. 4 experts (2 used) keep the expert weights few: the
# IQ2_XXS/Q2_K/Q4_K searches run at ~0.1 Mw/s on a CI core, and each expert matrix is 65k weights.
HF_CFG = dataclasses.replace(tiny(3), n_hash_layers=2, n_expert=4, n_expert_used=2)
# One top-k layer with 2 experts (both used: routing is trivial, the quantizer work halves): the q4 file
# that the q4 -> q2 requantization, quality and imatrix tests start from.
HF1_CFG = dataclasses.replace(tiny(1), n_hash_layers=0, n_expert=2, n_expert_used=2)


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dsv4-quant-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.lru_cache(maxsize=None)
def artifacts(kind: str) -> Path:
    """Shared, built once: 'hf' checkpoint folder, 'hf_q2' (dsv4 quantize --recipe q2 of it), 'hf1' (one
    layer), 'q4' (hf1 quantized with recipe q4), 'q4_q2' (that q4 file requantized to q2 experts)."""
    from dsv4.cli import main

    root = _root()
    if kind == "hf":
        return write_hf_checkpoint(root / "hf", HF_CFG, seed=0)
    if kind == "hf_q2":
        out = root / "hf_q2.gguf"
        assert main(["quantize", str(artifacts("hf")), str(out), "--recipe", "q2"]) == 0
        return out
    if kind == "hf1":
        return write_hf_checkpoint(root / "hf1", HF1_CFG, seed=3)
    if kind == "q4":
        from dsv4.quant.requant import quantize_model

        return quantize_model(artifacts("hf1"), root / "q4.gguf", "q4").path
    if kind == "q4_q2":
        out = root / "q4_q2.gguf"
        assert main(["quantize", str(artifacts("q4")), str(out), "--recipe", "q2"]) == 0
        return out
    raise KeyError(kind)


# ---- encodings -----------------------------------------------------------------------------------------

def test_e4m3_decoder_matches_torch_on_all_codes():
    codes = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy()
    want = np.where(np.isnan(want), 0.0, want)  # NaN codes read as 0 (ds4's converter)
    assert_close(convert.E4M3_TABLE, want, "dequant", "all", "E4M3 table vs torch float8_e4m3fn")


def test_e8m0_values_and_nan_rejected():
    assert_close(e8m0_to_f32(np.array([127, 128, 120, 1], np.uint8)), [1.0, 2.0, 2.0 ** -7, 2.0 ** -126],
                 "dequant", "all", "E8M0 = 2^(e-127)")
    with pytest.raises(ModelFileError, match="NaN"):
        e8m0_to_f32(np.array([255], np.uint8))


def test_fp4_hand_packed_bytes():
    # byte 0x21: element 0 = low nibble code 1 (+0.5), element 1 = high nibble code 2 (+1.0);
    # 0xF9: element 2 = code 9 (-0.5), element 3 = code 15 (-6.0); row 0 scale 2^1, row 1 scale 2^-1
    packed = np.zeros((2, 16), np.uint8)
    packed[0, :2] = [0x21, 0xF9]
    packed[1, 15] = 0x7A  # elements 30, 31: code 10 (-1.0), code 7 (+6.0)
    scale = np.array([[128], [126]], np.uint8)
    got = dequant_fp4(packed.view(np.int8), scale)
    want = np.zeros((2, 32), np.float32)
    want[0, :4] = [1.0, 2.0, -1.0, -12.0]
    want[1, 30:] = [-0.5, 3.0]
    assert_close(got, want, "dequant", "all", "FP4 nibble order / sign / table")


def test_fp8_block_scales_apply_per_128x128_block():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 300)).astype(np.float32)
    x[:128, :128] *= 1000.0  # one block far larger: its scale must not leak into neighbours
    w, s = encode_fp8(x)
    assert s.shape == (2, 3)
    want = torch.from_numpy(w).view(torch.float8_e4m3fn).float().numpy()
    sc = np.ldexp(1.0, s.astype(np.int32) - 127)
    want = want * np.repeat(np.repeat(sc, 128, 0)[:200], 128, 1)[:, :300]
    assert_close(dequant_fp8(w, s), want, "dequant", "all", "FP8 block dequant")
    rel = np.linalg.norm(dequant_fp8(w, s)[128:, 128:] - x[128:, 128:]) / np.linalg.norm(x[128:, 128:])
    assert rel < 0.04, f"E4M3 with a power-of-two block scale keeps ~2^-4 relative precision, got {rel}"
    with pytest.raises(ModelFileError, match="FP8 scale has shape"):
        dequant_fp8(w, s[:1])


def test_fp4_encoder_round_trip_error():
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    p, s = encode_fp4(x)
    assert p.dtype == np.int8 and p.shape == (64, 128) and s.shape == (64, 8)
    rel = np.linalg.norm(dequant_fp4(p, s) - x) / np.linalg.norm(x)
    assert 0.05 < rel < 0.2, f"MXFP4 of a Gaussian has ~10% relative RMSE, got {rel}"


# ---- names and config -------------------------------------------------------------------------------------

def test_name_map_covers_every_tensor_and_experts_stack_by_id():
    for s in expected_tensors(HF_CFG):
        hf_name(s.name)  # raises for an unmapped name
    h = hf_name("blk.3.ffn_down_exps.weight")
    assert (h.expert_weight(7), h.expert_scale(7)) == ("layers.3.ffn.experts.7.w2.weight", "layers.3.ffn.experts.7.w2.scale")
    assert hf_name("blk.0.ffn_gate_exps.weight").part == "w1" and hf_name("blk.0.ffn_up_exps.weight").part == "w3"
    assert hf_name("blk.4.exp_probs_b.bias").hf == "layers.4.ffn.gate.bias"
    assert hf_name("blk.1.attn_sinks.weight").hf == "layers.1.attn.attn_sink"
    assert hf_name("blk.2.indexer_compressor_kv.weight").hf == "layers.2.attn.indexer.compressor.wkv.weight"
    assert hf_name("output.weight").hf == "head.weight" and hf_name("output_hc_fn.weight").hf == "hc_head_fn"
    with pytest.raises(ValueError, match="no Hugging Face name"):
        hf_name("blk.0.made_up.weight")


def test_config_json_round_trip_and_missing_key():
    assert config_from_hf(config_to_hf(HF_CFG)).fingerprint() == HF_CFG.fingerprint()
    data = config_to_hf(HF_CFG)
    del data["moe_intermediate_size"]
    with pytest.raises(ModelFileError, match="moe_intermediate_size"):
        config_from_hf(data)


# ---- a written checkpoint read back ----------------------------------------------------------------------

def test_checkpoint_reads_back_encoded_values():
    ck = HfCheckpoint(artifacts("hf"))
    assert ck.config.fingerprint() == HF_CFG.fingerprint()
    gen = {name: (x, enc) for name, x, enc in iter_hf_tensors(HF_CFG, seed=0)}
    # FP8 projection, BF16 matrix, F32 vector, I64 hash table: decoded = what the writer encoded
    x, _ = gen["layers.2.attn.wq_a.weight"]
    w, s = encode_fp8(x)
    assert_close(ck.tensor("blk.2.attn_q_a.weight"), dequant_fp8(w, s), "dequant", "all", "FP8 tensor")
    x, _ = gen["layers.1.ffn.gate.weight"]
    bf = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert_close(ck.tensor("blk.1.ffn_gate_inp.weight"), bf, "dequant", "all", "BF16 tensor")
    x, _ = gen["layers.0.attn_norm.weight"]
    assert_close(ck.tensor("blk.0.attn_norm.weight"), x, "dequant", "all", "F32 vector")
    x, _ = gen["layers.0.ffn.gate.tid2eid"]
    assert np.array_equal(ck.tensor("blk.0.ffn_gate_tid2eid.weight"), x.astype(np.int32))
    # experts: expert e of the stacked GGUF tensor is layers.L.ffn.experts.e
    name = "blk.2.ffn_down_exps.weight"
    assert ck.shape(name) == (HF_CFG.n_expert, HF_CFG.n_embd, HF_CFG.expert_ff)
    for e in (0, 3):
        p, s = encode_fp4(gen[f"layers.2.ffn.experts.{e}.w2.weight"][0])
        assert_close(ck.expert(name, e), dequant_fp4(p, s), "dequant", "all", f"expert {e}")
    assert ck.missing("blk.2.attn_kv.weight") == [] and ck.missing(name) == []
