"""moe_int8's Gluon stages (dsv4/kernels_triton/moe_int8_gluon.py: Q4_K and IQ2_XXS gate/up, Q4_K and Q2_K down)
natively on an NVIDIA sm_90+ GPU.

Gluon has no interpreter, so these run only on the GPU (tools/gpu_check.sh); the CPU suite compiles the kernel for sm_90
offline (tests/kernels/test_moe_int8_gluon_compile.py). At Flash shapes (q4 recipe, the q2 recipe for its own stages; 256
experts, a repeated expert id in a token's selection, _moe_problem), T = 1 and 4, over several tiles, on one activation
plane (Q8_K) and on three (fp32-grade): h against float64 on the same activations (tolerance `stage`), the down stage
against float64 on the same h (`stage`), whole moe_int8 calls against TorchOps(act_quant=True) in float64 (`end_to_end`;
three planes: the float MoE, `limb3`) and the same bits on a second call, the tuned configs included. A Triton kernel
that runs where the Gluon one must fails the test. Every output and scratch buffer is poisoned (NaN floats, 0x7F7F7F7F
words) before the kernel writes it.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dsv4.kernels_triton.moe_int8 import Prefetch
from tests.gpu.test_triton_gpu import (CLAMP, D, F_EXP, NVIDIA_SM90, _assert, _dequant64, _moe_problem,  # noqa: F401
                                       _moe_reference, poison)
from tests.kernels.test_triton_moe_int8 import capture_h  # noqa: F401  (a fixture)

pytestmark = NVIDIA_SM90

# (rows, warps along K, prefetch, warps along rows): moe_int8.Int8GluonTile
TILES = [(2, 1, True, 1), (4, 1, False, 1), (4, 1, True, 1), (8, 1, False, 2), (8, 1, True, 2), (2, 2, False, 1),
         (16, 1, False, 4), (1, 1, True, 1)]
# (.., 2 warps along K, ..): FLAT down tiles at F = 2048, each warp its own slots (a step takes two)
DOWN_TILES = [(4, 1, True, 1), (4, 1, False, 1), (2, 1, True, 1), (1, 1, False, 1), (8, 1, True, 2), (16, 1, False, 4),
              (8, 2, False, 1), (4, 2, True, 1)]
# on three activation planes (quant_q8_k(limbs=3), 22-bit codes)
LIMB3_TILES = [(2, 1, False, 1), (2, 1, True, 1), (4, 1, False, 2), (8, 1, False, 4), (2, 2, False, 1)]
LIMB3_DOWN_TILES = [(4, 1, False, 1), (4, 1, False, 2), (2, 1, True, 1), (1, 1, False, 1), (8, 1, False, 4),
                    (8, 2, False, 1)]
GATE_UP_CASES = [(tile, 1) for tile in TILES] + [(tile, 3) for tile in LIMB3_TILES]
# the IQ2_XXS gate/up (q2 recipe) on its own kernel: one lane per 32-weight group, 1024 inputs per warp and step
ALL = Prefetch.ALL  # every K step's weight words before the PDL wait (4 steps at 1 warp along K, 2 at 2)
IQ2_GATE_UP_CASES = [((4, 1, True, 1), 1), ((4, 1, False, 1), 1), ((2, 1, True, 1), 1), ((8, 1, False, 2), 1),
                     ((4, 2, False, 1), 1), ((1, 1, False, 1), 1), ((16, 1, True, 4), 1), ((2, 1, True, 1), 3),
                     ((4, 1, False, 1), 3), ((4, 2, True, 2), 3), ((4, 4, False, 1), 3), ((2, 1, ALL, 1), 1),
                     ((4, 1, ALL, 2), 1), ((2, 2, ALL, 1), 1), ((2, 1, ALL, 1), 3), ((1, 1, ALL, 1), 3)]
ALL_GATE_UP_CASES = ([(tile, limbs, "q4") for tile, limbs in GATE_UP_CASES]
                     + [(tile, limbs, "q2") for tile, limbs in IQ2_GATE_UP_CASES])
# ALL on a down tile reads as NEXT (moe_int8_gluon._prefetch)
DOWN_CASES = ([(tile, 1) for tile in DOWN_TILES] + [(tile, 3) for tile in LIMB3_DOWN_TILES]
              + [((4, 1, ALL, 1), 3)])
# the Q2_K down stage (q2 recipe) on the same kernel, its own layout
Q2_DOWN_CASES = [((4, 1, True, 1), 1), ((4, 1, False, 1), 1), ((2, 1, True, 1), 1), ((8, 1, False, 2), 1),
                 ((16, 1, False, 4), 1), ((4, 1, False, 1), 3), ((2, 1, True, 1), 3), ((8, 1, False, 4), 3),
                 ((4, 2, True, 1), 1), ((4, 2, False, 1), 3), ((4, 2, ALL, 1), 1)]


def _ids(tiles):
    return [f"r{r}k{k}{f'w{w}' if w > 1 else ''}{'pfall' if p == ALL else 'pf' if p else ''}" for r, k, p, w in tiles]


def _case_ids(cases):
    return [f"{_ids([tile])[0]}-l{limbs}" for tile, limbs in cases]


@pytest.fixture
def poison_words(monkeypatch):
    from dsv4.kernels_triton import moe_int8

    monkeypatch.setattr(moe_int8, "empty_i32", lambda shape, device: torch.full(
        tuple(shape), 0x7F7F7F7F, device=device, dtype=torch.int32))


def _cfg(tile, fused: bool, down=None, recipe="q4"):
    from dsv4.kernels_triton import moe_int8
    from dsv4.quant.formats import QuantFormat

    fmt = QuantFormat.Q4_K if recipe == "q4" else QuantFormat.IQ2_XXS
    return replace(moe_int8.TUNED[fmt], gluon_gate_up=tile and moe_int8.Int8GluonTile(*tile),
                   gluon_down=down and moe_int8.Int8GluonTile(*down), fuse_quant_h=fused)


def _h_reference(raws, uq, sel, wts, iq2_order: bool = False):
    """float64 h [T*K, F] of the Q8_K activations uq (dequantized; iq2_order: codes in that order) through the
    selected experts' gate/up."""
    from dsv4.kernels_triton import moe_int8

    rg, ru, _, qg, _ = raws
    x = moe_int8.dequant_q8_k(uq[0], uq[1], iq2_order).double()
    T, K = sel.shape
    h = torch.empty((T * K, F_EXP), dtype=torch.float64, device="cuda")
    for t in range(T):
        for i in range(K):
            e = int(sel[t, i])
            g = torch.clamp(x[t] @ _dequant64(rg[e], qg, D).T, max=CLAMP)
            u = torch.clamp(x[t] @ _dequant64(ru[e], qg, D).T, -CLAMP, CLAMP)
            h[t * K + i] = torch.nn.functional.silu(g) * u * float(wts[t, i])
    return h


