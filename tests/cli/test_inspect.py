"""`dsv4 inspect` and `dsv4 make-tiny` driven through the CLI entry point: model.md §8 figures for the
Flash presets, figures of a written file equal to those computed from its tensors, tables, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dsv4.cli import main

# model.md §8: weight bytes read per decoded token, and the indexer q_b + proj bytes (21 ratio-4 layers of
# 8192x1024 + 64x4096 F16) that are only read above 2051 tokens of context.
FLASH_BYTES_PER_TOKEN = {"q2": 9_559_118_244, "q4": 11_385_213_348}
FLASH_FILE_TENSOR_BYTES = {"q2": 86_714_775_900, "q4": 164_628_167_004}
FLASH_INDEXER_QB_PROJ = 21 * (8192 * 1024 + 64 * 4096) * 2


def _json(capsys, *args) -> dict:
    rc = main(["inspect", *args, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_flash_preset_figures(capsys, recipe):
    rep = _json(capsys, "--preset", "flash", "--recipe", recipe)
    assert rep["bytes_per_token"] == FLASH_BYTES_PER_TOKEN[recipe]
    assert rep["tensor_bytes"] == FLASH_FILE_TENSOR_BYTES[recipe]
    assert rep["bytes_per_token_short_context"] == FLASH_BYTES_PER_TOKEN[recipe] - FLASH_INDEXER_QB_PROJ
    assert rep["short_context_tokens"] == 2051
    assert (rep["n_layer"], rep["n_embd"], rep["n_vocab"], rep["recipe"], rep["file_bytes"]) == (43, 4096, 129280, recipe, 0)
    assert rep["n_tensors"] == 6 + 43 * 23 + 41 * 4 + 21 * 6 + 40 + 3


def _per_token_from_file(path) -> tuple[int, int]:
    """model.md §8 accounting written out again over the file's tensors: (per token, below 2052 tokens)."""
    from dsv4.weights import open_gguf  # a faster parse of the same bytes (the stock one takes ~6 s here)

    r = open_gguf(path)
    E = int(r.fields["deepseek4.expert_count"].contents())
    K = int(r.fields["deepseek4.expert_used_count"].contents())
    full = short = 0
    for t in r.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight" or t.name.endswith("ffn_gate_tid2eid.weight"):
            n //= int(t.shape[-1])  # one row
        elif "_exps." in t.name:
            n = n // E * K
        full += n
        if not (t.name.endswith("indexer.attn_q_b.weight") or t.name.endswith("indexer.proj.weight")):
            short += n
    return full, short


@pytest.mark.parametrize("which,recipe", [("tiny_q2_path", "q2"), ("tiny_q4_path", "q4")])
def test_written_file_figures_match_its_tensors(capsys, request, which, recipe):
    path = request.getfixturevalue(which)
    rep = _json(capsys, str(path))
    full, short = _per_token_from_file(path)
    assert (rep["bytes_per_token"], rep["bytes_per_token_short_context"]) == (full, short)
    assert rep["file_bytes"] == path.stat().st_size and rep["n_tensors"] == 178 and rep["recipe"] == recipe
    preset = _json(capsys, "--preset", "tiny", "--recipe", recipe)
    for k in ("bytes_per_token", "bytes_per_token_short_context", "n_tensors", "tensor_bytes", "bytes_by_format"):
        assert rep[k] == preset[k], f"{k}: file {rep[k]} != preset {preset[k]}"


def test_table_output(capsys, tiny_q2_path):
    assert main(["inspect", str(tiny_q2_path)]) == 0
    out = capsys.readouterr().out
    for needle in ("raw window (ratio 0): 2 layer(s)", "ratio 4 (compressed + indexer): 2 layer(s)",
                   "ratio 128 (compressed): 2 layer(s)", "indexer.attn_q_b.weight", "ffn_gate_tid2eid.weight",
                   "bytes per format", "IQ2_XXS", "Q2_K", "recipe: q2", "read per decoded token"):
        assert needle in out, f"{needle!r} missing from inspect output"


def test_make_tiny_cli(capsys, tmp_path):
    out = tmp_path / "one.gguf"
    assert main(["make-tiny", str(out), "--layers", "1", "--recipe", "q4", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    rep = _json(capsys, str(out))
    assert (rep["n_layer"], rep["recipe"], rep["n_tensors"]) == (1, "q4", 6 + 23 + 1)
    assert main(["make-tiny", str(tmp_path / "x.gguf"), "--recipe", "q3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --recipe must be one of q2, q4, got 'q3'"
    assert not (tmp_path / "x.gguf").exists()


def test_inspect_needs_a_model_or_preset(capsys):
    assert main(["inspect"]) == 2
    assert "give a MODEL.gguf to inspect, or --preset" in capsys.readouterr().err


def test_help_imports_nothing_heavy():
    """`dsv4 --help` stays instant: the CLI package imports no numeric or UI library at import time."""
    code = ("import sys, dsv4.cli; heavy = [m for m in ('torch', 'numpy', 'gguf', 'rich', 'tokenizers', "
            "'prompt_toolkit', 'triton', 'mlx') if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", f"imported at `dsv4 --help`: {r.stdout.strip()}"
    r = subprocess.run([sys.executable, "-c", "import sys; from dsv4.cli import main; sys.exit(main())", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "make-tiny" in r.stdout and "inspect" in r.stdout


def test_expert_bytes_read_per_token_flash_q2(capsys):
    """Per active expert q2 = 2 x 2,162,688 + 2,752,512 B (model.md §8), 6 experts x 43 layers."""
    rep = _json(capsys, "--preset", "flash", "--recipe", "q2")
    per_tok = rep["bytes_per_token_by_component"]
    assert per_tok["routed gate+up experts"] == 2 * 2_162_688 * 6 * 43
    assert per_tok["routed down experts"] == 2_752_512 * 6 * 43
    assert per_tok["token_embd"] == 4096 * 2 and per_tok["hash tables tid2eid"] == 3 * 6 * 4
    assert int(np.sum(list(per_tok.values()))) == FLASH_BYTES_PER_TOKEN["q2"]
