"""moe_int8's Gluon Q4_K kernels (dsv4/kernels_triton/moe_int8_gluon.py) compiled for sm_90 on the CPU.

Gluon has no interpreter: the kernels' numerics run on the GPU (tests/gpu/test_moe_int8_gluon_gpu.py). Here the
code Triton emits for the tiles the GPU tests and the probe use is checked for what the layout exists for: each
lane's weight words arrive by 16-byte loads (codes and header, both matrices of the gate/up stage, also the next
step's where prefetched), one dp4a per code word and nibble half of every row the lane holds (no redundant dots),
the activations by two 16-byte loads per step, the fused h quantizer's two atomics (arrival, reset) only where h is
quantized in the kernel, and (almost) nothing spilled (ptxas' stack frame, read back by cuobjdump).
"""
from __future__ import annotations

from tests.kernels.offline_compile import run_gluon_compile_script

_COMPILE = r"""
import json, os, re, subprocess, tempfile, triton
from dsv4.kernels_triton import moe_int8_gluon as m
from tests.kernels.offline_compile import compile_gluon_sm90

INTS = ("F", "D", "KSEL", "stride_w", "stride_xq", "stride_xd", "stride_xs", "stride_ht", "stride_hq", "stride_hd",
        "stride_hs", "stride_ot")
# the launchers' pointers and these integers are multiples of 16 at Flash shapes (Triton specializes them so)
DIV = ("F", "D", "stride_w", "stride_xq", "stride_xs", "stride_ht", "stride_hq", "stride_hs", "stride_ot")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
# gate/up: qh = h quantized in the kernel; down: qh = STEPS (0: looped, 6 or 12: unrolled over (slot, K step))
for kind, rows, wk, pf, wr, qh in [("gu", 4, 1, True, 1, False), ("gu", 4, 1, False, 1, True),
                                   ("gu", 16, 1, True, 4, True), ("gu", 8, 2, False, 1, False),
                                   ("dn", 2, 1, True, 1, 0), ("dn", 4, 2, False, 1, 0), ("dn", 8, 1, True, 4, 0),
                                   ("dn", 2, 2, False, 1, 6), ("dn", 2, 1, False, 1, 12)]:
    fn = m._q4_gate_up_kernel if kind == "gu" else m._q4_down_kernel
    sig = {n: ("i32" if n in INTS else "*i32") for n in fn.arg_names}
    sig.update({n: "*fp32" for n in ("xd_ptr", "wts_ptr", "h_ptr", "hd_ptr", "out_ptr") if n in sig})
    const = dict(ROWS=rows, WARPS_K=wk, WARPS_ROWS=wr, PF=pf, PDL=True, **({"QH": qh} if kind == "gu" else
                                                                            {"STEPS": qh}))
    if kind == "gu":
        sig["clamp"] = "fp32"
    sig.update({k: "constexpr" for k in const})
    k = compile_gluon_sm90(fn, sig, const, DIV, wk * wr)
    ptx = k.asm["ptx"]
    stack = None
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        stack = int(re.search(r"STACK:(\d+)", res).group(1))
    out[f"{kind}/{rows}/{wk}/{pf}/{wr}/{qh}"] = {
        "dp4a": ptx.count("dp4a.s32.s32"), "ld16": len(re.findall(r"ld\.global[^;]*\.v4\.b32", ptx)),
        "atom": len(re.findall(r"atom\.global", ptx)), "local": ptx.count(".local"), "stack": stack}
print("RESULT", json.dumps(out))
"""


MAX_STACK_BYTES = 8


def test_q4_gluon_kernels_compile_for_sm90():
    res = run_gluon_compile_script(_COMPILE)
    assert len(res) == 9
    for key, r in res.items():
        kind, rows, wk, pf, wr, qh = key.split("/")
        rpt = int(rows) // int(wr)  # rows per thread
        mats = 2 if kind == "gu" else 1
        steps = int(qh) if kind == "dn" and int(qh) else 1  # unrolled: every step's code is its own
        # at most one register pair spilled: Triton 3.6's ptxas (the H200 box) spills nothing, 3.9's keeps 8 bytes of
        # stack in the prefetched gate/up tiles (168 registers)
        assert r["local"] == 0 and (r["stack"] or 0) <= MAX_STACK_BYTES, (key, r)
        assert r["dp4a"] == rpt * mats * 8 * steps, (key, r)  # 4 code words x 2 nibble halves per row and matrix
        # codes + header per row and matrix, twice where prefetched (the prologue's step and the loop's next step);
        # two activation loads; the fused quantizer reads h by 16-byte loads too
        weight_loads = rpt * mats * 2 * (2 if pf == "True" else 1) * steps
        assert r["ld16"] >= weight_loads + 2 * steps, (key, r)
        assert r["atom"] == (2 if qh == "True" else 0), (key, r)
