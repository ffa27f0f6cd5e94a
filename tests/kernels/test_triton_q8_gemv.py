"""q8_gemv variants (gemv_rows, gemm_f16w) against dequantize_np-then-float64-matmul, Q8_0 only.

Interpreter on CPU (TRITON_INTERPRET=1 before triton is imported), small shapes: rows not a multiple
of the tile, T=1, 5 and 37, several K steps per program, the grouped form (x [T, G, K]), split-K
(forced through a DeviceInfo that claims a small GPU), extreme codes decoded exactly. NaN-poisoned outputs.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.kernels.test_triton_qmatmul import (  # noqa: E402,F401
    DEVICE, assert_matches, make_weight, make_x, poison, reference)
from dsv4.kernels_triton import blocks, q8_gemv, registry  # noqa: E402
from dsv4.kernels_triton.configs import DeviceInfo, Vendor, detect_device  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402
from tests.kernels.offline_compile import require_ptxas, run_compile_script  # noqa: E402

Q8 = QuantFormat.Q8_0
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMALL_GPU = DeviceInfo(Vendor.NVIDIA, "sm_90", n_sm=2)  # only sizes the grid: few SMs -> split-K


@pytest.mark.parametrize("n,k,t,groups,block_n,block_k,prefetch,x_mode", [
    (37, 96, 1, 1, 8, 1024, False, 0),  # rows not a multiple of the 8-row tile, K of 3 blocks (one 32-wide step each)
    (37, 256, 5, 1, 4, 64, False, 0),   # T=5 (token tile 8), 4 K steps per program
    (37, 256, 5, 1, 4, 64, True, 0),    # the same with the next step's loads prefetched
    (21, 128, 1, 1, 16, 64, True, 0),   # 16-row tile larger than the 21 rows' last tile, 2 K steps, prefetch
    (24, 128, 3, 2, 8, 128, False, 0),  # grouped: x [T, 2, K], 12 rows per group (tile shrinks to 4)
    (37, 256, 5, 1, 8, 64, True, 1),    # x word-permuted by the wrapper
    (24, 128, 3, 2, 8, 64, True, 1),    # ... grouped
    (37, 256, 5, 1, 8, 64, True, 2),    # x lanes as stride-4 gathers
    (24, 128, 3, 2, 8, 64, True, 2),    # ... grouped
    (37, 256, 5, 1, 4, 64, 2, 0),       # two steps ahead (4 K steps: the last two prefetches are masked)
    (21, 96, 1, 1, 16, 32, 2, 0),       # ... 3 K steps, one token
    (37, 256, 1, 1, 8, 64, "x", 0),     # one token, x of the next step prefetched too (last step re-reads)
    (24, 128, 1, 2, 8, 32, "x2", 0),    # ... grouped, two steps ahead
])
def test_gemv_rows(n, k, t, groups, block_n, block_k, prefetch, x_mode, poison):
    dw, w_ref = make_weight(Q8, (n, k), seed=n + k)
    x = make_x(t, k, groups)
    x_prefetch = isinstance(prefetch, str)
    if x_prefetch:
        prefetch = 2 if prefetch == "x2" else 1
    y = q8_gemv.gemv_rows(x, dw, detect_device(DEVICE), groups, block_n=block_n, block_k=block_k, prefetch=prefetch,
                          x_mode=x_mode, x_prefetch=x_prefetch)
    assert y.shape == (t, n)
    assert_matches(y, reference(x, w_ref, groups), "triton_gemv", "fp32", f"gemv_rows n={n} k={k} T={t} G={groups}")


def test_gemv_rows_split(poison):
    """A 'GPU' with 2 SMs: 3 row tiles of 8 -> split-K 8 over 512 codes. By default (split_sum 4) the partials
    are summed pairwise in a fixed tree order by atomic exchanges; 0-2 add them in slice order."""
    dw, w_ref = make_weight(Q8, (24, 512), seed=5)
    x = make_x(2, 512)
    x_other = make_x(2, 512) * -3.0
    assert q8_gemv._rows_split(3, 512, 64, SMALL_GPU, True) == 8
    y = q8_gemv.gemv_rows(x, dw, SMALL_GPU, 1, block_k=64)
    assert_matches(y, reference(x, w_ref), "triton_gemv", "fp32", "gemv_rows split-K, exchange tree")
    y_other = q8_gemv.gemv_rows(x_other, dw, SMALL_GPU, 1, block_k=64)
    assert_matches(y_other, reference(x_other, w_ref), "triton_gemv", "fp32", "exchange tree, other x")
    # the tree's slots are zero again after each call: a second call, after one on other activations, repeats
    assert torch.equal(y.cpu(), q8_gemv.gemv_rows(x, dw, SMALL_GPU, 1, block_k=64).cpu())
    (launch,) = [f for key, f in dw.plans.items() if key[-1][0] == "gemv_rows" and key[-1][12] == 4]  # split_sum
    assert launch.slots.shape == (7, 2, 24) and not launch.slots.any()
    # the last program's sum (acq_rel or relaxed counter reset) and the two-launch sum: slice order, the same bits
    # as each other, on every call (the counters are reset)
    y0 = q8_gemv.gemv_rows(x, dw, SMALL_GPU, 1, block_k=64, split_sum=0)
    assert_matches(y0, reference(x, w_ref), "triton_gemv", "fp32", "gemv_rows split-K, slice order")
    for split_sum, xs in [(1, x), (2, x), (0, x_other), (1, x), (0, x)]:
        y3 = q8_gemv.gemv_rows(xs, dw, SMALL_GPU, 1, block_k=64, split_sum=split_sum)
        if xs is x:
            assert torch.equal(y0.cpu(), y3.cpu()), split_sum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the L2 prefetch is inline PTX (NVIDIA sm_90+); the "
                    "interpreter runs none")
@pytest.mark.parametrize("dist", [2, 3, 5])
def test_gemv_rows_l2_prefetch(dist, poison):
    """The L2 prefetch is only a hint: the same bits as without it, on one program per row tile and on split-K
    (SMALL_GPU), grouped too; prefetch steps past the end of a program's K range are skipped."""
    from dsv4.kernels_triton.configs import hopper_plus

    dev = detect_device(DEVICE)
    x1 = make_x(1, 1024)
    if not hopper_plus(dev, x1):
        pytest.skip("needs NVIDIA sm_90 or newer")
    for n, k, groups, device in [(37, 1024, 1, dev), (48, 512, 2, dev), (24, 1024, 1, SMALL_GPU)]:
        dw, w_ref = make_weight(Q8, (n, k), seed=n + k + dist)
        x = make_x(1, k, groups)
        kw = dict(block_n=8, block_k=128, num_warps=1, prefetch=True)
        y0 = q8_gemv.gemv_rows(x, dw, device, groups, **kw).clone()
        y = q8_gemv.gemv_rows(x, dw, device, groups, l2_prefetch=dist, **kw)
        assert torch.equal(y, y0), (n, k, groups)
        assert_matches(y, reference(x, w_ref, groups), "triton_gemv", "fp32", f"gemv_rows l2 prefetch {dist} n={n}")


