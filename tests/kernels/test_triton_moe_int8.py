"""moe_int8 (routed-MoE decode on dp4a int8 dots with Q8_K activations) against float64 references
that round u and h to Q8_K exactly like TorchOps(act_quant=True).moe.

Interpreter mode without a GPU (the plain-Triton dp4a emulation; the PTX path only compiles on NVIDIA).
Cases: the Q8_K quantizer bit-exact vs TorchOps.quant_q8_k (all-zero block, |x| ties, .5 ties); the
dp4a emulation vs numpy on bytes including -128; q2 (IQ2_XXS/Q2_K) and q4 (Q4_K) at T=1 and T=5 with
the same expert twice for one token; each stage checked tightly (gate/up against Q8_K(u), down against
Q8_K of the kernel's own h) and end to end; row counts not a multiple of the tile; every registered
variant; NaN-poisoned fp32 and garbage-filled int32 scratch; bitwise-identical repeated runs; fallback.
"""
from __future__ import annotations

import os
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv4.kernels_triton import moe, moe_int8, registry  # noqa: E402
from dsv4.kernels_triton.configs import DeviceInfo, Vendor, detect_device  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402
from dsv4.reference import TorchOps  # noqa: E402
from tests.kernels.offline_compile import require_ptxas, run_compile_script  # noqa: E402
from tests.kernels.test_triton_moe import CLAMP, make_problem  # noqa: E402
from tests.kernels.test_triton_qmatmul import DEVICE, assert_matches, poison  # noqa: E402,F401
from tests.tolerances import assert_close  # noqa: E402

GARBAGE = 0x7F3A5C11  # int32 scratch fill: any word the kernels fail to write shows up as wrong codes


@pytest.fixture
def poison_i32(monkeypatch):
    def garbage_i32(shape, device):
        return torch.full(tuple(shape), GARBAGE, device=device, dtype=torch.int32)

    monkeypatch.setattr(moe_int8, "empty_i32", garbage_i32)


@pytest.fixture
def capture_h(monkeypatch):
    """Records every input of moe_int8.quant_q8_k: [u, h] for one fused_int8 call. Where the gate/up kernel
    quantizes h itself (fuse_quant_h), h is the same kernel's output with quant_h off (the same tile and sums:
    test_fused_quant_h_exact checks that its Q8_K equals quant_q8_k of that h bit for bit)."""
    seen = []
    orig = moe_int8.quant_q8_k
    orig_gate_up = moe_int8.gate_up_int8

    def rec(x, **kw):
        seen.append(x.detach().clone())
        return orig(x, **kw)

    def rec_gate_up(*args, quant_h=0, **kw):
        if quant_h:
            seen.append(orig_gate_up(*args, **kw).detach().clone())
        return orig_gate_up(*args, quant_h=quant_h, **kw)

    monkeypatch.setattr(moe_int8, "quant_q8_k", rec)
    monkeypatch.setattr(moe_int8, "gate_up_int8", rec_gate_up)
    return seen


def q8k(x: torch.Tensor) -> np.ndarray:
    return TorchOps.quant_q8_k(x.detach().cpu().float()).double().numpy()


def ref_h(u, wg, wu, sel, wts, clamp) -> np.ndarray:
    """float64 h [T*K, F] of TorchOps(act_quant=True).moe: gate/up on Q8_K(u), SwiGLU, route weight."""
    return swiglu_h(q8k(u), wg, wu, sel, wts, clamp)


def swiglu_h(ua: np.ndarray, wg, wu, sel, wts, clamp) -> np.ndarray:
    """float64 h [T*K, F]: gate/up of each slot's expert on the activations ua [T, D], SwiGLU, route weight."""
    sel, wts = sel.cpu().numpy(), wts.detach().cpu().double().numpy()
    T, K = sel.shape
    h = np.zeros((T * K, wg.shape[1]))
    for t in range(T):
        for i in range(K):
            e = sel[t, i]
            g = np.minimum(wg[e] @ ua[t], clamp)
            up = np.clip(wu[e] @ ua[t], -clamp, clamp)
            h[t * K + i] = g / (1.0 + np.exp(-np.clip(g, -700, None))) * up * wts[t, i]
    return h


def ref_down(hq: np.ndarray, wd, sel) -> np.ndarray:
    """float64 out [T, D] = sum_i down[sel[t, i]] @ hq[t*K + i] (hq already Q8_K-rounded)."""
    sel = sel.cpu().numpy()
    T, K = sel.shape
    out = np.zeros((T, wd.shape[1]))
    for t in range(T):
        for i in range(K):
            out[t] += wd[sel[t, i]] @ hq[t * K + i]
    return out


