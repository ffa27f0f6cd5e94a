"""The Gluon register-A MoE prefill gate/up and down (dsv4/kernels_triton/moe_gluon.py) natively on an NVIDIA sm_90+
GPU.

Gluon has no interpreter, so these run only on the GPU (tools/gpu_check.sh); the CPU suite compiles the kernel
for sm_90 offline (tests/kernels/test_moe_gluon_compile.py). The routed MoE at Flash shapes with this gate/up
(then the tuned config's down: the Gluon one for the q2 recipe's Q2_K) or with this down (Q2_K and Q4_K, behind
the tuned gate/up), against the float64 reference of the dequantized experts (tolerance `grouped_v2`: the same
fp16 weights and activations, another fp32 summation order), with h and y NaN-poisoned before the kernels write
them; T = 37 (partial expert tiles) and 300, a repeated expert id in a
token's selection and an expert with no tokens (_moe_problem); the same bits on a second call. A race between
an MMA and the registers or shared buffers it reads would show as wrong or unrepeatable sums here and in
tools/probe_prefill.py's T=2048 comparison (an earlier form that kept A registers across steps did).
"""
from __future__ import annotations

import pytest
import torch

from tests.gpu.test_triton_gpu import CLAMP, NVIDIA_SM90, _assert, _moe_problem, _moe_reference, poison  # noqa: F401

pytestmark = NVIDIA_SM90


TILES = [(64, 128, True), (64, 128, False), (64, 64, True), (32, 64, False), (64, 256, False)]


def _check_gluon_stage(recipe, t, bm, tile, stage, monkeypatch):
    """The whole MoE with the Gluon `stage` ("gate_up" or "down") of tile `tile` at expert tiles of bm pairs, the
    Triton kernel of that stage patched to raise; against float64 and bitwise repeatable."""
    from dataclasses import replace

    from dsv4.kernels_triton import moe_gluon, moe_prefill
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down), u, sel, wts = _moe_problem(recipe, t)
    dev = detect_device("cuda")
    if stage == "gate_up":
        assert moe_gluon.supports(u, gate, up, dev, tile, bm)
        cfg = replace(moe_prefill.TUNED[gate.fmt], block_m=bm, rega=tile)
    else:
        assert moe_gluon.supports_down(u, down, dev, tile, bm)
        cfg = replace(moe_prefill.tuned_config(gate), block_m=bm, rega_down=tile)

    def no_triton(*args, **kwargs):
        raise AssertionError(f"the Triton {stage} ran instead of the Gluon one")

    monkeypatch.setattr(moe_prefill, f"{stage}_stage", no_triton)
    y = moe_prefill.grouped_v2(u, gate, up, down, sel, wts, CLAMP, dev, cfg)
    _assert(y, _moe_reference(raws, u, sel, wts), "triton_moe", "grouped_v2", f"moe {recipe} rega {stage} {tile} T={t}")
    assert torch.equal(y, moe_prefill.grouped_v2(u, gate, up, down, sel, wts, CLAMP, dev, cfg)), "not reproducible"


@pytest.mark.parametrize("recipe", ["q2", "q4"])
@pytest.mark.parametrize("t", [37, 300])
@pytest.mark.parametrize("bm,bk,pf", TILES, ids=[f"m{m}k{k}{'pf' if p else ''}" for m, k, p in TILES])
def test_rega_moe_flash_shapes(recipe, t, bm, bk, pf, poison, monkeypatch):
    from dsv4.kernels_triton import moe_gluon

    _check_gluon_stage(recipe, t, bm, moe_gluon.RegATile(bk, prefetch=pf), "gate_up", monkeypatch)


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_tuned_prefill_takes_the_gluon_gate_up(recipe):
    """moe's auto path above the decode sizes (grouped_v2_default) runs the Gluon gate/up and down for the q2 recipe
    here; for Q4_K the Triton kernels stay (faster on the H200: tools/results/h200_prefill/11f, 15)."""
    from dsv4.kernels_triton import moe_gluon, moe_prefill
    from dsv4.kernels_triton.configs import detect_device

    _, (gate, up, _down), u, _sel, _wts = _moe_problem(recipe, 8)
    cfg = moe_prefill.tuned_config(gate)
    if recipe == "q4":
        assert cfg.rega is None and cfg.rega_down is None
        return
    assert cfg.rega is not None  # with cfg.block_m: the expert tiles' height is the config's one field now
    assert moe_gluon.supports(u, gate, up, detect_device("cuda"), cfg.rega, cfg.block_m)
    h = torch.empty((1, _down.shape[2]), device="cuda", dtype=torch.float16)
    assert cfg.rega_down is not None and moe_gluon.supports_down(h, _down, detect_device("cuda"), cfg.rega_down,
                                                                 cfg.block_m)


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_rega_h_equals_triton_weights(recipe):
    """h of the Gluon gate/up against moe_prefill's gate/up stage (the same fp16 weights: the two differ only in
    fp32 summation order, so far below the end-to-end tolerance)."""
    from dataclasses import replace

    from dsv4.kernels_triton import moe, moe_gluon, moe_prefill
    from dsv4.kernels_triton.configs import detect_device

    _, (gate, up, _down), u, sel, wts = _moe_problem(recipe, 96)
    dev = detect_device("cuda")
    x16 = u.to(torch.float16)
    cfg = replace(moe_prefill.tuned_config(gate), rega=None)
    tiles = moe.expert_tiles(sel, gate.shape[0], cfg.block_m)
    ref = moe_prefill.gate_up_stage(x16, gate, up, wts, CLAMP, tiles, sel.shape[1], dev, cfg).float()
    h = moe_gluon.gate_up_stage(x16, gate, up, wts, CLAMP, tiles, sel.shape[1], cfg.block_m,
                                moe_gluon.RegATile()).float()
    assert torch.isfinite(h).all()
    _assert(h, ref.double(), "triton_moe", "rega_h", f"rega h vs moe_prefill h, {recipe} T=96")


