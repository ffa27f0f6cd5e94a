"""The Gluon register-operand MoE gate/up and down (dsv4/kernels_triton/moe_gluon.py) compiled for sm_90 on the
CPU, for every format they decode (gate/up IQ2_XXS, Q4_K; down Q2_K, Q4_K).

Gluon has no interpreter: its numerics run on the GPU (tests/gpu/test_moe_gluon_gpu.py) and its arithmetic is
replayed in numpy (tests/kernels/test_moe_gluon_decode.py). Here the PTX Triton emits is checked for the
properties the kernel exists for and the one its correctness rests on: every wgmma takes A from registers
(the decoded weights never go to shared memory: no stmatrix), the activation tiles arrive by 16-byte cp.async
(two per thread per 64 inputs), and every wgmma wait waits for all MMAs (count 0), so no A register can be
live under an MMA still reading it after the code that owns it moves on (an earlier form that waited for
one and kept A across steps raced on the H200).
"""
from __future__ import annotations

from tests.kernels.offline_compile import run_gluon_compile_script

_COMPILE = r"""
import json, re
from dsv4.kernels_triton import moe_gluon as m
from tests.kernels.offline_compile import compile_gluon_sm90


def facts(k):
    ptx = k.asm["ptx"]
    return {
        "mma": ptx.count("wgmma.mma_async"),
        "mma_reg_a": len(re.findall(
            r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.f16\.f16\s*\{[^}]*\},\s*\{[^}]*\}", ptx)),
        "waits": re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx),
        "cp_async16": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*0x10, 0x10;", ptx)),
        "stmatrix": ptx.count("stmatrix"), "local": ptx.count(".local"), "cubin": len(k.asm["cubin"]),
        "ld_shared_b64": ptx.count("ld.shared.b64"), "table_decl": ptx.count(".shared .align 8 .b64 dsv4_psel[256]")}


GATE_UP_SIG = dict(x_ptr="*fp16", order_ptr="*i32", wts_ptr="*fp32", h_ptr="*fp16", tile_e_ptr="*i32",
                   tile_lo_ptr="*i32", tile_hi_ptr="*i32", gw_ptr="*i32", psel_ptr="*i64", F="i32", D="i32",
                   KSEL="i32", clamp="fp32", stride_xt="i32", stride_ht="i32", stride_w="i32", up_delta="i64",
                   FMT="constexpr", BM="constexpr", BK="constexpr", PF="constexpr", GL="constexpr", XL="constexpr",
                   HL="constexpr", TAB="constexpr")
DOWN_SIG = dict(h_ptr="*fp16", order_ptr="*i32", y_ptr="*fp32", tile_e_ptr="*i32", tile_lo_ptr="*i32",
                tile_hi_ptr="*i32", dw_ptr="*i32", F="i32", D="i32", stride_ht="i32", stride_yp="i32", stride_w="i32",
                FMT="constexpr", BM="constexpr", BK="constexpr", PF="constexpr", GL="constexpr", XL="constexpr",
                YL="constexpr")
# (kernel, its signature, its last layout constexprs, the integers Triton specializes as multiples of 16 at Flash
# shapes, (format, expert tile height, step, prefetch, shared selector table) cases); formats: 16 IQ2_XXS,
# 12 Q4_K, 10 Q2_K
KERNELS = [
    ("gate_up", m._gate_up_kernel, GATE_UP_SIG, lambda tab: dict(HL=m.pair_layout(), TAB=tab),
     ("F", "D", "stride_xt", "stride_ht", "stride_w"),
     [(16, 64, 64, False, False), (16, 64, 128, True, False), (16, 32, 64, False, False), (16, 64, 64, False, True),
      (16, 64, 128, True, True), (12, 64, 64, False, False), (12, 64, 128, True, False)]),
    ("down", m._down_kernel, DOWN_SIG, lambda tab: dict(YL=m.y_layout()), ("F", "D", "stride_ht", "stride_yp", "stride_w"),
     [(10, 64, 64, False, False), (10, 64, 128, True, False), (10, 32, 256, False, False),
      (12, 64, 128, False, False)]),
]
out = {}
for name, fn, sig, last, divisible, cases in KERNELS:
    for fmt, bm, bk, pf, tab in cases:
        s = dict(sig, gw_ptr="*i16") if fmt == 16 else sig  # IQ2_XXS rows are read as half-words
        k = compile_gluon_sm90(fn, s, dict(FMT=fmt, BM=bm, BK=bk, PF=pf, GL=m.group_layout(bk),
                                           XL=m.x_layout(bm, bk), **last(tab)), divisible, m.WARPS)
        out[f"{name}/{fmt}/{bm}/{bk}/{pf}/{tab}"] = facts(k)
print("RESULT", json.dumps(out))
"""


def test_gluon_gate_up_and_down_compile_for_sm90():
    res = run_gluon_compile_script(_COMPILE)
    for key, r in res.items():
        kernel, fmt, bm, bk, pf, tab = key.split("/")  # fmt: QuantFormat 16 IQ2_XXS, 12 Q4_K, 10 Q2_K
        bk = int(bk)
        loop_steps = 2 if pf == "True" else 1  # the prefetching loop is unrolled by two
        assert kernel in ("gate_up", "down")
        assert r["cubin"] > 0 and r["local"] == 0, (key, r)  # compiled, nothing spilled to local memory
        # one k16 wgmma per 16 inputs of each step in the loop, A in registers
        assert r["mma"] == loop_steps * bk // 16 and r["mma_reg_a"] == r["mma"], (key, r)
        assert r["waits"] and set(r["waits"]) == {"0"}, (key, r)
        assert r["stmatrix"] == 0, (key, r)
        # x (down: h): [bm, bk] fp16 per step in 16-byte copies over 256 threads, once before the loop and once
        # per step in it
        assert r["cp_async16"] == (1 + loop_steps) * max(1, int(bm) * bk * 2 // 16 // 256), (key, r)
        # the shared selector table: declared once, and every selector gather (one per record: bk / 16 per thread
        # and step, once before the loop and once per step in it) reads it; none without it
        if tab == "True":
            assert r["table_decl"] == 1 and r["ld_shared_b64"] == (1 + loop_steps) * bk // 16, (key, r)
        else:
            assert r["table_decl"] == 0 and r["ld_shared_b64"] == 0, (key, r)
