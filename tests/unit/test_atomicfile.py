"""dsv4.atomicfile: a failed write leaves the old target and no temp file; a good one replaces it."""
from __future__ import annotations

import pytest

from dsv4.atomicfile import replacing


def test_failed_write_keeps_target_and_leaves_nothing(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_good_write_replaces_target(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with replacing(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".model.gguf.tmp.")
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_orphaned_files_of_dead_processes_only_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from dsv4.atomicfile import remove_if_orphaned

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid no longer names a process
    mine, orphan = tmp_path / "mine.tmp", tmp_path / "orphan.tmp"
    mine.write_bytes(b"x")
    orphan.write_bytes(b"x")
    assert not remove_if_orphaned(mine, os.getpid()) and mine.exists()
    assert remove_if_orphaned(orphan, dead.pid) and not orphan.exists()
