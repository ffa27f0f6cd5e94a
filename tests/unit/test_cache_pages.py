"""Paged row store: spill/page-in returns the exact bytes, the budget holds, damaged page files are detected,
injected write failures keep the data in memory, pools sharing a dir keep separate files."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from dsv4.cache.pages import PageCorruptError, PagePool, default_kv_dir, parse_size
from dsv4.errors import CacheWriteError

ROW_BYTES = 193  # a tiny-shape compact attention row
ROWS_PER_PAGE = 16


def _fill(pool: PagePool, n_rows: int, seed: int = 0, pinned: bool = False):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 256, (n_rows, ROW_BYTES), dtype=np.uint8)
    s = pool.new_stream(ROW_BYTES, ROWS_PER_PAGE, pinned=pinned, name="L2.comp")
    for i in range(0, n_rows, 7):  # appends that straddle page boundaries
        s.append(ref[i: i + 7])
    return s, ref


@pytest.mark.parametrize("direct", [True, False])
def test_spilled_pages_come_back_exactly(tmp_path, direct):
    budget = 4 * ROWS_PER_PAGE * ROW_BYTES
    pool = PagePool(budget_bytes=budget, kv_dir=tmp_path, direct=direct)
    s, ref = _fill(pool, 1000)
    assert pool.stats.page_outs > 0 and pool.resident_bytes <= budget
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = rng.choice(1000, 32, replace=False)
        out = s.gather(idx)
        assert np.array_equal(out, ref[idx]), "paged rows differ from what was appended"
        assert pool.resident_bytes <= budget + 2 * ROWS_PER_PAGE * ROW_BYTES * 32
    assert pool.stats.page_ins > 0 and pool.stats.bytes_in == pool.stats.page_ins * ROWS_PER_PAGE * ROW_BYTES
    assert np.array_equal(s.all_rows(), ref)
    pool.close()
    assert not list(tmp_path.iterdir()), "page files must be removed when the pool closes"


def test_budget_none_never_touches_disk(tmp_path):
    pool = PagePool(budget_bytes=None, kv_dir=tmp_path)
    s, ref = _fill(pool, 500)
    assert np.array_equal(s.all_rows(), ref)
    assert pool.stats.page_outs == 0 and not list(tmp_path.iterdir())


def test_pinned_streams_stay_resident(tmp_path):
    pool = PagePool(budget_bytes=0, kv_dir=tmp_path)
    pinned, pref = _fill(pool, 300, seed=2, pinned=True)
    paged, ref = _fill(pool, 300, seed=3)
    assert all(p.data is not None for p in pinned.pages)
    assert sum(p.data is None for p in paged.pages) == len(paged.pages) - 1  # all but the open tail page
    assert np.array_equal(pinned.all_rows(), pref) and np.array_equal(paged.all_rows(), ref)


def test_prefetch_then_gather(tmp_path):
    pool = PagePool(budget_bytes=2 * ROWS_PER_PAGE * ROW_BYTES, kv_dir=tmp_path)
    s, ref = _fill(pool, 640)
    idx = np.array([5, 100, 101, 300, 633])
    s.prefetch(idx)
    before = pool.stats.page_ins
    assert np.array_equal(s.gather(idx), ref[idx])
    # rows 5 (page 0), 100/101 (page 6), 300 (page 18) were spilled; 633 is on page 39, still resident
    assert pool.stats.page_ins - before == 3 and pool.stats.prefetched == 3


def _damage(pool: PagePool, how: str):
    (f,) = pool.files.values()
    if how == "flip":
        with open(f.path, "r+b") as fh:
            fh.seek(f.slot_bytes * 0 + 100)
            b = fh.read(1)
            fh.seek(f.slot_bytes * 0 + 100)
            fh.write(bytes([b[0] ^ 0x10]))
    else:
        os.truncate(f.path, f.slot_bytes // 2)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_page_file_is_detected(tmp_path, how):
    pool = PagePool(budget_bytes=ROWS_PER_PAGE * ROW_BYTES, kv_dir=tmp_path, direct=False)
    s, ref = _fill(pool, 200)
    slot0_page = next(p for p, pg in enumerate(s.pages) if pg.slot == 0)
    _damage(pool, how)
    row = slot0_page * ROWS_PER_PAGE
    with pytest.raises(PageCorruptError, match="recompute"):
        s.gather([row])
    assert pool.stats.checksum_failures == 1
    # pages elsewhere in the file are still served exactly (flip) or refused (truncate), never wrong
    other = next(p for p, pg in enumerate(s.pages) if pg.slot == 3)
    idx = np.arange(other * ROWS_PER_PAGE, other * ROWS_PER_PAGE + 4)
    if how == "flip":
        assert np.array_equal(s.gather(idx), ref[idx])
    else:
        with pytest.raises(PageCorruptError):
            s.gather(idx)


def test_injected_write_failure_continues_in_memory(tmp_path):
    def enospc(op, n):
        if op == "write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    pool = PagePool(budget_bytes=ROWS_PER_PAGE * ROW_BYTES, kv_dir=tmp_path, fault=enospc)
    with pytest.warns(RuntimeWarning, match="continuing with the whole state in memory"):
        s, ref = _fill(pool, 300)
    assert isinstance(pool.last_error, CacheWriteError) and "No space left" in str(pool.last_error)
    assert not pool.spill_enabled and pool.stats.write_failures == 1
    assert np.array_equal(s.all_rows(), ref)


def test_two_pools_share_a_dir_without_sharing_files(tmp_path):
    a, b = (PagePool(budget_bytes=ROWS_PER_PAGE * ROW_BYTES, kv_dir=tmp_path) for _ in range(2))
    sa, ra = _fill(a, 300, seed=4)
    sb, rb = _fill(b, 300, seed=5)
    fa = {f.path for f in a.files.values()}
    fb = {f.path for f in b.files.values()}
    assert fa and fb and not (fa & fb)
    assert np.array_equal(sa.all_rows(), ra) and np.array_equal(sb.all_rows(), rb)


def test_truncate_then_append(tmp_path):
    pool = PagePool(budget_bytes=ROWS_PER_PAGE * ROW_BYTES, kv_dir=tmp_path)
    s, ref = _fill(pool, 200)
    s.truncate(70)  # mid-page: that page was spilled and must come back before being extended
    extra = np.full((50, ROW_BYTES), 7, np.uint8)
    s.append(extra)
    assert s.n_rows == 120
    assert np.array_equal(s.all_rows(), np.concatenate([ref[:70], extra]))


def test_o_direct_einval_falls_back_to_buffered_io(tmp_path):
    """A filesystem that accepts O_DIRECT at open but fails the I/O with EINVAL (some FUSE/overlay mounts)."""
    calls = []

    def einval_once(op, n):
        calls.append(op)
        if op == "write" and calls.count("write") == 1:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    pool = PagePool(budget_bytes=ROWS_PER_PAGE * ROW_BYTES, kv_dir=tmp_path, direct=True, fault=einval_once)
    s, ref = _fill(pool, 200)
    (f,) = pool.files.values()
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    assert not f.direct and pool.spill_enabled and pool.stats.page_outs > 0
    assert np.array_equal(s.all_rows(), ref)


@pytest.mark.parametrize("text,expected", [("", None), ("none", None), ("1000", 1000), ("512M", 512 << 20),
                                           ("2G", 2 << 30), ("1.5k", 1536), ("3GiB", 3 << 30), ("64MB", 64 << 20)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_default_kv_dir_follows_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("DSV4_KV_DIR", raising=False)
    assert default_kv_dir() == tmp_path / "c" / "kv"
    monkeypatch.setenv("DSV4_KV_DIR", str(tmp_path / "k"))
    assert default_kv_dir() == tmp_path / "k"


def test_page_files_of_dead_processes_are_swept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f"pages-{int(dead.stdout)}-0123456789ab-3088.pg"
    stale.write_bytes(b"x" * 100)
    alive = tmp_path / f"pages-{os.getppid()}-0123456789ab-3088.pg"  # our parent is alive: kept
    alive.write_bytes(b"y")
    pool = PagePool(budget_bytes=0, kv_dir=tmp_path)
    _fill(pool, 40)
    assert not stale.exists() and alive.exists() and len(pool.files) == 1
    pool.close()