def test_gemv_rows_decode_is_exact(poison):
    """Extreme codes (-128, 127, 0) and unit scales: a one-hot x reads back each code bit for bit, so
    every byte lane (x split into 4 lanes in registers) pairs with the right code."""
    n, k = 4, 64
    raw = blocks.synthetic_raw(Q8, (n, k), seed=2).reshape(n, 2, 34)
    codes = torch.tensor([-128, 127, 0, -1, 1, 64, -64, 3, 5, -7, 9, -11, 13, -15, 17, -19] * 2, dtype=torch.int8)
    raw[:, :, 2:] = codes.view(torch.uint8)
    raw[:, :, :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    dw = blocks.to_device(raw.reshape(n, 68), Q8, (n, k), DEVICE)
    for col in (0, 1, 2, 3, 5, 33, 62, 63):
        x = torch.zeros((1, k), device=DEVICE)
        x[0, col] = 1.0
        y = q8_gemv.gemv_rows(x, dw, detect_device(DEVICE), 1, block_k=32)
        assert torch.equal(y.cpu(), torch.full((1, n), float(codes[col % 32]))), f"column {col}"


@pytest.mark.parametrize("t,groups,split_k", [(37, 1, 1), (20, 2, 1), (37, 1, 3)])
def test_gemm_f16w(t, groups, split_k, poison):
    """fp16 dequant + tl.dot on fp32 x: rows and tokens not multiples of the 32x32 tiles, grouped form,
    split-K (3 slices of 32, summed in fixed order)."""
    dw, w_ref = make_weight(Q8, (64 if groups > 1 else 40, 96), seed=t)
    x = make_x(t, 96, groups)
    y = q8_gemv.gemm_f16w(x, dw, detect_device(DEVICE), groups, block_m=32, block_n=32, block_k=32, num_warps=4,
                          num_stages=2, split_k=split_k)
    assert_matches(y, reference(x, w_ref, groups), "triton_gemm", "fp16dot", f"gemm_f16w T={t} G={groups}")


def test_registered():
    names = {v.name for v in registry.variants(registry.KernelOp.QMATMUL)}
    assert set(q8_gemv.ROWS_VARIANTS) | set(q8_gemv.F16W_VARIANTS) <= names


@pytest.mark.parametrize("n,k,groups,x_split,block_n", [
    (37, 1024, 1, True, 16),   # rows not a multiple of the tile, 4 steps of 256 codes
    (64, 512, 2, True, 64),    # grouped: 32 rows per group (tile shrinks to 32), 2 steps
    (20, 512, 1, False, 16),   # x rounded to fp16 once (16 blocks per step: the dot needs N >= 16)
])
def test_gemv_mma(n, k, groups, x_split, block_n, poison):
    dw, w_ref = make_weight(Q8, (n, k), seed=n + k + groups)
    x = make_x(1, k, groups)
    y = q8_gemv.gemv_mma(x, dw, detect_device(DEVICE), groups, block_n=block_n, stages=2, x_split=x_split)
    assert y.shape == (1, n)
    kind = "fp32" if x_split else "fp16x"
    assert_matches(y, reference(x, w_ref, groups), "triton_gemv", kind, f"gemv_mma n={n} k={k} G={groups}")


@pytest.mark.parametrize("n,k,groups,block_n,block_k,dev", [
    (37, 256, 1, 8, 64, None),        # 5 row tiles over 4 programs, 4 steps each (prefetch crosses tiles)
    (24, 128, 2, 8, 32, None),        # grouped: 12 rows per group (tile shrinks to 4), 4 steps
    (24, 512, 1, 8, 64, SMALL_GPU),   # split-K 8 on a 2-SM 'GPU': items walk (split, tile) pairs
])
def test_gemv_rows_persist(n, k, groups, block_n, block_k, dev, poison):
    dw, w_ref = make_weight(Q8, (n, k), seed=n + 3 * k)
    x = make_x(1, k, groups)
    y = q8_gemv.gemv_rows_persist(x, dw, dev or detect_device(DEVICE), groups, block_n=block_n, block_k=block_k,
                                  programs_per_sm=1)
    assert_matches(y, reference(x, w_ref, groups), "triton_gemv", "fp32", f"gemv_rows_persist n={n} k={k} G={groups}")


def test_pdl_selection(monkeypatch):
    """Programmatic dependent launch only for CUDA tensors on NVIDIA sm_90+, and DSV4_PDL=0 turns it off."""
    from types import SimpleNamespace

    from dsv4.kernels_triton.configs import pdl_launch, use_pdl

    cuda, cpu = SimpleNamespace(is_cuda=True), torch.zeros(1)
    monkeypatch.delenv("DSV4_PDL", raising=False)
    assert use_pdl(DeviceInfo(Vendor.NVIDIA, "sm_90"), cuda) and use_pdl(DeviceInfo(Vendor.NVIDIA, "sm_100"), cuda)
    assert not use_pdl(DeviceInfo(Vendor.NVIDIA, "sm_89"), cuda)
    assert not use_pdl(DeviceInfo(Vendor.NVIDIA, "sm_90"), cpu)  # interpreter: no griddepcontrol
    assert not use_pdl(DeviceInfo(Vendor.AMD, "gfx942"), cuda)
    monkeypatch.setenv("DSV4_PDL", "0")
    assert not use_pdl(DeviceInfo(Vendor.NVIDIA, "sm_90"), cuda)
    assert pdl_launch(True) == {"launch_pdl": True} and pdl_launch(False) == {}


_SM90_PDL = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsv4.kernels_triton import q8_gemv as m
names = m._q8_rows_kernel.arg_names
types = dict(x_ptr="*fp32", w_ptr="*u8", s_ptr="*fp16", out_ptr="*fp32", y_ptr="*fp32", cnt_ptr="*i32")
const = dict(BLOCK_T=1, BLOCK_N=16, BLOCK_K=128, STAGES=1, GROUPED=False, PRMT=True, XPERM=0, PREFETCH=True, SPLIT=8,
             PDL=True, XPF=True, L2PF=0, SPLIT_SUM=0, WCACHE=0, KFLAT=False)  # the counter sum (the tree's below)

def ptx_of(fn, const, types, warps=1, ir="ptx", aligned=()):
    names = fn.arg_names
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm[ir]

def code_lanes(kflat):
    # the layout of the code-word load (the only evict_first load at WCACHE=4): lanes per axis, axis order; with the
    # 16-byte alignment that launches on Flash shapes specialize on (pointers, row stride, K slice)
    ttgir = ptx_of(m._q8_rows_kernel, dict(const, WCACHE=4, KFLAT=kflat), types, ir="ttgir",
                   aligned=("x_ptr", "w_ptr", "s_ptr", "stride_w_words", "k_split"))
    load = next(l for l in ttgir.splitlines() if "tt.load" in l and "evict_first" in l)
    name = re.search(r"x!tt\.ptr<i32>, (#blocked\d*)>", load).group(1)
    attrs = re.search("^" + name + r" = #ttg\.blocked<\{(.*)\}>", ttgir, re.M).group(1)
    return {k: json.loads(v) for k, v in re.findall(r"(\w+) = (\[[\d, ]*\])", attrs)}

ptx = ptx_of(m._q8_rows_kernel, const, types)
body = ptx.split("griddepcontrol.wait")
relaxed = ptx_of(m._q8_rows_kernel, dict(const, SPLIT_SUM=1), types)
xchg = ptx_of(m._q8_rows_kernel, dict(const, SPLIT_SUM=4), dict(types, cnt_ptr="*i64")).split("griddepcontrol.wait")
l2pf = ptx_of(m._q8_rows_kernel, dict(const, L2PF=3), types).split("griddepcontrol.wait")
sums = ptx_of(m._sum_splits_kernel, dict(SPLIT=8, BLOCK=512, PDL=True), dict(out_ptr="*fp32", y_ptr="*fp32"), 4)
wc = {c.name: ptx_of(m._q8_rows_kernel, dict(const, WCACHE=int(c)), types) for c in m.WeightCache}
print("RESULT" + json.dumps({"wait": len(body) - 1, "dependents": ptx.count("griddepcontrol.launch_dependents"),
                             "loads_before": body[0].count("ld.global"), "atomics_before": body[0].count("atom."),
                             "acq_rel": ptx.count(".acq_rel."), "acq_rel_relaxed_reset": relaxed.count(".acq_rel."),
                             "sum_loads_before": sums.split("griddepcontrol.wait")[0].count("ld.global"),
                             "l2pf_before": l2pf[0].count("prefetch.global.L2"),
                             "l2pf_after": l2pf[1].count("prefetch.global.L2"),
                             "l2pf_loads_before": l2pf[0].count("ld.global"),
                             "xchg_after": xchg[1].count("atom.global.gpu.relaxed.exch.b64"),
                             "xchg_atomics_before": xchg[0].count("atom."),
                             "xchg_ordering": sum(xchg[1].count(op) for op in (".acq_rel", ".release", ".acquire",
                                                                               "fence.", "membar.")),
                             "wc": {k: {"ef": v.count("ld.global.L1::evict_first"), "cg": v.count("ld.global.cg"),
                                        "ld": v.count("ld.global")} for k, v in wc.items()},
                             "lanes": {str(f): code_lanes(f) for f in (False, True)}}))
"""


def test_pdl_kernel_orders_loads_for_sm90():
    """The PTX of gemv_rows with PDL (compiled offline for sm_90): one griddepcontrol.wait and one
    launch_dependents; the first weight tile is loaded before the wait, the split-K atomics after it; the
    split-sum variants' atomics and loads (the exchange tree's relaxed exchanges); the L2 prefetch on both sides
    of the wait; the weight loads' L1 policy (w_cache)."""
    require_ptxas()
    res = run_compile_script(_SM90_PDL)
    assert res["wait"] == 1 and res["dependents"] == 1, res
    assert res["loads_before"] >= 2 and res["atomics_before"] == 0, res
    # split-K: arrival and reset are acq_rel; SPLIT_SUM=1 keeps only the arrival's; the sum kernel loads after the wait
    assert res["acq_rel"] == 2 and res["acq_rel_relaxed_reset"] == 1 and res["sum_loads_before"] == 0, res
    # SPLIT_SUM=4 (split 8): one relaxed 64-bit exchange per tree level (3) after the wait, no fence or ordered atomic
    assert res["xchg_after"] == 3 and res["xchg_atomics_before"] == 0 and res["xchg_ordering"] == 0, res
    # L2PF=3: step 2's lines are asked for before the wait (weights), step s + 3's in the loop; no other load moves
    assert res["l2pf_before"] >= 1 and res["l2pf_after"] >= 1 and res["l2pf_loads_before"] == res["loads_before"], res
    # w_cache: the code and scale loads take the policy, the same loads in each form; x's and the split-sum's
    # (.cg, SPLIT_SUM=0) do not change
    wc = res["wc"]
    assert wc["DEFAULT"]["ef"] == 0 and wc["EVICT_FIRST"]["ef"] > 0 and wc["L2_ONLY"]["ef"] == 0, wc
    assert wc["EVICT_FIRST"]["cg"] == wc["DEFAULT"]["cg"] < wc["L2_ONLY"]["cg"], wc
    assert wc["L2_ONLY"]["cg"] - wc["DEFAULT"]["cg"] == wc["EVICT_FIRST"]["ef"], wc  # the same weight loads
    assert wc["EVICT_FIRST"]["ld"] == wc["L2_ONLY"]["ld"] == wc["DEFAULT"]["ld"], wc
    # the codes only: fewer evict_first loads (the scales' are default)
    assert 0 < wc["EVICT_FIRST_CODES"]["ef"] < wc["EVICT_FIRST"]["ef"], wc
    # k_flat: the code words of a 16-row x 128-code step come by 16-byte loads whose lanes run along K (8 lanes x 4
    # words = a row's 32 words, 4 rows per warp load) on every Triton; without it Triton 3.6 puts 16 lanes over rows
    # (one 32-byte block of each row per load pair) and 3.7+ runs them along K too (h200_decode/109)
    flat, rows_first = res["lanes"]["True"], res["lanes"]["False"]
    assert flat == dict(sizePerThread=[1, 4], threadsPerWarp=[4, 8], warpsPerCTA=[1, 1], order=[1, 0]), res
    assert rows_first["sizePerThread"] == [1, 1, 4], res
    v37 = q8_gemv.TRITON_VERSION >= (3, 7)  # the script's Triton is this process's
    assert rows_first["threadsPerWarp"] == ([4, 4, 2] if v37 else [16, 1, 2]), res
    assert rows_first["order"] == ([2, 1, 0] if v37 else [2, 0, 1]), res


