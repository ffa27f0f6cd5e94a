"""Recipes: the shipped q2/q4 rules reproduce quant.md §3.7 / model.md §3 tensor by tensor, detection
names a file's recipe from its expert formats, and bad recipes fail with a clear RecipeError."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.errors import RecipeError
from dsv4.quant.formats import QuantFormat as F
from dsv4.quant.recipes import Recipe, detect_recipe

FX_MODEL = Path("/tmp/fx/seed7.gguf")  # the fixture's tiny q2 model (written by make_tiny_gguf.py --seed 7)

# model.md §3: (name suffix, math shape, q2 format, q4 format) for the DeepSeek V4 Flash release.
GLOBAL = [
    ("token_embd.weight", (129280, 4096), F.F16, F.F16),
    ("output_hc_fn.weight", (4, 16384), F.F16, F.F16),
    ("output_hc_scale.weight", (1,), F.F32, F.F32),
    ("output_hc_base.weight", (4,), F.F32, F.F32),
    ("output_norm.weight", (4096,), F.F32, F.F32),
    ("output.weight", (129280, 4096), F.Q8_0, F.Q8_0),
]
EVERY_LAYER = [
    ("hc_attn_fn.weight", (24, 16384), F.F16, F.F16),
    ("hc_attn_scale.weight", (3,), F.F32, F.F32),
    ("hc_attn_base.weight", (24,), F.F32, F.F32),
    ("attn_norm.weight", (4096,), F.F32, F.F32),
    ("attn_q_a.weight", (1024, 4096), F.Q8_0, F.Q8_0),
    ("attn_q_a_norm.weight", (1024,), F.F32, F.F32),
    ("attn_q_b.weight", (32768, 1024), F.Q8_0, F.Q8_0),
    ("attn_kv.weight", (512, 4096), F.Q8_0, F.Q8_0),
    ("attn_kv_a_norm.weight", (512,), F.F32, F.F32),
    ("attn_sinks.weight", (64,), F.F32, F.F32),
    ("attn_output_a.weight", (8192, 4096), F.Q8_0, F.Q8_0),
    ("attn_output_b.weight", (4096, 8192), F.Q8_0, F.Q8_0),
    ("hc_ffn_fn.weight", (24, 16384), F.F16, F.F16),
    ("hc_ffn_scale.weight", (3,), F.F32, F.F32),
    ("hc_ffn_base.weight", (24,), F.F32, F.F32),
    ("ffn_norm.weight", (4096,), F.F32, F.F32),
    ("ffn_gate_inp.weight", (256, 4096), F.F16, F.F16),
    ("ffn_gate_exps.weight", (256, 2048, 4096), F.IQ2_XXS, F.Q4_K),
    ("ffn_up_exps.weight", (256, 2048, 4096), F.IQ2_XXS, F.Q4_K),
    ("ffn_down_exps.weight", (256, 4096, 2048), F.Q2_K, F.Q4_K),
    ("ffn_gate_shexp.weight", (2048, 4096), F.Q8_0, F.Q8_0),
    ("ffn_up_shexp.weight", (2048, 4096), F.Q8_0, F.Q8_0),
    ("ffn_down_shexp.weight", (4096, 2048), F.Q8_0, F.Q8_0),
]


def compressed(wc: int, r: int):
    return [
        ("attn_compressor_ape.weight", (r, wc), F.F16, F.F16),
        ("attn_compressor_kv.weight", (wc, 4096), F.F16, F.F16),
        ("attn_compressor_gate.weight", (wc, 4096), F.F16, F.F16),
        ("attn_compressor_norm.weight", (512,), F.F32, F.F32),
        ("exp_probs_b.bias", (256,), F.F32, F.F32),
    ]


INDEXER = [
    ("indexer.attn_q_b.weight", (8192, 1024), F.F16, F.F16),
    ("indexer.proj.weight", (64, 4096), F.F16, F.F16),
    ("indexer_compressor_ape.weight", (4, 256), F.F16, F.F16),
    ("indexer_compressor_kv.weight", (256, 4096), F.F16, F.F16),
    ("indexer_compressor_gate.weight", (256, 4096), F.F16, F.F16),
    ("indexer_compressor_norm.weight", (128,), F.F32, F.F32),
]
HASH = [("ffn_gate_tid2eid.weight", (129280, 6), F.I32, F.I32)]
MTP = [
    ("mtp.0.hc_head_fn.weight", (4, 16384), F.F16, F.F16),
    ("mtp.0.hc_head_scale.weight", (1,), F.F32, F.F32),
    ("mtp.0.hc_head_base.weight", (4,), F.F32, F.F32),
    ("mtp.0.e_proj.weight", (4096, 4096), F.Q8_0, F.Q8_0),
    ("mtp.0.h_proj.weight", (4096, 4096), F.Q8_0, F.Q8_0),
    ("mtp.0.enorm.weight", (4096,), F.F32, F.F32),
    ("mtp.0.hnorm.weight", (4096,), F.F32, F.F32),
    ("mtp.0.norm.weight", (4096,), F.F32, F.F32),
]


def flash_inventory(n_layer: int = 43) -> list[tuple[str, tuple, F, F]]:
    out = list(GLOBAL)
    for l in range(n_layer):
        ratio = 0 if l < 2 else (4 if l % 2 == 0 else 128)
        rows = list(EVERY_LAYER)
        if ratio:
            rows += compressed(1024 if ratio == 4 else 512, ratio)
        if ratio == 4:
            rows += INDEXER
        if l < 3:
            rows += HASH
        out += [(f"blk.{l}.{s}", shape, q2, q4) for s, shape, q2, q4 in rows]
    return out + MTP + [(f"mtp.0.{s}", shape, q2, q4) for s, shape, q2, q4 in EVERY_LAYER]


@pytest.mark.parametrize("which", ["q2", "q4"])
def test_builtin_recipe_matches_spec_for_every_flash_tensor(which):
    recipe = Recipe.load(which)
    assert recipe.name == which
    inv = flash_inventory()
    wrong = []
    for name, shape, q2, q4 in inv:
        want = q2 if which == "q2" else q4
        got = recipe.format_for(name, shape)
        if got != want:
            wrong.append(f"{name}: {got.name} != {want.name}")
    assert not wrong, f"{len(wrong)} tensors get the wrong format: {wrong[:10]}"
    # every rule is used by the Flash inventory (no dead or mistyped rule ships)
    recipe.plan({n: s for n, s, _, _ in inv}, require_all_rules_used=True)


@pytest.mark.parametrize("which", ["q2", "q4"])
def test_detect_recipe_on_flash_formats(which):
    recipe = Recipe.load(which)
    formats = recipe.plan({n: s for n, s, _, _ in flash_inventory()})
    assert detect_recipe(formats) == which


def test_detect_mixed_and_custom():
    q2 = Recipe.load("q2").plan({n: s for n, s, _, _ in flash_inventory()})
    q4 = Recipe.load("q4").plan({n: s for n, s, _, _ in flash_inventory()})
    # ds4's "mixed" file: q2 experts except layers 37-42 taken from q4
    mixed = {n: (q4[n] if n.startswith(tuple(f"blk.{l}." for l in range(37, 43))) else f) for n, f in q2.items()}
    assert detect_recipe(mixed) == "mixed"
    custom = {n: (F.Q8_0 if "_exps" in n else f) for n, f in q2.items()}
    assert detect_recipe(custom) == "gate_up=Q8_0,down=Q8_0"
    assert detect_recipe({"token_embd.weight": F.F16}) == "none"


@pytest.mark.slow  # GGUFReader spends ~7 s parsing the 129k-token vocabulary
@pytest.mark.skipif(not FX_MODEL.exists(), reason="fixture tiny model /tmp/fx/seed7.gguf not present")
def test_q2_recipe_reproduces_fixture_file():
    import gguf

    reader = gguf.GGUFReader(str(FX_MODEL))
    formats = {t.name: F(int(t.tensor_type)) for t in reader.tensors}
    shapes = {t.name: tuple(int(x) for x in reversed(list(t.shape))) for t in reader.tensors}
    planned = Recipe.load("q2").plan(shapes)
    assert {n: f for n, f in planned.items() if f != formats[n]} == {}
    assert detect_recipe(formats) == "q2"


def test_overrides_take_precedence():
    r = Recipe.load("q2").with_overrides([("blk.4[0-2].ffn_*_exps.weight", "Q4_K"), ("re:blk\\.\\d+\\.attn_q_a\\.weight", "F16")])
    assert r.format_for("blk.41.ffn_down_exps.weight", (256, 4096, 2048)) == F.Q4_K
    assert r.format_for("blk.36.ffn_down_exps.weight", (256, 4096, 2048)) == F.Q2_K
    assert r.format_for("blk.3.attn_q_a.weight", (1024, 4096)) == F.F16
    assert r.format_for("blk.3.attn_q_b.weight", (32768, 1024)) == F.Q8_0


def test_json_round_trip(tmp_path):
    r = Recipe.load("q4")
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(r.to_dict()))
    r2 = Recipe.load(p)
    assert [(x.pattern, x.fmt) for x in r2.rules] == [(x.pattern, x.fmt) for x in r.rules]


# ------------------------------------------------------------------------------------ bad input


def test_unmatched_tensor_is_an_error():
    with pytest.raises(RecipeError, match=r"recipe 'q2' has no rule for tensor 'blk.0.mystery.weight'"):
        Recipe.load("q2").format_for("blk.0.mystery.weight", (16, 4096))


def test_format_the_row_cannot_hold():
    r = Recipe.from_rules("test", [("*", "Q4_K")])
    with pytest.raises(RecipeError, match=r"Q4_K for 'blk.0.x.weight' with rows of 100 weights.*multiple of 256"):
        r.format_for("blk.0.x.weight", (64, 100))
    with pytest.raises(RecipeError, match=r"Q8_0 .* rows of 100 weights.*multiple of 32"):
        Recipe.from_rules("t8", [("*", "Q8_0")]).format_for("w", (3, 100))
    assert r.format_for("ok.weight", (2, 512)) == F.Q4_K


def test_unknown_format_and_bad_patterns(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown format 'Q3_XL'"):
        Recipe.from_rules("bad", [("*.ffn_*", "Q3_XL")])
    with pytest.raises(RecipeError, match=r"not a valid regular expression"):
        Recipe.from_rules("bad", [("re:blk.(\\d+", "Q8_0")])
    r = Recipe.from_rules("typo", [("blk.*.ffn_gate_exp.weight", "Q4_K"), ("*", "F16")])
    with pytest.raises(RecipeError, match=r"'blk.\*.ffn_gate_exp.weight' match no tensor"):
        r.plan({"blk.0.ffn_gate_exps.weight": (4, 8, 256)}, require_all_rules_used=True)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match=r"neither a builtin \(q2, q4\) nor a readable JSON file"):
        Recipe.load("q3")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match=r"cannot read it as JSON"):
        Recipe.load(bad)
    bad.write_text(json.dumps({"name": "x", "rules": [{"format": "Q8_0"}]}))
    with pytest.raises(RecipeError, match=r"rule 0 must be an object with string 'pattern' and 'format'"):
        Recipe.load(bad)
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(RecipeError, match=r"non-empty 'rules' list"):
        Recipe.load(bad)