def run_staged(recipe, e, f, d, t, k, seed, captured, cfg=None, fn=None):
    """Run fused_int8 (or a registered variant fn); check h and the output stage by stage."""
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem(recipe, e, f, d, t, k, seed)
    dev = detect_device(DEVICE)
    captured.clear()
    if fn is None:
        y = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev, cfg)
    else:
        y = fn(u, gate, up, down, sel, wts, CLAMP, dev)
    assert len(captured) == 2, "fused_int8 quantizes u and h"
    what = f"{recipe} E={e} F={f} D={d} T={t} K={k}"
    href = ref_h(u, wg, wu, sel, wts, CLAMP)
    assert_matches(captured[1], href, "triton_moe_int8", "stage", f"h {what}")
    assert_matches(y, ref_down(q8k(captured[1]), wd, sel), "triton_moe_int8", "stage", f"out {what}")
    return y, ref_down(q8k(torch.from_numpy(href).float()), wd, sel)


# ---- Q8_K quantizer and dp4a emulation ------------------------------------------------------------

def torch_q8k_parts(x: torch.Tensor):
    """(codes, scales) of TorchOps.quant_q8_k, by the same formulas."""
    xb = x.float().reshape(x.shape[0], -1, 256)
    mx = torch.gather(xb, -1, xb.abs().argmax(-1, keepdim=True))
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(iscale * xb).clamp(max=127)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return q.reshape(x.shape[0], -1).to(torch.int64), d[:, :, 0]


def test_q8k_quantizer_bitexact(poison, poison_i32):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((3, 1024), generator=gen) * 4
    x[0, 256:512] = 0.0  # all-zero block: d = 0, codes 0
    x[1, 10], x[1, 200] = 40.0, -40.0  # |x| tie: the first (positive) one is max, so iscale < 0
    x[1, 300], x[1, 301] = -40.0, 40.0  # tie in block 1 led by the negative one
    x[2, 512:768] = torch.arange(256) * 0.5 - 64.0  # max -64 -> iscale 127/64: many exact .5 products
    x[2, 768:1024] = torch.tensor([-127.0] + [v + 0.5 for v in range(-127, 126)] + [0.5, 1.5])  # iscale 1: k+.5
    q, d, s = moe_int8.quant_q8_k(x.to(DEVICE))
    ref_q, ref_d = torch_q8k_parts(x)
    codes = q.cpu().contiguous().view(torch.int8).to(torch.int64)
    assert_close(codes.numpy(), ref_q.numpy(), "triton_moe_int8", "bitexact", "Q8_K codes")
    assert_close(d.cpu().numpy(), ref_d.numpy(), "triton_moe_int8", "bitexact", "Q8_K scales")
    assert_close(s.cpu().numpy(), ref_q.reshape(3, -1, 16).sum(-1).numpy(), "triton_moe_int8", "bitexact",
                 "Q8_K sums of 16")
    assert_close(moe_int8.dequant_q8_k(q.cpu(), d.cpu()).numpy(), TorchOps.quant_q8_k(x).numpy(),
                 "triton_moe_int8", "bitexact", "Q8_K round trip vs TorchOps.quant_q8_k")
    # ties exercised: +40 first gives d < 0, -40 first d > 0; the zero block d = 0
    assert float(d[1, 0]) == -float(d[1, 1]) < 0 and float(d[0, 1]) == 0.0


@triton.jit
def _dp4a_probe(a_ptr, b_ptr, c_ptr, o_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    r = moe_int8._dp4a(tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i), False)
    tl.store(o_ptr + i, r)


def test_dp4a_emulation_exact():
    gen = np.random.default_rng(3)
    a8 = gen.integers(-128, 128, (256, 4)).astype(np.int8)
    b8 = gen.integers(-128, 128, (256, 4)).astype(np.int8)
    a8[0], b8[0] = -128, -128  # extremes: 4 * 16384
    a8[1], b8[1] = -128, 127
    c = gen.integers(-2**20, 2**20, 256).astype(np.int32)
    expect = c.astype(np.int64) + (a8.astype(np.int64) * b8.astype(np.int64)).sum(1)
    tt = lambda v: torch.from_numpy(np.ascontiguousarray(v)).to(DEVICE)  # noqa: E731
    out = torch.empty(256, dtype=torch.int32, device=DEVICE)
    _dp4a_probe[(1,)](tt(a8.view(np.int32)[:, 0]), tt(b8.view(np.int32)[:, 0]), tt(c), out, N=256)
    assert_close(out.cpu().numpy(), expect, "triton_moe_int8", "bitexact", "dp4a emulation")


