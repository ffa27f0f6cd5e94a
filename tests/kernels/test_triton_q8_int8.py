"""q8_int8 (Q8_0 decode GEMV on dp4a int8 dots with Q8_0 activations) against float64 references that
round x to Q8_0 exactly like TorchOps(act_quant=True).qmatmul.

Interpreter mode without a GPU (the plain-Triton dp4a emulation). Cases: the quantizer bit-exact vs
TorchOps.quant_q8_0 (all-zero block, .5 ties, negative maxima, a row length that is not a multiple of the
quantizer's program); the GEMV at rows not a multiple of the tile, T=1, 5 and 8, several K steps per
program with and without prefetch, the grouped form, split-K (a DeviceInfo claiming a small GPU) summed in
fixed order and bitwise repeatable, extreme codes exact; T > 8 refused; TritonOps' ds4-exact mode routing
(decode to q8_int8, prefill to x rounded first). NaN-poisoned fp32 and garbage-filled int32 scratch.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4.kernels_triton import blocks, q8_int8, qmatmul, registry  # noqa: E402
from dsv4.kernels_triton.configs import DeviceInfo, Vendor, detect_device  # noqa: E402
from dsv4.quant.formats import QTensor, QuantFormat  # noqa: E402
from dsv4.reference import TorchOps  # noqa: E402
from tests.kernels.test_triton_qmatmul import (  # noqa: E402,F401
    DEVICE, assert_matches, make_weight, make_x, poison, reference)
from tests.tolerances import assert_close  # noqa: E402

Q8 = QuantFormat.Q8_0
SMALL_GPU = DeviceInfo(Vendor.NVIDIA, "sm_90", n_sm=2)  # only sizes the grid: few SMs -> split-K
GARBAGE = 0x5A3C7E11


@pytest.fixture
def poison_i32(monkeypatch):
    monkeypatch.setattr(q8_int8, "empty_i32",
                        lambda shape, device: torch.full(tuple(shape), GARBAGE, device=device, dtype=torch.int32))


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x as TorchOps(act_quant=True) feeds it to a Q8_0 matmul."""
    return TorchOps.quant_q8_0(x.detach().cpu().float())


def test_quantizer_bitexact(poison, poison_i32):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((3, 1120), generator=gen) * 3  # 35 blocks: the second quantizer program is partly masked
    x[0, 64:96] = 0.0  # all-zero block: d = 0, codes 0
    x[1, 0:32] = torch.tensor([127.0] + [v + 0.5 for v in range(-16, 15)])  # d = 1: exact .5 ties, half to even
    x[1, 32:64] = torch.tensor([-127.0] + [v - 0.5 for v in range(31)])  # negative maximum
    x[2, 1088:1120] = torch.arange(32) * -0.25  # largest |x| negative, products with .5 fractions
    q, d = q8_int8.quant_q8_0(x.to(DEVICE))
    xb = x.reshape(3, -1, 32)
    ref_d = xb.abs().amax(-1) / 127.0
    inv = torch.where(ref_d > 0, 1.0 / ref_d, torch.zeros_like(ref_d))
    ref_q = torch.round(xb * inv[:, :, None]).clamp(-127, 127).reshape(3, -1)
    codes = q.cpu().contiguous().view(torch.int8).to(torch.float32)
    assert_close(codes.numpy(), ref_q.numpy(), "triton_q8_int8", "bitexact", "Q8_0 codes")
    assert_close(d.cpu().numpy(), ref_d.numpy(), "triton_q8_int8", "bitexact", "Q8_0 scales")
    assert_close(q8_int8.dequant_q8_0(q.cpu(), d.cpu()).numpy(), TorchOps.quant_q8_0(x).numpy(),
                 "triton_q8_int8", "bitexact", "Q8_0 round trip vs TorchOps.quant_q8_0")
    assert float(d[0, 2]) == 0.0 and codes[1, 1:4].tolist() == [-16.0, -14.0, -14.0]  # -15.5 -> -16, -14.5 -> -14


def test_quantizer_refuses_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        q8_int8.quant_q8_0(torch.zeros((1, 40), device=DEVICE))


