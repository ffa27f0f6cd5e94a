"""moe_prefill (`grouped_v2*`: expert-sorted grouped tl.dot prefill with per-group word decoding)
against the float64 dequantize-then-loop reference of test_triton_moe.

Interpreter mode without a GPU (natively on a GPU box). Cases: q2 (IQ2_XXS gate/up, Q2_K down) and q4
(Q4_K) recipes, T=1 and T=37, the same expert twice for one token, an expert with no tokens, an expert
with more pairs than BLOCK_M (several tiles), several F/D blocks and K steps, NaN-poisoned outputs and
scratch (fp32 and the fp16 h), bitwise-identical repeated runs, every registered grouped_v2 variant,
the fallback to moe.moe_float for formats the kernels do not take, and the word-tensor orientation the
installed Triton does not pick (GROUPS_FIRST: the Triton 3.6 path on a 3.9 box and vice versa).
"""
from __future__ import annotations

import os

from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4.kernels_triton import moe, moe_prefill, registry  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402
from tests.kernels.test_triton_moe import CLAMP, make_problem, moe_reference  # noqa: E402
from tests.kernels.test_triton_qmatmul import DEVICE, assert_matches, poison  # noqa: E402,F401

# Small interpreter tiles: several F/D blocks and K steps per program, BLOCK_M 16 so that experts get
# several tiles; fp16-pair scaling (h2, the default) and fp32 scaling; BLOCK_K 256 and 128.
SMALL = moe_prefill.PrefillConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=1,
                                  block_n_down=128, block_k_down=256, num_warps_down=4)
SMALL_F32 = replace(SMALL, h2=False)
SMALL_K128_F32 = replace(SMALL, block_k=128, block_k_down=128, h2=False)
# gate and up rows in one tile (one dot per step); weights as the dot's A operand (tokens as its N)
SMALL_FUSE = replace(SMALL, fuse=True)
SMALL_SWAP = replace(SMALL, swap=True, swap_down=True)
SMALL_FUSE_SWAP_K128 = replace(SMALL, fuse=True, swap=True, swap_down=True, block_k=128, block_k_down=128)
SMALL_FUSE_K128_F32 = replace(SMALL, fuse=True, block_k=128, block_k_down=128, h2=False)
KIND = "grouped_v2"  # tolerance row


@pytest.fixture
def poison16(poison, monkeypatch):
    """poison (fp32 outputs) plus the fp16 h scratch of moe_prefill as NaN."""
    def nan_f16(shape, device):
        return torch.full(tuple(shape), float("nan"), device=device, dtype=torch.float16)

    monkeypatch.setattr(moe_prefill, "empty_f16", nan_f16)


def run(recipe, e, f, d, t, k, seed, cfg, sel_fn=None):
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem(recipe, e, f, d, t, k, seed)
    if sel_fn is not None:
        sel = sel_fn(sel).to(sel.device)
    y = moe_prefill.grouped_v2(u, gate, up, down, sel, wts, CLAMP, detect_device(DEVICE), cfg)
    return y, moe_reference(u, wg, wu, wd, sel, wts, CLAMP), sel


@pytest.mark.parametrize("recipe,t,cfg", [("q2", 1, SMALL), ("q2", 37, SMALL_F32), ("q4", 1, SMALL_K128_F32),
                                          ("q4", 37, SMALL), ("q2", 37, SMALL_FUSE), ("q4", 37, SMALL_SWAP),
                                          ("q2", 1, SMALL_FUSE_SWAP_K128), ("q4", 37, SMALL_FUSE_SWAP_K128),
                                          ("q2", 37, SMALL_FUSE_K128_F32), ("q4", 1, SMALL_FUSE_K128_F32)])
def test_grouped_v2(recipe, t, cfg, poison16):
    """make_problem: expert e-1 has no tokens, token 0 picks one expert twice; at T=37 K=3 the 111
    pairs over 4 experts give each used expert more pairs than BLOCK_M=16 (several tiles)."""
    y, ref, sel = run(recipe, 5, 256, 512, t, 3, seed=60 + t, cfg=cfg)
    if t > 1:
        counts = torch.bincount(sel.reshape(-1).cpu(), minlength=5)
        assert counts[-1] == 0 and int(counts.max()) > cfg.block_m
    assert_matches(y, ref, "triton_moe", KIND, f"grouped_v2 {recipe} T={t} bk={cfg.block_k} h2={cfg.h2} "
                                                f"fuse={cfg.fuse} swap={cfg.swap}/{cfg.swap_down}")


