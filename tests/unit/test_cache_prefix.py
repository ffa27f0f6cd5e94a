"""Snapshot format and disk prefix cache: round trip, no pickle, safe names, damaged/foreign files removed and
never loaded, eviction by budget, injected write failure, SIGKILL mid-write, two processes sharing a dir."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from dsv4.cache import snapshot as snap
from dsv4.cache.compact import AttnRowCodec, IndexerRowCodec
from dsv4.cache.prefix import PrefixCache, prefix_key
from dsv4.errors import CacheWriteError, SnapshotError

FP = "f" * 32
REPO = Path(__file__).resolve().parents[2]


def _arrays(tokens, n_float=2048):
    """Deterministic content derived from the tokens, so any process can verify what it loaded."""
    rng = np.random.default_rng(len(tokens) * 7919 + int(tokens[-1]))
    return {"tokens": np.asarray(tokens, "<i4"), "x": rng.standard_normal(n_float).astype("<f4"),
            "frontier": np.full((8, 16), -1e30, "<f4")}


def _tokens(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 129280, n)]


# ---- snapshot format --------------------------------------------------------------------------------------

def test_snapshot_round_trip_all_dtypes_and_codecs(tmp_path):
    attn, idx = AttnRowCodec(64, 64), IndexerRowCodec(128)
    rows = np.zeros((5, 128), np.float32)
    rows[:, :64] = np.ldexp(np.arange(64, dtype=np.float32) % 8, -3)  # on the E4M3 grid
    rows[:, 64:] = np.float16(0.333)
    a = {"f4": np.arange(6, dtype="<f4").reshape(2, 3), "f2": np.ones(3, "<f2"), "i8": np.arange(4, dtype="<i8"),
         "u1": np.arange(7, dtype=np.uint8), "b": np.array([True, False]), "empty": np.zeros((0, 128), "<f4"),
         "layer2.comp": attn.encode(rows)}
    p = tmp_path / "s.dsv4kv"
    n = snap.write_snapshot(p, a, FP, 5, {"k": "v"}, {"layer2.comp": snap.Codec.ATTN})
    assert n == p.stat().st_size
    s = snap.read_snapshot(p, FP, (attn, idx))
    assert s.n_tokens == 5 and s.meta == {"k": "v"}
    for k in a:
        if k != "layer2.comp":
            assert s.arrays[k].dtype == a[k].dtype and np.array_equal(s.arrays[k], a[k]), k
    assert np.array_equal(s.arrays["layer2.comp"].view(np.uint32), rows.view(np.uint32))
    with pytest.raises(SnapshotError, match="different model"):
        snap.read_snapshot(p, "0" * 32)


def _rewrite_manifest(path: Path, edit):
    m, base = snap.read_manifest(path)
    edit(m)
    raw = json.dumps(m).encode()
    body = path.read_bytes()[base:]
    new_base = (snap.HEADER.size + len(raw) + snap.ALIGN - 1) // snap.ALIGN * snap.ALIGN
    head = snap.HEADER.pack(snap.MAGIC, snap.VERSION, len(raw), zlib.crc32(raw), 0) + raw
    path.write_bytes(head + b"\0" * (new_base - len(head)) + body)


def test_object_dtype_is_refused_never_unpickled(tmp_path):
    p = tmp_path / "evil.dsv4kv"
    snap.write_snapshot(p, {"x": np.zeros(8, "<f4")}, FP, 0)
    _rewrite_manifest(p, lambda m: m["arrays"][0].update(dtype="|O"))
    with pytest.raises(SnapshotError, match="forbidden dtype"):
        snap.read_snapshot(p)
    src = "".join((REPO / "dsv4/cache" / f).read_text() for f in ("snapshot.py", "prefix.py", "pages.py"))
    assert "pickle" not in src.replace("unpickled", "").replace("no pickle", "").replace("No pickle", "")
    assert "np.load(" not in src and "allow_pickle" not in src


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", ".hidden", "..", "a..b", "", "x" * 200,
                                  "ok\0", "nul\n"])
def test_unsafe_snapshot_names_are_refused(tmp_path, name):
    with pytest.raises(SnapshotError, match="snapshot name"):
        snap.snapshot_path(tmp_path, name)


def test_safe_snapshot_names_stay_inside(tmp_path):
    p = snap.snapshot_path(tmp_path, "my-chat_1.v2")
    assert p.parent == tmp_path.resolve() and p.name == "my-chat_1.v2.dsv4kv"


@pytest.mark.parametrize("damage", ["flip_array", "flip_manifest", "truncate", "garbage"])
def test_damaged_snapshot_is_detected(tmp_path, damage):
    p = tmp_path / "s.dsv4kv"
    snap.write_snapshot(p, _arrays(_tokens(50)), FP, 50)
    b = bytearray(p.read_bytes())
    if damage == "flip_array":
        b[-10] ^= 0x01
    elif damage == "flip_manifest":
        b[snap.HEADER.size + 5] ^= 0x20
    elif damage == "truncate":
        b = b[: len(b) - 100]
    else:
        b = bytearray(os.urandom(len(b)))
    p.write_bytes(bytes(b))
    with pytest.raises(SnapshotError):
        snap.read_snapshot(p, FP)


# ---- prefix cache -----------------------------------------------------------------------------------------

def test_longest_prefix_wins_and_other_models_miss(tmp_path):
    c = PrefixCache(tmp_path, FP, budget_bytes=None, min_tokens=1)
    toks = _tokens(300)
    for n in (100, 200):
        c.store(toks[:n], _arrays(toks[:n]))
    e = c.lookup(toks[:250])
    assert e is not None and e.n_tokens == 200
    s = c.load(e, toks[:250])
    assert np.array_equal(s.arrays["x"], _arrays(toks[:200])["x"])
    assert c.lookup(toks[:99]) is None and c.lookup(_tokens(300, seed=1)) is None
    assert PrefixCache(tmp_path, "e" * 32, budget_bytes=None).lookup(toks) is None
    assert c.entries()[0].hits + c.entries()[1].hits == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_damaged_or_foreign_entries_are_removed_with_a_warning(tmp_path, damage):
    c = PrefixCache(tmp_path, FP, budget_bytes=None, min_tokens=1)
    toks = _tokens(120)
    path = c.store(toks, _arrays(toks))
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("not ours")
    if damage == "flip":
        b = bytearray(path.read_bytes())
        b[-20] ^= 0x40
        path.write_bytes(bytes(b))
    elif damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:  # a file with our naming pattern that another program wrote
        path.write_bytes(b"GGUF" + os.urandom(4000))
    with pytest.warns(RuntimeWarning, match="removing"):
        e = c.lookup(toks)
        if e is not None:  # manifest intact: the damage is found when the arrays are verified
            assert c.load(e, toks) is None
    assert not path.exists() and unrelated.exists()
    assert c.lookup(toks) is None


def test_damaged_entry_found_during_eviction_does_not_deadlock(tmp_path):
    """Regression: eviction (holding the dir lock) meeting a damaged file took the flock again and hung."""
    import threading

    c = PrefixCache(tmp_path, FP, budget_bytes=1, min_tokens=1)
    a, b = _tokens(70, 5), _tokens(70, 6)
    pa = c.store(a, _arrays(a))  # over budget but protected as the newest
    os.truncate(pa, 100)
    done = threading.Event()

    def store_b():
        with pytest.warns(RuntimeWarning, match="removing"):
            c.store(b, _arrays(b))
        done.set()

    t = threading.Thread(target=store_b, daemon=True)
    t.start()
    t.join(20)
    assert done.is_set(), "store() hung while evicting a damaged entry"
    assert not pa.exists() and c.lookup(b) is not None


def test_renamed_entry_is_not_loaded_under_the_wrong_key(tmp_path):
    c = PrefixCache(tmp_path, FP, budget_bytes=None, min_tokens=1)
    a, b = _tokens(80, 1), _tokens(80, 2)
    pa = c.store(a, _arrays(a))
    os.replace(pa, tmp_path / f"{prefix_key(FP, b)}{snap.SUFFIX}")
    with pytest.warns(RuntimeWarning, match="does not match"):
        assert c.lookup(b) is None


def test_eviction_keeps_the_budget_and_prefers_hit_entries(tmp_path):
    toks = [_tokens(100, s) for s in range(4)]
    c = PrefixCache(tmp_path, FP, budget_bytes=None, min_tokens=1)
    size = c.dir.joinpath(c.store(toks[0], _arrays(toks[0])).name).stat().st_size
    c.budget = int(2.5 * size)
    for _ in range(3):
        c.load(c.lookup(toks[0]), toks[0])  # entry 0 is popular
    for t in toks[1:]:
        time.sleep(0.01)
        c.store(t, _arrays(t))
    keys = {e.key for e in c.entries()}
    assert c.total_bytes() <= c.budget and len(keys) == 2
    assert prefix_key(FP, toks[0]) in keys and prefix_key(FP, toks[3]) in keys  # popular + just written


def test_injected_write_failure_gives_clear_error_and_no_debris(tmp_path):
    def enospc(op, n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    c = PrefixCache(tmp_path, FP, budget_bytes=None, min_tokens=1, fault=enospc)
    toks = _tokens(60)
    with pytest.raises(CacheWriteError, match="No space left on device.*continues in memory"):
        c.store(toks, _arrays(toks))
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert c.store_or_warn(toks, _arrays(toks)) is None
    assert isinstance(c.last_error, CacheWriteError)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"] or not list(tmp_path.glob("*.dsv4kv*"))


_CHILD = textwrap.dedent("""
    import sys, warnings, numpy as np
    warnings.simplefilter("error")
    sys.path.insert(0, {tests!r})
    from test_cache_prefix import _arrays, _tokens, FP
    from dsv4.cache.prefix import PrefixCache
    mode, d, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(seed)
    base = _tokens(400, 99)
    if mode == "writer":  # big entries, forever: the parent SIGKILLs it mid-write
        import time

        def slow_disk(op, n):  # announce the big array write and take a while: the kill lands inside it
            if n > 1_000_000:
                print("mid-write", flush=True)
                time.sleep(0.5)

        c = PrefixCache(d, FP, budget_bytes=None, min_tokens=1, fault=slow_disk)
        for i in range(10**6):
            t = base[: 10 + i]
            c.store(t, _arrays(t, n_float=3_000_000))
            print("stored", len(t), flush=True)
    else:  # racer: overlapping keys, tight budget, load + verify what others wrote
        c = PrefixCache(d, FP, budget_bytes=4 * 1024 * 1024, min_tokens=1)
        for i in range(25):
            t = base[: int(rng.choice([50, 100, 150, 200, 250]))]
            c.store(t, _arrays(t, n_float=200_000))
            q = base[: int(rng.integers(50, 400))]
            e = c.lookup(q)
            if e is not None:
                s = c.load(e, q)
                if s is not None:
                    exp = _arrays(q[: e.n_tokens], n_float=200_000)
                    assert all(np.array_equal(s.arrays[k], exp[k]) for k in exp), "loaded wrong data"
        print("ok", flush=True)
