"""KV cache benchmark (issue #8): compact state size, paged decode speed, page-in vs disk bandwidth.

1. State bytes per token at tiny and Flash shapes (compact formats vs ds4's float32 rows).
2. Decode tokens/s on a model file with the paged state at a budget of 10% of the paged bytes vs unlimited
   (bit-identity of the logits is checked on the way).
3. Page-in bandwidth of PagePool.gather with Flash-shaped rows and indexer-like random selections, next to
   the disk's sequential O_DIRECT read bandwidth measured in the same run on the same directory.

    python tools/bench_kvcache.py [--model tiny.gguf] [--tokens 600] [--decode 8] [--kv-dir DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from dsv4.cache.compact import attn_codec, fp32_state_bytes_per_token, indexer_codec, state_bytes_per_token
from dsv4.cache.pages import DEFAULT_IO_DEPTH, PagePool
from dsv4.config import flash, tiny

FLASH_TARGET = 3500.0
DISK_PROBE_BYTES = 256 << 20
DISK_PROBE_CHUNK = 4 << 20


def state_sizes() -> dict:
    out = {}
    for name, cfg in (("tiny", tiny()), ("flash", flash())):
        c, f = state_bytes_per_token(cfg), fp32_state_bytes_per_token(cfg)
        out[name] = {"attn_row_bytes": attn_codec(cfg).row_bytes, "indexer_row_bytes": indexer_codec(cfg).row_bytes,
                     "compact_bytes_per_token": c, "fp32_bytes_per_token": f, "ratio": f / c}
    out["flash"]["vs_3.5KB_target"] = out["flash"]["compact_bytes_per_token"] / FLASH_TARGET - 1.0
    return out


def disk_read_bandwidth(d: Path, nbytes: int = DISK_PROBE_BYTES) -> dict:
    """Sequential read of a fresh file with O_DIRECT (page cache bypassed) where the filesystem allows."""
    path = d / f"bench-probe-{os.getpid()}.bin"
    buf = mmap.mmap(-1, DISK_PROBE_CHUNK)
    buf.write(os.urandom(DISK_PROBE_CHUNK))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for off in range(0, nbytes, DISK_PROBE_CHUNK):
        os.pwrite(fd, buf, off)
    os.fsync(fd)
    os.close(fd)
    direct = hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        direct = False
        fd = os.open(path, os.O_RDONLY)
    if not direct and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    got = 0
    for off in range(0, nbytes, DISK_PROBE_CHUNK):
        got += os.preadv(fd, [buf], off)
    dt = time.perf_counter() - t0
    rand = _random_reads(fd, nbytes)
    os.close(fd)
    path.unlink()
    return {"bytes": got, "seconds": dt, "GBps": got / dt / 1e9, "o_direct": direct, "random": rand}


def _random_reads(fd: int, nbytes: int, size: int = 40960, n: int = 4000, depth: int = DEFAULT_IO_DEPTH) -> dict:
    """Random reads of one page slot (Flash: 64 rows x 583 B + header, aligned) at the pool's queue depth."""
    from concurrent.futures import ThreadPoolExecutor

    offs = np.random.default_rng(1).integers(0, nbytes // size, n) * size

    def one(off):
        b = mmap.mmap(-1, size)
        try:
            return os.preadv(fd, [b], int(off))
        finally:
            b.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(depth) as ex:
        got = sum(ex.map(one, offs))
    dt = time.perf_counter() - t0
    return {"request_bytes": size, "queue_depth": depth, "GBps": got / dt / 1e9, "iops": n / dt}


def page_in_bandwidth(d: Path, n_rows: int = 200_000, rows_per_page: int = 64, steps: int = 50,
                      topk: int = 512, budget_fraction: float = 0.10) -> dict:
    """Flash-shaped attention rows (583 B); each step gathers `topk` random rows like an indexer selection."""
    rb = attn_codec(flash()).row_bytes
    budget = int(budget_fraction * n_rows * rb)
    pool = PagePool(budget, d)
    s = pool.new_stream(rb, rows_per_page, name="flash.comp")
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (4096, rb), dtype=np.uint8)
    for i in range(0, n_rows, 4096):
        s.append(block[: min(4096, n_rows - i)])
    pool.stats.__init__()
    t0 = time.perf_counter()
    for _ in range(steps):
        s.gather(rng.choice(n_rows, topk, replace=False))
    dt = time.perf_counter() - t0
    st = pool.stats
    direct = all(f.direct for f in pool.files.values())
    pool.close()
    return {"rows": n_rows, "row_bytes": rb, "rows_per_page": rows_per_page, "budget_bytes": budget,
            "page_ins": st.page_ins, "bytes_in": st.bytes_in, "read_seconds": st.read_seconds,
            "read_GBps": st.bytes_in / max(st.read_seconds, 1e-9) / 1e9, "gather_steps_per_s": steps / dt,
            "end_to_end_GBps": st.bytes_in / dt / 1e9, "o_direct": direct}


def decode_speed(model: Path, n_tokens: int, n_decode: int, d: Path) -> dict:
    import dsv4
    from dsv4.cache.paged import enable_paging

    eng = dsv4.load(model, backend="torch")
    ids = [int(t) for t in np.random.default_rng(0).integers(1000, 60000, n_tokens + n_decode)]
    res, logits = {}, {}
    paged_bytes = sum(n_tokens // 4 * attn_codec(eng.config).row_bytes
                      for l in range(eng.config.n_layer) if eng.config.ratio(l) == 4)
    for name, budget in (("unlimited", None), ("budget_10pct", int(0.10 * paged_bytes))):
        s = eng.new_session(ctx=n_tokens + n_decode + 8)
        pager = enable_paging(s, budget_bytes=budget, kv_dir=d, rows_per_page=16)
        s.prefill(ids[:n_tokens])
        t0 = time.perf_counter()
        out = [s.decode(t) for t in ids[n_tokens:]]
        dt = time.perf_counter() - t0
        logits[name] = np.stack(out)
        res[name] = {"budget_bytes": budget, "decode_tps": n_decode / dt, **pager.pool.stats.as_dict()}
        pager.close()
    res["bit_identical"] = bool(np.array_equal(logits["unlimited"].view(np.uint32),
                                               logits["budget_10pct"].view(np.uint32)))
    res["paged_state_bytes"] = paged_bytes
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="GGUF for the decode-speed part (skipped without)")
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--kv-dir", type=Path, help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--rows", type=int, default=200_000, help="Flash rows in the page-in test")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.kv_dir) as tmp:
        d = Path(tmp)
        r = {"machine": platform.node(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M"),
             "state": state_sizes(), "disk_read": disk_read_bandwidth(d), "page_in": page_in_bandwidth(d, a.rows)}
        r["page_in"]["fraction_of_sequential_disk"] = r["page_in"]["read_GBps"] / r["disk_read"]["GBps"]
        r["page_in"]["fraction_of_random_disk"] = r["page_in"]["read_GBps"] / r["disk_read"]["random"]["GBps"]
        if a.model:
            r["decode"] = decode_speed(a.model, a.tokens, a.decode, d)
    text = json.dumps(r, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text)


if __name__ == "__main__":
    main()
