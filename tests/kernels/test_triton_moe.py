"""Triton routed-MoE kernels (fused decode, grouped prefill, device expert tiling) against a float64
dequantize-then-loop reference, and the tiny model on TritonOps against TorchOps (prefill + decode).

Interpreter mode without a GPU (see test_triton_qmatmul.py). Cases: q2 (IQ2_XXS gate/up, Q2_K down)
and q4 (Q4_K) recipes, T=1 and T=37, repeated expert ids within a token, an expert with no tokens,
NaN-poisoned outputs and scratch; bitwise reproducibility of repeated runs.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4.kernels_triton import moe, registry  # noqa: E402
from dsv4.kernels_triton.configs import GemmConfig, GemvConfig, MoeConfig, detect_device  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402
from tests.kernels.test_triton_qmatmul import DEVICE, assert_matches, make_weight, poison  # noqa: E402,F401
from tests.tolerances import assert_close  # noqa: E402

Q = QuantFormat
RECIPES = {"q2": (Q.IQ2_XXS, Q.Q2_K), "q4": (Q.Q4_K, Q.Q4_K), "q8": (Q.Q8_0, Q.Q8_0)}
CLAMP = 10.0


def moe_reference(u, wg, wu, wd, sel, wts, clamp):
    """float64: out[t] = sum_i down[e] @ (silu(min(g, c)) * clip(up, -c, c) * w)."""
    u = u.detach().cpu().double().numpy()
    sel = sel.cpu().numpy()
    wts = wts.detach().cpu().double().numpy()
    out = np.zeros((u.shape[0], wd.shape[1]))
    for t in range(u.shape[0]):
        for i in range(sel.shape[1]):
            e = sel[t, i]
            g = np.minimum(wg[e] @ u[t], clamp)
            up = np.clip(wu[e] @ u[t], -clamp, clamp)
            h = g / (1.0 + np.exp(-np.clip(g, -700, None))) * up * wts[t, i]
            out[t] += wd[e] @ h
    return out


def make_problem(recipe: str, e: int, f: int, d: int, t: int, k: int, seed: int, device=DEVICE):
    fg, fd = RECIPES[recipe]
    gate, wg = make_weight(fg, (e, f, d), seed, device)
    up, wu = make_weight(fg, (e, f, d), seed + 1, device)
    down, wd = make_weight(fd, (e, d, f), seed + 2, device)
    gen = torch.Generator().manual_seed(seed + 3)
    u = (torch.randn((t, d), generator=gen) * 3).to(device)
    sel = torch.randint(0, e - 1, (t, k), generator=gen)  # expert e-1 never chosen: an expert with no tokens
    sel[0, 1] = sel[0, 0]  # the same expert twice for one token
    wts = torch.rand((t, k), generator=gen)
    return (gate, up, down, u, sel.to(device), wts.to(device)), (wg, wu, wd)


def check_moe(recipe, e, f, d, t, k, path, seed=0, device=DEVICE):
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem(recipe, e, f, d, t, k, seed, device)
    dev = detect_device(device)
    fn = moe.fused_decode if path == "decode" else moe.grouped
    y = fn(u, gate, up, down, sel, wts, CLAMP, dev)
    ref = moe_reference(u, wg, wu, wd, sel, wts, CLAMP)
    assert_matches(y, ref, "triton_moe", path, f"{recipe} {path} E={e} F={f} D={d} T={t} K={k}")
    return y


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_fused_decode_t1(recipe, poison):
    check_moe(recipe, 5, 256, 256, 1, 6, "decode", seed=1)


def test_fused_decode_t3_q8(poison):
    check_moe("q8", 5, 96, 64, 3, 3, "decode", seed=2)


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_grouped_t37(recipe, poison):
    check_moe(recipe, 5, 256, 256, 37, 3, "grouped", seed=3)


def test_grouped_matches_decode_path_on_q8(poison):
    """Both paths on one problem agree (grouped within its fp16 tolerance of the fp32 decode path)."""
    y_dec = check_moe("q8", 4, 64, 96, 9, 2, "decode", seed=4)
    y_grp = check_moe("q8", 4, 64, 96, 9, 2, "grouped", seed=4)
    scale = float(y_dec.abs().max())
    assert_close((y_grp / scale).cpu().numpy(), (y_dec / scale).cpu().numpy(), "triton_moe", "grouped", "grouped vs decode")


def test_decode_is_bitwise_reproducible():
    (gate, up, down, u, sel, wts), _ = make_problem("q8", 4, 64, 96, 2, 3, seed=5)
    dev = detect_device(DEVICE)
    a = moe.fused_decode(u, gate, up, down, sel, wts, CLAMP, dev)
    b = moe.fused_decode(u, gate, up, down, sel, wts, CLAMP, dev)
    assert torch.equal(a, b)


def expert_tiles_reference(sel, n_expert: int, block_m: int):
    """moe.expert_tiles written with torch ops (stable argsort, bincount, searchsorted)."""
    flat = sel.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.bincount(flat, minlength=n_expert)
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    ids = torch.arange(-(-flat.numel() // block_m) + n_expert)
    te = torch.searchsorted(tile_end, ids, right=True).clamp_(max=n_expert - 1)
    lo = starts[te] + (ids - (tile_end[te] - tiles[te])) * block_m
    hi = torch.minimum(lo + block_m, starts[te] + counts[te])
    used = ids < tile_end[-1]
    return order, te.int(), torch.where(used, lo, 0).int(), torch.where(used, hi, 0).int()


@pytest.mark.parametrize("t,k,e,bm,hot", [(11, 3, 7, 4, False), (1, 6, 256, 64, False), (300, 6, 256, 64, False),
                                           (70, 2, 5, 16, True)])
def test_expert_tiles_match_torch_reference(t, k, e, bm, hot):
    """The one-launch grouping equals the torch formulation exactly: stable order within an expert
    across chunks (T*K = 1800 pairs: 29 chunks of 64), tile ends, empty unused tiles; outputs poisoned."""
    gen = torch.Generator().manual_seed(t)
    sel = torch.randint(0, e, (t, k), generator=gen)
    if hot:
        sel[:, 0] = 2  # one expert with most pairs (many tiles), others without any
    empty = torch.empty

    def poisoned(shape, **kw):  # every int32 scratch and output of expert_tiles starts as -7
        if kw.get("dtype") != torch.int32:
            return empty(shape, **kw)
        shape = shape if isinstance(shape, tuple) else (shape,)
        return torch.full(shape, -7, dtype=torch.int32, device=kw.get("device"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", poisoned)
        got = moe.expert_tiles(sel.to(DEVICE), e, bm)
    for g, r, name in zip(got, expert_tiles_reference(sel, e, bm), ("order", "tile_e", "tile_lo", "tile_hi")):
        assert torch.equal(g.cpu(), r), name


def test_expert_tiles_cover_every_pair_once():
    """Device grouping: tiles never straddle experts, cover each (token, slot) pair exactly once, and
    unused tiles are empty."""
    gen = torch.Generator().manual_seed(6)
    e, bm = 7, 4
    sel = torch.randint(0, e - 2, (11, 3), generator=gen)  # two experts without tokens
    order, te, lo, hi = (x.cpu() for x in moe.expert_tiles(sel.to(DEVICE), e, bm))
    flat = sel.reshape(-1)
    seen = []
    for j in range(te.numel()):
        rows = order[lo[j]:hi[j]].long()
        assert hi[j] - lo[j] <= bm
        if rows.numel():
            assert torch.all(flat[rows] == te[j]), f"tile {j} mixes experts"
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(flat.numel()))


def test_registered_moe_variants(poison):
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem("q8", 4, 64, 96, 3, 2, seed=8)
    dev = detect_device(DEVICE)
    ref = moe_reference(u, wg, wu, wd, sel, wts, CLAMP)
    names = []
    for v in registry.variants(registry.KernelOp.MOE):
        y = v.fn(u, gate, up, down, sel, wts, CLAMP, dev)
        kind = "grouped" if v.name == "grouped" else "decode"
        assert_matches(y, ref, "triton_moe", kind, f"variant {v.name}")
        names.append(v.name)
    assert {"auto", "fused_decode", "grouped"} <= set(names)


# ---- tiny model end to end ---------------------------------------------------------------------------

PROMPT = [0, 1201, 7, 64, 93, 18, 2200, 5, 311, 46]  # 10 tokens: the prefill takes the GEMM/grouped paths
DECODE = [77]


ACCURATE = {"qmatmul": "auto_ieee", "moe": "auto_ieee"}  # fp32 prefill GEMMs: isolates wiring from fp16 rounding


def _run(path, backend, **kw):
    import dsv4

    eng = dsv4.load(path, backend=backend, device=DEVICE, **kw)
    s = eng.new_session(ctx=256)
    out = [s.prefill(PROMPT)]
    for tok in DECODE:
        out.append(s.decode(tok))
    return out


@pytest.mark.slow
def test_tiny_model_tritonops_matches_reference(tiny_q2_path, poison):
    ref = _run(tiny_q2_path, "torch")
    got = _run(tiny_q2_path, "triton", kernels=ACCURATE)
    for step, (g, r) in enumerate(zip(got, ref)):
        scale = float(np.abs(r).max())
        assert np.isfinite(g).all(), f"step {step}: non-finite logits"
        assert_close(g / scale, r / scale, "triton_model", "logits", f"tiny q2 logits step {step}")
        assert int(np.argmax(g)) == int(np.argmax(r)) or np.sort(r)[-1] - np.sort(r)[-2] < 1e-2 * scale


@pytest.mark.slow
def test_tiny_q4_model_limb3_moe_matches_reference(tiny_q4_path, poison, monkeypatch):
    """The default decode MoE on CUDA (moe_int8 on three int8 activation planes) inside the model: the tiny q4
    experts (Q4_K, D = F = 256) are shapes it takes (the tiny q2 IQ2_XXS rows are too short for it, D % 512), so
    TritonOps with it as the MoE kernel, fp32 GEMMs elsewhere, matches the reference logits; every MoE call of the
    run went through it with limbs=3."""
    from dsv4.kernels_triton import moe_int8

    calls = []
    orig = moe_int8.fused_int8

    def spy(*a, **kw):
        calls.append((a[0].shape[0], kw.get("limbs", a[9] if len(a) > 9 else 1)))
        return orig(*a, **kw)

    monkeypatch.setattr(moe_int8, "fused_int8", spy)
    ref = _run(tiny_q4_path, "torch")
    got = _run(tiny_q4_path, "triton", kernels={"qmatmul": "auto_ieee", "moe": "int8_limb3"})
    assert calls and all(limbs == moe_int8.LIMBS_FP32 for _, limbs in calls), calls
    assert {t for t, _ in calls} >= {1, len(PROMPT)}  # the prefill and the decode step
    for step, (g, r) in enumerate(zip(got, ref)):
        scale = float(np.abs(r).max())
        assert np.isfinite(g).all(), f"step {step}: non-finite logits"
        assert_close(g / scale, r / scale, "triton_model", "logits", f"tiny q4 int8_limb3 logits step {step}")


@pytest.mark.parametrize("recipe,t,small", [("q2", 1, False), ("q2", 2, True), ("q4", 1, False), ("q4", 2, True)])
def test_fused_blockdot(recipe, t, small, poison):
    """Group-wise decode variant (IQ2_XXS per 8 weights, Q2_K per 16, Q4_K per 32); small tiles: several
    row blocks and K steps per program."""
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem(recipe, 5, 256, 256, t, 6, seed=9 + t)
    cfg = None
    if small:
        tile = GemvConfig(block_n=64, block_k=128, num_warps=4)
        cfg = MoeConfig(tile, tile, GemmConfig(16, 32, 16, 4, 1))
    y = moe.fused_blockdot(u, gate, up, down, sel, wts, CLAMP, detect_device(DEVICE), cfg)
    assert_matches(y, moe_reference(u, wg, wu, wd, sel, wts, CLAMP), "triton_moe", "decode", f"blockdot {recipe} T={t}")
