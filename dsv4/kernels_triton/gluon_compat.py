"""The Gluon names the Gluon kernels (q8_gluon, moe_gluon, moe_int8_gluon) use, imported in one place.

Gluon ships with Triton >= 3.5; without it HAVE_GLUON is False, the names are None and every caller of a Gluon kernel
keeps its Triton path. Names Triton renamed after 3.6 (the old ones raise from 3.9 on) are resolved here once.
"""
from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                                 warpgroup_mma_wait)
    HAVE_GLUON = True
    barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # a CTA-wide barrier
    async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared  # cp.async
except ImportError:  # pragma: no cover - older Triton
    HAVE_GLUON = False
    gluon = gl = async_copy = fence_async_shared = warpgroup_mma = warpgroup_mma_wait = None
    barrier = async_load = None
