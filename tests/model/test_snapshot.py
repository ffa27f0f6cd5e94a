"""Session snapshots: save -> load in a fresh process -> bit-identical next logits and identical greedy
continuation; foreign, truncated or corrupt snapshots are refused with SnapshotError."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dsv4
from dsv4.errors import SnapshotError
from tests.tolerances import assert_close

torch.set_num_threads(1)

CHILD = textwrap.dedent("""
    import sys, numpy as np, torch, dsv4
    torch.set_num_threads(1)
    model, snap, out, nxt = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    eng = dsv4.load(model, backend="torch")
    s = eng.load_session(snap)
    restored = s.last_logits.copy()
    lg = s.decode(nxt)
    gen = [e.token_id for e in s.generate([], None, max_tokens=3)]
    np.savez(out, restored=restored, next=lg, gen=np.asarray(gen), n=np.asarray(s.n_past))
""")


@pytest.fixture(scope="module")
def engine(tiny_q2_path):
    return dsv4.load(tiny_q2_path, backend="torch")


@pytest.mark.parametrize("n_tokens", [131, 9])  # 131: live ratio-4 frontier mid-window, ratio-128 row emitted
def test_snapshot_roundtrip_fresh_process(engine, tiny_q2_path, tmp_path, n_tokens):
    ids = np.random.default_rng(n_tokens).integers(0, 129280, n_tokens).tolist()
    s = engine.new_session(ctx=512, prefill_chunk=100)
    s.prefill(ids)
    snap = tmp_path / "s.dsv4snap"
    size = s.save(snap)
    assert size == snap.stat().st_size
    nxt = 4242
    out = tmp_path / "child.npz"
    subprocess.run([sys.executable, "-c", CHILD, str(tiny_q2_path), str(snap), str(out), str(nxt)], check=True,
                   capture_output=True)
    child = np.load(out)
    assert_close(child["restored"], s.last_logits, "model", "snapshot", "restored last logits")
    lg = s.decode(nxt)
    assert_close(child["next"], lg, "model", "snapshot", "next logits after restore")
    gen = [e.token_id for e in s.generate([], None, max_tokens=3)]
    assert child["gen"].tolist() == gen and int(child["n"]) == s.n_past


def test_snapshot_refuses_corrupt_truncated_foreign(engine, tiny_q2_path, tiny_q4_path, tmp_path):
    s = engine.new_session(ctx=64)
    s.prefill([5, 6, 7, 8, 9])
    snap = tmp_path / "a.snap"
    s.save(snap)
    data = snap.read_bytes()
    (tmp_path / "trunc.snap").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    (tmp_path / "flip.snap").write_bytes(bytes(flipped))
    (tmp_path / "junk.snap").write_bytes(b"not a snapshot at all, just text" * 4)
    for name, msg in (("trunc", "checksum|truncated"), ("flip", "checksum"), ("junk", "not a dsv4")):
        with pytest.raises(SnapshotError, match=msg):
            engine.load_session(tmp_path / f"{name}.snap")
    with pytest.raises(SnapshotError, match="cannot read"):
        engine.load_session(tmp_path / "missing.snap")
    # a config that differs (here: tiny with another layer count) is refused by fingerprint
    from dsv4.engine import Engine

    other = dsv4.load(tiny_q4_path, backend="torch")
    other_cfg = other.config.with_layers(5)
    foreign = Engine.__new__(Engine)
    foreign.__dict__.update(other.__dict__, config=other_cfg)
    with pytest.raises(SnapshotError, match="different model"):
        foreign.load_session(snap)
    # a good snapshot still loads
    assert engine.load_session(snap).tokens == [5, 6, 7, 8, 9]