""")


def _spawn(mode, d, seed):
    code = _CHILD.format(tests=str(REPO / "tests" / "unit"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, mode, str(d), str(seed)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_sigkill_while_writing_loses_at_most_the_inflight_entry(tmp_path):
    p = _spawn("writer", tmp_path, 0)
    stored = []
    try:
        while True:
            line = p.stdout.readline()
            assert line, f"writer died: {p.stderr.read()}"
            if line.startswith("stored"):
                stored.append(int(line.split()[1]))
            elif len(stored) >= 3:
                break  # "mid-write" of the 4th entry: its temp file is half written
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    leftovers = [f for f in tmp_path.iterdir() if ".tmp." in f.name]
    assert len(leftovers) == 1, "the kill should have interrupted one write"
    c = PrefixCache(tmp_path, FP, budget_bytes=None, min_tokens=1)  # sweeps the dead writer's temp file
    assert not [f for f in tmp_path.iterdir() if ".tmp." in f.name]
    base = _tokens(400, 99)
    ok = []
    for e in c.entries():
        s = c.load(e, base)
        assert s is not None and np.array_equal(s.arrays["x"], _arrays(base[: e.n_tokens], 3_000_000)["x"])
        ok.append(e.n_tokens)
    assert set(stored) <= set(ok) and len(ok) <= len(stored) + 1, (stored, ok, leftovers)


def test_two_processes_sharing_a_dir_do_not_corrupt_each_other(tmp_path):
    ps = [_spawn("racer", tmp_path, s) for s in (1, 2)]
    outs = [p.communicate(timeout=120) for p in ps]
    for p, (out, err) in zip(ps, outs):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    c = PrefixCache(tmp_path, FP, budget_bytes=None, min_tokens=1)
    base = _tokens(400, 99)
    for e in c.entries():
        assert c.load(e, base) is not None