class _NoLaunch:
    """Stands in for a Triton kernel that must not run (the Gluon one must take the stage)."""

    def __getitem__(self, grid):
        raise AssertionError("a Triton kernel ran instead of the Gluon one")


def _no_triton(monkeypatch, *names):
    from dsv4.kernels_triton import moe_int8

    for name in names:
        monkeypatch.setattr(moe_int8, name, _NoLaunch())


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("tile,limbs,recipe", ALL_GATE_UP_CASES,
                         ids=[f"{recipe}-{_case_ids([(tile, limbs)])[0]}" for tile, limbs, recipe in ALL_GATE_UP_CASES])
def test_gluon_gate_up_h(t, tile, limbs, recipe, poison, poison_words, monkeypatch):
    from dsv4.kernels_triton import moe_int8

    raws, (gate, up, _), u, sel, wts = _moe_problem(recipe, t)
    iq2 = moe_int8.uses_iq2_order(gate)
    uq = moe_int8.quant_q8_k(u, iq2, limbs=limbs)
    _no_triton(monkeypatch, "_gate_up_int8_kernel")
    h = moe_int8.gate_up_int8(uq, gate, up, sel, wts, CLAMP, True, _cfg(tile, False, recipe=recipe), pdl=True)
    _assert(h, _h_reference(raws, uq, sel, wts, iq2), "triton_moe_int8", "stage",
            f"gluon h {recipe} T={t} {tile} {limbs}")


ALL_DOWN_CASES = [(tile, limbs, "q4") for tile, limbs in DOWN_CASES] + [(tile, limbs, "q2")
                                                                       for tile, limbs in Q2_DOWN_CASES]


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("tile,limbs,recipe", ALL_DOWN_CASES,
                         ids=[f"{recipe}-{_case_ids([(tile, limbs)])[0]}" for tile, limbs, recipe in ALL_DOWN_CASES])
def test_gluon_down(t, tile, limbs, recipe, poison, poison_words, monkeypatch):
    from dsv4.kernels_triton import moe_int8

    raws, (gate, up, down), u, sel, wts = _moe_problem(recipe, t)
    h = torch.randn((t * sel.shape[1], F_EXP), device="cuda") * 0.3
    hq3 = moe_int8.quant_q8_k(h, limbs=limbs)
    _no_triton(monkeypatch, "_down_int8_kernel")
    y = moe_int8.down_int8(hq3, down, sel, True, _cfg(None, False, tile, recipe), pdl=True)
    _assert(y, _down_reference(raws, hq3, sel), "triton_moe_int8", "stage",
            f"gluon down {recipe} T={t} {tile} {limbs}")


