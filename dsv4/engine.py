"""Public engine API: `load()` -> Engine (weights + one backend, chosen once) -> Session (one timeline).

A Session owns its tokens, its preallocated KV state and the last logits; `prefill` extends the
timeline in chunks (layer-major), `decode` adds one token, `generate` streams, `save`/`load_session`
write and read versioned, checksummed snapshots (no pickle). Backends are registered by name in
BACKENDS and imported lazily. Knows nothing of terminals or kernels.
"""
from __future__ import annotations

import importlib
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from . import settings
from .cache.state import SessionState
from .config import Config
from .errors import DsvError, ModelFileError
from .model import Model, MtpWeights

log = logging.getLogger("dsv4")

BACKENDS = {
    "torch": "dsv4.reference:TorchOps",
    "triton": "dsv4.kernels_triton:TritonOps",
    "mlx": "dsv4.kernels_mlx:MlxOps",
}



def _backend_class(name: str):
    mod, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def resolve_backend(name: str = "auto") -> str:
    """'auto': triton with a CUDA/ROCm device, mlx on macOS arm64, else torch."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
        return name
    try:
        import torch

        if torch.cuda.is_available():
            try:
                importlib.import_module("dsv4.kernels_triton")
                return "triton"
            except Exception as e:  # noqa: BLE001 - any import failure means: use the reference
                log.warning("triton backend unavailable (%s); using torch", e)
    except ImportError:
        pass
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        try:
            importlib.import_module("dsv4.kernels_mlx")
            return "mlx"
        except Exception as e:  # noqa: BLE001
            log.warning("mlx backend unavailable (%s); using torch", e)
    return "torch"


def make_ops(backend: str, **kw):
    cls = _backend_class(backend)
    if kw.get("kernels") and backend != "triton":
        raise DsvError(f"kernel variants (--kernel) are registered for the triton backend, not {backend!r}")
    if backend in ("torch", "triton"):
        import torch

        dtype = kw.pop("dtype", None)
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
                     "fp64": torch.float64}[dtype]
        device = kw.pop("device", None) or ("cuda" if backend == "triton" else "cpu")
        return cls(device=device, dtype=dtype or torch.float32, **kw)
    return cls(**kw)


def load(path, backend="auto", mtp: Optional[str] = None, check: Optional[bool] = None, **backend_kw) -> "Engine":
    """Open a DSV4 GGUF and bind it to a backend.

    backend: 'auto' (picks and logs the best available), 'torch', 'triton', 'mlx', or an Ops instance
    (e.g. a TorchOps subclass with a researcher's kernel variant: no registry edit needed).
    check: shadow-run the reference for every overridden op and log the error (dsv4/kernel_check.py);
    defaults to the DSV4_KERNEL_CHECK setting."""
    from .weights import load_weights

    if isinstance(backend, str) or backend is None:
        name = resolve_backend(backend or settings.get("DSV4_BACKEND"))
        if backend == "auto":
            log.info("dsv4: using backend %s", name)
        ops = None
    else:
        ops, name = backend, getattr(backend, "name", type(backend).__name__)
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file not found: {path}")
    weights = load_weights(p)
    if ops is None:
        ops = make_ops(name, **backend_kw)
    _prepare_weights(ops, weights)
    if settings.get("DSV4_KERNEL_CHECK") if check is None else check:
        from .kernel_check import enable

        enable(ops)
    mtp_w = load_mtp(mtp, weights.config) if mtp else None
    return Engine(weights, ops, name, mtp_w)


def _prepare_weights(ops, weights) -> None:
    from dataclasses import fields as dc_fields

    from .quant.formats import QTensor

    def walk(obj):
        for f in dc_fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, QTensor):
                setattr(obj, f.name, ops.prepare(v))
            elif hasattr(v, "__dataclass_fields__") and not isinstance(v, Config):
                walk(v)

    walk(weights)
    for lw in weights.layers:
        walk(lw)


MTP_PREFIX = "mtp.0."


def load_mtp(path, cfg: Config) -> MtpWeights:
    """Bind the optional MTP support GGUF (model.md §3.4: tensors named mtp.0.*)."""
    import gguf

    from .quant.formats import QTensor, QuantFormat
    from .weights import LAYER_TENSORS, HCWeights, LayerWeights

    def _qtensor(x) -> QTensor:  # GGUF dims are ne0-first; QTensor shapes are PyTorch order
        shape = tuple(int(v) for v in reversed([int(d) for d in x.shape]))
        return QTensor.from_bytes(x.data, QuantFormat(int(x.tensor_type)), shape, x.name)

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ModelFileError(f"cannot read MTP file {path}: {e}") from None
    t = {x.name[len(MTP_PREFIX):]: _qtensor(x) for x in reader.tensors if x.name.startswith(MTP_PREFIX)}

    def need(name):
        if name not in t:
            raise ModelFileError(f"MTP file {path} lacks tensor {MTP_PREFIX}{name}")
        return t[name]

    def hc(prefix):
        return HCWeights(need(prefix + "_fn.weight"), need(prefix + "_scale.weight"), need(prefix + "_base.weight"))

    kw = {attr: need(suf) for suf, attr in LAYER_TENSORS.items()}
    block = LayerWeights(index=-1, hc_attn=hc("hc_attn"), hc_ffn=hc("hc_ffn"), exp_probs_b=need("exp_probs_b.bias"),
                         **kw)
    m = MtpWeights(need("e_proj.weight"), need("h_proj.weight"), need("enorm.weight"), need("hnorm.weight"),
                   need("norm.weight"), hc("hc_head"), block)
    m._reader = reader  # keep the memmap alive
    return m


@dataclass
class TokenEvent:
    """One generated token."""

    token_id: int
    index: int
    logits: Optional[np.ndarray] = field(default=None, repr=False)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s > 0 else 0.0


class Engine:
    """A loaded model bound to one backend."""

    def __init__(self, weights, ops, backend: str, mtp: Optional[MtpWeights] = None):
        self.weights = weights
        self.config: Config = weights.config
        self.ops = ops
        self.backend = backend
        self.model = Model(weights, ops, mtp)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            # reuse the weights' reader: a second stock GGUFReader re-parses 129k strings (seconds)
            self._tokenizer = Tokenizer.from_gguf(self.weights.reader or self.weights.path)
        return self._tokenizer

    def new_session(self, ctx: int = 32768, prefill_chunk: Optional[int] = None, kv_budget: Optional[int] = None,
                    kv_dir=None) -> "Session":
        """kv_budget (bytes): page the ratio-4 compressed rows, spilling beyond it to kv_dir (cache/paged.py)."""
        s = Session(self, ctx, prefill_chunk or int(settings.get("DSV4_PREFILL_CHUNK")))
        if kv_budget is not None:
            from .cache.paged import enable_paging

            enable_paging(s, kv_budget, kv_dir)
        return s

    def load_session(self, path) -> "Session":
        return Session.load(self, path)


class Session:
    """One timeline: tokens, KV state, last logits."""

    def __init__(self, engine: Engine, ctx: int, prefill_chunk: int):
        if ctx < 1 or prefill_chunk < 1:
            raise ValueError(f"ctx and prefill_chunk must be positive (got {ctx}, {prefill_chunk})")
        self.engine = engine
        self.ctx = int(ctx)
        self.prefill_chunk = int(prefill_chunk)
        self.state = SessionState.allocate(engine.ops, engine.config, self.ctx)
        self.tokens: list[int] = []
        self.last_logits: Optional[np.ndarray] = None
        self.last_hidden = None  # final HC state of the last token (MTP drafts start from it)
        self.last_stats: Optional[GenerationStats] = None

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def _check(self, ids: Sequence[int]) -> np.ndarray:
        a = np.asarray(list(ids), dtype=np.int64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError("prefill needs at least one token id")
        V = self.engine.config.n_vocab
        bad = (a < 0) | (a >= V)
        if bad.any():
            raise ValueError(f"token id {int(a[bad][0])} out of range [0, {V})")
        if self.n_past + a.size > self.ctx:
            raise ValueError(f"{self.n_past} + {a.size} tokens exceed the session context of {self.ctx}; "
                             "start a session with a larger ctx")
        return a

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens (chunked, layer-major) and return the next-token logits [V] float32."""
        ids = self._check(token_ids)
        model = self.engine.model
        for s in range(0, ids.size, self.prefill_chunk):
            chunk = ids[s:s + self.prefill_chunk]
            X = model.forward(chunk, self.n_past, self.state)
            self.tokens.extend(int(t) for t in chunk)
            self.last_hidden = X[X.shape[0] - 1:]
        self.last_logits = self.engine.ops.numpy(model.logits(self.last_hidden))[0]
        return self.last_logits

    def decode(self, token_id: int) -> np.ndarray:
        """One more token -> next-token logits [V] float32."""
        return self.prefill([int(token_id)])

    def generate(self, prompt, sampler: Optional[Callable] = None, max_tokens: int = 256,
                 stop_ids: Sequence[int] = ()) -> Iterator[TokenEvent]:
        """Stream tokens: prefill `prompt` (token ids or text), then sample up to max_tokens.
        sampler(logits) -> id (greedy when None, or an object with .sample(logits)). Stats land in
        `self.last_stats` when the iterator finishes."""
        if isinstance(prompt, str):
            prompt = self.engine.tokenizer.encode(prompt)
        prompt = list(prompt)
        stats = GenerationStats(prompt_tokens=len(prompt))
        self.last_stats = stats
        t0 = time.perf_counter()
        logits = self.prefill(prompt) if prompt else self.last_logits
        if logits is None:
            raise ValueError("generate needs a prompt on an empty session")
        stats.prefill_s = time.perf_counter() - t0
        pick = _sampler_fn(sampler)
        stop = set(int(s) for s in stop_ids)
        t1 = time.perf_counter()
        stats.stop_reason = "length"
        for i in range(max_tokens):
            if self.n_past >= self.ctx:
                stats.stop_reason = "ctx"
                break
            tok = int(pick(logits))
            stats.gen_tokens += 1
            stats.gen_s = time.perf_counter() - t1
            yield TokenEvent(tok, i, logits)
            if tok in stop:
                stats.stop_reason = "stop"
                break
            if i + 1 < max_tokens:
                logits = self.decode(tok)
            else:
                # the last token is fed so the session continues from it
                logits = self.decode(tok) if self.n_past < self.ctx else logits
            stats.gen_s = time.perf_counter() - t1

    # ---- MTP -----------------------------------------------------------------------------------
    def mtp_draft(self, n: int = 1) -> list[int]:
        """Greedy MTP drafts after the last token (model.md §6); needs an engine loaded with mtp=."""
        model = self.engine.model
        if model.mtp is None or self.last_hidden is None:
            raise ValueError("MTP drafting needs an engine loaded with an MTP file and a prefilled session")
        if getattr(self, "_mtp_state", None) is None or self._mtp_pos != self.n_past - 1:
            self._mtp_state = model.mtp_allocate(self.ctx)
        X, tok, p, out = self.last_hidden, self.tokens[-1], self.n_past - 1, []
        for _ in range(n):
            logits, X = model.mtp_step(tok, p, X, self._mtp_state)
            tok = int(np.argmax(self.engine.ops.numpy(logits)[0]))
            out.append(tok)
            p += 1
        self._mtp_pos = p
        return out

    # ---- snapshots -------------------------------------------------------------------------------
    # One format for /save, prefix reuse and `load_session`: dsv4/cache/snapshot.py (compact lossless
    # rows, JSON manifest + raw arrays, crc32 per array, config fingerprint, atomic write, no pickle).
    def save(self, path) -> int:
        """Write a snapshot; returns its size in bytes."""
        from .cache import snapshot

        return snapshot.save_session(self, path)

    @staticmethod
    def load(engine: Engine, path) -> "Session":
        from .cache import snapshot

        return snapshot.load_session(engine, path)


def _sampler_fn(sampler) -> Callable[[np.ndarray], int]:
    if sampler is None:
        return lambda logits: int(np.argmax(logits))
    if hasattr(sampler, "sample"):
        return sampler.sample
    return sampler