def test_rows_config_table():
    """The CUDA decode tiles: the Flash Q8_0 shapes take their measured tile at T=1, wide-K matrices split K with
    2-warp tiles; T > 1 the one-warp 32x128 tile, except the few-row matrices (4-warp default)."""
    rc = q8_gemv.rows_config
    t1, t1_37 = q8_gemv.ROWS_T1, q8_gemv.ROWS_T1_TRITON37
    assert q8_gemv.rows_t1_table() is (t1_37 if q8_gemv.TRITON_VERSION >= (3, 7) else t1)
    for shape, kw in q8_gemv.rows_t1_table().items():
        assert rc(1, *shape) is kw
    ef = q8_gemv.WeightCache.EVICT_FIRST_CODES
    # Triton 3.6: the three 35.7 MB matrices with their code words through [rows, codes] pointers (h200_decode/109)
    assert t1[(32768, 1024, 1)] == dict(block_k=128, num_warps=1, prefetch=True, block_n=16, w_cache=ef, k_flat=True)
    assert t1[(4096, 8192, 1)] == dict(block_k=128, num_warps=1, prefetch=True, block_n=16, w_cache=ef, k_flat=True)
    assert t1[(8192, 4096, 8)]["num_warps"] == 4 and t1[(8192, 4096, 8)]["allow_split"] is False
    assert [s for s, kw in t1.items() if kw.get("k_flat")] == [
        (32768, 1024, 1), (4096, 8192, 1), (8192, 4096, 8), (2048, 4096, 1), (512, 4096, 1)]
    assert not any(kw.get("k_flat") for kw in t1_37.values())
    assert t1[(512, 4096, 1)] == dict(q8_gemv.ROWS_T1_WIDE_K, k_flat=True)
    assert rc(1, 129280, 4096, 1)["allow_split"] is False and rc(1, 129280, 4096, 1)["block_n"] == 32
    assert rc(1, 1024, 4096, 1) is q8_gemv.ROWS_T1_WIDE_K and rc(1, 256, 8192, 1) is q8_gemv.ROWS_T1_WIDE_K
    assert rc(1, 64, 1024, 1) is q8_gemv.DEFAULT_ROWS
    # the code-word loads evict_first on attn_q_b, attn_output_a/b and ffn_gate_shexp (h200_decode/52, 52b, 52c, 109;
    # attn_q_b only with k_flat on 3.6); from Triton 3.7 on other tiles for the three large ones (103, 103b)
    assert [s for s, kw in t1.items() if kw.get("w_cache") == ef] == [
        (32768, 1024, 1), (4096, 8192, 1), (8192, 4096, 8), (2048, 4096, 1)]
    assert [s for s, kw in t1_37.items() if kw.get("w_cache") == ef] == [
        (32768, 1024, 1), (4096, 8192, 1), (8192, 4096, 8), (2048, 4096, 1)]
    changed = {s for s in t1 if t1_37[s] != {k: v for k, v in t1[s].items() if k != "k_flat"}}
    assert changed == {(32768, 1024, 1), (8192, 4096, 8)} and t1_37.keys() == t1.keys()
    assert t1_37[(8192, 4096, 8)] == dict(block_n=8, block_k=256, num_warps=1, prefetch=True, w_cache=ef)
    assert t1_37[(4096, 8192, 1)] == dict(block_n=16, block_k=128, num_warps=1, prefetch=True, w_cache=ef)
    assert t1_37[(32768, 1024, 1)] == dict(block_n=8, block_k=128, num_warps=1, prefetch=True, w_cache=ef)
    assert rc(4, 32768, 1024, 1) is q8_gemv.ROWS_TN and rc(8, 8192, 4096, 8) is q8_gemv.ROWS_TN
    assert rc(4, 129280, 4096, 1) is q8_gemv.ROWS_TN and rc(2, 4096, 8192, 1) is q8_gemv.ROWS_TN
    assert rc(4, 1024, 4096, 1) is q8_gemv.DEFAULT_ROWS_WIDE and rc(8, 512, 4096, 1) is q8_gemv.DEFAULT_ROWS_WIDE


