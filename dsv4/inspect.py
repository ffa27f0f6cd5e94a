"""Figures about a model file or a preset: tensor table by layer class, bytes per format, recipe,
and the weight bytes read per decoded token (model.md §8).

`report()` builds one plain dict (what `dsv4 inspect --json` prints); `render()` draws it with rich.
Without a file the tensors come from `synth.inventory`, the list the writer would produce, so the
figures for a preset and for a file written from it agree. Knows no math and no backends.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import Config, LayerKind
from .quant.formats import QuantFormat
from .weights import Component, Read, TensorSlot, expected_tensors

GLOBAL_CLASS = "global"


@dataclass(frozen=True)
class TensorRow:
    name: str
    layer: int
    shape: tuple[int, ...]
    fmt: QuantFormat
    nbytes: int
    component: Optional[Component]  # None: a tensor the layout does not know (ignored by the engine)
    read: Read


def layer_class(cfg: Config, layer: int) -> str:
    if layer < 0:
        return GLOBAL_CLASS
    kind = cfg.kind(layer)
    return {LayerKind.RAW: "raw window (ratio 0)", LayerKind.RATIO4: "ratio 4 (compressed + indexer)",
            LayerKind.RATIO128: "ratio 128 (compressed)"}[kind]


def _nbytes(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= int(s)
    return n_rows * fmt.row_bytes(int(shape[-1]))


def rows_from_slots(slots: list[TensorSlot]) -> list[TensorRow]:
    return [TensorRow(s.name, s.layer, s.shape, s.fmt, _nbytes(s.shape, s.fmt), s.component, s.read) for s in slots]


def rows_from_file(weights, reader) -> list[TensorRow]:
    """Every tensor of an opened file; tensors outside the layout get component None."""
    slots = {s.name: s for s in expected_tensors(weights.config)}
    rows = []
    for t in reader.tensors:
        q = weights.tensors.get(t.name)
        s = slots.get(t.name)
        if q is None or s is None:
            shape = tuple(int(v) for v in reversed([int(x) for x in t.shape]))
            rows.append(TensorRow(t.name, -1, shape, QuantFormat.F32, int(t.n_bytes), None, Read.FULL))
            continue
        rows.append(TensorRow(t.name, s.layer, q.shape, q.fmt, q.nbytes, s.component, s.read))
    return rows


def read_per_token(row: TensorRow, cfg: Config, short_context: bool = False) -> int:
    """Weight bytes of this tensor one decode step reads (model.md §8)."""
    if row.component is None:
        return 0
    if row.read is Read.ONE_ROW:
        return row.nbytes // row.shape[0]
    if row.read is Read.USED_EXPERTS:
        return row.nbytes // cfg.n_expert * cfg.n_expert_used
    if row.read is Read.LONG_CONTEXT and short_context:
        return 0
    return row.nbytes


def bytes_per_token(rows: list[TensorRow], cfg: Config, short_context: bool = False) -> int:
    return sum(read_per_token(r, cfg, short_context) for r in rows)


def recipe_of(rows: list[TensorRow]) -> str:
    """q2 / q4 / mixed / ... from the routed-expert formats."""
    from .quant.recipes import detect_recipe

    return detect_recipe({r.name: r.fmt for r in rows if r.component in (Component.EXPERTS_GATE_UP, Component.EXPERTS_DOWN)})


def _summary(cfg: Config, rows: list[TensorRow], source: str, file_bytes: int, n_tensors: int) -> dict:
    by_fmt: Counter = Counter()
    by_comp: Counter = Counter()
    per_tok_comp: Counter = Counter()
    for r in rows:
        by_fmt[r.fmt.name if r.component is not None else "unknown"] += r.nbytes
        key = r.component.value if r.component is not None else "unknown"
        by_comp[key] += r.nbytes
        per_tok_comp[key] += read_per_token(r, cfg)
    groups: dict[str, dict] = defaultdict(dict)
    layers_in_class = Counter(layer_class(cfg, l) for l in range(cfg.n_layer))
    for r in rows:
        cls = layer_class(cfg, r.layer) if r.component is not None else "unknown"
        suffix = r.name.split(".", 2)[-1] if r.layer >= 0 else r.name
        g = groups[cls].setdefault(suffix, {"shape": list(r.shape), "formats": Counter(), "count": 0, "bytes": 0})
        g["formats"][r.fmt.name] += 1
        g["count"] += 1
        g["bytes"] += r.nbytes
    tensor_groups = {
        cls: {"layers": layers_in_class.get(cls, 0),
              "tensors": {k: {**v, "formats": dict(v["formats"])} for k, v in g.items()}}
        for cls, g in groups.items()
    }
    cfg_dict = {k: v for k, v in cfg.__dict__.items() if k != "extra"}
    cfg_dict["compress_ratios"] = list(cfg.compress_ratios)
    cfg_dict["swiglu_clamp"] = list(cfg.swiglu_clamp)
    return {
        "source": source,
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_vocab": cfg.n_vocab,
        "recipe": recipe_of(rows),
        "n_tensors": n_tensors, "file_bytes": file_bytes,
        "tensor_bytes": sum(r.nbytes for r in rows),
        "bytes_per_token": bytes_per_token(rows, cfg),
        "bytes_per_token_short_context": bytes_per_token(rows, cfg, short_context=True),
        "short_context_tokens": short_context_limit(cfg),
        "bytes_by_format": dict(sorted(by_fmt.items())),
        "bytes_by_component": dict(by_comp),
        "bytes_per_token_by_component": dict(per_tok_comp),
        "tensor_groups": tensor_groups,
        "config": cfg_dict,
    }


def short_context_limit(cfg: Config) -> int:
    """Longest context (tokens) at which the indexer still selects every compressed row (model.md §8)."""
    return 4 * cfg.idx_topk + 3  # ratio-4 rows = floor(ctx / 4) <= top_k


def report(path: Optional[str | Path] = None, preset: Optional[str] = None, recipe: str = "q2",
           layers: Optional[int] = None) -> dict:
    """Figures for a model file, or (no path) for the file `make-tiny --preset/--recipe/--layers` writes."""
    if path is not None:
        from .weights import load_weights

        w = load_weights(path)
        rows = rows_from_file(w, w.reader)
        return _summary(w.config, rows, str(path), Path(path).stat().st_size, len(w.reader.tensors))
    from .synth import inventory, preset_config

    cfg = preset_config(preset or "flash", layers)
    slots = inventory(cfg, recipe)
    return _summary(cfg, rows_from_slots(slots), f"preset {cfg.name} ({recipe})", 0, len(slots))


def _gb(n: int) -> str:
    return f"{n:,} B ({n / 1e9:.3f} GB)"


def render(rep: dict, console=None) -> None:
    """Print a report: config, tensor table by layer class, bytes per format, recipe, per-token reads."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    c = rep["config"]
    con.print(f"[bold]{rep['source']}[/]  {c.get('name', '')}")
    ct = Table(title="config", show_header=False)
    for k in ("n_layer", "n_embd", "n_vocab", "n_head", "head_dim", "rope_dim", "q_lora_rank", "o_groups",
              "o_lora_rank", "n_expert", "n_expert_used", "expert_ff", "n_hash_layers", "window", "idx_heads",
              "idx_dim", "idx_topk", "n_hc", "compress_ratios"):
        ct.add_row(k, str(c[k]))
    con.print(ct)
    for cls, g in rep["tensor_groups"].items():
        t = Table(title=f"{cls}" + (f": {g['layers']} layer(s)" if cls != GLOBAL_CLASS and cls != "unknown" else ""))
        for col in ("tensor", "shape", "format", "count", "bytes"):
            t.add_column(col, justify="right" if col in ("count", "bytes") else "left", overflow="fold")
        for name, v in g["tensors"].items():
            fm = ", ".join(f"{f}" if n == v["count"] else f"{f}x{n}" for f, n in v["formats"].items())
            t.add_row(name, "x".join(map(str, v["shape"])), fm, str(v["count"]), f"{v['bytes']:,}")
        con.print(t)
    ft = Table(title="bytes per format")
    ft.add_column("format")
    ft.add_column("bytes", justify="right")
    for f, n in rep["bytes_by_format"].items():
        ft.add_row(f, f"{n:,}")
    con.print(ft)
    size = f"{rep['file_bytes']:,} B" if rep["file_bytes"] else "none (figures from the preset's tensor list)"
    con.print(f"recipe: [bold]{rep['recipe']}[/]   tensors: {rep['n_tensors']}   file: {size}")
    con.print(f"weight bytes read per decoded token: {_gb(rep['bytes_per_token'])}")
    con.print(f"  at context <= {rep['short_context_tokens']} tokens (no indexer q_b/proj): "
              f"{_gb(rep['bytes_per_token_short_context'])}")
