"""qmatmul.gemm_fp8 (variant `gemm_fp8`): the Q8_0 prefill GEMM through an fp8 dot.

In the interpreter on CPU (natively on a GPU): the result against a float64 product of the very fp8 operands the
kernel should form (codes and power-of-two-scaled activations cast by torch, round to nearest even), both fp8
flavours (OCP e4m3 and CDNA3's e4m3fnuz), rows not a multiple of the tile, the grouped form, a token of zeros; the
in-kernel rounding helper against torch's casts; the fallbacks; which flavour each device gets. The sm_90 PTX path
offline (wgmma on e4m3). NaN-poisoned outputs.
"""
from __future__ import annotations

import functools
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv4.kernels_triton import qmatmul, registry  # noqa: E402
from dsv4.kernels_triton.configs import DeviceInfo, DotDtype, Vendor, detect_device, fp8_dot, select_gemm  # noqa: E402
from dsv4.kernels_triton.registry import KernelOp  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402
from tests.kernels.offline_compile import require_ptxas, run_compile_script  # noqa: E402
from tests.kernels.test_triton_qmatmul import (  # noqa: E402,F401
    DEVICE, assert_matches, make_weight, make_x, poison, reference)

Q8 = QuantFormat.Q8_0
TORCH_FP8 = {DotDtype.FP8_E4M3: torch.float8_e4m3fn, DotDtype.FP8_E4M3_FNUZ: torch.float8_e4m3fnuz}
FP8_MAX = {DotDtype.FP8_E4M3: 448.0, DotDtype.FP8_E4M3_FNUZ: 240.0}


@triton.jit
def _fp8_cast_kernel(x_ptr, y_ptr, DT: tl.constexpr):
    i = tl.arange(0, 16)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(DT).to(tl.float32))


@functools.cache
def interpreter_lowers(dot: DotDtype) -> bool:
    """Whether this Triton runs the flavour's fp8 type where the tests run (natively always): the interpreters of
    Triton 3.6 and 3.7 list fp8e4b8 but cannot lower it (their to_ir has no such branch; 3.8's and 3.9's do)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return True
    x = torch.arange(16, dtype=torch.float32) - 8.0  # exact in both flavours
    y = torch.full_like(x, float("nan"))
    try:
        _fp8_cast_kernel[(1,)](x, y, DT=qmatmul.tl_dot_dtype(dot))
    except Exception as e:  # noqa: BLE001 - InterpreterError or ValueError by Triton version
        if "fail to convert" not in str(e):
            raise
        return False
    return bool(torch.equal(x, y))


def fp8_reference(x: torch.Tensor, dw, dot: DotDtype, groups: int = 1) -> np.ndarray:
    """float64 sum over 32-code chunks of d * (x8 . q8), times each token's inverse scale: x8 = x * 2^e_t cast to
    fp8 (e_t: the largest power of two keeping max |x_t| within the flavour's range), q8 = codes cast to fp8."""
    x = x.detach().cpu()
    rows, k = dw.n_rows, dw.k
    nb = k // 32
    # the repacked Q8_0 rows the kernel reads: k code bytes (w), then the block scales at off_s (s, fp16)
    q8 = dw.w.cpu().view(torch.int8)[:, :k].float().to(TORCH_FP8[dot]).double().reshape(rows, nb, 32)
    d = dw.s.cpu().view(torch.float16)[:, dw.off_s: dw.off_s + nb].double()
    t = x.shape[0]
    amax = x.abs().reshape(t, -1).amax(1).double()
    scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(FP8_MAX[dot] / amax.clamp_min(1e-30)))),
                        torch.ones_like(amax))
    x8 = (x.double() * scale.view(-1, *([1] * (x.dim() - 1)))).float().to(TORCH_FP8[dot]).double()
    xg = x8.reshape(t, groups, nb, 32)
    r = rows // groups
    w = (q8 * d[:, :, None]).reshape(groups, r, nb, 32)
    y = torch.einsum("tgbk,grbk->tgr", xg, w).reshape(t, rows)
    return (y / scale[:, None]).numpy()


@pytest.mark.parametrize("dot", [DotDtype.FP8_E4M3, DotDtype.FP8_E4M3_FNUZ])
@pytest.mark.parametrize("n,k,t,groups", [(48, 256, 37, 1), (37, 128, 21, 1), (32, 128, 9, 2)])
def test_gemm_fp8_matches_fp8_rounded_product(dot, n, k, t, groups, poison):
    """Both flavours, rows not a multiple of the 16-row tile, the grouped form; one token of zeros (scale 1)."""
    dw, w_ref = make_weight(Q8, (n, k), seed=n + k)
    x = make_x(t, k, groups) * 3.0
    x[1] = 0.0
    dev = detect_device(DEVICE)
    if dev.vendor == Vendor.NVIDIA and dot == DotDtype.FP8_E4M3_FNUZ:
        pytest.skip("e4m3fnuz dots are AMD's (CDNA3)")
    if not interpreter_lowers(dot):
        pytest.skip(f"this Triton's interpreter cannot lower {dot.value} (Triton 3.6, 3.7)")
    c = select_gemm(Q8, t, dw.n_rows, dw.k, dev)
    cfg = replace(c, dot=dot, block_k=max(32, c.block_k))
    y = qmatmul.gemm(x, dw, dev, groups, cfg)
    assert y.shape == (t, n) and torch.equal(y[1].cpu(), torch.zeros(n))
    assert_matches(y, fp8_reference(x, dw, dot, groups), "triton_gemm", "fp8_emulated", f"{dot.name} n={n} T={t}")
    # the fp8 rounding is the only loss against the exact product, and it stays within e4m3's bound
    assert_matches(y, reference(x, w_ref, groups), "triton_gemm", "fp8", f"{dot.name} vs exact")


