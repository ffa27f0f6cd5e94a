"""Paged session state: ratio-4 compressed attention rows live as compact rows in a PagePool.

`enable_paging(session, budget_bytes, kv_dir)` swaps each ratio-4 layer's dense `comp` buffer for a
`PagedLayerState` whose rows are compact (compact.py) in a RowStream (pages.py); everything else (raw
window, indexer rows — every one is scored — ratio-128 rows, frontiers) stays resident as before. The
model reaches the rows only through the LayerState hooks `put_comp` / `comp_keys`: the paged version
encodes emitted rows, and for attention pages in just the rows the indexer selected (others stay zero and
are masked out), prefetching the next ratio-4 layer's last selection while this one computes.
Knows no attention math.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import LayerKind
from .compact import AttnRowCodec, attn_codec
from .pages import DEFAULT_ROWS_PER_PAGE, PagePool, RowStream
from .state import LayerState, n_compressed


@dataclass
class PagedLayerState(LayerState):
    """A ratio-4 LayerState whose compressed attention rows are paged (comp is unused and empty)."""

    stream: Optional[RowStream] = None
    codec: Optional[AttnRowCodec] = None
    next_paged: Optional["PagedLayerState"] = field(default=None, repr=False)
    last_sel: Optional[np.ndarray] = field(default=None, repr=False)

    def put_comp(self, ops, rows: np.ndarray, c) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        if rows[0] < self.stream.n_rows:  # a rewound timeline re-emits rows: drop the stale tail first
            self.stream.truncate(int(rows[0]))
        assert rows[0] == self.stream.n_rows and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))), \
            "compressed rows are emitted in order"
        self.stream.append(self.codec.encode(ops.numpy(c)))

    def comp_keys(self, ops, n_end: int, allowed):
        """[n_end, Dh]: the rows some query may attend to, paged in (batched); other rows are zero."""
        need = np.flatnonzero(ops.numpy(allowed).reshape(-1, n_end).any(0))
        dense = np.zeros((n_end, self.codec.head_dim), np.float32)
        if len(need):
            dense[need] = self.codec.decode(self.stream.gather(need))
        self.last_sel = need
        nxt = self.next_paged
        if nxt is not None and nxt.last_sel is not None and len(nxt.last_sel):
            nxt.stream.prefetch(nxt.last_sel[nxt.last_sel < nxt.stream.n_rows])
        return ops.asarray(dense)

    def _dense_view(self) -> LayerState:
        """The resident part as a plain LayerState (comp excluded), for the base (de)serialization."""
        kw = {f: getattr(self, f) for f in LayerState.__dataclass_fields__}
        kw["comp"] = None
        return LayerState(**kw)

    def to_arrays(self, ops, n_tokens: int, ratio: int, window: int) -> dict[str, np.ndarray]:
        out = self._dense_view().to_arrays(ops, n_tokens, ratio, window)
        out["comp"] = self.codec.decode(self.stream.gather(np.arange(n_compressed(n_tokens, ratio))))
        return out

    def load_arrays(self, ops, arrays: dict[str, np.ndarray], n_tokens: int, window: int) -> None:
        self._dense_view().load_arrays(ops, {k: v for k, v in arrays.items() if k != "comp"}, n_tokens, window)
        self.stream.truncate(0)
        comp = arrays.get("comp")
        if comp is not None and len(comp):
            self.stream.append(self.codec.encode(np.asarray(comp, dtype=np.float32)))


@dataclass
class SessionPager:
    """The pool and paged layers of one session (stats, budget, close)."""

    pool: PagePool
    layers: dict[int, PagedLayerState]

    def pageable_bytes(self) -> int:
        """Logical bytes of the paged rows (resident or spilled)."""
        return sum(st.stream.n_rows * st.stream.row_bytes for st in self.layers.values())

    def close(self) -> None:
        self.pool.close()


def enable_paging(session, budget_bytes: Optional[int] = None, kv_dir: Optional[Path] = None,
                  rows_per_page: int = DEFAULT_ROWS_PER_PAGE, direct: bool = True, fault=None) -> SessionPager:
    """Make `session`'s ratio-4 compressed rows paged under `budget_bytes` (None: no limit). Rows already
    in the session are moved into pages. Returns the pager (also kept as `session.pager`)."""
    eng = session.engine
    cfg, ops = eng.config, eng.ops
    pool = PagePool(budget_bytes, kv_dir, direct=direct, fault=fault)
    codec = attn_codec(cfg)
    paged: dict[int, PagedLayerState] = {}
    for l, st in enumerate(session.state.layers):
        if cfg.kind(l) != LayerKind.RATIO4 or isinstance(st, PagedLayerState):
            continue
        nc = n_compressed(session.n_past, cfg.ratio(l))
        existing = ops.numpy(st.comp)[:nc] if nc else None
        kw = {f: getattr(st, f) for f in LayerState.__dataclass_fields__}
        kw["comp"] = ops.zeros((0, cfg.head_dim))  # the dense buffer is released
        new = PagedLayerState(**kw, stream=pool.new_stream(codec.row_bytes, rows_per_page, name=f"layer{l}.comp"),
                              codec=codec)
        if existing is not None:
            new.stream.append(codec.encode(existing))
        session.state.layers[l] = new
        paged[l] = new
    order = sorted(paged)
    for a, b in zip(order, order[1:] + order[:1]):
        paged[a].next_paged = paged[b] if b != a else None
    session.pager = SessionPager(pool, paged)
    return session.pager
