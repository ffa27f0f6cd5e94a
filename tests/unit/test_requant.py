"""`dsv4 quantize` end to end: HF checkpoint -> q2 GGUF that loads and runs with the recipe's formats and
the source's values in the right places; q4 GGUF -> q2 experts; and bad input (unknown pattern, a format
the row cannot hold, a checkpoint missing tensors, an interrupted run): a clear error and no file under
the output name."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import dsv4
from dsv4.cli import main
from dsv4.errors import ModelFileError, RecipeError
from dsv4.quant import requant
from dsv4.quant.convert import HfCheckpoint
from dsv4.quant.dequant import dequantize
from dsv4.quant.formats import QuantFormat
from dsv4.quant.recipes import Recipe
from dsv4.weights import load_weights
from test_convert import HF1_CFG, HF_CFG, artifacts

N_PROBE_TOKENS = 5
# Relative RMSE bounds of re-encoding the (already FP8/FP4-valued) source: Q8_0 ~0.5 %, F16 ~0.03 %;
# IQ2_XXS ~35-45 % (quant.md §3.8); a wrong expert or a transposed matrix gives ~140 % (two unrelated
# Gaussians), so these bounds separate "right tensor" from "wrong tensor" by a wide margin.
REL_Q8, REL_F16, REL_IQ2 = 0.01, 0.001, 0.6


def _leftovers(out):
    """Temp files of an interrupted write beside OUT (dsv4.atomicfile names them .OUT.tmp.*)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp"))


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def _run_ok(path) -> np.ndarray:
    eng = dsv4.load(path, backend="torch")
    logits = eng.new_session(ctx=16).prefill(list(range(100, 100 + N_PROBE_TOKENS)))
    assert logits.shape == (eng.config.n_vocab,) and np.isfinite(logits).all()
    assert logits.std() > 0.1, "degenerate logits: weights were lost on the way"
    return logits


def _assert_formats_follow(path, recipe: str):
    rec = Recipe.load(recipe)
    w = load_weights(path)
    wrong = {n: (t.fmt.name, rec.format_for(n, t.shape).name) for n, t in w.tensors.items()
             if t.fmt != rec.format_for(n, t.shape)}
    assert not wrong, f"tensor formats differ from recipe {recipe}: {dict(list(wrong.items())[:5])}"
    return w


def test_hf_checkpoint_to_q2_loads_runs_and_keeps_values():
    out = artifacts("hf_q2")
    w = _assert_formats_follow(out, "q2")
    assert w.config.fingerprint() == HF_CFG.fingerprint()
    assert {w.tensors[f"blk.{l}.ffn_gate_exps.weight"].fmt for l in range(3)} == {QuantFormat.IQ2_XXS}
    assert w.tensors["blk.2.ffn_down_exps.weight"].fmt == QuantFormat.Q2_K
    ck = HfCheckpoint(artifacts("hf"))
    assert _rel(dequantize(w.tensors["blk.2.attn_q_b.weight"]), ck.tensor("blk.2.attn_q_b.weight")) < REL_Q8
    assert _rel(dequantize(w.tensors["output.weight"]), ck.tensor("output.weight")) < REL_Q8
    assert _rel(dequantize(w.tensors["blk.2.indexer.proj.weight"]), ck.tensor("blk.2.indexer.proj.weight")) < REL_F16
    assert np.array_equal(dequantize(w.tensors["blk.1.ffn_gate_tid2eid.weight"]),
                          ck.tensor("blk.1.ffn_gate_tid2eid.weight"))
    gate = w.tensors["blk.2.ffn_gate_exps.weight"]
    for e in (0, 3):  # expert e of the file came from experts.e of the checkpoint (and not from another)
        got = dequantize(gate.expert(e))
        assert _rel(got, ck.expert(gate.name, e)) < REL_IQ2
        assert _rel(got, ck.expert(gate.name, (e + 1) % HF_CFG.n_expert)) > 1.0
    _run_ok(out)