def _down_reference(raws, hq3, sel):
    """float64 [T, D]: the selected experts' down projections of quant_q8_k's h (one plane or three)."""
    from dsv4.kernels_triton import moe_int8

    _, _, rd, _, qd = raws
    T, K = sel.shape
    x = moe_int8.dequant_q8_k(hq3[0], hq3[1]).double().view(T, K, F_EXP)
    ref = torch.zeros((T, D), dtype=torch.float64, device="cuda")
    for e in torch.unique(sel).tolist():  # one expert dequantized at a time
        w = _dequant64(rd[e], qd, F_EXP)
        for tt, i in (sel == e).nonzero().tolist():
            ref[tt] += w @ x[tt, i]
    return ref


# fused: cfg.fuse_quant_h, which only the Triton gate/up follows (with a Gluon gate/up h has its own launch: the
# Triton gate/up kernel must not run)
END_TO_END = [((8, 1, False, 2), (4, 1, True, 1), False), ((8, 1, False, 2), (4, 1, True, 1), True),
              ((2, 1, True, 1), (16, 1, False, 4), True), ((4, 1, False, 1), (2, 1, True, 1), False),
              (None, (4, 1, True, 1), True)]


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("gate_up,down,fused", END_TO_END,
                         ids=[f"{_ids([g])[0] if g else 'triton'}-{_ids([d])[0]}{'-qh' if f else ''}"
                              for g, d, f in END_TO_END])
def test_gluon_moe_int8_end_to_end(t, gate_up, down, fused, poison, poison_words, monkeypatch):
    from dsv4.kernels_triton import moe_int8
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down_w), u, sel, wts = _moe_problem("q4", t)
    _no_triton(monkeypatch, "_down_int8_kernel", *(["_gate_up_int8_kernel"] if gate_up else []))
    cfg = _cfg(gate_up, fused, down)
    dev = detect_device("cuda")
    y = moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev, cfg)
    _assert(y, _moe_reference(raws, u, sel, wts, q8k=True), "triton_moe_int8", "end_to_end",
            f"gluon moe q4 T={t} {gate_up} {down}")
    assert torch.equal(y, moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev, cfg))


def test_tuned_q4_runs_the_gluon_stages(poison, poison_words, monkeypatch):
    """moe_int8's default (TUNED) q4 call on sm_90+: both Q4_K stages on the Gluon kernels, h quantized by its own
    launch, within `end_to_end` of the float64 reference and repeatable."""
    from dsv4.kernels_triton import moe_int8
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down_w), u, sel, wts = _moe_problem("q4", 1)
    _no_triton(monkeypatch, "_down_int8_kernel", "_gate_up_int8_kernel")
    dev = detect_device("cuda")
    y = moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev)
    _assert(y, _moe_reference(raws, u, sel, wts, q8k=True), "triton_moe_int8", "end_to_end", "tuned gluon moe q4")
    assert torch.equal(y, moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev))


@pytest.mark.parametrize("t", [1, 4])
def test_gluon_moe_three_planes_end_to_end(t, poison, poison_words, monkeypatch):
    """moe_int8 on fp32-grade activations (limbs=3, the CUDA decode default) with both Q4_K stages on the Gluon
    kernels: within the `limb3` tolerance of the float MoE in float64, and repeatable."""
    from dsv4.kernels_triton import moe_int8
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down_w), u, sel, wts = _moe_problem("q4", t)
    _no_triton(monkeypatch, "_down_int8_kernel", "_gate_up_int8_kernel")
    cfg = _cfg((2, 1, True, 1), False, (4, 1, False, 2))
    dev, L = detect_device("cuda"), moe_int8.LIMBS_FP32
    y = moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev, cfg, L)
    _assert(y, _moe_reference(raws, u, sel, wts), "triton_moe_int8", "limb3", f"gluon moe q4 limb3 T={t}")
    assert torch.equal(y, moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev, cfg, L))