def test_asm_only_on_nvidia():
    x = torch.zeros(1)
    assert not moe_int8.use_asm(DeviceInfo(Vendor.CPU, "interpreter"), x)
    assert not moe_int8.use_asm(DeviceInfo(Vendor.AMD, "gfx942"), x)
    assert not moe_int8.use_asm(DeviceInfo(Vendor.NVIDIA, "sm_90"), x)  # a CPU tensor never takes PTX
    assert moe_int8.use_asm(DeviceInfo(Vendor.NVIDIA, "sm_90"), SimpleNamespace(is_cuda=True))


# ---- the MoE ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,t,k", [("q2", 1, 4), ("q2", 5, 3), ("q4", 1, 4), ("q4", 5, 3)])
def test_fused_int8(recipe, t, k, poison, poison_i32, capture_h):
    y, ref = run_staged(recipe, 4, 256, 1024, t, k, seed=40 + t, captured=capture_h)
    assert_matches(y, ref, "triton_moe_int8", "end_to_end", f"{recipe} T={t} vs TorchOps(act_quant) float64")


@pytest.mark.parametrize("recipe,f,d", [("q2", 768, 1536), ("q4", 768, 768)])
@pytest.mark.skipif(DEVICE != "cpu", reason="row counts are multiples of 256, so only the interpreter's "
                    "> 256-row tiles leave a remainder (too large to compile natively)")
def test_rows_not_multiple_of_tile(recipe, f, d, poison, poison_i32, capture_h):
    """512-row gate/up and 1024/512-row down tiles over 768 and 1536/768 rows (odd block counts too)."""
    cfg = moe_int8.Int8MoeConfig(block_n_gate_up=512, kstep_gate_up=4, block_n_down=1024 if d > 1024 else 512,
                                 kstep_down=4, cpu_widen=False)
    run_staged(recipe, 3, f, d, 2, 2, seed=50, captured=capture_h, cfg=cfg)


@pytest.mark.parametrize("name", sorted(moe_int8.CONFIGS))
@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_registered_variants(name, recipe, poison, poison_i32, capture_h):
    v = registry.get(registry.KernelOp.MOE, name)
    assert v.max_t == 8 and v.supports(moe_int8.QuantFormat.IQ2_XXS) and v.supports(moe_int8.QuantFormat.Q4_K)
    run_staged(recipe, 3, 512, 2048, 2, 2, seed=60, captured=capture_h, fn=v.fn)


def test_repeatable_bitwise(poison, poison_i32):
    (gate, up, down, u, sel, wts), _ = make_problem("q2", 4, 256, 512, 3, 3, seed=70)
    dev = detect_device(DEVICE)
    y1 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev)
    y2 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev)
    assert torch.isfinite(y1).all()
    assert torch.equal(y1.view(torch.int32), y2.view(torch.int32))


@pytest.mark.skipif(DEVICE == "cpu", reason="the 16-byte activation loads are PTX (blocks.load4): on the "
                    "interpreter x_vec reads words one by one, the path every other test runs")
@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_x_vec_bitwise(recipe, poison, poison_i32):
    """x_vec_gate_up / x_vec_down read the same activation words and code sums by 16-byte loads, and scale_vec_*
    the same Q4_K d|dmin and scale words: with the same tiles the output is bitwise the word-load output (and
    finite)."""
    (gate, up, down, u, sel, wts), _ = make_problem(recipe, 4, 256, 1024, 3, 3, seed=71)
    dev = detect_device(DEVICE)
    base = replace(moe_int8.TUNED[gate.fmt], x_vec_gate_up=False, x_vec_down=False,
                   scale_vec_gate_up=False, scale_vec_down=False)
    y0 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev, base)
    y1 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev,
                             replace(base, x_vec_gate_up=True, x_vec_down=True))
    y2 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev,
                             replace(base, scale_vec_gate_up=True, scale_vec_down=True))
    assert torch.isfinite(y0).all()
    assert torch.equal(y0.view(torch.int32), y1.view(torch.int32))
    assert torch.equal(y0.view(torch.int32), y2.view(torch.int32))


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_unroll_down_bitwise(recipe, poison, poison_i32):
    """unroll_down runs the same (slot, K step) terms in the same order as the down loop, unrolled: the output
    is bitwise the looped one (and finite); K = 3 slots, two K steps each."""
    (gate, up, down, u, sel, wts), _ = make_problem(recipe, 4, 512, 512, 2, 3, seed=72)
    dev = detect_device(DEVICE)
    base = replace(moe_int8.TUNED[gate.fmt], kstep_down=1, unroll_down=False)
    y0 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev, base)
    y1 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev, replace(base, unroll_down=True))
    assert torch.isfinite(y0).all()
    assert torch.equal(y0.view(torch.int32), y1.view(torch.int32))


