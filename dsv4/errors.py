"""User-facing error types. The CLI prints `error: <message>` on one line and exits with the
error's exit code (2); tracebacks only with DSV4_DEBUG=1. Internal invariants use assert instead."""
from __future__ import annotations


class DsvError(Exception):
    """Base of every error caused by user input (files, arguments, state); message is actionable."""

    exit_code = 2


class ModelFileError(DsvError):
    """A GGUF file that is missing, unreadable, truncated or inconsistent with the DSV4 layout."""


class SnapshotError(DsvError):
    """A session snapshot or cache file that is corrupt, truncated, or from another model."""


class CacheWriteError(DsvError):
    """Writing a KV page / cache entry failed (full disk, permissions); the session continues in memory."""


class ChatError(DsvError, ValueError):
    """A conversation that cannot be rendered: unknown role, malformed tool call or arguments."""


class RecipeError(DsvError):
    """A quantization recipe that is malformed or cannot be applied to a tensor."""
