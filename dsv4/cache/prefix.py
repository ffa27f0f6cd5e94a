"""Disk prefix cache: snapshots keyed by the hash of (model fingerprint, token prefix).

A new session whose prompt starts with a cached prefix loads the longest one and prefills only the suffix.
Entries are snapshot.py files named `<sha256>.dsv4kv` (written crash-safe: temp file, fsync, rename) plus a
small JSON sidecar with hits and last use. Files with our name that fail any check are removed with a
warning, never loaded; temp files of dead processes are swept. Processes sharing a dir serialize
store/evict/remove with an fcntl lock and never write a file another reads (atomic renames). Eviction keeps
the disk budget by score = (decayed hits + 1) * tokens / bytes, like ds4. Knows no model math.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..atomicfile import remove_if_orphaned
from ..errors import CacheWriteError, SnapshotError
from . import snapshot as snap_mod
from .pages import default_kv_dir

log = logging.getLogger("dsv4")

DEFAULT_DISK_BUDGET = 4 << 30  # ds4's default --kv-disk-space-mb 4096
DEFAULT_MIN_TOKENS = 64
HIT_HALF_LIFE_S = 6 * 3600.0
ENTRY_RE = re.compile(r"^([0-9a-f]{64})" + re.escape(snap_mod.SUFFIX) + r"$")
TMP_RE = re.compile(r"^\..*\.tmp\.(\d+)\.[0-9a-f]{8}$")
SIDECAR = ".meta"
LOCK_NAME = ".lock"


def prefix_key(fingerprint: str, tokens: Sequence[int]) -> str:
    """sha256 over the model fingerprint and the token ids as little-endian u32."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(np.asarray(tokens, dtype="<u4").tobytes())
    return h.hexdigest()


@dataclass
class Entry:
    key: str
    path: Path
    n_tokens: int
    nbytes: int
    hits: int
    last_used: float
    fingerprint: str

    def score(self, now: float) -> float:
        eff = self.hits * 2.0 ** (-(now - self.last_used) / HIT_HALF_LIFE_S)
        eff = 0.0 if eff < 0.01 else eff
        return (eff + 1.0) * self.n_tokens / max(self.nbytes, 1)


