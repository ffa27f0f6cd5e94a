"""Triton kernels natively on a GPU at DeepSeek V4 Flash shapes (run by tools/gpu_check.sh).

Same checks as tests/kernels (which also run natively when a GPU is present) but at full size:
every Q8_0/F16 projection shape of model.md §3 for decode and prefill token counts, the routed MoE
with 256 experts (q2 and q4 recipes; the int8 decode against a reference with the Q8_K round trips of
TorchOps(act_quant=True)), and bitwise reproducibility of the MoE paths. The oracle is
dsv4.quant.dequant.dequantize_torch (bit-exact twin of dequantize_np) in float64 on the GPU, only for
the rows/experts a case touches. Outputs are NaN-poisoned. Skipped without a CUDA/ROCm device.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]
# the Gluon kernels' test files (q8_gluon, moe_gluon): NVIDIA sm_90+ only
NVIDIA_SM90 = [pytest.mark.cuda,
               pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None
                                  or torch.cuda.get_device_capability() < (9, 0), reason="needs an NVIDIA sm_90+ GPU")]

D, F_EXP, N_EXPERT, K_USED = 4096, 2048, 256, 6
CLAMP = 10.0

DENSE = [  # name, format, out, in, groups
    ("attn_q_a", "Q8_0", 1024, 4096, 1), ("attn_q_b", "Q8_0", 32768, 1024, 1), ("attn_kv", "Q8_0", 512, 4096, 1),
    ("attn_output_a", "Q8_0", 8192, 4096, 8), ("attn_output_b", "Q8_0", 4096, 8192, 1),
    ("ffn_down_shexp", "Q8_0", 4096, 2048, 1), ("output", "Q8_0", 129280, 4096, 1),
    ("attn_compressor_kv", "F16", 1024, 4096, 1), ("indexer.attn_q_b", "F16", 8192, 1024, 1),
    ("indexer.proj", "F16", 64, 4096, 1), ("hc_attn_fn", "F16", 24, 16384, 1),
]


@pytest.fixture
def poison(monkeypatch):
    """NaN in every fp32 output / scratch buffer of the launchers, and in moe_prefill's fp16 h."""
    from dsv4.kernels_triton import blocks, moe_prefill

    monkeypatch.setattr(blocks, "empty", lambda shape, device: torch.full(tuple(shape), float("nan"), device=device))
    monkeypatch.setattr(moe_prefill, "empty_f16", lambda shape, device: torch.full(
        tuple(shape), float("nan"), device=device, dtype=torch.float16))


def _weight(fmt_name, shape, seed):
    from dsv4.kernels_triton import blocks
    from dsv4.quant.formats import QuantFormat

    fmt = QuantFormat[fmt_name]
    raw = blocks.synthetic_raw(fmt, shape, device="cuda", seed=seed)
    return raw, blocks.to_device(raw, fmt, shape, "cuda"), fmt


def _dequant64(raw, fmt, k):
    from dsv4.quant.dequant import dequantize_torch

    return dequantize_torch(raw, fmt, k, dtype=torch.float64)