@pytest.mark.parametrize("w_cache", list(q8_gemv.WeightCache))
def test_gemv_rows_weight_cache_policy(w_cache, poison):
    """w_cache only changes how the weight loads use L1 and L2: the same result as the default policy (the PTX
    side is checked in test_pdl_kernel_orders_loads_for_sm90), prefetched and not, split-K and not."""
    dw, w_ref = make_weight(Q8, (40, 1024), seed=11)
    x = make_x(1, 1024)
    for kw in (dict(block_k=128, prefetch=True), dict(block_k=256, prefetch=False, allow_split=False)):
        y = q8_gemv.gemv_rows(x, dw, SMALL_GPU, 1, w_cache=w_cache, **kw)
        assert_matches(y, reference(x, w_ref), "triton_gemv", "fp32", f"w_cache {w_cache.name} {kw}")
        assert torch.equal(y.cpu(), q8_gemv.gemv_rows(x, dw, SMALL_GPU, 1, **kw).cpu())


@pytest.mark.parametrize("t,groups,prefetch,kw", [
    (1, 1, 1, dict(block_n=8, block_k=128)),           # split-K on the small 'GPU', next step prefetched
    (1, 2, 1, dict(block_n=8, block_k=64)),            # grouped
    (5, 1, 2, dict(block_n=4, block_k=64)),            # T=5, two steps ahead (the last two prefetches masked)
    (1, 1, 0, dict(block_n=16, block_k=256, allow_split=False)),  # no prefetch, rows past N in the last tile
])
def test_gemv_rows_k_flat(t, groups, prefetch, kw, poison):
    """k_flat only changes the shape of the code-word pointers ([rows, codes] then reshaped, so that Triton 3.6 lays
    a warp's lanes along K as 3.7+ does): the reference within fp32 tolerance; in the interpreter (no layouts) bit for
    bit the default form, natively the same on a repeated call (the layout changes the order of the final row sums)."""
    dw, w_ref = make_weight(Q8, (40, 1024), seed=17)
    x = make_x(t, 1024, groups)
    y = q8_gemv.gemv_rows(x, dw, SMALL_GPU, groups, prefetch=prefetch, k_flat=True, **kw).clone()
    assert_matches(y, reference(x, w_ref, groups), "triton_gemv", "fp32", f"k_flat T={t} G={groups} {kw}")
    again = q8_gemv.gemv_rows(x, dw, SMALL_GPU, groups, prefetch=prefetch, k_flat=not INTERPRET, **kw)
    assert torch.equal(y.cpu(), again.cpu())