class PrefixCache:
    """One cache directory for one model (entries of other models in the same dir are left alone)."""

    def __init__(self, directory=None, fingerprint: str = "", budget_bytes: Optional[int] = DEFAULT_DISK_BUDGET,
                 min_tokens: int = DEFAULT_MIN_TOKENS, fault: Optional[snap_mod.IoFault] = None):
        self.dir = Path(directory) if directory is not None else default_kv_dir()
        self.fingerprint = fingerprint
        self.budget = budget_bytes
        self.min_tokens = min_tokens
        self.fault = fault
        self.last_error: Optional[CacheWriteError] = None
        self._tlock = threading.RLock()
        self._depth = 0
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sweep_temps()

    # ---- locking and housekeeping ---------------------------------------------------------------------
    @contextmanager
    def _locked(self):
        """Directory lock across processes; re-entrant here (flock on a second fd would self-deadlock)."""
        with self._tlock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._depth = 1
                yield
            finally:
                self._depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _sweep_temps(self) -> None:
        """Remove temp files left by dead processes (a SIGKILL mid-write loses only that entry)."""
        for p in self.dir.iterdir():
            m = TMP_RE.fullmatch(p.name)
            if not m:
                continue
            remove_if_orphaned(p, int(m.group(1)))

    def _discard(self, path: Path, why: str) -> None:
        """Remove a damaged entry, unless another process replaced it meanwhile (same inode check)."""
        try:
            ino = path.stat().st_ino
        except FileNotFoundError:
            return
        warnings.warn(f"dsv4 KV cache: removing {path.name}: {why}", RuntimeWarning, stacklevel=3)
        with self._locked():
            try:
                if path.stat().st_ino == ino:
                    path.unlink()
                    self._sidecar(path).unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(path.name + SIDECAR)

    def _usage(self, path: Path) -> tuple[int, float]:
        try:
            d = json.loads(self._sidecar(path).read_text())
            return int(d["hits"]), float(d["last_used"])
        except (OSError, ValueError, KeyError, TypeError):
            try:
                return 0, path.stat().st_mtime
            except FileNotFoundError:
                return 0, 0.0

    def _touch(self, path: Path, hits: int) -> None:
        side = self._sidecar(path)
        tmp = side.with_name(f".{side.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps({"hits": hits, "last_used": time.time()}))
            os.replace(tmp, side)
        except OSError:  # usage stats are advisory
            tmp.unlink(missing_ok=True)

    # ---- listing ----------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Valid entries (manifest checked); damaged ones are removed with a warning."""
        out = []
        for p in sorted(self.dir.iterdir()):
            m = ENTRY_RE.fullmatch(p.name)
            if not m:
                continue
            try:
                man, _ = snap_mod.read_manifest(p)
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            except SnapshotError as e:
                self._discard(p, str(e))
                continue
            meta = man.get("meta") or {}
            if meta.get("prefix_key") != m.group(1):
                self._discard(p, "file name does not match its content")
                continue
            hits, last = self._usage(p)
            out.append(Entry(m.group(1), p, int(man["n_tokens"]), size, hits, last, man["fingerprint"]))
        return out

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries())

    # ---- lookup / load ---------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int]) -> Optional[Entry]:
        """Longest cached prefix of `tokens` for this model (a strict prefix or the whole list)."""
        best = None
        for e in self.entries():
            if e.fingerprint != self.fingerprint or e.n_tokens > len(tokens) or e.n_tokens == 0:
                continue
            if prefix_key(self.fingerprint, tokens[: e.n_tokens]) != e.key:
                continue
            if best is None or e.n_tokens > best.n_tokens:
                best = e
        return best

    def load(self, entry: Entry, tokens: Sequence[int], codecs: tuple = ()) -> Optional[snap_mod.Snapshot]:
        """Read and verify an entry; a damaged one is removed (warning) and None returned."""
        try:
            s = snap_mod.read_snapshot(entry.path, self.fingerprint, codecs)
        except FileNotFoundError:
            return None  # evicted by another process meanwhile
        except SnapshotError as e:
            self._discard(entry.path, str(e))
            return None
        saved = s.arrays.get("tokens")
        if saved is None or len(saved) != s.n_tokens or list(map(int, saved)) != list(tokens[: s.n_tokens]):
            self._discard(entry.path, "stored tokens differ from the key")
            return None
        self._touch(entry.path, entry.hits + 1)
        return s

    # ---- store / evict ----------------------------------------------------------------------------------
    def store(self, tokens: Sequence[int], arrays: dict, codecs: Optional[dict] = None,
              meta: Optional[dict] = None) -> Path:
        """Write an entry for exactly `tokens` (arrays must include "tokens"); CacheWriteError on failure."""
        key = prefix_key(self.fingerprint, tokens)
        path = self.dir / f"{key}{snap_mod.SUFFIX}"
        m = dict(meta or {})
        m["prefix_key"] = key
        snap_mod.write_snapshot(path, arrays, self.fingerprint, len(tokens), m, codecs, self.fault)
        self._touch(path, 0)
        self.evict(protect=path)
        return path

    def store_or_warn(self, *a, **kw) -> Optional[Path]:
        """store(), but a write failure becomes a warning (the caller continues in memory)."""
        try:
            return self.store(*a, **kw)
        except CacheWriteError as e:
            self.last_error = e
            warnings.warn(str(e), RuntimeWarning, stacklevel=2)
            return None

    def evict(self, protect: Optional[Path] = None) -> list[Path]:
        """Delete lowest-scoring entries until the directory is within the budget."""
        if self.budget is None:
            return []
        removed = []
        with self._locked():
            es = self.entries()
            total = sum(e.nbytes for e in es)
            now = time.time()
            es.sort(key=lambda e: (e.score(now), e.last_used))
            for e in es:
                if total <= self.budget:
                    break
                if protect is not None and e.path == protect:
                    continue
                try:
                    e.path.unlink()
                    self._sidecar(e.path).unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                total -= e.nbytes
                removed.append(e.path)
        return removed


# ---- session-level reuse ----------------------------------------------------------------------------------

def session_with_prefix(engine, tokens: Sequence[int], cache: Optional[PrefixCache], ctx: int = 32768,
                        **session_kw):
    """A Session holding the longest cached prefix of `tokens` (or empty); returns (session, n_reused).
    The caller prefills tokens[n_reused:]. A whole-prompt hit keeps one token to prefill, for fresh logits."""
    from .compact import attn_codec, indexer_codec

    sess = engine.new_session(ctx=ctx, **session_kw)
    if cache is None:
        return sess, 0
    entry = cache.lookup(list(tokens[:-1]) if len(tokens) > 1 else [])
    if entry is None:
        return sess, 0
    cfg = engine.config
    snap = cache.load(entry, list(tokens), (attn_codec(cfg), indexer_codec(cfg)))
    if snap is None:
        return sess, 0
    snap_mod.restore_into(sess, snap)
    return sess, snap.n_tokens


def store_session_prefix(session, cache: Optional[PrefixCache]) -> Optional[Path]:
    """Save the session (it must hold exactly the prefix to key) into the cache; a write error warns."""
    if cache is None or session.n_past < cache.min_tokens:
        return None
    stored, codecs, meta = snap_mod.session_arrays(session)
    return cache.store_or_warn(session.tokens, stored, codecs, meta)