@pytest.mark.parametrize("t", [37, 300])
@pytest.mark.parametrize("bk,pf", [(64, False), (64, True)])
def test_rega_smem_table(t, bk, pf, poison, monkeypatch):
    """The IQ2_XXS gate/up with its pair selectors gathered from the shared copy of the table (smem_table): the
    whole MoE against float64 (as above), and h bit for bit the global-table kernel's (the same selectors, the same
    summation order)."""
    from dsv4.kernels_triton import moe, moe_gluon, moe_prefill

    tile = moe_gluon.RegATile(bk, prefetch=pf, smem_table=True)
    _check_gluon_stage("q2", t, 64, tile, "gate_up", monkeypatch)
    _, (gate, up, _down), u, sel, wts = _moe_problem("q2", t)
    x16 = u.to(torch.float16)
    tiles = moe.expert_tiles(sel, gate.shape[0], 64)
    h_tab = moe_gluon.gate_up_stage(x16, gate, up, wts, CLAMP, tiles, sel.shape[1], 64, tile)
    h_glob = moe_gluon.gate_up_stage(x16, gate, up, wts, CLAMP, tiles, sel.shape[1], 64,
                                     moe_gluon.RegATile(bk, prefetch=pf))
    assert torch.isfinite(h_tab).all() and torch.equal(h_tab, h_glob)


@pytest.mark.parametrize("recipe", ["q2", "q4"])
@pytest.mark.parametrize("stage", ["gate_up", "down"])
def test_rega_register_cap(recipe, stage, poison, monkeypatch):
    """Both Gluon stages under an 80-register cap (three programs per SM; the tuned q2 down runs so), the whole MoE
    against float64 at T = 300."""
    from dsv4.kernels_triton import moe_gluon

    _check_gluon_stage(recipe, 300, 64, moe_gluon.RegATile(64, prefetch=False, maxnreg=80), stage, monkeypatch)


DOWN_TILES = [(64, 128, False), (64, 128, True), (64, 64, False), (32, 256, False)]


@pytest.mark.parametrize("recipe", ["q2", "q4"])
@pytest.mark.parametrize("t", [37, 300])
@pytest.mark.parametrize("bm,bk,pf", DOWN_TILES, ids=[f"m{m}k{k}{'pf' if p else ''}" for m, k, p in DOWN_TILES])
def test_rega_down_flash_shapes(recipe, t, bm, bk, pf, poison, monkeypatch):
    """The Gluon down (Q2_K or Q4_K experts) behind the tuned gate/up, the whole MoE against float64 (tolerance
    `grouped_v2`: the same fp16 weights as moe_prefill's down); y NaN-poisoned before the kernel writes it (the
    poison fixture); moe_prefill's Triton down must not run; the same bits on a second call."""
    from dsv4.kernels_triton import moe_gluon

    _check_gluon_stage(recipe, t, bm, moe_gluon.RegATile(bk, prefetch=pf), "down", monkeypatch)


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_rega_down_equals_triton_down(recipe):
    """y of the Gluon down against moe_prefill's down stage on the same h (the same fp16 weights: the two differ
    only in fp32 summation order)."""
    from dsv4.kernels_triton import moe, moe_gluon, moe_prefill
    from dsv4.kernels_triton.configs import detect_device

    _, (gate, _up, down), u, sel, _wts = _moe_problem(recipe, 96)
    dev = detect_device("cuda")
    cfg = moe_prefill.tuned_config(gate)
    tiles = moe.expert_tiles(sel, gate.shape[0], cfg.block_m)
    T, K = sel.shape
    h = (torch.randn((T * K, down.shape[2]), device="cuda") * 0.5).to(torch.float16)
    ref = moe_prefill.down_stage(h, down, tiles, T, K, dev, cfg)
    y = moe_gluon.down_stage(h, down, tiles, T, K, cfg.block_m, moe_gluon.RegATile(128, prefetch=False))
    assert torch.isfinite(y).all()
    _assert(y, ref.double(), "triton_moe", "rega_y", f"rega down y vs moe_prefill y, {recipe} T=96")

