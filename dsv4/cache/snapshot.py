"""On-disk session snapshot format: versioned header, JSON manifest, raw little-endian arrays, crc32 each.

Layout: 24-byte header (magic, version, manifest length, manifest crc32, reserved), the UTF-8 JSON manifest
(config fingerprint, token count, user meta, and per array: name, dtype, shape, offset, nbytes, crc32,
codec), then the arrays at 64-byte aligned offsets. Nothing is ever unpickled: dtypes come from a closed
whitelist and arrays are read with np.frombuffer. Writes are crash-safe (private temp file, fsync, rename).
Session state rows are stored in the compact codecs (compact.py); frontiers and logits as float32.
Owns the byte format and safe names; knows nothing of attention math.
"""
from __future__ import annotations

import enum
import json
import os
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..atomicfile import fsync_dir
from ..errors import CacheWriteError, SnapshotError
from .compact import AttnRowCodec, IndexerRowCodec, NotRepresentableError, attn_codec, indexer_codec

MAGIC = b"DSV4KVS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIII")  # magic, version, manifest bytes, manifest crc32, reserved
ALIGN = 64
MAX_MANIFEST = 64 << 20
SUFFIX = ".dsv4kv"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DTYPES = frozenset({"<f4", "<f2", "|u1", "<u2", "<u4", "<i4", "<i8", "|b1"})  # closed: no object dtypes
IoFault = Callable[[str, int], None]


class Codec(str, enum.Enum):
    RAW = "raw"  # the array as stored
    ATTN = "attn"  # compact attention rows (uint8) -> float32 rows
    INDEXER = "indexer"  # compact indexer rows (uint8) -> float32 rows


@dataclass
class Snapshot:
    """A verified snapshot: manifest fields and arrays decoded to their logical form."""

    fingerprint: str
    n_tokens: int
    meta: dict
    arrays: dict[str, np.ndarray] = field(repr=False)
    nbytes: int = 0


def snapshot_path(directory, name: str) -> Path:
    """`/save NAME` target inside `directory`; refuses anything that could leave it."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise SnapshotError(f"invalid snapshot name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                            "not starting with '.' and without '/' or '..'")
    d = Path(directory).resolve()
    p = (d / (name if name.endswith(SUFFIX) else name + SUFFIX)).resolve()
    if p.parent != d:
        raise SnapshotError(f"snapshot name {name!r} resolves outside {d}")
    return p


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_snapshot(path, arrays: dict[str, np.ndarray], fingerprint: str, n_tokens: int, meta: Optional[dict] = None,
                   codecs: Optional[dict[str, Codec]] = None, fault: Optional[IoFault] = None) -> int:
    """Write atomically (temp file + fsync + rename); returns the file size. OSError -> CacheWriteError."""
    path = Path(path)
    entries, blobs, off = [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">" or (a.dtype.str not in DTYPES and a.dtype.newbyteorder("<").str in DTYPES):
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype.str not in DTYPES:
            raise TypeError(f"array {name!r} has dtype {a.dtype}; snapshots hold only {sorted(DTYPES)}")
        b = memoryview(a).cast("B") if a.nbytes else memoryview(b"")
        entries.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": off,
                        "nbytes": a.nbytes, "crc32": zlib.crc32(b),
                        "codec": (codecs or {}).get(name, Codec.RAW).value})
        blobs.append((off, b))
        off = _pad(off + a.nbytes)
    manifest = json.dumps({"format": "dsv4-kv-snapshot", "version": VERSION, "fingerprint": fingerprint,
                           "n_tokens": int(n_tokens), "created": time.time(), "meta": meta or {},
                           "arrays": entries}, sort_keys=True).encode()
    base = _pad(HEADER.size + len(manifest))
    tmp = path.parent / f".{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            head = HEADER.pack(MAGIC, VERSION, len(manifest), zlib.crc32(manifest), 0) + manifest
            for o, b in [(0, memoryview(head))] + [(base + o, b) for o, b in blobs]:
                if fault:
                    fault("write", len(b))
                if len(b):
                    os.pwrite(fd, b, o)
            os.ftruncate(fd, base + off)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CacheWriteError(f"cannot write KV snapshot {path} ({e.strerror or e}); the session continues in "
                              "memory (free disk space or use another --kv-dir)") from None
    return base + off


def read_manifest(path) -> tuple[dict, int]:
    """Header + manifest only (cheap); returns (manifest, base offset of arrays). SnapshotError if damaged."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                raise SnapshotError(f"{path} is truncated (no header)")
            magic, version, mlen, mcrc, _ = HEADER.unpack(head)
            if magic != MAGIC:
                raise SnapshotError(f"{path} is not a dsv4 KV snapshot (bad magic)")
            if version != VERSION:
                raise SnapshotError(f"{path} has snapshot version {version}; this dsv4 reads version {VERSION}")
            if mlen > MAX_MANIFEST:
                raise SnapshotError(f"{path} has an implausible manifest size {mlen}")
            raw = f.read(mlen)
    except OSError as e:
        raise SnapshotError(f"cannot read snapshot {path}: {e.strerror or e}") from None
    if len(raw) != mlen or zlib.crc32(raw) != mcrc:
        raise SnapshotError(f"{path} has a truncated or corrupt manifest (checksum mismatch)")
    try:
        m = json.loads(raw)
        assert isinstance(m, dict) and isinstance(m["arrays"], list) and isinstance(m["fingerprint"], str)
        int(m["n_tokens"])
    except (ValueError, KeyError, TypeError, AssertionError):
        raise SnapshotError(f"{path} has an unreadable manifest") from None
    return m, _pad(HEADER.size + mlen)


