"""MLX backend formats: exact repacks and the MLX-ops twins of the Metal kernels (CPU MLX).

Oracle: `dsv4.quant.dequant.dequantize_np` on random blocks (random bytes with finite scale fields,
plus zero, negative, subnormal and large scales); matmuls against float64 dequantize-then-matmul.
"""
from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from dsv4.kernels_mlx import twins  # noqa: E402
from dsv4.kernels_mlx.metal import KernelSet, metal_supported  # noqa: E402
from dsv4.kernels_mlx.repack import dequantize_affine, repack_affine  # noqa: E402
from dsv4.quant.dequant import dequantize_np  # noqa: E402
from dsv4.quant.formats import QuantFormat as F  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

# byte offsets of the fp16 scale fields per format (quant.md §1.1)
HALF_FIELDS = {F.Q8_0: (0,), F.Q4_K: (0, 2), F.Q2_K: (80, 82), F.IQ2_XXS: (0,)}
SPECIAL_SCALES = np.array([0.0, -0.0137, 6.0e-8, 3.1e-5, 1024.0, -2.5], np.float16)  # zero, neg, subnormal, big


def random_blocks(rng, fmt: F, lead: tuple[int, ...], n: int, special: bool = True) -> np.ndarray:
    """Random raw rows [*lead, row_bytes(n)] whose fp16 fields are finite (the first ones special: zero,
    negative, subnormal, large; off for chained products, where a 1024 scale makes fp32 sums of ~1e5
    terms whose order-dependent rounding says nothing about the kernel)."""
    raw = rng.integers(0, 256, (*lead, fmt.row_bytes(n)), dtype=np.uint8)
    b = raw.reshape(-1, fmt.type_size)
    for off in HALF_FIELDS[fmt]:
        h = (rng.standard_normal(b.shape[0]) * 0.02).astype(np.float16)
        if special:
            h[: len(SPECIAL_SCALES)] = SPECIAL_SCALES[: min(len(h), len(SPECIAL_SCALES))]
        b[:, off : off + 2] = h.view(np.uint8).reshape(-1, 2)
    return raw


# ------------------------------------------------------------------------------------- repacks

@pytest.mark.parametrize("fmt", [F.Q8_0, F.Q4_K])
@pytest.mark.parametrize("lead", [(5,), (3, 7)], ids=["2d", "experts"])
def test_repack_dequantizes_exactly(fmt, lead):
    rng = np.random.default_rng(int(fmt) * 10 + len(lead))
    n = 512
    raw = random_blocks(rng, fmt, lead, n)
    ref = dequantize_np(raw, fmt, n)
    got = np.array(dequantize_affine(repack_affine(raw, fmt, n)))
    assert got.shape == ref.shape
    assert_close(got, ref, "dequant", "all", f"MLX affine repack of {fmt.name}")
    # equal as numbers everywhere; the only allowed bit difference is the sign of a zero
    differ = got.view(np.uint32) != ref.view(np.uint32)
    assert np.all(ref[differ] == 0), f"{fmt.name}: non-zero weights differ in bits"


@pytest.mark.parametrize("fmt", [F.Q8_0, F.Q4_K])
def test_repack_quantized_matmul(fmt):
    rng = np.random.default_rng(3)
    n, out = 512, 24
    raw = random_blocks(rng, fmt, (out,), n)
    ref_w = dequantize_np(raw, fmt, n).astype(np.float64)
    aw = repack_affine(raw, fmt, n)
    x = rng.standard_normal((3, n)).astype(np.float32)
    y = mx.quantized_matmul(mx.array(x), aw.wq, aw.scales, aw.biases, transpose=True, group_size=32, bits=aw.bits)
    assert_close(np.array(y), x.astype(np.float64) @ ref_w.T, "mlx_qmatmul", "fp32", f"{fmt.name} quantized_matmul")