@pytest.mark.parametrize("recipe,limbs", [("q2", 1), ("q4", 1), ("q2", 3), ("q4", 3)])
def test_fused_quant_h_exact(recipe, limbs, poison, poison_i32):
    """fuse_quant_h: with two gate/up programs per 256-block (the later one quantizes), the kernel's own Q8_K of h
    (codes, scales, sums; one plane and three) is quant_q8_k of its h bit for bit, the arrival counters are back
    at zero after each call, and the whole call is bitwise the unfused one, twice."""
    (gate, up, down, u, sel, wts), _ = make_problem(recipe, 3, 256, 512, 1, 2, seed=73)
    dev = detect_device(DEVICE)
    asm = moe_int8.use_asm(dev, u)
    cfg = moe_int8.Int8MoeConfig(block_n_gate_up=128, kstep_gate_up=1, warps_gate_up=4, block_n_down=256,
                                 kstep_down=1, cpu_widen=False)
    fused = replace(cfg, fuse_quant_h=True)
    assert moe_int8.fuses_quant_h(fused) and not moe_int8.fuses_quant_h(cfg)
    uq = moe_int8.quant_q8_k(u, iq2_order=moe_int8.uses_iq2_order(gate), limbs=limbs)
    h = moe_int8.gate_up_int8(uq, gate, up, sel, wts, CLAMP, asm, cfg)
    assert torch.isfinite(h).all()
    counters = moe_int8.block_counters(gate, 1)
    for _ in range(2):
        got = moe_int8.gate_up_int8(uq, gate, up, sel, wts, CLAMP, asm, fused, quant_h=limbs)
        want = moe_int8.quant_q8_k(h, limbs=limbs)
        for name, g, w in zip(("codes", "scales", "sums"), got, want):
            assert g.shape == w.shape and torch.equal(g.view(torch.int32), w.view(torch.int32)), name
        assert not counters.any(), "every 256-block's last program resets its counter"
    y0 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev, cfg, limbs)
    assert torch.isfinite(y0).all()
    for _ in range(2):
        y1 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev, fused, limbs)
        assert torch.equal(y0.view(torch.int32), y1.view(torch.int32))


def test_fused_quant_h_needs_a_dividing_tile():
    """A gate/up tile that does not divide 256 keeps the quantizer launch (fused_int8) and is refused by name
    where the caller asks gate_up_int8 for the fused quantizer."""
    (gate, up, down, u, sel, wts), _ = make_problem("q4", 3, 256, 256, 1, 2, seed=74)
    cfg = moe_int8.Int8MoeConfig(block_n_gate_up=512, fuse_quant_h=True, cpu_widen=False)
    assert not moe_int8.fuses_quant_h(cfg)
    uq = moe_int8.quant_q8_k(u)
    with pytest.raises(ValueError, match="fuse_quant_h"):
        moe_int8.gate_up_int8(uq, gate, up, sel, wts, CLAMP, False, cfg, quant_h=1)
    with pytest.raises(ValueError, match="limbs"):
        moe_int8.gate_up_int8(uq, gate, up, sel, wts, CLAMP, False, replace(cfg, block_n_gate_up=128), quant_h=2)


# ---- fp32-grade activations: three int8 planes (limbs=3, variant int8_limb3) ----------------------------

def torch_limb_parts(x: torch.Tensor):
    """(22-bit codes, hi-plane scales) of quant_q8_k(limbs=3) by the same fp32 ops: iscale = LIMB_MAX / max|x|
    (IEEE), q = rint(iscale x) clamped to +-LIMB_MAX, d = 65536 / iscale."""
    lim = float(moe_int8.LIMB_MAX_F.value)
    xb = x.float().reshape(x.shape[0], -1, 256)
    amax = xb.abs().amax(-1, keepdim=True)
    ones = torch.ones_like(amax)  # tensor / tensor: IEEE division (a Python number / tensor is a reciprocal product)
    iscale = torch.where(amax != 0, (lim * ones) / torch.where(amax != 0, amax, ones), torch.zeros_like(amax))
    q = torch.round(iscale * xb).clamp(-lim, lim)
    d = torch.where(amax != 0, (65536.0 * ones) / torch.where(amax != 0, iscale, ones), torch.zeros_like(amax))
    return q.reshape(x.shape[0], -1).to(torch.int64), d[:, :, 0]


