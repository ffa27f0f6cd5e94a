"""Streaming quantization of a whole model: source (HF checkpoint folder or DSV4 GGUF) + recipe -> GGUF.

`plan_quantization` checks everything before a byte is written (every tensor present, a recipe rule for
each, formats the row width can hold and the engine accepts); `quantize_model` then converts tensor by
tensor (routed experts one expert at a time, dense matrices in row chunks), never holding the model in
RAM, into a hidden temp file beside OUT (dsv4.atomicfile), fsyncs and renames it over OUT: an interrupted or failed run leaves no file under
the output name (an existing OUT stays untouched). Tensors whose source format already equals the
target are copied byte for byte. Knows file layouts and recipes; no model math.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ..atomicfile import replacing
from ..config import Config
from ..errors import ModelFileError, RecipeError
from ..weights import ARCH, Component, TensorSlot, config_from_reader, expected_tensors, open_gguf
from .dequant import dequantize_np
from .formats import QTensor, QuantFormat
from .imatrix import Imatrix
from .recipes import Recipe

ROW_CHUNK_WEIGHTS = 1 << 24  # weights per dense chunk: bounds float32 temporaries to 64 MB
KEY_RECIPE = "quantize.recipe"
KEY_IMATRIX = "quantize.imatrix.file"
STALE_KEY_PREFIXES = ("GGUF.", "quantize.", "general.architecture")  # re-written, not copied
MTP_EXTRA = ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight",
             "hc_head_fn.weight", "hc_head_scale.weight", "hc_head_base.weight")
FLOAT_KINDS = (QuantFormat.F32, QuantFormat.F16, QuantFormat.BF16)


class Action(enum.Enum):
    COPY = "copy"  # same format in the source GGUF: raw bytes
    QUANTIZE = "quantize"  # float source -> target format
    INTS = "ints"  # integer table (I32)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    fmt: QuantFormat
    action: Action
    expert: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.fmt.row_bytes(self.shape[-1])

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class QuantizeResult:
    path: Path
    recipe: str
    tensors: list[TensorPlan] = field(default_factory=list)
    file_bytes: int = 0


# ---- sources ------------------------------------------------------------------------------------------

class GgufSource:
    """An existing DSV4 GGUF (any formats): tensors dequantized on demand, metadata copied."""

    kind = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.config: Config = config_from_reader(self.reader, str(self.path))
        self.tensors: dict[str, QTensor] = {}
        for t in self.reader.tensors:
            fmt = QuantFormat(int(t.tensor_type))
            shape = tuple(int(v) for v in reversed([int(x) for x in t.shape]))
            self.tensors[t.name] = QTensor.from_bytes(t.data, fmt, shape, t.name)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def missing(self, name: str) -> list[str]:
        return [] if name in self.tensors else [name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def source_format(self, name: str) -> Optional[QuantFormat]:
        return self.tensors[name].fmt

    def raw_chunks(self, name: str) -> Iterator[np.ndarray]:
        """The stored bytes as [rows, row_bytes] chunks."""
        qt = self.tensors[name]
        flat = np.asarray(qt.data).reshape(qt.n_rows, -1)
        step = max(1, ROW_CHUNK_WEIGHTS // qt.shape[-1])
        for s in range(0, flat.shape[0], step):
            yield np.ascontiguousarray(flat[s: s + step])

    def expert(self, name: str, e: int) -> np.ndarray:
        qt = self.tensors[name]
        return dequantize_np(np.asarray(qt.data[e]), qt.fmt, qt.shape[-1])

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        qt = self.tensors[name]
        raw = np.asarray(qt.data).reshape(qt.n_rows, -1)[start:stop]
        return dequantize_np(raw, qt.fmt, qt.shape[-1])

    def ints(self, name: str) -> np.ndarray:
        qt = self.tensors[name]
        return dequantize_np(np.asarray(qt.data), qt.fmt, qt.shape[-1]).astype(np.int32)

    def write_metadata(self, w) -> None:
        import gguf

        V = gguf.GGUFValueType
        for key, f in self.reader.fields.items():
            if key.startswith(STALE_KEY_PREFIXES):
                continue
            vtype = V(f.types[0])
            sub = V(f.types[-1]) if vtype == V.ARRAY else None
            w.add_key_value(key, f.contents(), vtype, sub_type=sub)


class HfSource:
    """The official Hugging Face checkpoint folder (convert.HfCheckpoint); metadata from config.json and the
    official V4 tokenizer."""

    kind = "hf"

    def __init__(self, path: str | Path):
        from .convert import HfCheckpoint

        self.path = Path(path)
        self.ckpt = HfCheckpoint(path)
        self.config: Config = self.ckpt.config
        self._cache: tuple[str, np.ndarray] | None = None

    def has(self, name: str) -> bool:
        return self.ckpt.has(name)

    def missing(self, name: str) -> list[str]:
        return self.ckpt.missing(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(name)

    def source_format(self, name: str) -> Optional[QuantFormat]:
        return None  # never a GGUF block format: always converted

    def _whole(self, name: str) -> np.ndarray:
        if self._cache is None or self._cache[0] != name:
            self._cache = None  # free the previous tensor first
            self._cache = (name, self.ckpt.tensor(name))
        return self._cache[1]

    def expert(self, name: str, e: int) -> np.ndarray:
        return self.ckpt.expert(name, e)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        x = self._whole(name)
        return x.reshape(-1, x.shape[-1])[start:stop]

    def ints(self, name: str) -> np.ndarray:
        return self._whole(name).astype(np.int32)

    def write_metadata(self, w) -> None:
        from ..synth import add_metadata  # the one writer of the DSV4 metadata schema

        add_metadata(w, self.config)


def open_source(path: str | Path):
    """A folder is a Hugging Face checkpoint, a file a DSV4 GGUF."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file or folder (give a DSV4 .gguf or a Hugging Face checkpoint folder)")
    return HfSource(p) if p.is_dir() else GgufSource(p)