@pytest.mark.parametrize("n,k,t,groups,block_n,block_k,prefetch", [
    (37, 96, 1, 1, 8, 1024, True),   # K of 3 blocks: rows not 4-byte aligned, the float GEMV on rounded x
    (37, 128, 1, 1, 8, 1024, True),  # rows not a multiple of the tile, 4 blocks (one 128-code step)
    (37, 256, 5, 1, 4, 64, False),   # T=5 (token tile 8), 4 K steps per program
    (37, 256, 5, 1, 4, 64, True),    # the same with the next step prefetched
    (21, 128, 8, 1, 16, 64, True),   # T=8, a 16-row tile larger than the 21 rows' last tile
    (24, 128, 3, 2, 8, 128, False),  # grouped: x [T, 2, K], 12 rows per group (tile shrinks to 4)
    (24, 128, 1, 2, 8, 32, True),    # grouped, one token, 4 steps
])
def test_gemv_int8(n, k, t, groups, block_n, block_k, prefetch, poison, poison_i32):
    dw, w_ref = make_weight(Q8, (n, k), seed=n + k + t)
    x = make_x(t, k, groups) * 2
    y = q8_int8.gemv_int8(x, dw, detect_device(DEVICE), groups, block_n=block_n, block_k=block_k, prefetch=prefetch)
    assert y.shape == (t, n)
    assert_matches(y, reference(rounded(x), w_ref, groups), "triton_q8_int8", "gemv",
                   f"gemv_int8 n={n} k={k} T={t} G={groups}")


@pytest.mark.parametrize("t,groups", [(5, 1), (1, 2)])
def test_gemv_int8_x_broadcast(t, groups, poison, poison_i32):
    """x_full=False: x's words and scales loaded once per program as [1, NB, 4] and broadcast over rows."""
    dw, w_ref = make_weight(Q8, (24, 256), seed=t + groups)
    x = make_x(t, 256, groups)
    y = q8_int8.gemv_int8(x, dw, detect_device(DEVICE), groups, block_n=4, block_k=64, x_full=False)
    assert_matches(y, reference(rounded(x), w_ref, groups), "triton_q8_int8", "gemv", f"x broadcast T={t} G={groups}")


def test_gemv_int8_split_is_fixed_order(poison, poison_i32):
    """2 'SMs': 3 row tiles of 8 -> split-K 8 over 512 codes; the partials are summed pairwise by atomic
    exchanges in a fixed tree order and the exchange slots are zero again after each call, so a second call
    (also after one on other activations) gives the same bits."""
    dw, w_ref = make_weight(Q8, (24, 512), seed=6)
    x = make_x(2, 512)
    y = q8_int8.gemv_int8(x, dw, SMALL_GPU, 1, block_n=8, block_k=64)
    assert_matches(y, reference(rounded(x), w_ref), "triton_q8_int8", "gemv", "gemv_int8 split-K")
    x_other = make_x(2, 512) * -3.0
    y_other = q8_int8.gemv_int8(x_other, dw, SMALL_GPU, 1, block_n=8, block_k=64)
    assert_matches(y_other, reference(rounded(x_other), w_ref), "triton_q8_int8", "gemv", "split-K, other x")
    y2 = q8_int8.gemv_int8(x, dw, SMALL_GPU, 1, block_n=8, block_k=64)
    assert torch.equal(y.cpu(), y2.cpu())
    (launch,) = dw.plans.values()
    assert launch.slots.shape == (7, 2, 24) and not launch.slots.any()


