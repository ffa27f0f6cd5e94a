"""Every DSV4_* environment variable, read here and nowhere else.

Each setting has a name, a type, a default and one line of doc. Other modules call
`settings.get()` (or a named accessor) instead of touching os.environ, so the knobs that
change behaviour are all visible in one place. Also here: the Triton variables dsv4 pins (TRITON_PINNED).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type
    default: object
    doc: str


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("DSV4_MODEL", str, "", "Model GGUF used by `dsv4 chat`/`run` when -m is not given."),
        Setting("DSV4_DEBUG", bool, False, "Show Python tracebacks for user-facing errors."),
        Setting("DSV4_BACKEND", str, "auto", "Default backend: auto, torch, triton or mlx."),
        Setting("DSV4_CACHE_DIR", str, "", "Cache root (default: $XDG_CACHE_HOME/dsv4 or ~/.cache/dsv4)."),
        Setting("DSV4_KERNEL_CHECK", bool, False, "Shadow-run the reference for every accelerated op and log errors."),
        Setting("DSV4_PREFILL_CHUNK", int, 2048, "Default prefill chunk length in tokens."),
        Setting("DSV4_KV_DIR", str, "", "KV page files and prefix cache (default: <cache dir>/kv); --kv-dir overrides."),
        Setting("DSV4_KV_BUDGET", str, "", "Resident bytes for paged KV rows, e.g. 2G or 512M (default: no limit)."),
        Setting("DSV4_KV_DISK_MB", int, 4096, "Disk budget of the KV prefix cache in MiB."),
        Setting("DSV4_PDL", bool, True, "Triton decode kernels use programmatic dependent launch on sm_90+ "
                "(their weight loads start while the previous kernel finishes)."),
    )
}


# Triton's own environment knobs that dsv4 pins where the user has not set them (pin_triton_knobs, called when
# dsv4.kernels_triton is imported): the values the kernels were tuned and tested with.
TRITON_PINNED: dict[str, str] = {
    # FP contraction (a * b + c as one FMA) on: Triton's default through 3.9, which warns once per process that 3.10
    # turns it off; every kernel time and tolerance figure of tools/results/ was measured with it on
    "TRITON_DEFAULT_FP_FUSION": "1",
}


def pin_triton_knobs() -> None:
    """Set TRITON_PINNED's variables that the environment does not already have (a user's value wins)."""
    for name, value in TRITON_PINNED.items():
        os.environ.setdefault(name, value)


def _parse(s: Setting, raw: str):
    if s.kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return s.kind(raw)


def get(name: str):
    """Value of a registered setting (environment overrides the default)."""
    s = SETTINGS[name]
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return s.default
    try:
        return _parse(s, raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {s.kind.__name__}") from None


def debug() -> bool:
    return bool(get("DSV4_DEBUG"))


def cache_dir() -> Path:
    """User cache directory for dsv4 (embedded model, KV pages, prefix cache, history)."""
    explicit = get("DSV4_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dsv4"