def read_snapshot(path, fingerprint: Optional[str] = None, codecs: tuple = ()) -> Snapshot:
    """Read and verify every array (crc32, bounds, dtype whitelist). `fingerprint` given: must match.
    `codecs` = (AttnRowCodec, IndexerRowCodec) to decode compact arrays; without them they stay uint8."""
    path = Path(path)
    m, base = read_manifest(path)
    if fingerprint is not None and m["fingerprint"] != fingerprint:
        raise SnapshotError(f"snapshot {path} was written for a different model (config fingerprint differs)")
    size = path.stat().st_size
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for e in m["arrays"]:
            try:
                name, dt, shape = str(e["name"]), str(e["dtype"]), [int(x) for x in e["shape"]]
                off, nb, crc, codec = int(e["offset"]), int(e["nbytes"]), int(e["crc32"]), Codec(e["codec"])
            except (KeyError, TypeError, ValueError):
                raise SnapshotError(f"{path} has a malformed array entry") from None
            if dt not in DTYPES:
                raise SnapshotError(f"{path}: array {name!r} has a forbidden dtype {dt!r}")
            if min(shape, default=0) < 0 or int(np.prod(shape)) * np.dtype(dt).itemsize != nb or off < 0:
                raise SnapshotError(f"{path}: array {name!r} has inconsistent shape/size")
            if base + off + nb > size:
                raise SnapshotError(f"{path} is truncated (array {name!r} ends past the end of the file)")
            buf = bytearray(nb)
            f.seek(base + off)
            if f.readinto(buf) != nb or zlib.crc32(buf) != crc:
                raise SnapshotError(f"{path}: array {name!r} is corrupt (checksum mismatch)")
            a = np.frombuffer(buf, dtype=np.dtype(dt)).reshape(shape)
            if codec != Codec.RAW and codecs:
                a = (codecs[0] if codec == Codec.ATTN else codecs[1]).decode(a)
            arrays[name] = a
    return Snapshot(m["fingerprint"], int(m["n_tokens"]), m.get("meta") or {}, arrays, size)


# ---- session state <-> snapshot arrays ------------------------------------------------------------------

def encode_state_arrays(arrays: dict[str, np.ndarray], attn: AttnRowCodec, idx: IndexerRowCodec):
    """Float state arrays -> (stored arrays, codecs): raw/comp rows as compact attention rows, indexer rows
    as compact FP4 rows; anything off the grid (e.g. a backend that skips F16 rounding) stays float32."""
    out, codecs = {}, {}
    for k, v in arrays.items():
        kind = k.rsplit(".", 1)[-1]
        codec = {"raw": attn, "comp": attn, "idx": idx}.get(kind)
        if codec is not None and v.ndim == 2 and v.shape[1] == (attn.head_dim if codec is attn else idx.dim):
            try:
                out[k] = codec.encode(v)
                codecs[k] = Codec.ATTN if codec is attn else Codec.INDEXER
                continue
            except NotRepresentableError:
                pass
        out[k] = np.ascontiguousarray(v, dtype=np.float32) if v.dtype.kind == "f" else v
    return out, codecs


def session_arrays(session) -> tuple[dict, dict, dict]:
    """(stored arrays, codecs, meta) of an engine Session: tokens, last logits/hidden, compact state."""
    eng = session.engine
    cfg, ops = eng.config, eng.ops
    state = session.state.to_arrays(ops, cfg, session.n_past)
    stored, codecs = encode_state_arrays(state, attn_codec(cfg), indexer_codec(cfg))
    stored["tokens"] = np.asarray(session.tokens, dtype="<i4")
    if session.last_logits is not None:
        stored["last_logits"] = np.asarray(session.last_logits, dtype="<f4")
    if getattr(session, "last_hidden", None) is not None:
        stored["last_hidden"] = np.asarray(ops.numpy(session.last_hidden), dtype="<f4")
    meta = {"ctx": session.ctx, "prefill_chunk": session.prefill_chunk, "model": cfg.name}
    return stored, codecs, meta


def save_session(session, path, meta: Optional[dict] = None, fault: Optional[IoFault] = None) -> int:
    """Snapshot an engine Session (tokens, last logits, state) to `path`; returns bytes written."""
    stored, codecs, m = session_arrays(session)
    m.update(meta or {})
    return write_snapshot(path, stored, session.engine.config.fingerprint(), session.n_past, m, codecs, fault)


def restore_into(session, snap: Snapshot) -> None:
    """Load a verified snapshot into a fresh Session of the same engine."""
    eng = session.engine
    n = snap.n_tokens
    tokens = snap.arrays.get("tokens")
    if tokens is None or len(tokens) != n:
        raise SnapshotError("snapshot token count does not match its manifest")
    if n > session.ctx:
        raise SnapshotError(f"snapshot holds {n} tokens, more than the session context {session.ctx}")
    session.state.load_arrays(eng.ops, eng.config, {k: v for k, v in snap.arrays.items() if k.startswith("layer")}, n)
    session.tokens = [int(t) for t in tokens]
    lg = snap.arrays.get("last_logits")
    session.last_logits = None if lg is None else np.array(lg, dtype=np.float32)
    lh = snap.arrays.get("last_hidden")
    if lh is not None:
        session.last_hidden = eng.ops.asarray(np.array(lh))


def load_session(engine, path, ctx: Optional[int] = None, **session_kw):
    """Open a snapshot written by save_session into a new Session (ctx defaults to the saved one)."""
    cfg = engine.config
    snap = read_snapshot(path, cfg.fingerprint(), (attn_codec(cfg), indexer_codec(cfg)))
    sess = engine.new_session(ctx=int(ctx or snap.meta.get("ctx") or max(snap.n_tokens, 1)),
                              prefill_chunk=snap.meta.get("prefill_chunk"), **session_kw)
    restore_into(sess, snap)
    return sess