def test_requantize_q4_gguf_to_q2_experts():
    src, out = artifacts("q4"), artifacts("q4_q2")
    w_src, w = load_weights(src), _assert_formats_follow(out, "q2")
    # everything but the routed experts is byte-identical (same format -> copied)
    for name, t in w.tensors.items():
        if "_exps." not in name:
            assert np.array_equal(np.asarray(t.data), np.asarray(w_src.tensors[name].data)), name
    down = "blk.0.ffn_down_exps.weight"
    assert _rel(dequantize(w.tensors[down].expert(1)), dequantize(w_src.tensors[down].expert(1))) < REL_IQ2
    _run_ok(out)


def _recipe_file(tmp_path, rules) -> str:
    q2 = Recipe.load("q2").to_dict()
    q2["rules"] = rules + q2["rules"]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(q2))
    return str(p)


def _assert_clean_failure(capsys, rc, out, needle):
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err, err
    assert not out.exists() and _leftovers(out) == []


def test_unknown_recipe_pattern_is_refused(tmp_path, capsys):
    bad = _recipe_file(tmp_path, [{"pattern": "blk.*.ffn_gaet_exps.weight", "format": "Q4_K"}])
    out = tmp_path / "o.gguf"
    rc = main(["quantize", str(artifacts("hf")), str(out), "--recipe", bad])
    _assert_clean_failure(capsys, rc, out, "matches no DSV4 tensor name")


def test_format_the_row_cannot_hold_is_refused(tmp_path, capsys):
    # attn_output_b rows are G * r_o = 128 wide in the tiny shapes: Q4_K blocks need 256
    bad = _recipe_file(tmp_path, [{"pattern": "*.attn_output_b.weight", "format": "Q4_K"}])
    out = tmp_path / "o.gguf"
    rc = main(["quantize", str(artifacts("hf")), str(out), "--recipe", bad])
    _assert_clean_failure(capsys, rc, out, "needs a multiple of 256")
    with pytest.raises(RecipeError, match="engine reads only F32"):
        requant.plan_quantization(requant.open_source(artifacts("hf")),
                                  Recipe.from_rules("x", [("*norm.weight", "Q8_0"), ("*", "F16")]))


def test_checkpoint_missing_tensors_is_refused(tmp_path, capsys):
    src = artifacts("hf")
    part = tmp_path / "partial"
    part.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name == "config.json":
            os.symlink(f, part / f.name)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["layers.2.ffn.experts.3.w3.scale"]
    (part / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "o.gguf"
    rc = main(["quantize", str(part), str(out), "--recipe", "q2"])
    _assert_clean_failure(capsys, rc, out, "missing tensor layers.2.ffn.experts.3.w3.scale")


def test_interrupted_run_leaves_no_output_and_keeps_an_old_file(tmp_path, monkeypatch):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous model")
    calls = {"n": 0}
    real = requant.quantize_rows

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 40:  # well into the tensor data
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(requant, "quantize_rows", dying)
    q8 = Recipe.load("q2").with_overrides([("*_exps.weight", "Q8_0")], name="q8x")  # fast: no IQ2 search
    with pytest.raises(KeyboardInterrupt):
        requant.quantize_model(artifacts("hf"), out, q8)
    assert calls["n"] == 40
    assert out.read_bytes() == b"previous model"
    assert _leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]