# ---- planning ---------------------------------------------------------------------------------------------

def _possible_names(cfg: Config) -> list[str]:
    """Every tensor name a DSV4 main or MTP file with cfg.n_layer layers can hold, whatever each layer's
    class (recipes are written once for all layer classes): recipe patterns are checked against these."""
    from ..config import tiny

    every_class = expected_tensors(tiny(6))  # raw, hash, ratio-4 and ratio-128 layers
    suffixes = sorted({s.name.split(".", 2)[2] for s in every_class if s.layer >= 0})
    names = [s.name for s in every_class if s.layer < 0]
    names += [f"blk.{l}.{x}" for l in range(cfg.n_layer) for x in suffixes]
    names += ["mtp.0." + x for x in (*suffixes, *MTP_EXTRA)]
    return names


def plan_quantization(src, recipe: Recipe) -> list[TensorPlan]:
    """The output tensors in file order with their formats; raises before anything is written."""
    cfg = src.config
    slots: list[TensorSlot] = [s for s in expected_tensors(cfg) if not s.optional or src.has(s.name)]
    missing = [(s.name, m) for s in slots for m in src.missing(s.name)]
    if missing:
        name, hf = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{src.path}: missing tensor {hf} (needed for {name}){more}; the checkpoint is incomplete")
    possible = _possible_names(cfg)
    dead = [r.pattern for r in recipe.rules if not any(r.matches(n) for n in possible)]
    if dead:
        raise RecipeError(f"recipe {recipe.name!r}: pattern {dead[0]!r} matches no DSV4 tensor name (typo?); "
                          "names look like 'blk.3.ffn_down_exps.weight' or 'output.weight'")
    plan = []
    for s in slots:
        shape = src.shape(s.name)
        if tuple(shape) != tuple(s.shape):
            raise ModelFileError(f"{src.path}: tensor {s.name} has shape {list(shape)}, the config needs {list(s.shape)}")
        fmt = recipe.format_for(s.name, shape)
        if fmt not in s.formats:
            ok = "/".join(sorted(f.name for f in s.formats))
            raise RecipeError(f"recipe {recipe.name!r} gives {s.name} the format {fmt.name}, but the engine reads "
                              f"only {ok} there; add a rule for it")
        is_int = QuantFormat.I32 in s.formats
        expert = s.component in (Component.EXPERTS_GATE_UP, Component.EXPERTS_DOWN)
        sf = src.source_format(s.name)
        action = Action.INTS if is_int else (Action.COPY if sf == fmt else Action.QUANTIZE)
        plan.append(TensorPlan(s.name, tuple(shape), fmt, action, expert))
    fmts = {p.name: p.fmt for p in plan}
    for l in range(cfg.n_layer):
        g, u = fmts[f"blk.{l}.ffn_gate_exps.weight"], fmts[f"blk.{l}.ffn_up_exps.weight"]
        if g != u:
            raise RecipeError(f"recipe {recipe.name!r}: blk.{l} routed gate is {g.name} but up is {u.name}; "
                              "the engine needs gate and up in one format")
    return plan


# ---- conversion ---------------------------------------------------------------------------------------------

def _torch_device(device: Optional[str]) -> str:
    if device:
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def quantize_rows(x: np.ndarray, fmt: QuantFormat, importance: Optional[np.ndarray], device: str) -> np.ndarray:
    """float32 [rows, n] -> uint8 GGUF rows; on a GPU through quantize_torch (same block rules)."""
    from .quantize import quantize_np, quantize_torch

    if device == "cpu" or fmt in FLOAT_KINDS or fmt == QuantFormat.Q8_0:
        return quantize_np(x, fmt, importance)
    import torch

    imp = None if importance is None else torch.as_tensor(importance, device=device)
    return quantize_torch(torch.from_numpy(np.ascontiguousarray(x)).to(device), fmt, imp).cpu().numpy()