def _dense_reference(x64, w64, groups: int):
    """float64 x [T, K] (or [T, G, K]) against w64 [N, K] (rows [g*R, (g+1)*R) use x[:, g])."""
    if groups == 1:
        return x64 @ w64.T
    n, k = w64.shape
    return torch.einsum("tgk,grk->tgr", x64, w64.reshape(groups, n // groups, k)).reshape(x64.shape[0], n)


def _assert(y, ref, op, kind, what):
    from tests.tolerances import assert_close

    scale = float(ref.abs().max())
    assert_close((y.double() / scale).cpu().numpy(), (ref / scale).cpu().numpy(), op, kind, what)


@pytest.mark.parametrize("name,fmt,n,k,groups", DENSE, ids=[d[0] for d in DENSE])
@pytest.mark.parametrize("t", [1, 4, 2048])
def test_qmatmul_flash_shapes(name, fmt, n, k, groups, t, poison):
    from dsv4.kernels_triton import qmatmul
    from dsv4.kernels_triton.configs import detect_device

    if t == 2048 and name == "output":
        t = 256  # keeps the float64 reference small; the GEMM path is the same
    raw, dw, qf = _weight(fmt, (n, k), seed=n + k)
    dev = detect_device("cuda")
    x = torch.randn((t, groups, k) if groups > 1 else (t, k), device="cuda",
                    generator=torch.Generator(device="cuda").manual_seed(t))
    ref = _dense_reference(x.double(), _dequant64(raw, qf, k), groups)
    y = qmatmul.qmatmul_auto(x, dw, dev, groups)
    from dsv4.kernels_triton.configs import select_gemv

    # for 2..8 tokens the per-shape table may route Q8_0 decode through the fp16 tl.dot kernel
    # (qmatmul.gemv_dot); one token always takes the fp32 q8_gemv.gemv_rows on CUDA
    dot_decode = 1 < t <= qmatmul.DECODE_MAX_T and fmt == "Q8_0" and select_gemv(qf, n, k, dev, tokens=t).dot_m
    path = "gemv" if t <= qmatmul.DECODE_MAX_T and not dot_decode else "gemm"
    _assert(y, ref, f"triton_{path}", "fp32" if path == "gemv" else "fp16dot", f"{name} T={t}")


Q8_DENSE = [d for d in DENSE if d[1] == "Q8_0"]


@pytest.mark.parametrize("name,fmt,n,k,groups", Q8_DENSE, ids=[d[0] for d in Q8_DENSE])
@pytest.mark.parametrize("t", [1, 4])
def test_q8_int8_flash_shapes(name, fmt, n, k, groups, t, poison):
    """The ds4-exact mode's Q8_0 decode (q8_int8: Q8_0 activations, dp4a) natively with its tuned tiles
    (split-K ones included) against float64 of the Q8_0-rounded x; a repeated call gives the same bits."""
    from dsv4.kernels_triton import q8_int8
    from dsv4.kernels_triton.configs import detect_device
    from dsv4.reference import TorchOps

    raw, dw, qf = _weight(fmt, (n, k), seed=n + k + 1)
    x = torch.randn((t, groups, k) if groups > 1 else (t, k), device="cuda",
                    generator=torch.Generator(device="cuda").manual_seed(t + 1)) * 2
    ref = _dense_reference(TorchOps.quant_q8_0(x).double(), _dequant64(raw, qf, k), groups)
    y = q8_int8.gemv_int8_default(x, dw, detect_device("cuda"), groups)
    _assert(y, ref, "triton_q8_int8", "gemv", f"{name} T={t}")
    assert torch.equal(y, q8_int8.gemv_int8_default(x, dw, detect_device("cuda"), groups))


def _moe_problem(recipe, t, seed=0):
    from dsv4.quant.formats import QuantFormat

    fg, fd = {"q2": ("IQ2_XXS", "Q2_K"), "q4": ("Q4_K", "Q4_K")}[recipe]
    rg, gate, qg = _weight(fg, (N_EXPERT, F_EXP, D), seed + 1)
    ru, up, _ = _weight(fg, (N_EXPERT, F_EXP, D), seed + 2)
    rd, down, qd = _weight(fd, (N_EXPERT, D, F_EXP), seed + 3)
    gen = torch.Generator().manual_seed(seed)
    sel = torch.stack([torch.randperm(N_EXPERT - 1, generator=gen)[:K_USED] for _ in range(t)])  # expert 255 idle
    sel[0, 1] = sel[0, 0]
    wts = torch.rand((t, K_USED), generator=gen)
    u = torch.randn((t, D), generator=gen) * 3
    assert QuantFormat(qg) and QuantFormat(qd)
    return (rg, ru, rd, qg, qd), (gate, up, down), u.cuda(), sel.cuda(), wts.cuda()


def _moe_reference(raws, u, sel, wts, q8k: bool = False):
    """float64; q8k: u and each h row go through the Q8_K round trip first (TorchOps(act_quant=True)). One expert
    dequantized at a time (200 MB in float64 at Flash shapes; all of them at once would be ~50 GB, and the GPU tests
    run in 4 processes on one GPU)."""
    from dsv4.reference import TorchOps

    rg, ru, rd, qg, qd = raws
    out = torch.zeros((u.shape[0], D), dtype=torch.float64, device="cuda")
    u64 = (TorchOps.quant_q8_k(u.float()) if q8k else u).double()
    for e in torch.unique(sel).tolist():
        wg, wu, wd = _dequant64(rg[e], qg, D), _dequant64(ru[e], qg, D), _dequant64(rd[e], qd, F_EXP)
        rows, slots = (sel == e).nonzero(as_tuple=True)
        x = u64[rows]
        g = torch.clamp(x @ wg.T, max=CLAMP)
        up = torch.clamp(x @ wu.T, -CLAMP, CLAMP)
        h = torch.nn.functional.silu(g) * up * wts[rows, slots, None].double()
        if q8k:
            h = TorchOps.quant_q8_k(h.float()).double()
        out.index_add_(0, rows, h @ wd.T)
    return out


@pytest.mark.parametrize("recipe", ["q2", "q4"])
@pytest.mark.parametrize("t,path", [(1, "decode"), (4, "decode"), (1, "blockdot"), (4, "blockdot"), (96, "grouped"),
                                    (96, "grouped_v2"), (1, "int8"), (4, "int8"), (1, "int8_limb3"),
                                    (4, "int8_limb3")])
def test_moe_flash_shapes(recipe, t, path, poison):
    from dsv4.kernels_triton import moe, moe_int8, moe_prefill
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down), u, sel, wts = _moe_problem(recipe, t)
    fn = {"decode": moe.fused_decode, "blockdot": moe.fused_blockdot, "grouped": moe.grouped,
          "grouped_v2": moe_prefill.grouped_v2_default, "int8": moe_int8.fused_int8,
          "int8_limb3": _limb3()}[path]
    y = fn(u, gate, up, down, sel, wts, CLAMP, detect_device("cuda"))
    op, kind = {"grouped": ("triton_moe", "grouped"), "grouped_v2": ("triton_moe", "grouped_v2"),
                "int8": ("triton_moe_int8", "end_to_end"),
                "int8_limb3": ("triton_moe_int8", "limb3")}.get(path, ("triton_moe", "decode"))
    _assert(y, _moe_reference(raws, u, sel, wts, q8k=path == "int8"), op, kind, f"moe {recipe} {path} T={t}")


@pytest.mark.parametrize("recipe", ["q2", "q4"])
@pytest.mark.parametrize("name", ["grouped_v2", "grouped_v2_f32", "grouped_v2_m128", "grouped_v2_n64"])
def test_moe_prefill_registered_tiles(recipe, name, poison):
    """The registered comparison tiles of moe_prefill (8 warps x 128 rows, fp32 scaling, 128-pair tiles,
    4 warps x 64 rows), whose loops the benchmark times, at Flash shapes: the same grouped_v2 tolerance."""
    from dsv4.kernels_triton import moe_prefill
    from dsv4.kernels_triton.configs import detect_device

    raws, (gate, up, down), u, sel, wts = _moe_problem(recipe, 96)
    y = moe_prefill.grouped_v2(u, gate, up, down, sel, wts, CLAMP, detect_device("cuda"), moe_prefill.CONFIGS[name])
    _assert(y, _moe_reference(raws, u, sel, wts), "triton_moe", "grouped_v2", f"moe {recipe} {name} T=96")


def _limb3():
    """The registered int8_limb3 variant: moe_int8 on fp32-grade activations (three int8 planes)."""
    from dsv4.kernels_triton import registry

    return registry.get(registry.KernelOp.MOE, "int8_limb3").fn


@pytest.mark.parametrize("path", ["decode", "grouped", "grouped_v2", "int8", "int8_limb3"])
def test_moe_bitwise_reproducible(path):
    from dsv4.kernels_triton import moe, moe_int8, moe_prefill
    from dsv4.kernels_triton.configs import detect_device

    _, (gate, up, down), u, sel, wts = _moe_problem("q2", 300 if "grouped" in path else 3, seed=4)
    fn = {"decode": moe.fused_decode, "grouped": moe.grouped, "grouped_v2": moe_prefill.grouped_v2_default,
          "int8": moe_int8.fused_int8, "int8_limb3": _limb3()}[path]
    dev = detect_device("cuda")
    a = fn(u, gate, up, down, sel, wts, CLAMP, dev)
    b = fn(u, gate, up, down, sel, wts, CLAMP, dev)
    assert torch.equal(a, b), "MoE output differs between two identical runs"


def test_tiny_model_default_kernels(tiny_q2_path):
    """TritonOps with its default (fp16-dot prefill) kernels vs TorchOps on the GPU, prefill + decode.
    (tests/kernels/test_triton_moe.py runs the fp32-kernel comparison with the tight tolerance.)"""
    import numpy as np

    from tests.kernels.test_triton_moe import _run
    from tests.tolerances import assert_close

    ref = _run(tiny_q2_path, "torch")
    got = _run(tiny_q2_path, "triton")
    for step, (g, r) in enumerate(zip(got, ref)):
        scale = float(np.abs(r).max())
        assert_close(g / scale, r / scale, "triton_model", "logits_fp16", f"tiny q2 default kernels step {step}")