def test_repack_gather_qmm_selects_experts():
    rng = np.random.default_rng(4)
    e, out, n, t = 5, 16, 256, 3
    raw = random_blocks(rng, F.Q4_K, (e, out), n)
    ref_w = dequantize_np(raw, F.Q4_K, n).astype(np.float64)
    aw = repack_affine(raw, F.Q4_K, n)
    x = rng.standard_normal((t, n)).astype(np.float32)
    sel = np.array([[4, 0], [1, 1], [3, 2]], np.int32)
    y = mx.gather_qmm(mx.array(x)[:, None, None, :], aw.wq, aw.scales, aw.biases, rhs_indices=mx.array(sel),
                      transpose=True, group_size=32, bits=4)
    expect = np.einsum("tkoi,ti->tko", ref_w[sel], x.astype(np.float64))
    assert_close(np.array(y).squeeze(2), expect, "mlx_qmatmul", "fp32", "Q4_K gather_qmm")


# --------------------------------------------------------------------------------------- twins

@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
def test_twin_dequant_bit_exact(fmt):
    rng = np.random.default_rng(int(fmt))
    raw = random_blocks(rng, fmt, (2, 6), 768)
    ref = dequantize_np(raw, fmt, 768)
    got = np.array(twins.TWIN_DECODERS[fmt](mx.array(raw)))
    assert got.shape == ref.shape
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), f"{fmt.name} twin decode differs in bits"


