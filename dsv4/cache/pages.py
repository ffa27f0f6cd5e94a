"""Paged row storage: fixed-size pages per layer stream, a resident pool with a byte budget, LRU spill.

A `PagePool` owns the resident bytes of every `RowStream` made from it and one page file per process under
the kv dir (so two processes sharing a dir never touch each other's pages). Full pages are immutable; when
the budget is exceeded the least recently used full page of an unpinned stream is written once (pwrite,
O_DIRECT where supported, aligned buffers) and dropped; `gather` pages it back in with batched preads and
verifies its crc32, so a damaged page file raises `PageCorruptError` and never yields wrong rows.
Knows bytes and rows only: no codecs, no attention math.
"""
from __future__ import annotations

import collections
import errno
import mmap
import os
import re
import struct
import threading
import uuid
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..atomicfile import remove_if_orphaned
from ..errors import CacheWriteError, SnapshotError

IO_ALIGN = 4096  # O_DIRECT needs offset, length and buffer address aligned to the logical block size
PAGE_MAGIC = b"DSV4PAGE"
PAGE_HEADER = struct.Struct("<8sIIIII")  # magic, stream id, page index, n_rows, payload bytes, crc32
DEFAULT_ROWS_PER_PAGE = 64
DEFAULT_IO_DEPTH = 8  # concurrent page reads in flight

IoFault = Callable[[str, int], None]  # (op "write"/"read", nbytes): raise OSError to inject a failure


class PageCorruptError(SnapshotError):
    """A spilled page failed its checksum or is truncated: its rows are unavailable, never guessed."""


SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> Optional[int]:
    """'512M', '2G', '1000000' -> bytes; '' or 'none' -> None (no limit)."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    if t in ("", "NONE"):
        return None
    unit = t[-1] if t[-1:] in SIZE_SUFFIXES and not t[-1:].isdigit() else ""
    try:
        n = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use bytes or a K/M/G/T suffix, e.g. 512M)") from None
    if n < 0:
        raise ValueError(f"size must not be negative: {text!r}")
    return int(n * SIZE_SUFFIXES[unit])


def default_kv_dir() -> Path:
    """DSV4_KV_DIR, else <cache dir>/kv."""
    from .. import settings

    explicit = settings.get("DSV4_KV_DIR")
    return Path(explicit) if explicit else settings.cache_dir() / "kv"


def default_budget() -> Optional[int]:
    from .. import settings

    return parse_size(settings.get("DSV4_KV_BUDGET"))


def _align(n: int) -> int:
    return (n + IO_ALIGN - 1) // IO_ALIGN * IO_ALIGN


@dataclass
class PageStats:
    page_ins: int = 0
    page_outs: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0
    checksum_failures: int = 0
    write_failures: int = 0
    prefetched: int = 0  # page-ins served by a prefetch started earlier
    read_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class PageFile:
    """Slots of one fixed size in a private file; each slot = header + payload padded to IO_ALIGN."""

    def __init__(self, path: Path, slot_bytes: int, direct: bool = True, fault: Optional[IoFault] = None):
        self.path = path
        self.slot_bytes = _align(slot_bytes)
        self.fault = fault
        self.n_slots = 0
        self.free: list[int] = []
        self.direct = False
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError:  # tmpfs and some FUSE filesystems refuse O_DIRECT
                self.fd = os.open(path, flags, 0o600)
        else:
            self.fd = os.open(path, flags, 0o600)
        self._buf = mmap.mmap(-1, self.slot_bytes)  # page-aligned, as O_DIRECT requires

    def write(self, slot: Optional[int], header: bytes, payload: memoryview) -> int:
        """Write one slot (a new one when slot is None); returns the slot index."""
        if slot is None:
            slot = self.free.pop() if self.free else self.n_slots
        self._buf[: len(header)] = header
        self._buf[len(header): len(header) + len(payload)] = payload
        try:
            if self.fault:
                self.fault("write", self.slot_bytes)
            n = os.pwrite(self.fd, self._buf, slot * self.slot_bytes)
        except OSError as e:
            if self.direct and e.errno == errno.EINVAL:  # filesystem accepted the flag but not the I/O
                self._drop_direct()
                n = os.pwrite(self.fd, self._buf, slot * self.slot_bytes)
            else:
                raise
        if n != self.slot_bytes:
            raise OSError(errno.ENOSPC, f"short write to {self.path}")
        self.n_slots = max(self.n_slots, slot + 1)
        return slot

    def _drop_direct(self) -> None:
        import fcntl

        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
        self.direct = False

    def read(self, slots: list[int], pool: Optional[ThreadPoolExecutor] = None) -> list[bytes]:
        """Batched read: each run of contiguous slots is one preadv into one aligned buffer; runs are issued
        concurrently on `pool` (random page reads are latency-bound, queue depth is what gives bandwidth)."""
        order = sorted(set(slots))
        runs, i = [], 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and order[j + 1] == order[j] + 1:
                j += 1
            runs.append((order[i], j - i + 1))
            i = j + 1
        big = mmap.mmap(-1, max(1, len(order)) * self.slot_bytes)  # page-aligned; slices at slot multiples stay so
        view = memoryview(big)
        starts, pos = [], 0
        for _, n in runs:
            starts.append(pos)
            pos += n * self.slot_bytes

        def one(k: int) -> int:
            first, n = runs[k]
            bufs = [view[starts[k] + m * self.slot_bytes: starts[k] + (m + 1) * self.slot_bytes] for m in range(n)]
            if self.fault:
                self.fault("read", n * self.slot_bytes)
            try:
                return os.preadv(self.fd, bufs, first * self.slot_bytes)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._drop_direct()
                return os.preadv(self.fd, bufs, first * self.slot_bytes)

        got = list(pool.map(one, range(len(runs)))) if pool is not None and len(runs) > 1 else \
            [one(k) for k in range(len(runs))]
        out: dict[int, bytes] = {}
        for k, (first, n) in enumerate(runs):
            for m in range(n):
                lo = starts[k] + m * self.slot_bytes
                have = max(0, min(self.slot_bytes, got[k] - m * self.slot_bytes))  # short read: truncated file
                out[first + m] = bytes(view[lo: lo + have])
        view.release()
        big.close()
        return [out[s] for s in slots]

    def close(self, unlink: bool = True) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._buf.close()
            if unlink:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


PAGE_FILE_RE = re.compile(r"^pages-(\d+)-[0-9a-f]{12}-\d+\.pg$")


def sweep_dead_page_files(d: Path) -> list[Path]:
    """Remove page files of processes that no longer exist (killed before they could clean up)."""
    removed = []
    for p in d.iterdir():
        m = PAGE_FILE_RE.fullmatch(p.name)
        if m and remove_if_orphaned(p, int(m.group(1))):
            removed.append(p)
    return removed


@dataclass
class _Page:
    data: Optional[np.ndarray]  # uint8 [rows_per_page, row_bytes] while resident
    n_rows: int = 0
    slot: Optional[int] = None  # where its bytes are on disk (full pages only; written once)
    crc: int = 0


@dataclass
class RowStream:
    """Append-only rows of a fixed byte width, stored in pages of `rows_per_page` rows (one page table)."""

    pool: "PagePool"
    sid: int
    row_bytes: int
    rows_per_page: int
    pinned: bool
    name: str = ""
    pages: list = field(default_factory=list)
    n_rows: int = 0

    @property
    def page_bytes(self) -> int:
        return self.rows_per_page * self.row_bytes

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.uint8).reshape(-1, self.row_bytes)
        self.pool._append(self, rows)

    def gather(self, idx) -> np.ndarray:
        """uint8 [len(idx), row_bytes]: rows by index (paged in as needed, checksums verified)."""
        return self.pool._gather(self, np.asarray(idx, dtype=np.int64).reshape(-1))

    def prefetch(self, idx) -> None:
        """Start paging in the pages holding `idx` in the background (the next selections)."""
        self.pool._prefetch(self, np.asarray(idx, dtype=np.int64).reshape(-1))

    def all_rows(self) -> np.ndarray:
        return self.gather(np.arange(self.n_rows))

    def truncate(self, n: int) -> None:
        """Keep the first n rows (session rewind)."""
        self.pool._truncate(self, n)

    def resident_bytes(self) -> int:
        return sum(self.page_bytes for p in self.pages if p.data is not None)


class PagePool:
    """Resident pages of many streams under one byte budget (None = unlimited), LRU spill to a page file."""

    def __init__(self, budget_bytes: Optional[int] = None, kv_dir: Optional[Path] = None, direct: bool = True,
                 fault: Optional[IoFault] = None, prefetch_threads: int = 1, io_depth: int = DEFAULT_IO_DEPTH):
        self.budget = budget_bytes
        self.kv_dir = Path(kv_dir) if kv_dir is not None else None
        self.direct = direct
        self.fault = fault
        self.stats = PageStats()
        self.streams: list[RowStream] = []
        self.files: dict[int, PageFile] = {}
        self.spill_enabled = True
        self.last_error: Optional[CacheWriteError] = None
        self._lru: collections.OrderedDict = collections.OrderedDict()  # (sid, page) -> None, oldest first
        self._lock = threading.RLock()
        self._inflight: dict[tuple[int, int], Future] = {}
        self._exec = ThreadPoolExecutor(prefetch_threads) if prefetch_threads else None
        self._io = ThreadPoolExecutor(io_depth) if io_depth > 1 else None
        self._resident = 0  # bytes of resident pages of unpinned streams
        self._pinned = 0

    # ---- streams ----------------------------------------------------------------------------------
    def new_stream(self, row_bytes: int, rows_per_page: int = DEFAULT_ROWS_PER_PAGE, pinned: bool = False,
                   name: str = "") -> RowStream:
        s = RowStream(self, len(self.streams), row_bytes, rows_per_page, pinned, name)
        self.streams.append(s)
        return s

    @property
    def resident_bytes(self) -> int:
        return self._resident

    @property
    def pinned_bytes(self) -> int:
        return self._pinned

    def total_bytes(self) -> int:
        """Logical bytes of every stream (resident or spilled), whole pages."""
        return sum(len(s.pages) * s.page_bytes for s in self.streams)

    # ---- internals --------------------------------------------------------------------------------
    def _account(self, s: RowStream, delta: int) -> None:
        if s.pinned:
            self._pinned += delta
        else:
            self._resident += delta

    def _append(self, s: RowStream, rows: np.ndarray) -> None:
        with self._lock:
            i = 0
            while i < len(rows):
                if not s.pages or s.pages[-1].n_rows == s.rows_per_page:
                    s.pages.append(_Page(np.zeros((s.rows_per_page, s.row_bytes), np.uint8)))
                    self._account(s, s.page_bytes)
                pg = s.pages[-1]
                k = min(s.rows_per_page - pg.n_rows, len(rows) - i)
                if pg.data is None:  # the tail page of a truncated stream may have been spilled
                    self._load_pages(s, [len(s.pages) - 1])
                if pg.slot is not None:  # it changes now: its disk copy is stale
                    self.files[s.page_bytes].free.append(pg.slot)
                    pg.slot = None
                pg.data[pg.n_rows: pg.n_rows + k] = rows[i: i + k]
                pg.n_rows += k
                i += k
                s.n_rows += k
                if pg.n_rows == s.rows_per_page and not s.pinned:
                    self._lru[(s.sid, len(s.pages) - 1)] = None
            self._enforce()

    def _gather(self, s: RowStream, idx: np.ndarray) -> np.ndarray:
        if len(idx) and (idx.min() < 0 or idx.max() >= s.n_rows):
            raise IndexError(f"row index out of range 0..{s.n_rows - 1} in stream {s.name or s.sid}")
        page_of = idx // s.rows_per_page
        need = sorted(set(page_of.tolist()))
        with self._lock:
            self._load_pages(s, need)
            out = np.empty((len(idx), s.row_bytes), np.uint8)
            for p in need:
                sel = page_of == p
                out[sel] = s.pages[p].data[idx[sel] - p * s.rows_per_page]
                if (s.sid, p) in self._lru:
                    self._lru.move_to_end((s.sid, p))
            self._enforce(protect={(s.sid, p) for p in need})
        return out

    def _load_pages(self, s: RowStream, need: list[int]) -> None:
        missing = [p for p in need if s.pages[p].data is None]
        if not missing:
            return
        waits = [(p, self._inflight.pop((s.sid, p))) for p in missing if (s.sid, p) in self._inflight]
        for p, fut in waits:
            self._install(s, p, fut.result())
            self.stats.prefetched += 1
        rest = [p for p in missing if s.pages[p].data is None]
        if rest:
            for p, raw in zip(rest, self._read(s, rest)):
                self._install(s, p, raw)

    def _read(self, s: RowStream, pages: list[int]) -> list[bytes]:
        import time

        f = self.files[s.page_bytes]
        t0 = time.perf_counter()
        raws = f.read([s.pages[p].slot for p in pages], self._io)
        self.stats.read_seconds += time.perf_counter() - t0
        return raws

    def _install(self, s: RowStream, p: int, raw: bytes) -> None:
        pg = s.pages[p]
        if pg.data is not None:
            return
        data = self._verify(s, p, raw)
        pg.data = data
        self._account(s, s.page_bytes)
        self.stats.page_ins += 1
        self.stats.bytes_in += s.page_bytes
        self._lru[(s.sid, p)] = None

    def _verify(self, s: RowStream, p: int, raw: bytes) -> np.ndarray:
        pg = s.pages[p]
        h = PAGE_HEADER.size
        if len(raw) < h + s.page_bytes:
            self.stats.checksum_failures += 1
            raise PageCorruptError(f"page {p} of stream {s.name or s.sid} is truncated in {self.files[s.page_bytes].path}; "
                                   "its rows are lost: recompute the session from its tokens")
        magic, sid, idx, n_rows, nbytes, crc = PAGE_HEADER.unpack_from(raw)
        payload = raw[h: h + s.page_bytes]
        if (magic != PAGE_MAGIC or sid != s.sid or idx != p or nbytes != s.page_bytes or crc != pg.crc
                or zlib.crc32(payload) != pg.crc):
            self.stats.checksum_failures += 1
            raise PageCorruptError(f"page {p} of stream {s.name or s.sid} failed its checksum in "
                                   f"{self.files[s.page_bytes].path}; recompute the session from its tokens")
        return np.frombuffer(payload, np.uint8).reshape(s.rows_per_page, s.row_bytes).copy()

    def _file(self, page_bytes: int) -> PageFile:
        f = self.files.get(page_bytes)
        if f is None:
            d = self.kv_dir if self.kv_dir is not None else default_kv_dir()
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            sweep_dead_page_files(d)
            path = d / f"pages-{os.getpid()}-{uuid.uuid4().hex[:12]}-{page_bytes}.pg"
            f = self.files[page_bytes] = PageFile(path, PAGE_HEADER.size + page_bytes, self.direct, self.fault)
        return f

    def _page_out(self, s: RowStream, p: int) -> bool:
        pg = s.pages[p]
        if pg.slot is None:
            payload = memoryview(pg.data).cast("B")
            pg.crc = zlib.crc32(payload)
            header = PAGE_HEADER.pack(PAGE_MAGIC, s.sid, p, pg.n_rows, s.page_bytes, pg.crc)
            try:
                pg.slot = self._file(s.page_bytes).write(None, header, payload)
            except OSError as e:
                self.stats.write_failures += 1
                self.spill_enabled = False
                self.last_error = CacheWriteError(
                    f"cannot write KV pages under {self.kv_dir or 'the kv dir'} ({e.strerror or e}); "
                    "continuing with the whole state in memory (free disk space or raise --kv-budget)")
                warnings.warn(str(self.last_error), RuntimeWarning, stacklevel=4)
                return False
            self.stats.page_outs += 1
            self.stats.bytes_out += s.page_bytes
        pg.data = None
        self._account(s, -s.page_bytes)
        self.stats.evictions += 1
        return True

    def _enforce(self, protect: frozenset | set = frozenset()) -> None:
        if self.budget is None or not self.spill_enabled:
            return
        for key in list(self._lru):
            if self._resident <= self.budget:
                break
            if key in protect:
                continue
            sid, p = key
            s = self.streams[sid]
            if s.pages[p].data is None or s.pages[p].n_rows < s.rows_per_page:
                del self._lru[key]
                continue
            if not self._page_out(s, p):
                return
            del self._lru[key]

    def _prefetch(self, s: RowStream, idx: np.ndarray) -> None:
        if self._exec is None or not len(idx):
            return
        with self._lock:
            pages = sorted({int(p) for p in (idx // s.rows_per_page).tolist()
                            if s.pages[p].data is None and (s.sid, p) not in self._inflight})
            if not pages:
                return
            slots = [s.pages[p].slot for p in pages]
            f = self.files[s.page_bytes]
            fut = self._exec.submit(f.read, slots, self._io)
            for k, p in enumerate(pages):
                sub: Future = Future()
                self._inflight[(s.sid, p)] = sub
                fut.add_done_callback(lambda fu, sub=sub, k=k: sub.set_exception(fu.exception())
                                      if fu.exception() else sub.set_result(fu.result()[k]))

    def _truncate(self, s: RowStream, n: int) -> None:
        with self._lock:
            keep_pages = -(-n // s.rows_per_page)
            for p in range(len(s.pages) - 1, keep_pages - 1, -1):
                pg = s.pages.pop()
                self._lru.pop((s.sid, p), None)
                self._inflight.pop((s.sid, p), None)
                if pg.data is not None:
                    self._account(s, -s.page_bytes)
                if pg.slot is not None:
                    self.files[s.page_bytes].free.append(pg.slot)
            s.n_rows = n
            if s.pages and n % s.rows_per_page:
                s.pages[-1].n_rows = n % s.rows_per_page
                self._lru.pop((s.sid, len(s.pages) - 1), None)

    def close(self) -> None:
        for ex in (self._exec, self._io):
            if ex is not None:
                ex.shutdown(wait=True)
        self._exec = self._io = None
        for f in self.files.values():
            f.close(unlink=True)
        self.files.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