def test_missing_source_and_output_dir_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no such file or folder"):
        requant.quantize_model(tmp_path / "nope", tmp_path / "o.gguf", "q2")
    with pytest.raises(ModelFileError, match="no such directory"):
        requant.quantize_model(artifacts("hf"), tmp_path / "no" / "o.gguf", "q2")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_imatrix_collect_save_load_and_feed_the_quantizers(tmp_path, monkeypatch):
    from dsv4.quant.imatrix import Imatrix, ImatrixError

    from dsv4.quant.imatrix import collect_imatrix

    src = artifacts("q4")  # one top-k layer, 2 experts, 2 used
    E = HF1_CFG.n_expert
    im_path = tmp_path / "im.safetensors"
    ids = [0, 19923, 2058, 14, 566, 344, 260, 1950, 294, 270, 17168, 2645, 16, 1000, 2000]
    collect_imatrix(src, ids, chunk=8).save(im_path)  # (the CLI adds only tokenization: slow, tested elsewhere)
    im = Imatrix.load(im_path)
    T, K = im.n_tokens, HF1_CFG.n_expert_used
    assert T == len(ids)
    gate, down = "blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight"
    # every token routes to K experts; each dense projection sees every token once; sums are of squares
    assert im.counts[gate].sum() == T * K and im.counts[down].sum() == T * K
    assert np.array_equal(im.counts[gate], im.counts["blk.0.ffn_up_exps.weight"])
    assert im.counts["blk.0.attn_q_a.weight"].tolist() == [T] and im.counts["output.weight"].tolist() == [T]
    assert im.sums[gate].shape == (E, 256) and (im.sums[gate] >= 0).all() and im.sums[gate].sum() > 0
    used = int(np.argmax(im.counts[gate]))
    assert np.array_equal(im.importance(gate, used, 256),
                          (im.sums[gate][used] / im.counts[gate][used]).astype(np.float32))
    im.counts[gate][1 - used] = 0
    assert np.array_equal(im.importance(gate, 1 - used, 256), np.ones(256, np.float32))  # unseen expert: 1.0 (ds4)
    with pytest.raises(ImatrixError, match="columns"):
        im.importance(gate, 0, 512)
    (tmp_path / "x.txt").write_text("not safetensors")
    with pytest.raises(ImatrixError, match="not a dsv4 imatrix"):
        Imatrix.load(tmp_path / "x.txt")

    passed, asked = [], []
    real_rows, real_imp = requant.quantize_rows, Imatrix.importance

    def spy_rows(x, fmt, importance, device):
        passed.append(importance)
        return real_rows(x, fmt, importance, device)

    def spy_imp(self, name, expert=None, ncols=None):
        v = real_imp(self, name, expert, ncols)
        asked.append((name, expert, v))
        return v

    monkeypatch.setattr(requant, "quantize_rows", spy_rows)
    monkeypatch.setattr(Imatrix, "importance", spy_imp)
    fast = Recipe.load("q4").with_overrides([("*_exps.weight", "Q8_0")], name="q8x")  # no slow searches
    requant.quantize_model(src, tmp_path / "o.gguf", fast, imatrix=im_path)
    experts = [(n, e) for n, e, _ in asked if e is not None]
    assert experts == [(n, e) for n in (gate, "blk.0.ffn_up_exps.weight", down) for e in range(E)]
    # what the imatrix answered is exactly what reached the quantizer, call by call
    answered = [v for _, _, v in asked if v is not None]
    assert len(answered) == len([p for p in passed if p is not None]) == 3 * E  # dense tensors are copied
    assert all(a is b for a, b in zip(answered, [p for p in passed if p is not None]))
    loaded = Imatrix.load(im_path)
    v = dict(((n, e), v) for n, e, v in asked)[(down, used)]
    assert np.array_equal(v, (loaded.sums[down][used] / loaded.counts[down][used]).astype(np.float32))


def test_imatrix_cli_on_a_text(tmp_path, capsys):
    from dsv4.quant.imatrix import Imatrix

    src = artifacts("q4")
    text = tmp_path / "calib.txt"
    text.write_text("Importance matrices weight the quantization error by how large each input column is.")
    capsys.readouterr()
    out = tmp_path / "im.safetensors"
    assert main(["imatrix", str(src), str(text), "-o", str(out), "--chunk", "8"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    im = Imatrix.load(out)
    assert im.n_tokens >= 10
    assert im.counts["blk.0.ffn_down_exps.weight"].sum() == HF1_CFG.n_expert_used * im.n_tokens
    assert main(["imatrix", str(src), str(tmp_path / "missing.txt"), "-o", str(out)]) == 2
    assert "cannot read text file" in capsys.readouterr().err
