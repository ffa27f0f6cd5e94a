"""Which GGUF file `dsv4 chat` / `dsv4 run` use, and the embedded demo model.

Order: `-m PATH`, else the DSV4_MODEL setting, else `./ds4flash.gguf` (the path ds4 users already have),
else the embedded default: the tiny random-weight model, written once by `dsv4.synth.write_model` into the
user cache directory and reused. This module owns only paths and the one-time generation; it never loads
weights (the engine does) and prints nothing (the CLI shows `DEMO_BANNER` when `is_demo` is set).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .errors import ModelFileError

DS4_DEFAULT_NAME = "ds4flash.gguf"
# Bump when dsv4.synth changes what the demo file holds, so stale copies are not reused.
DEMO_FORMAT_VERSION = 1
DEMO_PRESET = "tiny"
DEMO_RECIPE = "q2"
DEMO_SEED = 0
DEMO_FILE = f"demo-{DEMO_PRESET}-{DEMO_RECIPE}-seed{DEMO_SEED}-v{DEMO_FORMAT_VERSION}.gguf"
GGUF_MAGIC = b"GGUF"

DEMO_BANNER = (
    "Using the built-in DEMO model: a tiny DeepSeek V4 with RANDOM weights. It exercises the whole engine\n"
    "but its replies are gibberish. For the real model, download a GGUF from Hugging Face\n"
    "(antirez/deepseek-v4-gguf): the q2 file for machines with 96-128 GB of memory, q4 for >= 256 GB.\n"
    "Then point dsv4 at it with `-m PATH`, `DSV4_MODEL=PATH`, or put it at ./ds4flash.gguf."
)


class ModelSource(enum.Enum):
    FLAG = "-m"
    SETTING = "DSV4_MODEL"
    CWD = "./" + DS4_DEFAULT_NAME
    DEMO = "embedded demo"


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: ModelSource
    created: bool = False  # True when this call generated the demo file

    @property
    def is_demo(self) -> bool:
        return self.source is ModelSource.DEMO


def demo_model_path() -> Path:
    return settings.cache_dir() / "models" / DEMO_FILE


def check_model_file(path: Path, source: ModelSource) -> Path:
    """Fail early, with the way out named, on a path that cannot be a GGUF model."""
    hint = {ModelSource.FLAG: "check the -m path", ModelSource.SETTING: "fix DSV4_MODEL or pass -m PATH"}.get(
        source, "pass -m PATH or set DSV4_MODEL")
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (from {source.value}; {hint})")
    if path.is_dir():
        raise ModelFileError(f"model path is a directory, not a GGUF file: {path} ({hint})")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (bad magic {magic!r}): {path} ({hint})")
    return path


def ensure_demo_model(on_create=None, progress=None) -> tuple[Path, bool]:
    """Path of the demo model, generating it on first use. Returns (path, created).

    The file is written to a temporary name and renamed, so an interrupted or concurrent first run never
    leaves a half-written model behind. `on_create()` is called just before generating; `progress(done, total,
    name)` per tensor written (both for the CLI's display)."""
    path = demo_model_path()
    if path.is_file() and path.stat().st_size > 0:
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    if on_create is not None:
        on_create()
    from .synth import write_model

    write_model(path, preset=DEMO_PRESET, recipe=DEMO_RECIPE, seed=DEMO_SEED, progress=progress)  # atomic
    return path, True


def resolve_model(explicit: str | os.PathLike | None = None, on_create=None, progress=None) -> ResolvedModel:
    """Apply the resolution order; a path given explicitly (flag or setting) must exist and be a GGUF."""
    if explicit:
        p = Path(explicit).expanduser()
        return ResolvedModel(check_model_file(p, ModelSource.FLAG), ModelSource.FLAG)
    env = settings.get("DSV4_MODEL")
    if env:
        p = Path(env).expanduser()
        return ResolvedModel(check_model_file(p, ModelSource.SETTING), ModelSource.SETTING)
    cwd = Path.cwd() / DS4_DEFAULT_NAME
    if cwd.is_file():
        return ResolvedModel(check_model_file(cwd, ModelSource.CWD), ModelSource.CWD)
    path, created = ensure_demo_model(on_create, progress)
    return ResolvedModel(path, ModelSource.DEMO, created)
