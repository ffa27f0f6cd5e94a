"""dsv4: a Python inference engine for DeepSeek V4 Flash (GGUF).

Public API: load(), Engine, Session, Config, SamplingParams. Heavy modules are imported lazily so
`import dsv4` and `dsv4 --help` stay fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config  # noqa: E402


def __getattr__(name):
    if name in ("load", "Engine", "Session"):
        from . import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
