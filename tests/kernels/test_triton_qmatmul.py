"""Triton qmatmul kernels (GEMV, GEMM, grouped, split-K, every registered variant) against
dequantize_np-then-float64-matmul, for Q8_0, Q2_K, Q4_K, IQ2_XXS, F16, BF16, F32.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set here before the
kernels are imported) at small shapes: row counts that are not a multiple of the tile, T=1 and T=37,
explicit small tiles so several programs and split-K slices run. Outputs are NaN-poisoned.
The `check_*` functions are reused natively and at Flash shapes by tests/gpu/test_triton_gpu.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _require_interpreter() -> None:
    """triton.jit (tl.zeros included) picks interpreter vs compiler when triton is first imported; if
    something imported triton before TRITON_INTERPRET was set, CPU kernel runs cannot work."""
    import sys

    if torch.cuda.is_available() or "triton.language" not in sys.modules:
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in tests/conftest.py "
                    "(when no GPU is present) so CPU kernel tests run in the interpreter", pytrace=False)


_require_interpreter()

from dsv4.kernels_triton import blocks, qmatmul, registry  # noqa: E402
from dsv4.kernels_triton.configs import GemmConfig, GemvConfig, detect_device  # noqa: E402
from dsv4.quant.dequant import dequantize_np  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402
from dsv4.reference import TorchOps  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Q = QuantFormat
ALL_FORMATS = [Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.IQ2_XXS, Q.F16, Q.BF16, Q.F32]
# Smallest legal row length per format that still spans several blocks.
SMALL_K = {Q.Q8_0: 96, Q.Q2_K: 512, Q.Q4_K: 512, Q.IQ2_XXS: 512, Q.F16: 80, Q.BF16: 48, Q.F32: 40}


@pytest.fixture
def poison(monkeypatch):
    """Every output/scratch buffer the launchers allocate starts as NaN."""
    def nan_empty(shape, device):
        return torch.full(tuple(shape), float("nan"), device=device, dtype=torch.float32)

    monkeypatch.setattr(blocks, "empty", nan_empty)


def make_weight(fmt: QuantFormat, shape, seed: int, device=DEVICE):
    """(DeviceWeight, float64 numpy oracle of the dequantized weight)."""
    raw = blocks.synthetic_raw(fmt, tuple(shape), device=device, seed=seed)
    ref = dequantize_np(raw.cpu().numpy(), fmt, shape[-1]).astype(np.float64)
    return blocks.to_device(raw, fmt, tuple(shape), device), ref


def reference(x: torch.Tensor, w_ref: np.ndarray, groups: int = 1) -> np.ndarray:
    xd = x.detach().cpu().double().numpy()
    if groups == 1:
        return xd @ w_ref.T
    r = w_ref.shape[0] // groups
    return np.einsum("tgk,grk->tgr", xd, w_ref.reshape(groups, r, -1)).reshape(xd.shape[0], -1)


def assert_matches(y, ref, op: str, kind: str, what: str):
    """Compare relative to the largest |reference output| of the call (fp32/fp16 sum error scale)."""
    y = y.detach().cpu().double().numpy()
    scale = max(float(np.abs(ref).max()), 1e-30)
    assert_close(y / scale, ref / scale, op, kind, what)


def make_x(t: int, k: int, groups: int = 1, seed: int = 11, device=DEVICE):
    """Seeded standard-normal activations x [T, K] (or [T, G, K] for the grouped form)."""
    shape = (t, groups, k) if groups > 1 else (t, k)
    return torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed)).to(device)


def check_qmatmul(fmt, n, k, t, path: str, seed: int = 0, groups: int = 1, cfg=None, device=DEVICE):
    """One kernel call vs float64 dequantize-then-matmul; path is 'gemv' or 'gemm'."""
    dev = detect_device(device)
    dw, w_ref = make_weight(fmt, (n, k), seed, device)
    x = make_x(t, k, groups, seed + 1, device)
    if path == "gemv":
        y = qmatmul.gemv(x, dw, dev, groups, cfg=cfg)
    else:
        y = qmatmul.gemm(x, dw, dev, groups, cfg=cfg)
    kind = "fp32" if path == "gemv" else "fp16dot"
    assert_matches(y, reference(x, w_ref, groups), f"triton_{path}", kind, f"{fmt.name} {path} N={n} K={k} T={t} G={groups}")


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("t", [1, 5])
def test_gemv_default_config(fmt, t, poison):
    check_qmatmul(fmt, 37, SMALL_K[fmt], t, "gemv", seed=int(fmt) + t)


@pytest.mark.parametrize("fmt", [Q.Q8_0, Q.Q4_K, Q.IQ2_XXS, Q.Q2_K], ids=lambda f: f.name)
def test_gemv_small_tiles_split_k(fmt, poison):
    """Several row blocks (last one partial) and two K slices summed in order."""
    cfg = GemvConfig(block_n=16, block_k=16, num_warps=4, split_k=2)
    check_qmatmul(fmt, 37, SMALL_K[fmt], 3, "gemv", seed=11, cfg=cfg)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_gemm_t37(fmt, poison):
    cfg = GemmConfig(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=1)
    check_qmatmul(fmt, 37, min(SMALL_K[fmt], 256), 37, "gemm", seed=int(fmt), cfg=cfg)


@pytest.mark.parametrize("groups", [1, 2])
def test_gemv_dot_split_k(groups, poison):
    """The tl.dot decode path with split-K (two K slices summed in order), a partial row tile, T=3."""
    cfg = GemvConfig(block_n=16, block_k=64, num_warps=4, split_k=2, num_stages=1, dot_m=16)
    dev = detect_device(DEVICE)
    dw, w_ref = make_weight(Q.Q8_0, (96, 256) if groups == 2 else (37, 256), 23)
    shape = (3, groups, 256) if groups > 1 else (3, 256)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(24)).to(DEVICE)
    y = qmatmul.gemv_dot(x, dw, dev, groups, cfg=cfg)
    assert_matches(y, reference(x, w_ref, groups), "triton_gemm", "fp16dot", f"gemv_dot split 2 G={groups}")


@pytest.mark.parametrize("fmt", [Q.Q8_0, Q.IQ2_XXS], ids=lambda f: f.name)
@pytest.mark.parametrize("groups", [1, 2])
def test_gemm_dequant_chunks(fmt, groups, monkeypatch, poison):
    """Transient-dequant prefill path: three row chunks (last partial) or the grouped bmm layout."""
    monkeypatch.setattr(qmatmul, "DEQUANT_CHUNK_ROWS", 16)
    dev = detect_device(DEVICE)
    n, k = (40, 256) if groups == 1 else (64, 256)
    dw, w_ref = make_weight(fmt, (n, k), 31)
    x = torch.randn((19, groups, k) if groups > 1 else (19, k), generator=torch.Generator().manual_seed(32)).to(DEVICE)
    y = qmatmul.gemm_dequant(x, dw, dev, groups)
    assert_matches(y, reference(x, w_ref, groups), "triton_gemm", "fp16dot", f"gemm_dequant {fmt.name} G={groups}")


def test_gemm_q8_0_chunked_scales(poison):
    """The Q8_0 GEMM path that scales 32-wide code chunks per row (BLOCK_K a multiple of 32): a partial
    row tile (N=37), a partial token tile, two chunks per K step."""
    cfg = GemmConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=1)
    check_qmatmul(Q.Q8_0, 37, 128, 37, "gemm", seed=21, cfg=cfg)


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_grouped(path, poison):
    """attn_output_a layout: rows [g*R, (g+1)*R) use x[:, g]; two groups of 32 rows."""
    t = 2 if path == "gemv" else 37
    check_qmatmul(Q.Q8_0, 64, 96, t, path, seed=5, groups=2)


def test_every_registered_variant(poison):
    """Each qmatmul variant on the same problem (decode-only variants at T=3, the rest at T=20)."""
    dev = detect_device(DEVICE)
    dw, w_ref = make_weight(Q.Q8_0, (40, 64), 3)
    for v in registry.variants(registry.KernelOp.QMATMUL):
        t = 3 if v.max_t else 20
        x = torch.randn((t, 64), generator=torch.Generator().manual_seed(7)).to(DEVICE)
        y = v.fn(x, dw, dev, 1)
        # gemv_dot / gemm_dequant / gemm_f16w* feed tl.dot or cuBLAS with fp16 operands at every T
        fp16_always = v.name in ("gemv_dot", "gemm_dequant") or v.name.startswith("gemm_f16w")
        kind = "fp16dot" if (t > qmatmul.DECODE_MAX_T and v.name in ("auto", "gemm")) or fp16_always else "fp32"
        if v.name == "gemm_fp8" and t > qmatmul.DECODE_MAX_T:  # e4m3 operands (tests/kernels/test_triton_fp8.py)
            kind = "fp8"
        op = "triton_gemm" if kind in ("fp16dot", "fp8") else "triton_gemv"
        if v.act_quant:  # ds4's int8 scheme: x rounded to Q8_0 as TorchOps(act_quant=True) does
            x, op, kind = TorchOps.quant_q8_0(x.cpu()).to(DEVICE), "triton_q8_int8", "gemv"
        assert_matches(y, reference(x, w_ref), op, kind, f"variant {v.name}")


def test_q8_0_repack_is_lossless():
    """The Q8_0 device layout holds the same bytes: undoing the repack gives the GGUF rows back."""
    raw = blocks.synthetic_raw(Q.Q8_0, (5, 96), seed=9)
    packed = blocks.repack_q8_0(raw)
    nb = 3
    back = torch.cat([packed[:, 32 * nb:].reshape(5, nb, 2), packed[:, :32 * nb].reshape(5, nb, 32)], 2).reshape(5, -1)
    assert torch.equal(back, raw)
    assert torch.equal(torch.sort(packed.flatten())[0], torch.sort(raw.flatten())[0])


def test_scoped_override_and_unknown_name():
    op = registry.KernelOp.QMATMUL
    assert registry.resolve(op, Q.Q8_0).name == registry.AUTO
    with registry.use(qmatmul="gemm"):
        assert registry.resolve(op, Q.Q8_0).name == "gemm"
        with registry.use(qmatmul="gemv"):
            assert registry.resolve(op, Q.Q8_0).name == "gemv"
        assert registry.resolve(op, Q.Q8_0).name == "gemm"
    assert registry.resolve(op, Q.Q8_0, {op: "gemv"}).name == "gemv"
    with pytest.raises(ValueError, match="no qmatmul kernel named 'nope'"):
        with registry.use(qmatmul="nope"):
            pass


@pytest.mark.parametrize("t,groups", [(1, 1), (3, 1), (2, 2)])
def test_q8_0_blocked_gemv(t, groups, poison):
    """The block-dot Q8_0 GEMV variant: several row blocks, two K slices, grouped rows."""
    dev = detect_device(DEVICE)
    n = 64 if groups > 1 else 37
    dw, w_ref = make_weight(Q.Q8_0, (n, 256), 21 + t)
    x = torch.randn((t, groups, 256) if groups > 1 else (t, 256), generator=torch.Generator().manual_seed(t)).to(DEVICE)
    y = qmatmul.gemv_q8_0_blocked(x, dw, dev, groups, cfg=GemvConfig(block_n=16, block_k=64, num_warps=4, split_k=2))
    assert_matches(y, reference(x, w_ref, groups), "triton_gemv", "fp32", f"q8blk T={t} G={groups}")
