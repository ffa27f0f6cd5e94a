"""qmatmul_fast variants (gemv_persist, gemm_hybrid, the block-scaled dequant path) against
dequantize_np-then-float64-matmul, Q8_0 only.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported)
at small shapes: row counts not a multiple of the tile, T=1, 5, 20, 37, the grouped form, several
K steps per tile, persistent programs owning several tiles, and split-K (forced through a DeviceInfo
that claims a small GPU). Outputs are NaN-poisoned.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.kernels.test_triton_qmatmul import (  # noqa: E402,F401
    DEVICE, assert_matches, make_weight, make_x, poison, reference)
from dsv4.kernels_triton import qmatmul_fast, registry  # noqa: E402
from dsv4.kernels_triton.configs import DeviceInfo, Vendor, detect_device  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402

Q8 = QuantFormat.Q8_0
SMALL_GPU = DeviceInfo(Vendor.NVIDIA, "sm_90", n_sm=4)  # only sizes the grid: few SMs -> split-K


@pytest.mark.parametrize("n,k,t,groups,block_k,block_n", [
    (37, 96, 1, 1, 2048, 4),   # rows not a multiple of the 4-row tile, K of 3 blocks (one 32-wide step each)
    (37, 256, 5, 1, 64, 4),    # T=5 (token tile 8), 4 K steps per tile
    (37, 256, 1, 1, 128, 8),   # 8-row tiles (gemv_persist_n8), 2 K steps
    (24, 128, 3, 2, 2048, 4),  # grouped: x [T, 2, K], 12 rows per group
    (12, 64, 1, 3, 32, 8),     # grouped with 4 rows per group (tile shrinks to 4), 2 K steps
])
def test_gemv_persist(n, k, t, groups, block_k, block_n, poison):
    dw, w_ref = make_weight(Q8, (n, k), seed=n + k)
    x = make_x(t, k, groups)
    y = qmatmul_fast.gemv_persist(x, dw, detect_device(DEVICE), groups, block_k=block_k, block_n=block_n)
    assert y.shape == (t, n)
    assert_matches(y, reference(x, w_ref, groups), "triton_gemv", "fp32", f"gemv_persist n={n} k={k} T={t} G={groups}")


@pytest.mark.parametrize("allow_split", [True, False])
def test_gemv_persist_split_and_loop(allow_split, poison):
    """A 'GPU' with 4 SMs: 6 row tiles -> split-K 4 (partials summed in fixed order), or one slice.
    (Programs walking several tiles, with the prefetch crossing tile ends, run in the CPU cases.)"""
    dw, w_ref = make_weight(Q8, (24, 512), seed=5)
    x = make_x(2, 512)
    split, _ = qmatmul_fast._persist_grid(6, 512, 128, SMALL_GPU, allow_split, 1)
    assert split == (4 if allow_split else 1)
    y = qmatmul_fast.gemv_persist(x, dw, SMALL_GPU, 1, allow_split=allow_split, block_k=128)
    assert_matches(y, reference(x, w_ref), "triton_gemv", "fp32", f"gemv_persist split={allow_split}")


def test_resident_programs():
    """Persistent grid size from the compiled register count (sm_90: 64K registers, 256-register
    allocation per warp, 64 warps): 118 regs x 4 warps -> 4 programs; 168 x 2 -> 6; 255 x 4 -> 2."""
    assert qmatmul_fast._resident_programs(118, 4) == 4
    assert qmatmul_fast._resident_programs(168, 2) == 6
    assert qmatmul_fast._resident_programs(255, 4) == 2
    assert qmatmul_fast._resident_programs(32, 1) == 64


def test_word_permuted_decode_is_exact(poison):
    """Extreme codes (-128, 127, 0) and unit scales: the bit-trick decode must be exact, so a one-hot x
    reads back each weight column bit for bit."""
    from dsv4.kernels_triton import blocks

    n, k = 4, 64
    raw = blocks.synthetic_raw(Q8, (n, k), seed=2).reshape(n, 2, 34)
    codes = torch.tensor([-128, 127, 0, -1, 1, 64, -64, 3], dtype=torch.int8).repeat(8)[:32]
    raw[:, :, 2:] = codes.view(torch.uint8)
    raw[:, :, :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    dw = blocks.to_device(raw.reshape(n, 68), Q8, (n, k), DEVICE)
    for col in (0, 1, 5, 33, 63):
        x = torch.zeros((1, k), device=DEVICE)
        x[0, col] = 1.0
        y = qmatmul_fast.gemv_persist(x, dw, detect_device(DEVICE), 1)
        assert torch.equal(y.cpu(), torch.full((1, n), float(codes[col % 32]))), f"column {col}"


@pytest.mark.parametrize("t,kind", [(1, "fp32"), (20, "fp32"), (37, "fp16dot"), (300, "fp16dot")])
def test_gemm_hybrid(t, kind, poison):
    """T=1 and T=20: exact GEMV (chunks of 8 tokens); T=37: fused tl.dot GEMM; T=300: dequant + matmul."""
    dw, w_ref = make_weight(Q8, (40, 96), seed=t)
    x = make_x(t, 96)
    y = qmatmul_fast.gemm_hybrid(x, dw, detect_device(DEVICE), 1)
    op = "triton_gemm" if kind == "fp16dot" else "triton_gemv"
    assert_matches(y, reference(x, w_ref), op, kind, f"gemm_hybrid T={t}")


@pytest.mark.parametrize("groups", [1, 2])
def test_gemm_dequant_q8(groups, monkeypatch, poison):
    """Block-scaled dequant pass in several row chunks (chunk size forced small), and grouped."""
    monkeypatch.setattr(qmatmul_fast, "DEQUANT_CHUNK_BYTES", 16 * 2 * 96)  # 16 rows per chunk -> 3 chunks
    dw, w_ref = make_weight(Q8, (40, 96), seed=9)
    x = make_x(37, 96, groups)
    y = qmatmul_fast.gemm_dequant_q8(x, dw, detect_device(DEVICE), groups)
    assert_matches(y, reference(x, w_ref, groups), "triton_gemm", "fp16dot", f"gemm_dequant_q8 G={groups}")


def test_registered():
    names = {v.name for v in registry.variants(registry.KernelOp.QMATMUL)}
    assert {"gemv_persist", "gemv_persist_nosplit", "gemv_persist_n8", "gemm_hybrid"} <= names