@pytest.mark.parametrize("iq2_order", [False, True])
def test_limb_quantizer_exact(iq2_order, poison, poison_i32):
    """Three planes hi, mid, lo with q = 65536 hi + 256 mid + lo equal to the torch formula bit for bit, every
    plane a signed byte (hi within +-64), the sums of 16 as fp32 q sums / 65536, and the round trip within half a
    code (2^-23 of the block's max|x|) plus the fp32 rounding of the dequantized value; a zero block, a 2^90
    dynamic range and exact .5 products included."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn((3, 1024), generator=gen) * 4
    x[0, 256:512] = 0.0
    x[1, :256] *= torch.logspace(-9, 0, 256, base=2.0 ** 10).float()  # 2^-90 .. 1 in one block
    x[2, 512:768] = (torch.arange(256) - 128.0) * 0.5
    q, d, s = moe_int8.quant_q8_k(x.to(DEVICE), iq2_order=iq2_order, limbs=3)
    assert q.shape == (3, 3, 256)
    planes = [q[i].cpu().contiguous().view(torch.int8).to(torch.int64) for i in range(3)]
    if iq2_order:  # code j of each 8 is byte IQ2_ORDER[j]
        planes = [p.reshape(3, -1, 8)[:, :, list(moe_int8.IQ2_ORDER)].reshape(3, -1) for p in planes]
    assert int(planes[0].abs().max()) <= 64
    codes = planes[0] * 65536 + planes[1] * 256 + planes[2]
    ref_q, ref_d = torch_limb_parts(x)
    assert_close(codes.numpy(), ref_q.numpy(), "triton_moe_int8", "bitexact", "limb codes")
    assert_close(d.cpu().numpy(), ref_d.numpy(), "triton_moe_int8", "bitexact", "limb scales")
    sums = (ref_q.reshape(3, -1, 16).sum(-1).to(torch.float32) / 65536).numpy()
    assert_close(s.cpu().view(torch.float32).numpy(), sums, "triton_moe_int8", "bitexact", "limb sums of 16")
    back = moe_int8.dequant_q8_k(q.cpu(), d.cpu(), iq2_order).double()
    # half a code (max|x| / LIMB_MAX / 2) plus dequant_q8_k's fp32 rounding of the value (2^-24 of max|x|)
    bound = (x.abs().reshape(3, -1, 256).amax(-1, keepdim=True).double() * 0.751 * 2.0 ** -22).expand(3, 4, 256)
    assert torch.all((back - x.double()).abs() <= bound.reshape(3, -1))


def ref_float(u, wg, wu, wd, sel, wts, clamp):
    """float64 (h [T*K, F], out [T, D]) of the float MoE (no activation rounding)."""
    h = swiglu_h(u.detach().cpu().double().numpy(), wg, wu, sel, wts, clamp)
    return h, ref_down(h, wd, sel)


@pytest.mark.parametrize("recipe,t,k", [("q2", 1, 4), ("q2", 5, 3), ("q4", 1, 4), ("q4", 5, 3)])
def test_limb3_float_semantics(recipe, t, k, poison, poison_i32, capture_h):
    """The registered int8_limb3 matches the float MoE (u and h unrounded) in float64 within the fp32 decode
    tolerance, stage by stage; Q8_K activations (the int8 variant) miss that tolerance on the same problem by
    orders of magnitude, so the two extra planes are what the match rests on."""
    (gate, up, down, u, sel, wts), (wg, wu, wd) = make_problem(recipe, 4, 256, 1024, t, k, seed=90 + t)
    dev = detect_device(DEVICE)
    v = registry.get(registry.KernelOp.MOE, "int8_limb3")
    assert not v.act_quant and v.max_t == moe_int8.MAX_T
    capture_h.clear()
    y = v.fn(u, gate, up, down, sel, wts, CLAMP, dev)
    assert len(capture_h) == 2
    href, yref = ref_float(u, wg, wu, wd, sel, wts, CLAMP)
    what = f"int8_limb3 {recipe} T={t} K={k}"
    assert_matches(capture_h[1], href, "triton_moe_int8", "limb3", f"h {what}")
    assert_matches(y, yref, "triton_moe_int8", "limb3", f"out {what}")
    y8 = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev)
    err = lambda a: float(np.abs(a.detach().cpu().double().numpy() - yref).max() / np.abs(yref).max())  # noqa: E731
    assert err(y8) > 30 * max(err(y), 1e-9), (err(y8), err(y))


def test_other_formats_fall_back(poison):
    """Q8_0 experts are not taken: the call is moe.fused_blockdot's, bit for bit."""
    (gate, up, down, u, sel, wts), _ = make_problem("q8", 3, 64, 64, 2, 2, seed=80)
    dev = detect_device(DEVICE)
    y = moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev)
    ref = moe.fused_blockdot(u, gate, up, down, sel, wts, CLAMP, dev)
    assert torch.equal(y.view(torch.int32), ref.view(torch.int32))


# ---- the PTX path, compiled offline for sm_90 (no GPU needed: Triton's bundled ptxas) ----------------

_SM90_COMPILE = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsv4.kernels_triton import moe_int8 as m