def test_extreme_codes_exact(poison, poison_i32):
    """Weight codes -128/127 against x codes +-127 with unit scales: every block dot is an exact integer
    (|sum| up to 32 * 128 * 127), so the outputs are exact."""
    n, k = 4, 64
    raw = blocks.synthetic_raw(Q8, (n, k), seed=2).reshape(n, 2, 34)
    codes = torch.tensor([-128, 127] * 16, dtype=torch.int8)
    raw[:, :, 2:] = codes.view(torch.uint8)
    raw[:, :, :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    dw = blocks.to_device(raw.reshape(n, 68), Q8, (n, k), DEVICE)
    x = torch.tensor([[-127.0, 127.0] * 32]).to(DEVICE)  # d_x = 1, codes -127/127
    y = q8_int8.gemv_int8(x, dw, detect_device(DEVICE), 1, block_k=32)
    assert torch.equal(y.cpu(), torch.full((1, n), 32.0 * (128 * 127 + 127 * 127)))  # 32 pairs of codes


def test_refuses_prefill_and_other_formats(poison):
    dw, _ = make_weight(Q8, (8, 64), seed=1)
    with pytest.raises(ValueError, match="decode kernel"):
        q8_int8.gemv_int8(make_x(qmatmul.DECODE_MAX_T + 1, 64), dw, detect_device(DEVICE))
    d2, _ = make_weight(QuantFormat.Q2_K, (8, 256), seed=1)
    with pytest.raises(ValueError, match="Q8_0 weights"):
        q8_int8.gemv_int8(make_x(1, 256), d2, detect_device(DEVICE))


def test_registered_as_act_quant():
    v = registry.get(registry.KernelOp.QMATMUL, "q8_int8")
    assert v.act_quant and v.max_t == qmatmul.DECODE_MAX_T and v.supports(Q8) and not v.supports(QuantFormat.Q2_K)
    assert {w.name for w in registry.variants(registry.KernelOp.MOE) if w.act_quant} >= {"int8", "int8_base"}


@pytest.mark.parametrize("t,groups", [(1, 1), (3, 2), (20, 1), (20, 2)])
def test_tritonops_ds4_exact_mode(t, groups, poison, poison_i32, monkeypatch):
    """TritonOps(act_quant=True) Q8_0 matmuls keep TorchOps(act_quant=True)'s semantics: decode runs
    q8_int8, prefill rounds x first and runs the float kernel (q8_int8 not called)."""
    from dsv4.kernels_triton.ops import TritonOps

    n, k = 64, 128  # grouped: 32 rows per group (the grouped GEMM's tile)
    raw = blocks.synthetic_raw(Q8, (n, k), seed=t + groups).cpu().numpy()
    w = QTensor(raw, Q8, (n, k), name="w")
    calls = []
    orig = q8_int8.gemv_int8
    monkeypatch.setattr(q8_int8, "gemv_int8", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    tri = TritonOps(device=DEVICE, act_quant=True, kernels={"qmatmul": "auto_ieee"} if t > 8 else None)
    ref = TorchOps(device="cpu", act_quant=True, dtype=torch.float64)
    x = make_x(t, k, groups) * 2
    wt, wr = tri.prepare(w), ref.prepare(w)
    if groups == 1:
        y, r = tri.qmatmul(x, wt), ref.qmatmul(x.cpu().double(), wr)
    else:
        y, r = tri.qmatmul_grouped(x, wt, groups), ref.qmatmul_grouped(x.cpu().double(), wr, groups)
    assert calls == ([1] if t <= qmatmul.DECODE_MAX_T else [])
    assert_matches(y, r.numpy(), "triton_q8_int8", "gemv", f"TritonOps(act_quant) T={t} G={groups}")


def test_tritonops_ds4_exact_mode_on_rocm_rounds_x_first(poison, poison_i32, monkeypatch):
    """On ROCm (dp4a only emulated) the ds4-exact mode's Q8_0 decode rounds x and runs the float kernel."""
    from dsv4.kernels_triton.ops import TritonOps

    raw = blocks.synthetic_raw(Q8, (64, 128), seed=3).cpu().numpy()
    w = QTensor(raw, Q8, (64, 128), name="w")
    calls = []
    orig = q8_int8.gemv_int8
    monkeypatch.setattr(q8_int8, "gemv_int8", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    tri = TritonOps(device=DEVICE, act_quant=True)
    tri.device_info = DeviceInfo(Vendor.AMD, "gfx942", n_sm=4, wave=64)
    ref = TorchOps(device="cpu", act_quant=True, dtype=torch.float64)
    x = make_x(1, 128) * 2
    y = tri.qmatmul(x, tri.prepare(w))
    assert calls == []
    assert_matches(y, ref.qmatmul(x.cpu().double(), ref.prepare(w)).numpy(), "triton_q8_int8", "gemv",
                   "TritonOps(act_quant) on ROCm")
