"""How much a recipe costs: per-tensor error of quantizing a model, and model-level comparison of two files.

`tensor_errors` quantizes each tensor of a source (HF checkpoint or GGUF) with a recipe, decodes it and
reports relative RMSE against the source's float values. `compare_models` runs two GGUF files on the same
tokens (torch reference, whole prefill, logits at every position) and scores the second against the
first as ds4's quality tests do: mean/max KL(P_ref || P_test) of next-token distributions, top-1
agreement, mean NLL of the actual next tokens under each and their difference. Knows files and numbers,
not the model's internals (it calls the engine).
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DsvError
from .dequant import dequantize_np
from .formats import QuantFormat
from .recipes import Recipe
from .requant import Action, open_source, plan_quantization, quantize_rows


@dataclass(frozen=True)
class TensorError:
    name: str
    fmt: QuantFormat
    rel_rmse: float  # ||dequant(quant(x)) - x|| / ||x|| over the measured part
    max_abs: float
    nbytes: int  # bytes of the whole tensor in `fmt`
    n_weights: int  # weights measured (experts may be sampled)

    def as_row(self) -> dict:
        d = asdict(self)
        d["fmt"] = self.fmt.name
        return d


def tensor_errors(src_path: str | Path, recipe: Recipe | str, patterns: Sequence[str] = ("*",),
                  max_experts: Optional[int] = None, device: str = "cpu") -> list[TensorError]:
    """Relative error of each float tensor of the source quantized as `recipe` says.

    patterns: fnmatch globs selecting tensors; max_experts: measure only the first N experts of routed
    tensors (IQ2_XXS on a full model is slow). Tensors the recipe copies unchanged score 0."""
    rec = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    src = open_source(src_path)
    out = []
    for p in plan_quantization(src, rec):
        if p.action is Action.INTS or not any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns):
            continue
        ncols = p.shape[-1]
        if p.expert:
            n_e = p.shape[0] if max_experts is None else min(max_experts, p.shape[0])
            xs = [src.expert(p.name, e) for e in range(n_e)]
        else:
            n_rows = int(np.prod(p.shape[:-1], dtype=np.int64)) if len(p.shape) > 1 else 1
            xs = [src.rows(p.name, 0, n_rows).reshape(-1, ncols)]
        num = den = 0.0
        mx = 0.0
        n = 0
        for x in xs:
            x = np.ascontiguousarray(x, dtype=np.float32)
            y = dequantize_np(quantize_rows(x, p.fmt, None, device), p.fmt, ncols)
            d = (y.astype(np.float64) - x)
            num += float((d * d).sum())
            den += float((x.astype(np.float64) ** 2).sum())
            mx = max(mx, float(np.abs(d).max()))
            n += x.size
        out.append(TensorError(p.name, p.fmt, float(np.sqrt(num / den)) if den > 0 else 0.0, mx, p.nbytes, n))
    return out


@dataclass(frozen=True)
class QualityReport:
    """Scores of `test` against `ref` over n_positions next-token predictions."""

    n_positions: int
    kl_mean: float  # mean over positions of KL(P_ref || P_test), nats
    kl_max: float
    top1: float  # fraction of positions where both argmaxes agree
    nll_ref: float  # mean -log P_ref(next token)
    nll_test: float
    nll_delta: float  # nll_test - nll_ref

    def as_dict(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, test: np.ndarray, next_ids: Optional[Sequence[int]] = None) -> QualityReport:
    """Score logits [T, V] of a test model against a reference on the same positions (float64 throughout;
    identical inputs give KL exactly 0). next_ids [T]: the token that followed each position (for NLL)."""
    ref, test = np.atleast_2d(ref), np.atleast_2d(test)
    if ref.shape != test.shape:
        raise ValueError(f"logits shapes differ: {ref.shape} vs {test.shape}")
    lp, lq = _log_softmax(ref), _log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)  # [T]
    kl = np.maximum(kl, 0.0)  # float64 rounding can leave -1e-17 where the distributions agree
    top1 = float((ref.argmax(-1) == test.argmax(-1)).mean())
    if next_ids is not None:
        t = np.asarray(next_ids, dtype=np.int64)
        rows = np.arange(len(t))
        nll_p, nll_q = float(-lp[rows, t].mean()), float(-lq[rows, t].mean())
    else:
        nll_p = nll_q = float("nan")
    return QualityReport(int(kl.shape[0]), float(kl.mean()), float(kl.max()), top1, nll_p, nll_q, nll_q - nll_p)


def model_logits(path: str | Path, ids: Sequence[int], backend: str = "torch", chunk: int = 2048) -> np.ndarray:
    """Next-token logits [T, V] float32 at every position of `ids` (one session, prefill in chunks)."""
    from .. import engine as engine_mod

    eng = engine_mod.load(path, backend=backend)
    ids = np.asarray(list(ids), dtype=np.int64)
    sess = eng.new_session(ctx=len(ids), prefill_chunk=chunk)
    out = []
    for s in range(0, len(ids), chunk):
        part = ids[s: s + chunk]
        X = eng.model.forward(part, sess.n_past, sess.state)
        sess.tokens.extend(int(t) for t in part)
        out.append(eng.ops.numpy(eng.model.logits(X)))
    return np.concatenate(out, 0).astype(np.float32)


def compare_models(ref_path: str | Path, test_path: str | Path, ids: Sequence[int], backend: str = "torch",
                   chunk: int = 2048) -> QualityReport:
    """Run both files on the same token ids; positions 0..T-2 are scored (each has a next token)."""
    ids = [int(t) for t in ids]
    if len(ids) < 2:
        raise DsvError("quality comparison needs at least 2 tokens of text")
    a = model_logits(ref_path, ids, backend, chunk)[:-1]
    b = model_logits(test_path, ids, backend, chunk)[:-1]
    return compare_logits(a, b, ids[1:])


def text_ids(model_path: str | Path, text: str, max_tokens: Optional[int] = None) -> list[int]:
    """The model's own tokenization of `text`, truncated to max_tokens."""
    from ..tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(model_path).encode(text)
    return ids[:max_tokens] if max_tokens else ids
