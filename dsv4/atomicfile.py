"""Crash-safe replacement of one file: everything dsv4 writes to a user-visible path goes through here.

Write a private temp file beside the target (hidden name, pid + random suffix: two processes never share
one), fsync it, rename it over the target, fsync the directory. An exception removes the temp file and
leaves the target as it was; a kill leaves at most a hidden `.NAME.tmp.*` file, never a half-written
target. Knows nothing about what the file contains.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp."


def temp_path(path: Path) -> Path:
    """The private temp name used for `path` by this process."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}.{uuid.uuid4().hex[:8]}")


def owner_alive(pid: int) -> bool:
    """Whether process `pid` (the owner named in a temp or page file) still exists. Another user's live
    process counts as alive: its files are never ours to remove."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_if_orphaned(p: Path, pid: int) -> bool:
    """Delete a file whose owner process is gone (killed before it could clean up); True if removed."""
    if owner_alive(pid):
        return False
    try:
        p.unlink()
    except FileNotFoundError:
        return False
    return True


def fsync_dir(d: Path) -> None:
    """Make a rename in directory d durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(p: Path) -> None:
    fd = os.open(str(p), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """`with replacing(out) as tmp: write tmp` -> out appears complete, or not at all."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
