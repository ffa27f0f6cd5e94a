"""moe_f32 (routed-MoE decode, fp32 activations on moe_int8's tiling) against float64 dequantize-then-matmul.

Interpreter mode without a GPU (plain-Triton byte permutes; the PTX prmt path compiles only on NVIDIA).
Cases: q2 (IQ2_XXS/Q2_K) and q4 (Q4_K) at T=1 and T=5 with the same expert twice for one token and an
expert no token picks; each stage alone (gate/up against float64 h, down against float64 on the
kernel's own h) and end to end; the device tiles (1-warp IQ2_XXS rows, prefetched or not, several K
steps and row blocks per launch) instead of the interpreter's wide ones; rows not a multiple of the tile;
NaN-poisoned outputs; bitwise-identical repeated runs; formats it does not take fall back to fused_blockdot.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4.kernels_triton import moe, moe_f32, moe_int8, registry  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402
from tests.kernels.test_triton_moe import CLAMP, make_problem, moe_reference  # noqa: E402
from tests.kernels.test_triton_qmatmul import DEVICE, assert_matches, poison  # noqa: E402,F401

# The H200 tiles (moe_int8.TUNED) with the interpreter's widening off, prefetch on and off: these are the
# layouts the GPU runs, at shapes where they take several row blocks and K steps.
DEVICE_TILES = {
    "q2": moe_f32.F32MoeConfig(block_n_gate_up=16, kstep_gate_up=1, warps_gate_up=1, prefetch_gate_up=True,
                               block_n_down=16, kstep_down=1, warps_down=2, prefetch_down=True, cpu_widen=False),
    "q4": moe_f32.F32MoeConfig(block_n_gate_up=32, kstep_gate_up=1, warps_gate_up=4, block_n_down=8,
                               kstep_down=1, warps_down=1, prefetch_down=True, cpu_widen=False),
}


def ref_h(u, wg, wu, sel, wts, clamp) -> np.ndarray:
    """float64 h [T*K, F]: gate/up on fp32 u, SwiGLU with the clamps, route weight."""
    u = u.detach().cpu().double().numpy()
    sel, wts = sel.cpu().numpy(), wts.detach().cpu().double().numpy()
    T, K = sel.shape
    h = np.zeros((T * K, wg.shape[1]))
    for t in range(T):
        for i in range(K):
            e = sel[t, i]
            g = np.minimum(wg[e] @ u[t], clamp)
            up = np.clip(wu[e] @ u[t], -clamp, clamp)
            h[t * K + i] = g / (1.0 + np.exp(-np.clip(g, -700, None))) * up * wts[t, i]
    return h


def ref_down(h, wd, sel) -> np.ndarray:
    h = h.detach().cpu().double().numpy()
    sel = sel.cpu().numpy()
    T, K = sel.shape
    return np.stack([sum(wd[sel[t, i]] @ h[t * K + i] for i in range(K)) for t in range(T)])


def _stages(recipe, e, f, d, t, k, seed, cfg):
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem(recipe, e, f, d, t, k, seed)
    dev = detect_device(DEVICE)
    prmt = moe_int8.use_asm(dev, u)
    h = moe_f32.gate_up_f32(u, gate, up, sel, wts, CLAMP, prmt, cfg)
    assert_matches(h, ref_h(u, wg, wu, sel, wts, CLAMP), "triton_moe", "decode", f"f32 gate/up {recipe} T={t}")
    out = moe_f32.down_f32(h, down, sel, prmt, cfg)
    assert_matches(out, ref_down(h, wd, sel), "triton_moe", "decode", f"f32 down {recipe} T={t}")
    y = moe_f32.fused_f32(u, gate, up, down, sel, wts, CLAMP, dev, cfg)
    assert_matches(y, moe_reference(u, wg, wu, wd, sel, wts, CLAMP), "triton_moe", "decode",
                   f"f32 end to end {recipe} T={t}")
    return y


@pytest.mark.parametrize("recipe,t,k", [("q2", 1, 6), ("q2", 5, 3), ("q4", 1, 6), ("q4", 5, 3)])
def test_fused_f32(recipe, t, k, poison):
    cfg = moe_f32.TUNED[moe_int8.QuantFormat.IQ2_XXS if recipe == "q2" else moe_int8.QuantFormat.Q4_K]
    if DEVICE == "cpu":
        cfg = replace(cfg, block_n_gate_up=moe_int8.CPU_BLOCK_N_GATE_UP, block_n_down=moe_int8.CPU_BLOCK_N_DOWN)
    _stages(recipe, 5, 256, 512, t, k, seed=21 + t, cfg=cfg)


@pytest.mark.parametrize("recipe,prefetch", [("q2", True), ("q4", True), ("q4", False)])
def test_device_tiles(recipe, prefetch, poison):
    """Narrow 1-warp (q2) / 4-warp (q4) tiles as on the GPU: 16 (q2) / 8 (q4) row blocks of gate/up per slot, 32 / 64
    of down, 2 K steps each, next step prefetched or not (the GPU tests run every combination natively)."""
    cfg = replace(DEVICE_TILES[recipe], prefetch_gate_up=prefetch, prefetch_down=prefetch)
    _stages(recipe, 3, 256, 512, 1, 2, seed=31, cfg=cfg)


@pytest.mark.parametrize("recipe,f,d", [("q2", 768, 512), ("q4", 768, 768)])
def test_rows_not_multiple_of_tile(recipe, f, d, poison):
    """F = 768 gate/up rows (and for q4 D = 768 down rows) over 512-row tiles: the last block is partial."""
    cfg = replace(moe_f32.F32MoeConfig(), block_n_gate_up=512, block_n_down=512, cpu_widen=False)
    _stages(recipe, 3, f, d, 2, 2, seed=41, cfg=cfg)


def test_repeatable_bitwise(poison):
    (gate, up, down, u, sel, wts), _ = make_problem("q2", 4, 256, 512, 2, 3, seed=51)
    dev = detect_device(DEVICE)
    a = moe_f32.fused_f32(u, gate, up, down, sel, wts, CLAMP, dev)
    b = moe_f32.fused_f32(u, gate, up, down, sel, wts, CLAMP, dev)
    assert torch.equal(a, b)


def test_fallback_for_other_formats(poison):
    """Q8_0 experts are not decoded here: the call is fused_blockdot's, bit for bit."""
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem("q8", 4, 64, 96, 2, 2, seed=61)
    dev = detect_device(DEVICE)
    y = moe_f32.fused_f32(u, gate, up, down, sel, wts, CLAMP, dev)
    assert torch.equal(y, moe.fused_blockdot(u, gate, up, down, sel, wts, CLAMP, dev))
    assert_matches(y, moe_reference(u, wg, wu, wd, sel, wts, CLAMP), "triton_moe", "decode", "f32 fallback q8")


def test_registered():
    v = {x.name: x for x in registry.variants(registry.KernelOp.MOE)}["rows_f32"]
    assert set(v.formats) == {QuantFormat.IQ2_XXS, QuantFormat.Q4_K} and v.max_t == moe_f32.MAX_T