@triton.jit
def _round_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # at module level: Triton 3.8's interpreter cannot rewrite a kernel defined inside a test function
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, qmatmul._round_e4m3(tl.load(v_ptr + i, mask=i < n, other=1.0)), mask=i < n)


def test_round_e4m3_is_torchs_cast():
    """The in-kernel rounding to 3 mantissa bits equals torch's round-to-nearest-even fp8 cast on every code and
    on ties, both flavours' normal ranges (so the kernel's cast to fp8 rounds nothing)."""
    ties = torch.tensor([17.0, 19.0, 34.0, 38.0, 68.0, 76.0, 120.0, 124.0, 1.0625, 0.515625, 200.0, 232.0])
    codes = torch.arange(-127, 128, dtype=torch.float32)
    v = torch.cat([codes[codes != 0], ties, -ties, torch.rand(500, generator=torch.Generator().manual_seed(1)) * 200])
    out = torch.full_like(v, float("nan")).to(DEVICE)
    _round_kernel[(triton.cdiv(v.numel(), 256),)](v.to(DEVICE), out, v.numel(), BLOCK=256)
    out = out.cpu()
    for dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        ok = v.abs() <= (240.0 if dtype == torch.float8_e4m3fnuz else 448.0)
        assert torch.equal(out[ok], v[ok].to(dtype).float()), dtype


def test_gemm_fp8_falls_back_where_it_does_not_apply(poison):
    """Decode-sized T runs the auto variant (the same bits); so does a device without an fp8 dot."""
    dev = detect_device(DEVICE)
    dw, _ = make_weight(Q8, (48, 256), seed=4)
    x1 = make_x(5, 256)
    assert torch.equal(qmatmul.gemm_fp8(x1, dw, dev).cpu(), qmatmul.qmatmul_auto(x1, dw, dev).cpu())
    no_fp8 = DeviceInfo(Vendor.AMD, "gfx1151", n_sm=40, wave=32)
    x = make_x(37, 256)
    assert torch.equal(qmatmul.gemm_fp8(x, dw, no_fp8).cpu(), qmatmul.qmatmul_auto(x, dw, no_fp8).cpu())
    v = registry.get(KernelOp.QMATMUL, "gemm_fp8")
    assert v.supports(Q8) and not v.supports(QuantFormat.Q4_K)


@pytest.mark.parametrize("dev,want", [
    (DeviceInfo(Vendor.AMD, "gfx942", n_sm=304, wave=64), DotDtype.FP8_E4M3_FNUZ),  # MI300: CDNA3's own flavour
    (DeviceInfo(Vendor.AMD, "gfx950", n_sm=256, wave=64), DotDtype.FP8_E4M3),  # MI350: OCP e4m3
    (DeviceInfo(Vendor.AMD, "gfx1151", n_sm=40, wave=32), None),  # Strix Halo: no fp8 WMMA
    (DeviceInfo(Vendor.NVIDIA, "sm_90", n_sm=132), DotDtype.FP8_E4M3),
    (DeviceInfo(Vendor.NVIDIA, "sm_89", n_sm=128), DotDtype.FP8_E4M3),
    (DeviceInfo(Vendor.NVIDIA, "sm_80", n_sm=108), None),  # A100: no fp8 tensor cores
    (DeviceInfo(Vendor.CPU, "cpu"), DotDtype.FP8_E4M3),  # the interpreter (tests)
])
def test_fp8_flavour_per_device(dev, want):
    """fp8_dot per device, and select_gemm(fp8=True) takes it (AMD through kernels_hip.hip_gemm's use_fp8), or
    keeps fp16 where there is none."""
    assert fp8_dot(dev) == want
    assert select_gemm(Q8, 2048, 4096, 4096, dev, fp8=True).dot == (want or DotDtype.FP16)
    assert select_gemm(Q8, 2048, 4096, 4096, dev).dot == DotDtype.FP16


_SM90_FP8 = r"""
import json, re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsv4.kernels_triton import qmatmul as m

fn = m._qgemm_kernel
sig = {n: "i32" for n in fn.arg_names}
sig.update(x_ptr="*fp8e4nv", w_ptr="*i8", s_ptr="*fp16", g_ptr="*i8", out_ptr="*fp32", xs_ptr="*fp32")
const = dict(FMT=8, DOT=tl.float8e4nv, IEEE=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, Q8_FAST=True, XS=True)
sig.update({k: "constexpr" for k in const})
src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
print("RESULT" + json.dumps(sorted(set(re.findall(r"wgmma\.mma_async\S*", k.asm["ptx"])))))
"""


def test_fp8_gemm_compiles_to_e4m3_wgmma_for_sm90():
    """The NVIDIA path of the fp8 GEMM through Triton and ptxas for sm_90 (no GPU needed): Hopper's fp8 wgmma."""
    require_ptxas()
    mmas = run_compile_script(_SM90_FP8)
    assert mmas and all(".e4m3.e4m3" in op for op in mmas), mmas