def _tensor_chunks(src, p: TensorPlan, imatrix: Optional[Imatrix], device: str,
                   advance: Callable[[int], None]) -> Iterator[np.ndarray]:
    if p.action is Action.COPY:
        for c in src.raw_chunks(p.name):
            yield c
            advance(c.shape[0] * p.shape[-1])
        return
    if p.action is Action.INTS:
        yield np.ascontiguousarray(src.ints(p.name).astype("<i4")).view(np.uint8)
        advance(p.n_weights)
        return
    ncols = p.shape[-1]
    if p.expert:
        for e in range(p.shape[0]):
            x = src.expert(p.name, e)
            imp = imatrix.importance(p.name, e, ncols) if imatrix is not None else None
            yield quantize_rows(x, p.fmt, imp, device)
            advance(x.size)
        return
    n_rows = int(np.prod(p.shape[:-1], dtype=np.int64)) if len(p.shape) > 1 else 1
    step = max(1, ROW_CHUNK_WEIGHTS // ncols)
    imp = imatrix.importance(p.name, None, ncols) if imatrix is not None else None
    if imp is None and p.fmt == QuantFormat.IQ2_XXS and n_rows > step:
        # IQ2_XXS needs importance; without an imatrix it is the column energy of the WHOLE matrix (ds4)
        imp = np.zeros(ncols, np.float64)
        for s in range(0, n_rows, step):
            r = src.rows(p.name, s, s + step)
            imp += (r.astype(np.float64) ** 2).sum(0)
        imp = imp.astype(np.float32)
    for s in range(0, n_rows, step):
        x = src.rows(p.name, s, s + step).reshape(-1, ncols)
        yield quantize_rows(np.ascontiguousarray(x, dtype=np.float32), p.fmt, imp, device)
        advance(x.size)


def _writer(path: Path):
    import gguf

    from ..synth import writer_class

    class StreamingWriter(writer_class()):
        """GGUFWriter that takes one tensor's bytes as a stream of chunks (experts one at a time)."""

        def write_tensor_chunks(self, chunks: Iterator[np.ndarray]) -> int:
            if self.state not in (gguf.WriterState.TI_DATA, gguf.WriterState.WEIGHTS):
                raise ValueError(f"tensor data written in writer state {self.state}")
            fout = self.fout[0]
            name = next(iter(self.tensors[0]))
            ti = self.tensors[0].pop(name)
            self.write_padding(fout, fout.tell())
            n = 0
            for c in chunks:
                c = np.ascontiguousarray(c).view(np.uint8)
                fout.write(c.tobytes())
                n += c.nbytes
            if n != ti.nbytes:
                raise AssertionError(f"{name}: wrote {n} bytes, the header promised {ti.nbytes}")
            self.write_padding(fout, n)
            self.state = gguf.WriterState.WEIGHTS
            return n

    return StreamingWriter(str(path), ARCH)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    prog.start()
    prog.add_task("quantize", total=total)
    return prog


def quantize_model(src_path: str | Path, out_path: str | Path, recipe: Recipe | str,
                   imatrix: Imatrix | str | Path | None = None, progress: bool = False,
                   device: Optional[str] = None) -> QuantizeResult:
    """Quantize a model (HF checkpoint folder or DSV4 GGUF) with `recipe` into the GGUF `out_path`.

    imatrix: an Imatrix or the path of one (dsv4 imatrix output); device: torch device for the K/IQ
    quantizers (default: CUDA when available). Atomic: OUT appears only when complete."""
    rec = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    im = Imatrix.load(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    out = Path(out_path)
    if out.is_dir():
        raise ModelFileError(f"{out}: is a directory; give the path of the .gguf to write")
    if not out.parent.is_dir():
        raise ModelFileError(f"{out.parent}: no such directory")
    src = open_source(src_path)
    if src.kind == "gguf" and out.exists() and out.resolve() == src.path.resolve():
        raise ModelFileError(f"{out}: output is the source file; write to another path")
    plan = plan_quantization(src, rec)
    dev = _torch_device(device)
    prog = _progress(progress, sum(p.n_weights for p in plan))
    try:
        with replacing(out) as tmp:
            w = _writer(tmp)
            try:
                import gguf

                src.write_metadata(w)
                w.add_key_value(KEY_RECIPE, rec.name, gguf.GGUFValueType.STRING)
                if im is not None:
                    w.add_key_value(KEY_IMATRIX, str(im.source), gguf.GGUFValueType.STRING)
                for p in plan:
                    byte_shape = (*p.shape[:-1], p.fmt.row_bytes(p.shape[-1]))
                    w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes,
                                      raw_dtype=gguf.GGMLQuantizationType(int(p.fmt)))
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()

                def advance(n: int) -> None:
                    if prog is not None:
                        prog.advance(prog.task_ids[0], n)

                for p in plan:
                    if prog is not None:
                        prog.update(prog.task_ids[0], description=f"{p.name} -> {p.fmt.name}")
                    w.write_tensor_chunks(_tensor_chunks(src, p, im, dev, advance))
            finally:
                w.close()
    finally:
        if prog is not None:
            prog.stop()
    return QuantizeResult(out, rec.name, plan, out.stat().st_size)
