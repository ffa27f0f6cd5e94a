"""Tiny model, paged KV state: a budget of 10% of the paged state gives bit-identical logits to the resident
state (with page-ins), a damaged page file is reported (never wrong logits), compact snapshots restore
exactly, and the disk prefix cache makes a second run (also in a restarted process) prefill only new tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dsv4.cache import snapshot
from dsv4.cache.compact import attn_codec
from dsv4.cache.paged import enable_paging
from dsv4.cache.pages import PageCorruptError
from dsv4.cache.prefix import PrefixCache, session_with_prefix, store_session_prefix
from tests.tolerances import assert_close

BUDGET_FRACTION = 0.10
SYSTEM_PROMPT = "You are a careful assistant who answers in short, exact sentences. " * 5
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(tiny_q2_path):
    import dsv4

    return dsv4.load(tiny_q2_path, backend="torch")


def _ids(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(1000, 60000, n)]


def _run(engine, ids, n_prefill, chunk, paged_budget=None, kv_dir=None, rows_per_page=4):
    """Prefill n_prefill tokens, decode the rest; returns (stacked logits, pager or None)."""
    s = engine.new_session(ctx=len(ids) + 8, prefill_chunk=chunk)
    pager = None
    if paged_budget is not None:
        pager = enable_paging(s, budget_bytes=paged_budget, kv_dir=kv_dir, rows_per_page=rows_per_page)
    out = [s.prefill(ids[:n_prefill])]
    out += [s.decode(t) for t in ids[n_prefill:]]
    return np.stack(out), pager, s


def _pageable_bytes(cfg, n_tokens):
    """Bytes of the ratio-4 compressed attention rows after n_tokens (what the pool pages)."""
    return sum(n_tokens // 4 * attn_codec(cfg).row_bytes for l in range(cfg.n_layer) if cfg.ratio(l) == 4)


def _assert_bit_identical(a, b, what):
    assert_close(a, b, "kv_cache", "bitexact", what)
    diff = a.view(np.uint32) != b.view(np.uint32)
    assert not diff.any(), (f"{what}: {int(diff.sum())}/{diff.size} logits differ; first at "
                            f"{np.unravel_index(int(np.argmax(diff)), diff.shape)}, max abs {np.abs(a - b).max():.3e}")


def _paged_matches_resident(engine, tmp_path, n_total, n_prefill, chunk, rows_per_page):
    ids = _ids(n_total)
    budget = int(BUDGET_FRACTION * _pageable_bytes(engine.config, n_total))
    ref, _, _ = _run(engine, ids, n_prefill, chunk)
    got, pager, _ = _run(engine, ids, n_prefill, chunk, budget, tmp_path, rows_per_page)
    st = pager.pool.stats
    _assert_bit_identical(got, ref, f"paged (budget {budget} B) vs resident")
    assert st.page_ins > 0 and st.page_outs > 0, st
    assert st.checksum_failures == 0
    return st, budget, pager


def test_paged_budget_10pct_bit_identical_short(engine, tmp_path):
    # 160 prompt tokens: 40 compressed rows per ratio-4 layer, the indexer (top-k 32) selects from p = 131 on
    st, budget, pager = _paged_matches_resident(engine, tmp_path, n_total=162, n_prefill=160, chunk=64,
                                                rows_per_page=4)
    assert st.prefetched > 0 and budget < pager.pageable_bytes()  # the next layer's selection was prefetched
    pager.close()


def test_engine_new_session_kv_budget_pages_ratio4_layers(engine, tmp_path):
    from dsv4.cache.paged import PagedLayerState

    s = engine.new_session(ctx=64, kv_budget=1 << 20, kv_dir=tmp_path)
    kinds = [isinstance(st, PagedLayerState) for st in s.state.layers]
    assert kinds == [engine.config.ratio(l) == 4 for l in range(engine.config.n_layer)]
    assert s.pager.pool.budget == 1 << 20
    assert not isinstance(engine.new_session(ctx=64).state.layers[2], PagedLayerState)
    s.pager.close()


@pytest.mark.slow
def test_paged_budget_10pct_bit_identical_3000_tokens(engine, tmp_path):
    """The acceptance run of issue #8: 3,000 tokens (2,990 prefilled, 10 decoded), budget 10% of the state."""
    st, budget, pager = _paged_matches_resident(engine, tmp_path, n_total=3000, n_prefill=2990, chunk=2048,
                                                rows_per_page=16)
    print(f"\n3000-token paged run: budget {budget} B of {pager.pageable_bytes()} B paged state; {st}")
    pager.close()


