"""Typed per-layer session state (model.md §4.3.6-4.3.7, §5.3), preallocated for a context size.

Per layer: the raw window ring (row of position p in slot p mod W), compressed attention rows,
indexer rows, and the compressor frontiers (values + scores). Arrays are backend arrays created
through the op contract (`ops.zeros`); row counts are derived from the token count, not stored.
`to_arrays()` / `from_arrays()` convert the live part to / from host numpy for snapshots.
Owns memory and layout, no attention math.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np

from ..config import NEG_SENTINEL, Config, LayerKind

RATIO4_FRONTIER_ROWS = 8  # previous window (rows 0-3) + current window (rows 4-7)


def n_compressed(n_tokens: int, ratio: int) -> int:
    """Compressed rows emitted after n_tokens tokens: floor(n / r)."""
    return n_tokens // ratio if ratio else 0


def comp_capacity(ctx: int, ratio: int) -> int:
    return ctx // ratio + 2 if ratio else 0


@dataclass
class LayerState:
    """State of one layer. Unused parts (by layer kind) are None."""

    raw: object  # [W, Dh] ring
    comp: Optional[object] = None  # [ctx/r + 2, Dh]
    comp_front_kv: Optional[object] = None  # [8, 2 Dh] (ratio 4) or [128, Dh] (ratio 128)
    comp_front_score: Optional[object] = None
    idx: Optional[object] = None  # [ctx/4 + 2, Di] indexer rows (ratio 4 only)
    idx_front_kv: Optional[object] = None  # [8, 2 Di]
    idx_front_score: Optional[object] = None

    @staticmethod
    def allocate(ops, cfg: Config, layer: int, ctx: int) -> "LayerState":
        r = cfg.ratio(layer)
        st = LayerState(raw=ops.zeros((cfg.window, cfg.head_dim)))
        if r:
            fr = RATIO4_FRONTIER_ROWS if r == LayerKind.RATIO4 else r
            wc = cfg.compressor_width(layer)
            st.comp = ops.zeros((comp_capacity(ctx, r), cfg.head_dim))
            st.comp_front_kv = ops.zeros((fr, wc))
            st.comp_front_score = ops.zeros((fr, wc), NEG_SENTINEL)
        if r == LayerKind.RATIO4:
            st.idx = ops.zeros((comp_capacity(ctx, r), cfg.idx_dim))
            st.idx_front_kv = ops.zeros((RATIO4_FRONTIER_ROWS, 2 * cfg.idx_dim))
            st.idx_front_score = ops.zeros((RATIO4_FRONTIER_ROWS, 2 * cfg.idx_dim), NEG_SENTINEL)
        return st

    # The model reads/writes compressed attention rows only through these two hooks (cache/paged.py
    # overrides them to keep the rows in compact pages that may spill to disk).
    def put_comp(self, ops, rows: np.ndarray, c) -> None:
        """Store compressed rows c [len(rows), Dh] at row indices `rows` (host int64)."""
        ops.put(self.comp, ops.asarray(rows), c)

    def comp_keys(self, ops, n_end: int, allowed):
        """Compressed rows [n_end, Dh] for attention; rows that `allowed` [T, n_end] excludes for every
        query may come back as zeros (they are masked out)."""
        return self.comp[:n_end]

    def to_arrays(self, ops, n_tokens: int, ratio: int, window: int) -> dict[str, np.ndarray]:
        """Live contents as host arrays: raw rows in logical (oldest-first) order, the emitted rows, frontiers."""
        out = {}
        n_raw = min(n_tokens, window)
        slots = np.arange(n_tokens - n_raw, n_tokens) % window
        raw = ops.numpy(self.raw)
        out["raw"] = raw[slots]
        nc = n_compressed(n_tokens, ratio)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "raw" or v is None:
                continue
            a = ops.numpy(v)
            out[f.name] = a[:nc] if f.name in ("comp", "idx") else a
        return out

    def load_arrays(self, ops, arrays: dict[str, np.ndarray], n_tokens: int, window: int) -> None:
        """Inverse of to_arrays into this (freshly allocated) state."""
        n_raw = min(n_tokens, window)
        slots = np.arange(n_tokens - n_raw, n_tokens) % window
        if n_raw:
            ops.put(self.raw, ops.asarray(slots.astype(np.int64)), ops.asarray(arrays["raw"]))
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "raw" or v is None:
                continue
            a = arrays[f.name]
            if len(a):
                ops.put(v, ops.asarray(np.arange(len(a), dtype=np.int64)), ops.asarray(a))

    @staticmethod
    def from_arrays(ops, cfg: Config, layer: int, ctx: int, arrays: dict[str, np.ndarray],
                    n_tokens: int) -> "LayerState":
        """A freshly allocated layer state filled from `to_arrays()` output."""
        st = LayerState.allocate(ops, cfg, layer, ctx)
        st.load_arrays(ops, arrays, n_tokens, cfg.window)
        return st


@dataclass
class SessionState:
    """All layers' state for one session timeline of at most `ctx` tokens."""

    ctx: int
    layers: list[LayerState]

    @staticmethod
    def allocate(ops, cfg: Config, ctx: int) -> "SessionState":
        return SessionState(ctx, [LayerState.allocate(ops, cfg, l, ctx) for l in range(cfg.n_layer)])

    def to_arrays(self, ops, cfg: Config, n_tokens: int) -> dict[str, np.ndarray]:
        out = {}
        for l, st in enumerate(self.layers):
            for k, v in st.to_arrays(ops, n_tokens, cfg.ratio(l), cfg.window).items():
                out[f"layer{l}.{k}"] = v
        return out

    @staticmethod
    def from_arrays(ops, cfg: Config, ctx: int, arrays: dict[str, np.ndarray], n_tokens: int) -> "SessionState":
        st = SessionState.allocate(ops, cfg, ctx)
        st.load_arrays(ops, cfg, arrays, n_tokens)
        return st

    def load_arrays(self, ops, cfg: Config, arrays: dict[str, np.ndarray], n_tokens: int) -> None:
        for l, st in enumerate(self.layers):
            pre = f"layer{l}."
            st.load_arrays(ops, {k[len(pre):]: v for k, v in arrays.items() if k.startswith(pre)},
                           n_tokens, cfg.window)