def test_tuned_q4_three_planes_runs_the_gluon_stages(poison, poison_words, monkeypatch):
    """The CUDA decode default's q4 call (TUNED_LIMB3, three planes) on sm_90+: both Q4_K stages on the Gluon
    kernels, within `limb3` of the float MoE in float64."""
    from dsv4.kernels_triton import moe_int8
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down_w), u, sel, wts = _moe_problem("q4", 1)
    _no_triton(monkeypatch, "_down_int8_kernel", "_gate_up_int8_kernel")
    y = moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, detect_device("cuda"), limbs=moe_int8.LIMBS_FP32)
    _assert(y, _moe_reference(raws, u, sel, wts), "triton_moe_int8", "limb3", "tuned gluon moe q4 limb3")


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("limbs", [1, 3])
def test_gluon_down_q2_end_to_end(t, limbs, poison, poison_words, monkeypatch):
    """The q2 recipe's whole moe_int8 call with the Q2_K down stage on the Gluon kernel (the IQ2_XXS gate/up on
    Triton's): one plane within `end_to_end` of TorchOps(act_quant=True) in float64, three planes within `limb3`
    of the float MoE; repeatable."""
    from dsv4.kernels_triton import moe_int8
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down_w), u, sel, wts = _moe_problem("q2", t)
    _no_triton(monkeypatch, "_down_int8_kernel")
    cfg, dev = _cfg(None, False, (4, 1, True, 1), "q2"), detect_device("cuda")
    y = moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev, cfg, limbs)
    _assert(y, _moe_reference(raws, u, sel, wts, q8k=limbs == 1), "triton_moe_int8",
            "end_to_end" if limbs == 1 else "limb3", f"gluon down moe q2 T={t} limbs={limbs}")
    assert torch.equal(y, moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev, cfg, limbs))


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("limbs", [1, 3])
def test_gluon_q2_both_stages_end_to_end(t, limbs, poison, poison_words, monkeypatch):
    """The q2 recipe's whole moe_int8 call with the IQ2_XXS gate/up and the Q2_K down on the Gluon kernels (no Triton
    stage runs): one plane within `end_to_end` of TorchOps(act_quant=True) in float64, three planes within `limb3`
    of the float MoE; repeatable."""
    from dsv4.kernels_triton import moe_int8
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down_w), u, sel, wts = _moe_problem("q2", t)
    _no_triton(monkeypatch, "_down_int8_kernel", "_gate_up_int8_kernel")
    cfg, dev = _cfg((4, 1, True, 1), False, (4, 2, True, 1), "q2"), detect_device("cuda")
    y = moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev, cfg, limbs)
    _assert(y, _moe_reference(raws, u, sel, wts, q8k=limbs == 1), "triton_moe_int8",
            "end_to_end" if limbs == 1 else "limb3", f"gluon moe q2 T={t} limbs={limbs}")
    assert torch.equal(y, moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, dev, cfg, limbs))


@pytest.mark.parametrize("limbs", [1, 3])
def test_tuned_q2_runs_the_gluon_stages(limbs, poison, poison_words, monkeypatch):
    """moe_int8's default q2 calls on sm_90+ (TUNED one plane, TUNED_LIMB3 three): the IQ2_XXS gate/up and the Q2_K
    down stage on the Gluon kernels, within `end_to_end` / `limb3` of the float64 reference."""
    from dsv4.kernels_triton import moe_int8
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down_w), u, sel, wts = _moe_problem("q2", 1)
    _no_triton(monkeypatch, "_down_int8_kernel", "_gate_up_int8_kernel")
    y = moe_int8.fused_int8(u, gate, up, down_w, sel, wts, CLAMP, detect_device("cuda"), limbs=limbs)
    _assert(y, _moe_reference(raws, u, sel, wts, q8k=limbs == 1), "triton_moe_int8",
            "end_to_end" if limbs == 1 else "limb3", f"tuned gluon down moe q2 limbs={limbs}")


@pytest.mark.parametrize("recipe,f,k", [("q4", 256, 16), ("q2", 512, 8), ("q4", 1024, 8)])
def test_gluon_flat_down_narrow_experts(recipe, f, k, poison, poison_words, capture_h, monkeypatch):
    """A flat down tile (two warps along K: a 4096-input step) where F < 2048: one step spans 4096 / F slots
    (KSTEPS = F / 256 super-blocks per slot row); each stage against float64 on its own inputs (run_staged),
    the Triton down kernel must not run."""
    from dsv4.kernels_triton import moe_int8
    from dsv4.quant.formats import QuantFormat
    from tests.kernels.test_triton_moe_int8 import run_staged

    fmt = QuantFormat.Q4_K if recipe == "q4" else QuantFormat.IQ2_XXS
    cfg = replace(moe_int8.TUNED[fmt], gluon_gate_up=None, gluon_down=moe_int8.Int8GluonTile(4, warps_k=2))
    _no_triton(monkeypatch, "_down_int8_kernel")
    run_staged(recipe, k + 4, f, 512, 2, k, 31, capture_h, cfg)