@pytest.mark.parametrize("recipe,cfg", [("q2", SMALL), ("q4", SMALL_K128_F32)])
def test_other_orientation(recipe, cfg, poison16, monkeypatch):
    """Group-major vs row-major word tensors (chosen from the Triton version) give the same weights."""
    monkeypatch.setattr(moe_prefill, "GROUPS_FIRST", not moe_prefill.GROUPS_FIRST)
    y, ref, _ = run(recipe, 4, 256, 512, 6, 2, seed=75, cfg=cfg)
    assert_matches(y, ref, "triton_moe", KIND, f"grouped_v2 {recipe} GROUPS_FIRST={moe_prefill.GROUPS_FIRST}")


def test_one_hot_expert_and_repeats(poison16):
    """Every pair of every token on expert 2 except slot 1 of token 0 (a repeat pattern), 2 of 4
    experts unused: one expert with 4 tiles of BLOCK_M, the other with a single pair."""
    def sel_fn(sel):
        s = torch.full_like(sel, 2)
        s[0, 1] = 0
        return s

    y, ref, _ = run("q2", 4, 256, 256, 21, 3, seed=70, cfg=SMALL, sel_fn=sel_fn)
    assert_matches(y, ref, "triton_moe", KIND, "grouped_v2 one hot expert")


def test_bitwise_reproducible():
    a, ref, _ = run("q4", 4, 256, 256, 9, 2, seed=80, cfg=SMALL)
    b, _, _ = run("q4", 4, 256, 256, 9, 2, seed=80, cfg=SMALL)
    assert_matches(a, ref, "triton_moe", KIND, "grouped_v2 q4 repeat")
    assert torch.equal(a, b)


def test_registered_variants(poison16):
    """The registered grouped_v2* variants (their own tiles, interpreter: no pipelining) on one q2
    problem; Q8_0 experts fall back to moe.moe_float exactly."""
    names = [v.name for v in registry.variants(registry.KernelOp.MOE) if v.name.startswith("grouped_v2")]
    assert set(moe_prefill.CONFIGS) <= set(names)
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem("q2", 4, 256, 256, 5, 2, seed=90)
    ref = moe_reference(u, wg, wu, wd, sel, wts, CLAMP)
    dev = detect_device(DEVICE)
    for name in ("grouped_v2", "grouped_v2_f32", "grouped_v2_tuned"):  # the others differ only in tile sizes
        y = registry.get(registry.KernelOp.MOE, name).fn(u, gate, up, down, sel, wts, CLAMP, dev)
        assert_matches(y, ref, "triton_moe", KIND, name)
    (gate, up, down, u, sel, wts), _ = make_problem("q8", 4, 64, 96, 3, 2, seed=91)
    y = registry.get(registry.KernelOp.MOE, "grouped_v2").fn(u, gate, up, down, sel, wts, CLAMP, dev)
    assert torch.equal(y, moe.moe_float(u, gate, up, down, sel, wts, CLAMP, dev))


def test_auto_uses_grouped_v2_above_decode(monkeypatch, poison):
    """moe's auto variant sends T > 8 to moe_prefill (with its default tiles) and T <= 8 to the decode
    kernels; results equal the direct calls bit for bit."""
    from dsv4.kernels_triton import moe_prefill

    dev = detect_device(DEVICE)
    calls = []
    orig = moe_prefill.grouped_v2
    monkeypatch.setattr(moe_prefill, "grouped_v2", lambda *a, **k: calls.append(a[-1]) or orig(*a, **k))
    (gate, up, down, u, sel, wts), _ = make_problem("q4", 4, 256, 256, 9, 2, seed=3)
    y = moe.moe_auto(u, gate, up, down, sel, wts, CLAMP, dev)
    assert calls == [moe_prefill.TUNED[gate.fmt]]
    assert torch.equal(y, orig(u, gate, up, down, sel, wts, CLAMP, dev, moe_prefill.TUNED[gate.fmt]))
    calls.clear()
    moe.moe_auto(u[:3], gate, up, down, sel[:3], wts[:3], CLAMP, dev)
    assert calls == []