def test_damaged_page_file_is_reported_not_used(engine, tmp_path):
    ids = _ids(41, seed=3)
    s = engine.new_session(ctx=64, prefill_chunk=64)
    pager = enable_paging(s, budget_bytes=0, kv_dir=tmp_path, rows_per_page=4)
    s.prefill(ids[:40])  # 10 compressed rows per ratio-4 layer: two full pages each, spilled at budget 0
    (f,) = pager.pool.files.values()
    assert f.n_slots > 0
    with open(f.path, "r+b") as fh:  # flip one payload byte of every spilled page
        for slot in range(f.n_slots):
            fh.seek(slot * f.slot_bytes + 64)
            b = fh.read(1)
            fh.seek(slot * f.slot_bytes + 64)
            fh.write(bytes([b[0] ^ 0x04]))
    with pytest.raises(PageCorruptError, match="checksum"):
        s.decode(ids[40])
    pager.close()


def test_compact_snapshot_restores_exactly(engine, tmp_path):
    ids = _ids(132, seed=4)  # > 128: every layer class has compressed rows
    a = engine.new_session(ctx=256, prefill_chunk=80)
    a.prefill(ids[:130])
    path = snapshot.snapshot_path(tmp_path, "chat1")
    snapshot.save_session(a, path)
    rows = {k: v for k, v in a.state.to_arrays(engine.ops, engine.config, a.n_past).items()
            if k.rsplit(".", 1)[-1] in ("raw", "comp", "idx")}
    m, _ = snapshot.read_manifest(path)
    stored = {e["name"]: e for e in m["arrays"] if e["name"] in rows}
    assert set(stored) == set(rows) and all(e["codec"] in ("attn", "indexer") for e in stored.values()), stored
    assert sum(e["nbytes"] for e in stored.values()) * 2 < sum(v.nbytes for v in rows.values())  # compact, not f32
    b = snapshot.load_session(engine, path, kv_budget=0, kv_dir=tmp_path)  # restored straight into pages
    assert b.tokens == a.tokens and b.pager.pageable_bytes() > 0
    _assert_bit_identical(b.last_logits, a.last_logits, "restored last logits")
    ra = np.stack([a.decode(t) for t in ids[130:]])
    rb = np.stack([b.decode(t) for t in ids[130:]])
    _assert_bit_identical(rb, ra, "decode after restore (paged) vs uninterrupted")
    resaved = snapshot.snapshot_path(tmp_path, "chat1-again")
    snapshot.save_session(b, resaved)  # a paged session saves the same format
    c = snapshot.load_session(engine, resaved)
    _assert_bit_identical(c.last_logits, b.last_logits, "paged session snapshot")
    b.pager.close()


_RESTARTED = textwrap.dedent("""
    import json, sys
    import dsv4
    from dsv4.cache.prefix import PrefixCache, session_with_prefix
    model, kv, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    e = dsv4.load(model, backend="torch")
    cache = PrefixCache(kv, e.config.fingerprint(), min_tokens=1)
    s, n = session_with_prefix(e, ids, cache, ctx=512, prefill_chunk=64)
    s.prefill(ids[n:])
    print(json.dumps({"reused": n, "prefilled": len(ids) - n, "argmax": int(s.last_logits.argmax())}))
""")


def test_prefix_reuse_prefills_only_new_tokens_also_after_restart(engine, tiny_q2_path, tmp_path):
    cfg = engine.config
    system = engine.tokenizer.encode(SYSTEM_PROMPT)
    q1, q2 = engine.tokenizer.encode(" First question?"), engine.tokenizer.encode(" Another question, longer?")
    assert len(system) > 50 and system[:8] != q2[:8]
    cache = PrefixCache(tmp_path, cfg.fingerprint(), min_tokens=1)

    # run 1: cold; the caller syncs to the system prefix, stores it, then continues
    s1, n1 = session_with_prefix(engine, system + q1, cache, ctx=512, prefill_chunk=64)
    assert n1 == 0
    s1.prefill(system)
    assert store_session_prefix(s1, cache) is not None  # (run 1 would now go on with q1)

    # run 2 (same process): only the question is prefilled, and the result equals an uncached run
    s2, n2 = session_with_prefix(engine, system + q2, cache, ctx=512, prefill_chunk=64)
    assert n2 == len(system) and s2.n_past == len(system)
    logits2 = s2.prefill(q2)
    assert s2.n_past - n2 == len(q2)
    ref = engine.new_session(ctx=512, prefill_chunk=64)
    ref.prefill(system)
    _assert_bit_identical(logits2, ref.prefill(q2), "prefix-cached vs uncached")

    # run 3: a restarted process reuses the same cache directory
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _RESTARTED, str(tiny_q2_path), str(tmp_path),
                          json.dumps(system + q2)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"reused": len(system), "prefilled": len(q2), "argmax": int(logits2.argmax())}, r
