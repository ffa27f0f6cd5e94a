"""`dsv4 quantize`, `dsv4 imatrix` and `dsv4 quality`: recipe experiments from the command line.

Policy only: argument checks and printing. The work is in dsv4.quant.requant / imatrix / quality,
imported inside the commands so `dsv4 --help` stays instant.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .app import app


@app.command("quantize")
def quantize_cmd(
    src: Path = typer.Argument(..., help="Source: a Hugging Face checkpoint folder or a DSV4 .gguf."),
    out: Path = typer.Argument(..., help="GGUF to write (appears only when complete)."),
    recipe: str = typer.Option("q2", "--recipe", help="q2, q4, or a recipe JSON file."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix from `dsv4 imatrix`."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device for the K/IQ quantizers "
                                                                "(default: cuda when available, else cpu)."),
):
    """Quantize a model tensor by tensor with a recipe (streaming; atomic output)."""
    import time

    from ..quant.requant import quantize_model

    t0 = time.time()
    res = quantize_model(src, out, recipe, imatrix=imatrix, progress=sys.stderr.isatty(), device=device)
    by_fmt: dict[str, int] = {}
    for p in res.tensors:
        by_fmt[p.fmt.name] = by_fmt.get(p.fmt.name, 0) + p.nbytes
    mix = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(by_fmt.items(), key=lambda kv: -kv[1]))
    print(f"wrote {res.path} ({res.file_bytes:,} bytes, {len(res.tensors)} tensors, recipe {res.recipe}) "
          f"in {time.time() - t0:.1f} s: {mix}")


@app.command("imatrix")
def imatrix_cmd(
    model: Path = typer.Argument(..., help="DSV4 .gguf to run."),
    textfile: Path = typer.Argument(..., help="Calibration text (UTF-8)."),
    out: Path = typer.Option(..., "-o", "--out", help="Importance matrix to write (safetensors)."),
    chunk: int = typer.Option(512, "--chunk", help="Tokens per context (each chunk starts fresh)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use at most this many tokens."),
):
    """Collect per-expert input activation statistics by running the model on a text."""
    from ..errors import DsvError
    from ..quant.imatrix import collect_imatrix
    from ..quant.quality import text_ids

    if chunk < 1:
        raise DsvError(f"--chunk must be >= 1, got {chunk}")
    text = _read_text(textfile)
    ids = text_ids(model, text, max_tokens)
    im = collect_imatrix(model, ids, chunk)
    im.source = str(textfile)
    im.save(out)
    print(f"wrote {out}: {len(im.sums)} tensors, {im.n_tokens} tokens")


@app.command("quality")
def quality_cmd(
    a: Path = typer.Argument(..., help="Reference GGUF (or, with --recipe, the model to quantize: GGUF or HF folder)."),
    b: Optional[Path] = typer.Argument(None, help="GGUF to score against the reference."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file both models read."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Per-tensor error of this recipe on A instead."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Score at most this many tokens of the text."),
    max_experts: Optional[int] = typer.Option(None, "--max-experts", help="With --recipe: measure the first N experts."),
    tensors: Optional[list[str]] = typer.Option(None, "--tensors", help="With --recipe: only tensors matching "
                                                                         "this glob (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Compare two GGUFs on a text (KL, top-1, NLL), or report a recipe's per-tensor error on a model."""
    import json

    from ..errors import DsvError
    from ..quant import quality

    if recipe is not None:
        if b is not None or text is not None:
            raise DsvError("--recipe scores one model's tensors: give only MODEL (no second file, no --text)")
        rows = quality.tensor_errors(a, recipe, patterns=tuple(tensors or ("*",)), max_experts=max_experts)
        if as_json:
            print(json.dumps([r.as_row() for r in rows]))
            return
        print(f"{'tensor':<40} {'format':<8} {'rel_rmse':>9} {'max_abs':>9} {'MiB':>8}")
        for r in rows:
            print(f"{r.name:<40} {r.fmt.name:<8} {r.rel_rmse:9.5f} {r.max_abs:9.4f} {r.nbytes / 2**20:8.2f}")
        return
    if b is None or text is None:
        raise DsvError("give two GGUF files and --text FILE (or MODEL --recipe R for per-tensor errors)")
    ids = quality.text_ids(a, _read_text(text), max_tokens)
    rep = quality.compare_models(a, b, ids)
    if as_json:
        print(json.dumps(rep.as_dict()))
        return
    print(f"positions {rep.n_positions}  KL mean {rep.kl_mean:.6g}  KL max {rep.kl_max:.6g}  top-1 {rep.top1:.4f}  "
          f"NLL ref {rep.nll_ref:.4f}  NLL test {rep.nll_test:.4f}  delta {rep.nll_delta:+.4f}")


def _read_text(path: Path) -> str:
    from ..errors import DsvError

    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DsvError(f"cannot read text file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DsvError(f"{path} is not UTF-8 text") from None
