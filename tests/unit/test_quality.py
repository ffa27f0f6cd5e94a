"""Quality tools (dsv4.quant.quality, `dsv4 quality`): KL / top-1 / NLL scoring against hand-computed
values, a file against itself scores exactly 0, q2-requantized experts score KL > 0 against their q4
source, and the per-tensor error report of a recipe equals a direct quantize/dequantize measurement."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dsv4.cli import main
from dsv4.quant import quality
from dsv4.quant.convert import HfCheckpoint
from dsv4.quant.dequant import dequantize_np
from dsv4.quant.formats import QuantFormat
from dsv4.quant.quantize import quantize_np
from test_convert import artifacts
from tests.tolerances import assert_close

PROBE_IDS = [0, 19923, 2058, 14, 566, 344, 260, 1950, 294, 270, 17168, 2645, 16]  # "Hello world, this is ..."


def test_compare_logits_against_hand_values():
    ref = np.array([[0.0, np.log(3.0)], [2.0, 0.0], [0.0, 0.0]])  # P = (1/4, 3/4), ..., (1/2, 1/2)
    test = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    rep = quality.compare_logits(ref, test, next_ids=[1, 0, 1])
    p0 = np.array([0.25, 0.75])
    p1 = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    q1 = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    kl = [float((p0 * np.log(p0 / 0.5)).sum()), float((p1 * np.log(p1 / q1)).sum()), 0.0]
    assert_close([rep.kl_mean, rep.kl_max], [np.mean(kl), max(kl)], "quality", "float64", "KL")
    assert rep.n_positions == 3 and rep.top1 == pytest.approx(1 / 3)  # row 0: tie in test -> argmax 0 != 1
    nll_ref = -np.mean([np.log(0.75), np.log(p1[0]), np.log(0.5)])
    nll_test = -np.mean([np.log(0.5), np.log(q1[0]), np.log(0.5)])
    assert_close([rep.nll_ref, rep.nll_test, rep.nll_delta], [nll_ref, nll_test, nll_test - nll_ref],
                 "quality", "float64", "NLL")
    same = quality.compare_logits(ref, ref, [1, 0, 1])
    assert (same.kl_mean, same.kl_max, same.top1, same.nll_delta) == (0.0, 0.0, 1.0, 0.0)


def test_quality_cli_q4_vs_requantized_q2(tmp_path, capsys):
    src, q2 = artifacts("q4"), artifacts("q4_q2")
    capsys.readouterr()  # drop what building the shared files printed
    text = tmp_path / "t.txt"
    text.write_text("Hello world, this is a test of the tiny model. The quick brown fox jumps over the lazy dog.")
    assert main(["quality", str(src), str(q2), "--text", str(text), "--max-tokens", "24", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n_positions"] >= 10
    assert rep["kl_mean"] > 0 and rep["kl_max"] >= rep["kl_mean"]
    assert 0.0 <= rep["top1"] <= 1.0
    assert np.isfinite([rep["nll_ref"], rep["nll_test"], rep["nll_delta"]]).all()
    assert rep["nll_delta"] == pytest.approx(rep["nll_test"] - rep["nll_ref"])
    same = quality.compare_models(src, src, PROBE_IDS)
    assert (same.kl_mean, same.kl_max, same.top1, same.nll_delta) == (0.0, 0.0, 1.0, 0.0)


def test_per_tensor_errors_of_a_recipe(capsys):
    hf = artifacts("hf")
    capsys.readouterr()
    rows = {r.name: r for r in quality.tensor_errors(hf, "q2", patterns=("blk.2.attn_*", "output.weight",
                                                                          "blk.0.ffn_down_exps.weight"),
                                                     max_experts=1)}
    assert set(rows) >= {"blk.2.attn_q_a.weight", "blk.2.attn_norm.weight", "output.weight",
                         "blk.0.ffn_down_exps.weight"}
    ck = HfCheckpoint(hf)
    x = ck.tensor("blk.2.attn_kv.weight")
    y = dequantize_np(quantize_np(x, QuantFormat.Q8_0), QuantFormat.Q8_0, x.shape[1])
    r = rows["blk.2.attn_kv.weight"]
    assert r.fmt is QuantFormat.Q8_0 and r.n_weights == x.size and r.nbytes == x.shape[0] * x.shape[1] // 32 * 34
    x64 = x.astype(np.float64)
    assert_close(r.rel_rmse, np.linalg.norm(y - x64) / np.linalg.norm(x64), "quality", "float64", "rel RMSE")
    assert 0.0 < r.rel_rmse < 0.01
    assert rows["blk.2.attn_norm.weight"].rel_rmse == 0.0  # F32 source kept in F32
    d = rows["blk.0.ffn_down_exps.weight"]
    assert d.fmt is QuantFormat.Q2_K and d.n_weights == 256 * 256 and 0.2 < d.rel_rmse < 0.45
    assert main(["quality", str(hf), "--recipe", "q2", "--tensors", "blk.2.attn_k*", "--json"]) == 0
    cli = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(cli) == {"blk.2.attn_kv.weight", "blk.2.attn_kv_a_norm.weight"}
    assert cli["blk.2.attn_kv.weight"]["rel_rmse"] == r.rel_rmse and cli["blk.2.attn_kv.weight"]["fmt"] == "Q8_0"


def test_legacy_dat_imatrix_is_read_like_ds4(tmp_path):
    """llama.cpp .dat: values / ncall; a flat E*ncols entry is sliced per expert; name.expert.<e> entries
    fold into rows; experts without an entry get 1.0."""
    import struct

    from dsv4.quant.imatrix import Imatrix, ImatrixError

    flat = np.arange(3 * 4, dtype=np.float32) + 1  # 3 experts x 4 columns
    e2 = np.array([4.0, 8.0, 12.0, 16.0], np.float32)
    entries = [("blk.0.ffn_down_exps.weight", 2, flat), ("blk.0.ffn_gate_exps.weight.expert.2", 4, e2),
               ("blk.0.attn_kv.weight", 1, np.array([0.5, 0.25], np.float32))]
    buf = struct.pack("<i", len(entries))
    for name, ncall, v in entries:
        buf += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, v.size) + v.tobytes()
    buf += struct.pack("<ii", 10, 4) + b"wiki"  # trailer: chunks, dataset name
    p = tmp_path / "im.dat"
    p.write_bytes(buf)
    im = Imatrix.load(p)
    assert np.array_equal(im.importance("blk.0.ffn_down_exps.weight", 1, 4), flat[4:8] / 2)
    assert np.array_equal(im.importance("blk.0.ffn_gate_exps.weight", 2, 4), e2 / 4)
    assert np.array_equal(im.importance("blk.0.ffn_gate_exps.weight", 0, 4), np.ones(4, np.float32))
    assert np.array_equal(im.importance("blk.0.attn_kv.weight", None, 2), [0.5, 0.25])
    assert im.importance("output.weight", None, 2) is None
    p.write_bytes(buf[:30])
    with pytest.raises(ImatrixError, match="truncated|bad value count"):
        Imatrix.load(p)