def comp(fn, sig, const, options=None):
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options or {"num_warps": 4})
    ptx = k.asm["ptx"]
    blocks = [b.split("// end inline asm")[0] for b in ptx.split("// begin inline asm")[1:]]
    code = ["".join(ln for ln in b.splitlines() if not ln.strip().startswith((".loc", "//"))) for b in blocks]
    return {"asm_blocks": sum(c.count(";") == 1 for c in code if "dp4a" in c), "dp4a": ptx.count("dp4a.s32.s32"),
            "fma": ptx.count("fma.rn.f32"), "div_rn": ptx.count("div.rn.f32"), "cubin": len(k.asm["cubin"]),
            "prmt_asm": sum(c.count(";") == 1 for c in code if "prmt.b32" in c),
            "gdc": ptx.count("griddepcontrol.wait") + ptx.count("griddepcontrol.launch_dependents"),
            "mul_rn": sum(c.count(";") == 1 for c in code if "mul.rn.f32" in c), "atom": ptx.count("atom."),
            "v4": ptx.count("ld.global.v4.b32")}

i32, f32 = "i32", "fp32"
gu = dict(xq_ptr="*i32", xd_ptr="*fp32", xs_ptr="*i32", sel_ptr="*i64", wts_ptr="*fp32", h_ptr="*fp32",
          gw_ptr="*i32", uw_ptr="*i32", sel16_ptr="*i16", hq_ptr="*i32", hd_ptr="*fp32", hs_ptr="*i32",
          cnt_ptr="*i32", F=i32, D=i32, KSEL=i32, clamp=f32, stride_w=i32,
          stride_xq=i32, stride_xd=i32, stride_xs=i32, stride_ht=i32, stride_xl=i32, stride_hq=i32, stride_hd=i32,
          stride_hs=i32, stride_hl=i32, FMT="constexpr",
          BLOCK_N="constexpr", KSTEP="constexpr", ASM="constexpr", PF="constexpr",
          PDL="constexpr", XV="constexpr", SV="constexpr", LIMBS="constexpr", QH="constexpr")
dn = dict(hq_ptr="*i32", hd_ptr="*fp32", hs_ptr="*i32", sel_ptr="*i64", out_ptr="*fp32", w_ptr="*i32", F=i32,
          D=i32, KSEL=i32, stride_w=i32, stride_hq=i32, stride_hd=i32, stride_hs=i32, stride_ot=i32, stride_hl=i32,
          FMT="constexpr", BLOCK_N="constexpr", KSTEP="constexpr", ASM="constexpr",
          PF="constexpr", PDL="constexpr", XV="constexpr", SV="constexpr", STEPS="constexpr", LIMBS="constexpr")
qt = dict(x_ptr="*fp32", q_ptr="*i32", d_ptr="*fp32", s_ptr="*i32", stride_x=i32, stride_q=i32, stride_d=i32,
          stride_s=i32, stride_ql=i32, IQ2_ORDER="constexpr", PDL="constexpr", LIMBS="constexpr")
c = m.Int8MoeConfig()
out = {
    "quant": comp(m._q8k_quant_kernel, qt, dict(IQ2_ORDER=True, PDL=True, LIMBS=1), m.QUANT_LAUNCH),
    "quant_limb3": comp(m._q8k_quant_kernel, qt, dict(IQ2_ORDER=True, PDL=True, LIMBS=3), m.QUANT_LAUNCH),
    "gate_up_iq2": comp(m._gate_up_int8_kernel, gu, dict(FMT=16, BLOCK_N=c.block_n_gate_up,
                        KSTEP=c.kstep_gate_up, ASM=True, PF=c.prefetch_gate_up, PDL=True, XV=True,
                        SV=False, LIMBS=1, QH=False)),
    "gate_up_q4k": comp(m._gate_up_int8_kernel, gu, dict(FMT=12, BLOCK_N=c.block_n_gate_up,
                        KSTEP=c.kstep_gate_up, ASM=True, PF=c.prefetch_gate_up, PDL=True, XV=True,
                        SV=True, LIMBS=1, QH=False)),
    "down_q2k": comp(m._down_int8_kernel, dn, dict(FMT=10, BLOCK_N=c.block_n_down, KSTEP=c.kstep_down,
                     ASM=True, PF=c.prefetch_down, PDL=True, XV=True, SV=False, STEPS=0, LIMBS=1)),
    "down_q4k": comp(m._down_int8_kernel, dn, dict(FMT=12, BLOCK_N=c.block_n_down, KSTEP=c.kstep_down,
                     ASM=True, PF=c.prefetch_down, PDL=True, XV=True, SV=True, STEPS=0, LIMBS=1)),
}
for name in ("gate_up_iq2", "gate_up_q4k", "down_q2k", "down_q4k"):  # the same kernels on three planes
    fn = m._gate_up_int8_kernel if name.startswith("gate") else m._down_int8_kernel
    sig = gu if name.startswith("gate") else dn
    cx = dict(FMT={"gate_up_iq2": 16, "gate_up_q4k": 12, "down_q2k": 10, "down_q4k": 12}[name], ASM=True, PDL=True,
              XV=True, SV=name.endswith("q4k"), LIMBS=3)
    if name.startswith("gate"):
        cx.update(BLOCK_N=c.block_n_gate_up, KSTEP=c.kstep_gate_up, PF=c.prefetch_gate_up, QH=False)
    else:
        cx.update(BLOCK_N=c.block_n_down, KSTEP=c.kstep_down, PF=c.prefetch_down, STEPS=0)
    out[name + "_limb3"] = comp(fn, sig, cx)
