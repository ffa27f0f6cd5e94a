"""Importance matrices: per-input-column activation statistics that steer the quantizers (quant.md §3.6).

`collect_imatrix` runs the model on a text through `RecordingOps`, a TorchOps subclass that records, at
the op level, the inputs of every `qmatmul` (dense weights: sum of x^2 per input column) and of every
routed `moe` call, per selected expert: gate/up get sum of u^2 of the FFN-normed rows routed to that
expert, down gets sum of mid^2 of the route-weighted SwiGLU output (ds4's collector). `Imatrix` holds
sums and counts and gives `importance(name, expert)` = mean (1.0 for experts never selected, as ds4).
Saved as safetensors (`<name>.sum`, `<name>.count`); no pickle. `Imatrix.load` also reads llama.cpp's
legacy `.dat` files (ds4's published imatrix). Knows nothing of block formats.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DsvError
from ..reference import TorchOps

SUM_SUFFIX = ".sum"
COUNT_SUFFIX = ".count"
UNSEEN_IMPORTANCE = 1.0  # ds4 writes 1.0 for experts no token was routed to
DEFAULT_CHUNK = 512  # tokens per collection session (each chunk starts a fresh context)
LEGACY_SUFFIX = ".dat"  # llama.cpp / ds4 imatrix files
MAX_NAME_BYTES = 4096


class ImatrixError(DsvError):
    """An importance-matrix file that is unreadable or does not fit the model."""


@dataclass
class Imatrix:
    """sums[name]: float64 [E, ncols] for routed experts, [1, ncols] for dense weights; counts[name]: [E]."""

    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    n_tokens: int = 0
    source: str = ""

    def add(self, name: str, n_rows: int, col: int, expert: int, sumsq: np.ndarray, count: int) -> None:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_rows, col), np.float64)
            self.counts[name] = np.zeros(n_rows, np.int64)
        self.sums[name][expert] += sumsq
        self.counts[name][expert] += count

    def importance(self, name: str, expert: Optional[int] = None, ncols: Optional[int] = None) -> Optional[np.ndarray]:
        """Mean x^2 per input column of tensor `name` (expert `expert` of a routed tensor), or None if
        the matrix has no entry for it. Raises ImatrixError when the column count does not fit."""
        s = self.sums.get(name)
        if s is None:
            return None
        if expert is not None and ncols and s.shape[0] == 1 and s.shape[1] != ncols and s.shape[1] % ncols == 0:
            self._split_experts(name, s.shape[1] // ncols)  # a legacy entry of E * ncols values
            s = self.sums[name]
        e = 0 if expert is None else int(expert)
        if e >= s.shape[0]:
            raise ImatrixError(f"imatrix {self.source}: {name} has {s.shape[0]} expert rows, asked for expert {e}")
        if ncols is not None and s.shape[1] != ncols:
            raise ImatrixError(f"imatrix {self.source}: {name} has {s.shape[1]} columns, the tensor has {ncols}; "
                               "was it collected on another model?")
        c = int(self.counts[name][e])
        if c == 0:
            return np.full(s.shape[1], UNSEEN_IMPORTANCE, np.float32)
        return (s[e] / c).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        tensors = {}
        for n, s in self.sums.items():
            tensors[n + SUM_SUFFIX] = s.astype(np.float64)
            tensors[n + COUNT_SUFFIX] = self.counts[n].astype(np.int64)
        path = Path(path)
        save_file(tensors, str(path), metadata={"n_tokens": str(self.n_tokens), "format": "dsv4-imatrix-1"})
        return path

    @staticmethod
    def load(path: str | Path) -> "Imatrix":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ImatrixError(f"imatrix file not found: {path}")
        if path.suffix == LEGACY_SUFFIX:
            return Imatrix.load_dat(path)
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ImatrixError(f"{path}: not a dsv4 imatrix (safetensors) file: {e}") from None
        im = Imatrix(source=str(path), n_tokens=int(meta.get("n_tokens", 0)))
        for k, v in data.items():
            if k.endswith(SUM_SUFFIX):
                name = k[: -len(SUM_SUFFIX)]
                cnt = data.get(name + COUNT_SUFFIX)
                if v.ndim != 2 or cnt is None or cnt.shape != (v.shape[0],):
                    raise ImatrixError(f"{path}: entry {name} lacks a matching {COUNT_SUFFIX} vector")
                if not np.isfinite(v).all():
                    raise ImatrixError(f"{path}: entry {name} holds non-finite values")
                im.sums[name], im.counts[name] = v.astype(np.float64), cnt.astype(np.int64)
        if not im.sums:
            raise ImatrixError(f"{path}: no imatrix entries")
        return im


    @staticmethod
    def load_dat(path: str | Path) -> "Imatrix":
        """llama.cpp legacy imatrix (quant.md §3.6): int32 n; per entry int32 name_len, name, int32 ncall,
        int32 nval, float32[nval] (sums; mean = value / ncall); an optional trailer follows. An entry of
        E*ncols values is per expert; `name.expert.<e>` / `name.expert_<e>` entries are folded in."""
        import re
        import struct

        path = Path(path)
        raw = path.read_bytes()
        im, o = Imatrix(source=str(path)), 0

        def take(fmt: str):
            nonlocal o
            size = struct.calcsize(fmt)
            if o + size > len(raw):
                raise ImatrixError(f"{path}: truncated legacy imatrix at byte {o}")
            v = struct.unpack_from(fmt, raw, o)
            o += size
            return v

        (n,) = take("<i")
        if n < 1:
            raise ImatrixError(f"{path}: legacy imatrix with {n} entries")
        per_expert: dict[str, dict[int, np.ndarray]] = {}
        for _ in range(n):
            (ln,) = take("<i")
            if not 0 < ln <= MAX_NAME_BYTES:
                raise ImatrixError(f"{path}: bad entry name length {ln}")
            name = raw[o: o + ln].decode("utf-8", "replace")
            o += ln
            ncall, nval = take("<ii")
            if nval < 1 or o + 4 * nval > len(raw):
                raise ImatrixError(f"{path}: entry {name} has a bad value count {nval}")
            vals = np.frombuffer(raw, "<f4", nval, o).astype(np.float64)
            o += 4 * nval
            if not np.isfinite(vals).all():
                raise ImatrixError(f"{path}: entry {name} holds non-finite values")
            mean = vals / ncall if ncall > 0 else vals
            m = re.fullmatch(r"(.+)\.expert[._](\d+)", name)
            if m:
                per_expert.setdefault(m.group(1), {})[int(m.group(2))] = mean
            else:
                im.sums[name], im.counts[name] = mean[None, :], np.ones(1, np.int64)
        for name, rows in per_expert.items():
            width = {len(v) for v in rows.values()}
            if len(width) != 1:
                raise ImatrixError(f"{path}: experts of {name} have different widths {sorted(width)}")
            E = max(rows) + 1
            sums = np.full((E, width.pop()), UNSEEN_IMPORTANCE, np.float64)
            for e, v in rows.items():
                sums[e] = v
            im.sums[name], im.counts[name] = sums, np.ones(E, np.int64)
        return im

    def _split_experts(self, name: str, n_expert: int) -> None:
        """Reshape a legacy flat entry of n_expert * ncols values into per-expert rows (ds4's slicing)."""
        self.sums[name] = self.sums[name].reshape(n_expert, -1)
        self.counts[name] = np.ones(n_expert, np.int64)


class RecordingOps(TorchOps):
    """TorchOps that also accumulates importance statistics into `self.imatrix` (same math, same outputs)."""

    name = "torch+imatrix"

    def __init__(self, *args, imatrix: Optional[Imatrix] = None, **kw):
        super().__init__(*args, **kw)
        self.imatrix = imatrix if imatrix is not None else Imatrix()

    def _record_dense(self, x, w) -> None:
        import torch

        x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.imatrix.add(w.name, 1, x2.shape[1], 0, (x2 * x2).sum(0).cpu().numpy(), int(x2.shape[0]))

    def qmatmul(self, x, w):
        if w.name:
            self._record_dense(x, w)
        return super().qmatmul(x, w)

    def qmatmul_grouped(self, x, w, groups):
        if w.name:
            self._record_dense(x, w)  # every group's rows see the same input width
        return super().qmatmul_grouped(x, w, groups)

    def moe(self, u, gate, up, down, sel, weights, clamp):
        import torch

        E = gate.shape[0]
        u64 = u.to(torch.float64)
        for e in torch.unique(sel).tolist():  # host read: collection is not a fast path
            rows, slot = (sel == e).nonzero(as_tuple=True)
            ue = u[rows]  # [n, D]
            s = (u64[rows] ** 2).sum(0).cpu().numpy()
            for t in (gate, up):
                self.imatrix.add(t.name, E, u.shape[1], e, s, len(rows))
            Wg, Wu = self.dequant(gate.expert(e)), self.dequant(up.expert(e))
            mid = self.swiglu(ue @ Wg.T, ue @ Wu.T, clamp) * weights[rows, slot][:, None]
            m64 = mid.to(torch.float64)
            self.imatrix.add(down.name, E, mid.shape[1], e, (m64 * m64).sum(0).cpu().numpy(), len(rows))
        return super().moe(u, gate, up, down, sel, weights, clamp)


def collect_imatrix(model_path: str | Path, token_ids: Sequence[int], chunk: int = DEFAULT_CHUNK,
                    progress=None) -> Imatrix:
    """Run the model (torch reference) over `token_ids` in chunks of `chunk` tokens, each in a fresh
    session, and return the accumulated statistics. progress: optional callable(done_tokens, total)."""
    from .. import engine as engine_mod

    ids = [int(t) for t in token_ids]
    if not ids:
        raise ImatrixError("the calibration text encodes to no tokens")
    base = engine_mod.load(model_path, backend="torch")
    ops = RecordingOps()
    eng = engine_mod.Engine(base.weights, ops, ops.name)
    im = ops.imatrix
    im.source = str(model_path)
    for s in range(0, len(ids), chunk):
        part = np.asarray(ids[s: s + chunk], dtype=np.int64)
        sess = eng.new_session(ctx=len(part))
        # the head runs on every position (a session's prefill computes only the last one's logits), so
        # output.weight gets the statistics of all tokens like every other projection
        eng.model.logits(eng.model.forward(part, 0, sess.state))
        im.n_tokens += len(part)
        if progress is not None:
            progress(im.n_tokens, len(ids))
    return im


def collect_imatrix_text(model_path: str | Path, text: str, chunk: int = DEFAULT_CHUNK, progress=None) -> Imatrix:
    """collect_imatrix on `text`, tokenized with the model's own tokenizer."""
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(model_path)
    return collect_imatrix(model_path, tok.encode(text), chunk, progress)
