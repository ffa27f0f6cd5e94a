"""moe_fast (`fused_dot*`: routed-MoE decode through tl.dot with sub-blocks as dot columns) against the
float64 dequantize-then-loop reference of test_triton_moe.

Interpreter mode without a GPU. Cases: q2 (IQ2_XXS gate/up, Q2_K down) and q4 (Q4_K), T=1 and T=3,
the same expert twice for one token, an expert with no tokens, NaN-poisoned outputs and scratch; the
down split (several programs over (slot, K step) ranges, partials summed in order); bitwise
reproducibility; Q8_0 (not taken by these kernels) falls back to fused_blockdot exactly.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4.kernels_triton import moe_fast, registry  # noqa: E402
from dsv4.kernels_triton.configs import DeviceInfo, Vendor, detect_device  # noqa: E402
from tests.kernels.test_triton_moe import CLAMP, make_problem, moe_reference  # noqa: E402
from tests.kernels.test_triton_qmatmul import DEVICE, assert_matches, poison  # noqa: E402,F401

# Smallest shapes the kernels take natively: the input dim of each stage is 16 sub-blocks per step
# (IQ2_XXS/Q4_K 512, Q2_K 256), two steps for the gate/up stage.
SHAPES = {"q2": (4, 256, 1024), "q4": (4, 512, 1024), "split": (4, 512, 512)}  # (E, F, D)


def run(recipe, t, k, seed, cfg=None, dev=None, shape=None):
    e, f, d = shape or SHAPES[recipe]
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem(recipe, e, f, d, t, k, seed)
    dev = dev or detect_device(DEVICE)
    y = moe_fast.fused_dot(u, gate, up, down, sel, wts, CLAMP, dev, cfg)
    return y, moe_reference(u, wg, wu, wd, sel, wts, CLAMP)


@pytest.mark.parametrize("recipe,t", [("q2", 1), ("q2", 3), ("q4", 1)])
def test_fused_dot_fp16x(recipe, t, poison):
    y, ref = run(recipe, t, 2 if t > 1 else 3, seed=20 + t)
    assert_matches(y, ref, "triton_moe", "dot_fp16x", f"fused_dot {recipe} T={t}")


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_fused_dot_x2_is_fp32_grade(recipe, poison):
    """hi+lo activations, small row tiles (several F/D blocks) and a device whose size makes the down
    projection split its (slot, K step) range in two, one part crossing an expert boundary: within the
    fp32 decode tolerance."""
    cfg = moe_fast.DotMoeConfig(block_n_gate_up=64, block_n_down=32, x_split=True)
    e, f, d = SHAPES["split"]
    dev = DeviceInfo(Vendor.CPU, "interpreter", n_sm=16)
    steps = 3 * f // (16 * moe_fast.SUB_SIZE["Q2_K" if recipe == "q2" else "Q4_K"])  # K=3 slots
    assert moe_fast._down_split(2, d, 32, steps, dev) == steps // 2 + steps % 2
    y, ref = run(recipe, 2, 3, seed=30, cfg=cfg, dev=dev, shape=(e, f, d))
    assert_matches(y, ref, "triton_moe", "decode", f"fused_dot_x2 {recipe}")


@pytest.mark.parametrize("recipe,split", [("q2", False), ("q4", True)])
def test_fused_dot_packed_x(recipe, split, poison):
    """Activation tiles packed once by _x_pack_kernel (hi only, or hi|lo in one 32-column dot); with
    split=True also gate and up in separate programs and SwiGLU inside the h packing."""
    cfg = moe_fast.DotMoeConfig(packed_x=True, x_split=split, split_gate_up=split)
    y, ref = run(recipe, 2, 3, seed=50, cfg=cfg)
    assert_matches(y, ref, "triton_moe", "decode" if split else "dot_fp16x", f"fused_dot packed {recipe} split={split}")


def test_fused_dot_is_bitwise_reproducible():
    cfg = moe_fast.PXS  # the registered fused_dot_pxs configuration
    a, ref = run("q2", 1, 2, seed=40, cfg=cfg)
    b, _ = run("q2", 1, 2, seed=40, cfg=cfg)
    assert_matches(a, ref, "triton_moe", "dot_fp16x", "fused_dot_pxs q2")
    assert torch.equal(a, b)


def test_q8_falls_back_exactly(poison):
    """Q8_0 experts are not taken by the dot kernels: the fp32 fused_blockdot path answers."""
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem("q8", 4, 64, 96, 3, 2, seed=8)
    names = [v.name for v in registry.variants(registry.KernelOp.MOE) if v.name.startswith("fused_dot")]
    assert {"fused_dot", "fused_dot_x2", "fused_dot_px", "fused_dot_pxs"} <= set(names)
    for name in names:
        y = registry.get(registry.KernelOp.MOE, name).fn(u, gate, up, down, sel, wts, CLAMP, detect_device(DEVICE))
        assert_matches(y, moe_reference(u, wg, wu, wd, sel, wts, CLAMP), "triton_moe", "decode", name)
