"""MLX backend (Apple Silicon; the Linux CPU build for tests): `MlxOps`.

repack.py: exact Q8_0/Q4_K -> MLX affine; metal.py: Metal kernels + dispatcher; twins.py: their MLX-ops
twins; ops.py: MlxOps, every op of the contract. `import dsv4.kernels_mlx` needs the `mlx` package.
"""
from __future__ import annotations

from .ops import MlxOps

__all__ = ["MlxOps"]
