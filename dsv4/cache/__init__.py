"""Session KV state: typed per-layer buffers (state.py) and their serialization (snapshots)."""
from .state import LayerState, SessionState

__all__ = ["LayerState", "SessionState"]