for limbs in (1, 3):  # h quantized in the gate/up kernel (fuse_quant_h): its products by mul.rn, never contracted
    out[f"gate_up_iq2_qh{limbs}"] = comp(m._gate_up_int8_kernel, gu, dict(
        FMT=16, BLOCK_N=4, KSTEP=2, ASM=True, PF=True, PDL=True, XV=False, SV=False, LIMBS=limbs, QH=True),
        {"num_warps": 1})
t = m.TUNED[m.QuantFormat.IQ2_XXS]  # the tuned Q2_K down kernel under its register cap
k = triton.compile(ASTSource(fn=m._down_int8_kernel, signature=dn, constexprs=dict(
    FMT=10, BLOCK_N=t.block_n_down, KSTEP=t.kstep_down, ASM=True, PF=False, PDL=True, XV=t.x_vec_down, SV=False,
    STEPS=6 * 2048 // (256 * t.kstep_down), LIMBS=1)), target=GPUTarget("cuda", 90, 32),  # Flash: 6 slots, F 2048
    options={"num_warps": t.warps_down, **m._maxnreg(t.maxnreg_down, True)})
ptx = k.asm["ptx"]
out["down_q2k_tuned_maxnreg"] = int(ptx.split(".maxnreg")[1].split()[0]) if ".maxnreg" in ptx else 0
print("RESULT" + json.dumps(out))
"""


def test_ptx_path_compiles_for_sm90():
    """The NVIDIA path (inline dp4a, prmt) through Triton and ptxas for sm_90 in a subprocess without the
    interpreter: every dp4a asm block is exactly one instruction, the quantizer has IEEE divisions and no
    FMA contraction (rint must see the rounded product, as torch does)."""
    require_ptxas()
    res = run_compile_script(_SM90_COMPILE, env_extra={"TRITON_DEFAULT_FP_FUSION": "1"})
    # the tuned Q2_K down kernel carries its register cap into the PTX (.maxnreg)
    assert res.pop("down_q2k_tuned_maxnreg") == moe_int8.TUNED[QuantFormat.IQ2_XXS].maxnreg_down == 128
    c = moe_int8.Int8MoeConfig()
    threads = 4 * 32
    per_thread = {  # dp4a per thread per K step: elements / threads x dots per element
        "gate_up_iq2": c.block_n_gate_up * c.kstep_gate_up * 8 * 2 * 2 // threads * 8,
        "gate_up_q4k": c.block_n_gate_up * c.kstep_gate_up * 32 * 2 // threads * 2,
        "down_q2k": c.block_n_down * c.kstep_down * 16 // threads * 4,
        "down_q4k": c.block_n_down * c.kstep_down * 32 // threads * 2,
    }
    for name, n in per_thread.items():
        assert res[name]["dp4a"] == res[name]["asm_blocks"] == n, (name, res[name])
        assert res[name + "_limb3"]["dp4a"] == res[name + "_limb3"]["asm_blocks"] == 3 * n, (name, res[name + "_limb3"])
        assert res[name]["cubin"] > 0 and res[name + "_limb3"]["cubin"] > 0
    for q in ("quant", "quant_limb3"):
        assert res[q]["fma"] == 0 and res[q]["div_rn"] >= 2 and res[q]["asm_blocks"] == 0, res[q]
    # the fused h quantizer: its 256 products per block (8 per lane of the one warp) as single mul.rn asm blocks,
    # IEEE divisions, the arrival counter's add and reset; the unfused kernels have neither
    for limbs in (1, 3):
        qh = res.pop(f"gate_up_iq2_qh{limbs}")
        assert qh["mul_rn"] == 256 // 32 and qh["div_rn"] >= 2 and qh["atom"] >= 2 and qh["gdc"] == 2, qh
    assert all(r["mul_rn"] == 0 and r["atom"] == 0 for r in res.values()), res
    # programmatic dependent launch: one wait and one launch_dependents per kernel
    assert all(r["gdc"] == 2 for r in res.values()), {k: r["gdc"] for k, r in res.items()}
    # the selector IQ2_XXS decode: one single-instruction prmt per dp4a (4 signed magnitudes each); three planes
    # reuse each decoded word
    assert res["gate_up_iq2"]["prmt_asm"] == res["gate_up_iq2_limb3"]["prmt_asm"] == per_thread["gate_up_iq2"]
    # x_vec: activation words (IQ2_XXS, Q2_K) and code sums (Q2_K, Q4_K) as 16-byte loads
    v4 = {k: r["v4"] for k, r in res.items()}
    assert all(n > 0 for name, n in v4.items() if not name.startswith("quant")), v4


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_tritonops_ds4_exact_mode_routes_decode_moe_to_int8(recipe, poison, poison_i32, monkeypatch):
    """TritonOps(act_quant=True).moe (the ds4-exact mode) runs moe_int8 for decode and matches
    TorchOps(act_quant=True).moe on the same QTensors; a prefill-sized call stays on the reference."""
    from dsv4.kernels_triton import blocks
    from dsv4.kernels_triton.ops import TritonOps
    from dsv4.quant.formats import QTensor

    fg, fd = {"q2": ("IQ2_XXS", "Q2_K"), "q4": ("Q4_K", "Q4_K")}[recipe]
    from dsv4.quant.formats import QuantFormat as QF

    e, f, d = 4, 256, 512

    def qt(fmt, shape, seed):
        raw = blocks.synthetic_raw(QF[fmt], shape, seed=seed).cpu().numpy()
        return QTensor(raw, QF[fmt], shape, name=f"{fmt}{seed}")

    gate, up, down = qt(fg, (e, f, d), 1), qt(fg, (e, f, d), 2), qt(fd, (e, d, f), 3)
    gen = torch.Generator().manual_seed(7)
    u = torch.randn((2, d), generator=gen) * 3
    sel = torch.tensor([[0, 2], [3, 3]])
    wts = torch.rand((2, 2), generator=gen)
    calls = []
    orig = moe_int8.fused_int8
    monkeypatch.setattr(moe_int8, "fused_int8", lambda *a, **k: calls.append(1) or orig(*a, **k))
    tri = TritonOps(device=DEVICE, act_quant=True)
    ref = TorchOps(device="cpu", act_quant=True, dtype=torch.float64)
    prepared = [tri.prepare(t) for t in (gate, up, down)]
    y = tri.moe(u.to(DEVICE), *prepared, sel.to(DEVICE), wts.to(DEVICE), CLAMP)
    assert calls == [1], "decode MoE in ds4-exact mode must run moe_int8"
    r = ref.moe(u.double(), *[ref.prepare(t) for t in (gate, up, down)], sel, wts.double(), CLAMP)
    assert_matches(y, r.numpy(), "triton_moe_int8", "end_to_end", f"TritonOps(act_quant) {recipe}")
    big = torch.randint(0, e, (moe_int8.MAX_T + 1, 2), generator=gen)
    tri.moe(torch.randn((moe_int8.MAX_T + 1, d), generator=gen).to(DEVICE), *prepared, big.to(DEVICE),
            torch.rand((moe_int8.MAX_T + 1, 2), generator=gen).to(DEVICE), CLAMP)
    assert calls == [1], "prefill-sized MoE in ds4-exact mode stays on the reference"


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_tuned_steps_and_prefetch(recipe, poison, poison_i32, capture_h):
    """The per-format H200 configs' K steps and prefetch (across K steps and, in the down projection, across
    slots) with interpreter-sized row tiles (the GPU tests run the small tiles natively): 4 IQ2 pairs /
    2 Q4_K blocks per row in 2 steps, down over 2 slots x 2 blocks."""
    fmt = moe_int8.QuantFormat.IQ2_XXS if recipe == "q2" else moe_int8.QuantFormat.Q4_K
    tuned = moe_int8.TUNED[fmt]
    cfg = replace(tuned, block_n_gate_up=64, block_n_down=256, cpu_widen=False,
                  kstep_gate_up=2 if recipe == "q2" else 1, kstep_down=1)
    assert tuned.prefetch_gate_up or tuned.prefetch_down
    run_staged(recipe, 3, 512, 2048 if recipe == "q2" else 512, 1, 2, seed=90, captured=capture_h, cfg=cfg)


def test_scale_vec_needs_16_byte_rows():
    """The 16-byte scale-word loads run only on word views whose every row starts 16-byte aligned; anything
    else keeps the word loads (a misaligned ld.global.v4 would fault)."""
    w = torch.zeros(2 * 36, dtype=torch.int32)
    assert moe_int8._aligned16(w, 36)
    assert not moe_int8._aligned16(w[1:], 36)  # base 4 bytes past an aligned allocation
    assert not moe_int8._aligned16(w, 35)  # rows of 140 bytes