@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
@pytest.mark.parametrize("t", [1, 5])
def test_twin_gemv(fmt, t):
    rng = np.random.default_rng(10 + t)
    n, out = 1024, 13
    raw = random_blocks(rng, fmt, (out,), n)
    x = rng.standard_normal((t, n)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize_np(raw, fmt, n).astype(np.float64).T
    got = KernelSet(use_metal=False).raw_matmul(mx.array(x), mx.array(raw), fmt)
    assert_close(np.array(got), ref, "mlx_qmatmul", "fp32", f"{fmt.name} GEMV twin, T={t}")


@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
@pytest.mark.parametrize("per_pair", [False, True], ids=["shared_x", "pair_x"])
@pytest.mark.parametrize("e", [6, 40], ids=["all_experts", "selected_blocks"])  # T*K=12 >= E or < E
def test_twin_gathered_moe(fmt, per_pair, e):
    rng = np.random.default_rng(20 + per_pair)
    out, n, t, k = 10, 512, 4, 3
    raw = random_blocks(rng, fmt, (e, out), n)
    w = dequantize_np(raw, fmt, n).astype(np.float64)
    sel = rng.integers(0, e, (t, k)).astype(np.int32)
    sel[0] = [5, 5, 0]  # a repeated expert in one token
    x = rng.standard_normal((t, k, n) if per_pair else (t, n)).astype(np.float32)
    xk = x if per_pair else np.broadcast_to(x[:, None], (t, k, n))
    ref = np.einsum("tkoi,tki->tko", w[sel], xk.astype(np.float64))
    got = KernelSet(use_metal=False).raw_gather_matmul(mx.array(x), mx.array(raw), fmt, mx.array(sel))
    assert_close(np.array(got), ref, "mlx_qmatmul", "fp32", f"{fmt.name} gathered twin")


def _sinkhorn_f64(m, scale, base, s, iters, eps):
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    pre = sig(m[:, :s] * scale[0] + base[:s]) + eps
    post = 2.0 * sig(m[:, s : 2 * s] * scale[1] + base[s : 2 * s])
    c = (m[:, 2 * s :] * scale[2] + base[2 * s :]).reshape(-1, s, s)
    c = np.exp(c - c.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + eps
    c = c / (c.sum(1, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(2, keepdims=True) + eps)
        c = c / (c.sum(1, keepdims=True) + eps)
    return pre, post, c


def test_twin_hc_chain():
    rng = np.random.default_rng(30)
    t, s, d, iters, eps = 3, 4, 64, 20, 1e-6
    m = rng.standard_normal((t, (2 + s) * s)).astype(np.float32) * 2
    scale = rng.uniform(0.5, 2, 3).astype(np.float32)
    base = rng.standard_normal((2 + s) * s).astype(np.float32)
    X = rng.standard_normal((t, s, d)).astype(np.float32)
    y = rng.standard_normal((t, d)).astype(np.float32)
    ks = KernelSet(use_metal=False)
    got = ks.hc_sinkhorn(mx.array(m), mx.array(scale), mx.array(base), s, iters, eps)
    ref = _sinkhorn_f64(m.astype(np.float64), scale.astype(np.float64), base.astype(np.float64), s, iters, eps)
    for name, g, r in zip(("pre", "post", "comb"), got, ref):
        assert_close(np.array(g), r, "mlx_hc", "fp32", f"sinkhorn {name}")
    pre, post, comb = ref
    X64 = X.astype(np.float64)
    assert_close(np.array(ks.hc_weighted_sum(mx.array(X), mx.array(pre.astype(np.float32)))),
                 (pre[:, :, None] * X64).sum(1), "mlx_hc", "fp32", "hc weighted sum")
    want = post[:, :, None] * y[:, None, :] + np.einsum("trc,trd->tcd", comb, X64)
    got_post = ks.hc_post(mx.array(X), mx.array(y), mx.array(post.astype(np.float32)),
                          mx.array(comb.astype(np.float32)))
    assert_close(np.array(got_post), want, "mlx_hc", "fp32", "hc post")


def test_twin_swiglu_weighted():
    rng = np.random.default_rng(31)
    g = (rng.standard_normal((4, 3, 40)) * 8).astype(np.float32)  # crosses the clamp
    u = (rng.standard_normal((4, 3, 40)) * 8).astype(np.float32)
    wt = rng.uniform(0, 1, (4, 3)).astype(np.float32)
    gc = np.minimum(g.astype(np.float64), 10.0)
    ref = gc / (1 + np.exp(-gc)) * np.clip(u, -10, 10) * wt[..., None]
    got = KernelSet(use_metal=False).swiglu(mx.array(g), mx.array(u), 10.0, mx.array(wt))
    assert_close(np.array(got), ref, "mlx_hc", "fp32", "swiglu x route weight")


def test_dispatcher_uses_twins_off_apple():
    assert KernelSet().use_metal == metal_supported()
    if not metal_supported():
        assert KernelSet().use_metal is False


# ------------------------------------------------------- Metal sources, emulated on the CPU (C++)
# No Metal here: each kernel body is compiled as C++ with a small shim (address-space qualifiers
# dropped, threadgroup arrays static, simd_sum as a running sum per call site over a simdgroup's lanes
# run last-to-first, so lane 0 sees the total) and run threadgroup by threadgroup, each twice, so what
# one thread writes to threadgroup memory before a barrier is there for every thread in the second pass.
# This checks the kernels' indexing and arithmetic against the twins; not Metal compilation or timing.

_SHIM = r"""
#include <cstdint>
#include <cmath>
#include <algorithm>
#define device
#define threadgroup
#define thread
typedef unsigned int uint; typedef unsigned short ushort; typedef unsigned long ulong;
typedef _Float16 half;
struct uint3 { uint x, y, z; };
template <typename T, typename U> T as_type(U u) { T t; __builtin_memcpy(&t, &u, sizeof(T)); return t; }
static float g_simd_acc[64];
static int g_simd_call = 0;
inline void simd_reset() { for (float& a : g_simd_acc) a = 0.0f; }
inline float simd_sum(float v) { g_simd_acc[g_simd_call] += v; return g_simd_acc[g_simd_call++]; }
using std::sqrt;
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
namespace metal { namespace precise { inline float exp(float x) { return std::exp(x); } } }
using std::min; using std::max;
inline float clamp(float x, float a, float b) { return std::min(std::max(x, a), b); }
"""
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float16): "half", np.dtype(np.uint8): "uint8_t",
          np.dtype(np.int32): "int32_t"}


def _emulate(tmp_path, source, inputs, outputs, template, grid, tg):
    import ctypes
    import shutil
    import subprocess

    from dsv4.kernels_mlx import metal as M

    if shutil.which("g++") is None:
        pytest.skip("no g++ to emulate the Metal sources")
    params = ", ".join([f"const {_CTYPE[a.dtype]}* {n}" for n, a in inputs] + [f"float* {n}" for n, _ in outputs])
    tmpl = ", ".join(f"{'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()}" for k, v in template.items())
    attrs = ("uint3 thread_position_in_grid, uint3 threads_per_threadgroup, uint thread_index_in_simdgroup, "
             "uint thread_index_in_threadgroup")
    names = ", ".join([n for n, _ in inputs] + [n for n, _ in outputs])
    import re

    # a threadgroup array declaration is shared by the threadgroup's threads: static storage here
    source = re.sub(r"(?m)^(\s*)threadgroup (\w+ \w+\[)", r"\1static \2", source)
    code = f"""{_SHIM}
{M._HEADER}
{M._DOT_HEADER}
template <{tmpl}> void body({params}, {attrs}) {{
{source}
}}
extern "C" void run({params}) {{
  const uint G_[3] = {{{grid[0]}, {grid[1]}, {grid[2]}}}, B_[3] = {{{tg[0]}, {tg[1]}, {tg[2]}}};
  const uint n_ = B_[0] * B_[1] * B_[2];
  for (uint bz_ = 0; bz_ < G_[2] / B_[2]; ++bz_)
    for (uint by_ = 0; by_ < G_[1] / B_[1]; ++by_)
      for (uint bx_ = 0; bx_ < G_[0] / B_[0]; ++bx_)
        for (int pass_ = 0; pass_ < 2; ++pass_)
          for (uint j_ = 0; j_ < n_; ++j_) {{
            const uint lin_ = n_ - 1 - j_;  // last-to-first: lane 0 of a simdgroup runs after its other lanes
            if (lin_ % 32 == 31 || j_ == 0) simd_reset();
            g_simd_call = 0;
            const uint lx_ = lin_ % B_[0], ly_ = (lin_ / B_[0]) % B_[1], lz_ = lin_ / (B_[0] * B_[1]);
            body<>({names}, uint3{{bx_ * B_[0] + lx_, by_ * B_[1] + ly_, bz_ * B_[2] + lz_}},
                   uint3{{B_[0], B_[1], B_[2]}}, lin_ % 32, lin_);
          }}
}}
"""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src, lib = tmp_path / "k.cpp", tmp_path / "k.so"
    src.write_text(code)
    r = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"Metal source does not compile as C++ under the shim:\n{r.stderr[:3000]}"
    outs = [np.full(shape, np.nan, np.float32) for _, shape in outputs]  # poisoned
    ins = [np.ascontiguousarray(a) for _, a in inputs]
    ctypes.CDLL(str(lib)).run(*[a.ctypes.data_as(ctypes.c_void_p) for a in ins + outs])
    return outs


def _iq2_tables_np():
    from dsv4.quant.tables import IQ2XXS_GRID, KSIGNS_IQ2XS

    return np.ascontiguousarray(IQ2XXS_GRID).reshape(-1), np.ascontiguousarray(KSIGNS_IQ2XS)


@pytest.mark.parametrize("fmt", [F.Q2_K, F.IQ2_XXS])
@pytest.mark.parametrize("gather", ["dense", "shared_x", "pair_x"])
def test_metal_gemv_source_emulated(tmp_path, fmt, gather):
    from dsv4.kernels_mlx import metal as M

    rng = np.random.default_rng(40)
    e, out, n, t, k = (1, 13, 512, 3, 1) if gather == "dense" else (5, 6, 512, 2, 3)
    raw = random_blocks(rng, fmt, (e, out), n)
    sel = rng.integers(0, e, (t, k)).astype(np.int32)
    per_pair = gather == "pair_x"
    x = rng.standard_normal((t, k, n) if per_pair else (t, n)).astype(np.float32)
    n_p = t if gather == "dense" else t * k
    inputs = [("x", x), ("w", raw.reshape(-1)), ("sel", sel.reshape(-1))]
    src = M.Q2_K_GEMV_SOURCE
    if fmt == F.IQ2_XXS:
        grid_t, signs_t = _iq2_tables_np()
        inputs += [("grid", grid_t), ("ksigns", signs_t)]
        src = M.IQ2_XXS_GEMV_SOURCE
    tmpl = dict(IN=n, OUT=out, K=k, GATHER=gather != "dense", PER_PAIR=per_pair, ROW_BYTES=fmt.row_bytes(n))
    rows = -(-out // M.GEMV_ROWS_PER_TG) * M.GEMV_ROWS_PER_TG
    (got,) = _emulate(tmp_path, src, inputs, [("out", (n_p, out))], tmpl, (32, rows, n_p),
                      (32, M.GEMV_ROWS_PER_TG, 1))
    ks = KernelSet(use_metal=False)
    if gather == "dense":
        want = ks.raw_matmul(mx.array(x), mx.array(raw[0]), fmt)
    else:
        want = ks.raw_gather_matmul(mx.array(x), mx.array(raw), fmt, mx.array(sel)).reshape(n_p, out)
    assert_close(got, np.array(want), "mlx_metal", "twin", f"{fmt.name} {gather} Metal source (emulated)")


def test_metal_hc_and_swiglu_sources_emulated(tmp_path):
    from dsv4.kernels_mlx import metal as M

    rng = np.random.default_rng(41)
    t, s, d, iters, eps = 3, 4, 40, 20, 1e-6
    m = (rng.standard_normal((t, (2 + s) * s)) * 2).astype(np.float32)
    scale = rng.uniform(0.5, 2, 3).astype(np.float32)
    base = rng.standard_normal((2 + s) * s).astype(np.float32)
    ks = KernelSet(use_metal=False)
    want = [np.array(a) for a in ks.hc_sinkhorn(mx.array(m), mx.array(scale), mx.array(base), s, iters, eps)]
    got = _emulate(tmp_path / "sk", M.HC_SINKHORN_SOURCE,
                   [("m", m), ("scale", scale), ("base", base), ("params", np.array([eps], np.float32))],
                   [("pre", (t, s)), ("post", (t, s)), ("comb", (t, s, s))], dict(N_TOK=t, S=s, ITERS=iters),
                   (32, 1, 1), (32, 1, 1))
    for name, g, w in zip(("pre", "post", "comb"), got, want):
        assert_close(g, w, "mlx_hc", "fp32", f"hc_sinkhorn {name} Metal source (emulated)")
    X = rng.standard_normal((t, s, d)).astype(np.float32)
    y = rng.standard_normal((t, d)).astype(np.float32)
    pre, post, comb = want
    (g,) = _emulate(tmp_path / "ws", M.HC_WSUM_SOURCE, [("X", X), ("a", pre)], [("out", (t, d))], dict(S=s, D=d),
                    (64, t, 1), (64, 1, 1))
    assert_close(g, np.array(ks.hc_weighted_sum(mx.array(X), mx.array(pre))), "mlx_hc", "fp32", "hc wsum (emulated)")
    (g,) = _emulate(tmp_path / "po", M.HC_POST_SOURCE, [("X", X), ("y", y), ("post", post), ("comb", comb)],
                    [("out", (t, s, d))], dict(S=s, D=d), (64, s, t), (64, 1, 1))
    want_post = ks.hc_post(mx.array(X), mx.array(y), mx.array(post), mx.array(comb))
    assert_close(g, np.array(want_post), "mlx_hc", "fp32", "hc_post (emulated)")
    gate = (rng.standard_normal((6, 50)) * 8).astype(np.float32)
    up = (rng.standard_normal((6, 50)) * 8).astype(np.float32)
    wt = rng.uniform(0, 1, 6).astype(np.float32)
    (g,) = _emulate(tmp_path / "sw", M.SWIGLU_SOURCE,
                    [("gate", gate), ("up", up), ("wt", wt), ("params", np.array([10.0], np.float32))],
                    [("out", (6, 50))], dict(F=50), (64, 6, 1), (64, 1, 1))
    want_sw = ks.swiglu(mx.array(gate), mx.array(up), 10.0, mx.array(wt))
    assert_close(g, np.array(want_sw), "mlx_hc", "fp32", "swiglu (emulated)")


@pytest.mark.parametrize("head", [False, True], ids=["hc_pre", "hc_head"])
def test_metal_fused_hc_source_emulated(tmp_path, head):
    from dsv4.kernels_mlx import metal as M

    rng = np.random.default_rng(42)
    t, s, d, iters, eps, rms_eps = 2, 4, 96, 20, 1e-6, 1e-6
    nc = s if head else (2 + s) * s
    X = rng.standard_normal((t, s, d)).astype(np.float32)
    fn = (rng.standard_normal((nc, s * d)) * 0.05).astype(np.float16)
    scale = rng.uniform(0.5, 2, 1 if head else 3).astype(np.float32)
    base = rng.standard_normal(nc).astype(np.float32)
    ks = KernelSet(use_metal=False)
    args = (mx.array(X), mx.array(fn), mx.array(scale), mx.array(base))
    inputs = [("X", X), ("fn", fn), ("scale", scale), ("base", base),
              ("params", np.array([eps, rms_eps], np.float32))]
    tg = 64  # 2 simdgroups: exercises the cross-simdgroup reduction
    if head:
        want = [np.array(ks.hc_head(*args, eps, rms_eps))]
        got = _emulate(tmp_path, M.HC_HEAD_FUSED_SOURCE, inputs, [("out", (t, d))], dict(S=s, D=d, NC=nc, TG=tg),
                       (tg, 1, t), (tg, 1, 1))
    else:
        want = [np.array(a) for a in ks.hc_pre(*args, iters, eps, rms_eps)]
        outs = [("out", (t, d)), ("post", (t, s)), ("comb", (t, s, s))]
        got = _emulate(tmp_path, M.HC_PRE_FUSED_SOURCE, inputs, outs, dict(S=s, D=d, NC=nc, ITERS=iters, TG=tg),
                       (tg, 1, t), (tg, 1, 1))
    for name, g, w in zip(("x", "post", "comb"), got, want):
        assert_close(g, w, "mlx_metal", "twin", f"fused {'hc_head' if head else 'hc_pre'} {name} (emulated)")


@pytest.mark.parametrize("fmts", [(F.IQ2_XXS, F.Q2_K), (F.Q2_K, F.IQ2_XXS)], ids=["q2_recipe", "swapped"])
def test_metal_fused_moe_sources_emulated(tmp_path, fmts):
    from dsv4.kernels_mlx import metal as M

    fgu, fd = fmts
    rng = np.random.default_rng(43)
    e, d, f, t, k, clamp = 5, 256, 256, 2, 3, 10.0
    gate, up = random_blocks(rng, fgu, (e, f), d, False), random_blocks(rng, fgu, (e, f), d, False)
    down = random_blocks(rng, fd, (e, d), f, False)
    u = rng.standard_normal((t, d)).astype(np.float32)
    sel = np.array([[4, 0, 4], [1, 3, 2]], np.int32)  # a repeated expert in one token
    wt = rng.uniform(0.1, 1, (t, k)).astype(np.float32)
    ks = KernelSet(use_metal=False)
    args = [mx.array(a) for a in (u, gate, up, down)]
    want = np.array(ks.moe_raw(*args, fgu, fd, mx.array(sel), mx.array(wt), clamp))
    grid_t, signs_t = _iq2_tables_np()
    tables = lambda fmt: [("grid", grid_t), ("ksigns", signs_t)] if fmt == F.IQ2_XXS else []  # noqa: E731
    key = {F.Q2_K: "q2_k", F.IQ2_XXS: "iq2_xxs"}
    rows = M.GEMV_ROWS_PER_TG
    (h,) = _emulate(tmp_path / "pair", M.MOE_PAIR_SOURCES[key[fgu]],
                    [("x", u), ("gate", gate.reshape(-1)), ("up", up.reshape(-1)), ("sel", sel.reshape(-1)),
                     ("wt", wt.reshape(-1)), ("params", np.array([clamp], np.float32))] + tables(fgu),
                    [("out", (t * k, f))], dict(IN=d, OUT=f, K=k, ROW_BYTES=fgu.row_bytes(d)),
                    (32, -(-f // rows) * rows, t * k), (32, rows, 1))
    h_want = ks.swiglu(ks.raw_gather_matmul(mx.array(u), mx.array(gate), fgu, mx.array(sel)),
                       ks.raw_gather_matmul(mx.array(u), mx.array(up), fgu, mx.array(sel)), clamp, mx.array(wt))
    assert_close(h, np.array(h_want).reshape(t * k, f), "mlx_metal", "twin", "fused gate+up+swiglu (emulated)")
    (y,) = _emulate(tmp_path / "down", M.MOE_DOWN_SUM_SOURCES[key[fd]],
                    [("x", h), ("w", down.reshape(-1)), ("sel", sel.reshape(-1))] + tables(fd),
                    [("out", (t, d))], dict(IN=f, OUT=d, K=k, ROW_BYTES=fd.row_bytes(f)),
                    (32, -(-d // rows) * rows, t), (32, rows, 1))
    assert_close(y, want, "mlx_metal", "moe", "fused down + K-sum (emulated)")
