"""notebooks/*.ipynb executed top to bottom with nbclient on tiny models: their assert cells must pass.

Each notebook has one cell tagged `parameters`; the test replaces its source with the paths of this run
(the tiny q2 model from conftest, a temporary work folder). Outputs stay out of git: the test also checks
that the committed notebooks carry none."""
from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300
PARAMETERS_TAG = "parameters"
# BOS + "The quick brown fox jumps over the lazy dog." + "The quick" in the V4 vocabulary (skips the tokenizer)
PROBE_IDS = [0, 671, 4787, 13769, 46012, 54994, 1060, 270, 41638, 6397, 16, 671, 4787]


def _run(name: str, params: dict, workdir: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [c for c in nb.cells if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged {PARAMETERS_TAG!r}"
    cells[0].source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_committed_notebooks_have_no_outputs(name):
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} carry outputs; strip them before committing"


def test_format_anatomy_notebook(tiny_q2_path, tmp_path):
    nb = _run("01_format_anatomy.ipynb", {"MODEL": str(tiny_q2_path), "OUT_DIR": str(tmp_path), "SEED": 0}, tmp_path)
    assert (tmp_path / "01_error_histograms.png").stat().st_size > 0
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "IQ2_XXS" in text and "blk.0.ffn_gate_exps.weight" in text


def test_recipe_comparison_notebook(tmp_path):
    _run("02_recipe_comparison.ipynb", {"WORKDIR": str(tmp_path), "N_LAYERS": 1, "N_EXPERTS": 2,
                                        "TEXT": "", "TOKEN_IDS": PROBE_IDS, "SEED": 0},
         tmp_path)
    assert (tmp_path / "02_bytes_vs_kl.png").stat().st_size > 0
    assert {p.name for p in tmp_path.glob("*.gguf")} == {"ref.gguf", "q8x.gguf", "q4.gguf", "q2.gguf"}


def test_custom_kernel_notebook(tiny_q2_path, tmp_path):
    nb = _run("03_custom_kernel.ipynb", {"MODEL": str(tiny_q2_path), "N_TOKENS": 8}, tmp_path)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Q8_0 qmatmul calls through the variant" in text
