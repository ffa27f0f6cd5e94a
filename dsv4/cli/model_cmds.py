"""`dsv4 make-tiny` (write a synthetic DSV4 GGUF) and `dsv4 inspect` (figures about a model).

Policy only: argument checking and printing; the work is in dsv4.synth and dsv4.inspect, imported
inside the commands so `dsv4 --help` stays instant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app

PRESET_NAMES = ("tiny", "flash")
RECIPE_NAMES = ("q2", "q4")


def _choice(value: Optional[str], allowed: tuple[str, ...], flag: str) -> Optional[str]:
    from ..errors import DsvError

    if value is not None and value not in allowed:
        raise DsvError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    return value


@app.command("make-tiny")
def make_tiny(
    out: Path = typer.Argument(..., help="GGUF file to write (replaced atomically)."),
    preset: str = typer.Option("tiny", "--preset", help="tiny (design.md §4) or flash (full-width tensors)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Number of layers (default: the preset's)."),
    recipe: str = typer.Option("q2", "--recipe", help="Routed-expert formats: q2 (IQ2_XXS/Q2_K) or q4 (Q4_K)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the file is deterministic per seed."),
):
    """Write a complete DSV4 GGUF with random weights and the real V4 tokenizer."""
    import sys
    import time

    from ..synth import write_model

    _choice(preset, PRESET_NAMES, "--preset")
    _choice(recipe, RECIPE_NAMES, "--recipe")
    t0 = time.time()
    interactive = sys.stderr.isatty()

    def progress(done: int, total: int, name: str) -> None:
        if interactive:
            print(f"\r{done}/{total} {name[:60]:<60}", end="", file=sys.stderr, flush=True)

    res = write_model(out, preset=preset, layers=layers, recipe=recipe, seed=seed, progress=progress)
    if interactive:
        print(file=sys.stderr)
    print(f"wrote {res.path} ({res.file_bytes:,} bytes, {res.n_tensors} tensors, {res.config.n_layer} layers, "
          f"recipe {res.recipe.value}) in {time.time() - t0:.1f} s")


@app.command("inspect")
def inspect_cmd(
    model: Optional[Path] = typer.Argument(None, help="GGUF model file (or use --preset)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Figures for a preset without a file: tiny or flash."),
    recipe: str = typer.Option("q2", "--recipe", help="With --preset: q2 or q4."),
    layers: Optional[int] = typer.Option(None, "--layers", help="With --preset: number of layers."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
):
    """Config, tensors by layer class, bytes per format, recipe, and weight bytes read per token."""
    import json

    from ..errors import DsvError
    from ..inspect import render, report

    _choice(preset, PRESET_NAMES, "--preset")
    _choice(recipe, RECIPE_NAMES, "--recipe")
    if model is not None and preset is not None:
        raise DsvError("give either MODEL.gguf or --preset, not both")
    if model is None and preset is None:
        raise DsvError("give a MODEL.gguf to inspect, or --preset tiny|flash [--recipe q2|q4] for figures without a file")
    if model is not None:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = report(path=model)
        for w in caught:
            import sys

            print(f"warning: {w.message}", file=sys.stderr)
    else:
        rep = report(preset=preset, recipe=recipe, layers=layers)
    if as_json:
        print(json.dumps(rep))
    else:
        render(rep)


@app.command("kernels")
def kernels_cmd():
    """List the registered kernel variants (select with --kernel OP=NAME on the triton backend)."""
    from rich.console import Console
    from rich.table import Table

    from ..kernels_triton import variants

    t = Table(title="Triton kernel variants")
    for col in ("op", "name", "formats", "max T", "doc"):
        t.add_column(col)
    for v in variants():
        fmts = "all" if not v.formats else ", ".join(f.name for f in v.formats)
        t.add_row(v.op.value, v.name, fmts, "" if v.max_t is None else str(v.max_t), v.doc)
    Console().print(t)
