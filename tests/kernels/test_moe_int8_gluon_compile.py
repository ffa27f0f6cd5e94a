"""moe_int8's Gluon kernels (dsv4/kernels_triton/moe_int8_gluon.py: Q4_K and IQ2_XXS gate/up, Q4_K and Q2_K down)
compiled for sm_90 on the CPU.

Gluon has no interpreter: the kernels' numerics run on the GPU (tests/gpu/test_moe_int8_gluon_gpu.py). Here the code
Triton emits for the tiles the GPU tests and the probe use is checked for what the layout exists for: each lane's Q4_K
weight words arrive by 16-byte loads (two code pieces and the header per row and matrix and K step; Q2_K's 84-byte
blocks allow word loads only), one dp4a per code word, nibble half (Q2_K: shift) and activation plane of every row the
lane holds (no redundant dots), one dp2a per sub-block pair and plane for the scales and (one plane) one for the mins,
the activations by 16-byte loads, no atomics, and (almost) nothing spilled (ptxas' stack frame, read back by cuobjdump).
"""
from __future__ import annotations

from tests.kernels.offline_compile import run_gluon_compile_script

_COMPILE = r"""
import json, os, re, subprocess, tempfile, triton
from dsv4.kernels_triton import moe_int8_gluon as m
from tests.kernels.offline_compile import compile_gluon_sm90

INTS = ("F", "D", "KSEL", "stride_w", "stride_xq", "stride_xd", "stride_xs", "stride_ht", "stride_hq", "stride_hd",
        "stride_hs", "stride_ot", "stride_xl", "stride_hl")
# the launchers' pointers and these integers are multiples of 16 at Flash shapes (Triton specializes them so)
DIV = ("F", "D", "stride_w", "stride_xq", "stride_xs", "stride_ht", "stride_hq", "stride_hs", "stride_ot", "stride_xl",
       "stride_hl")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
# (kind, rows, warps along K, prefetch (2: Prefetch.ALL), warps along rows, ks, steps, activation planes): gate/up
# steps = D / (2048 warps_k) at D = 4096 (IQ2_XXS, kind g2: D / (1024 warps_k)); down ks = K steps per slot (F / 2048:
# 1 at Flash, 2 at F = 4096), steps = 6 ks
for kind, rows, wk, pf, wr, ks, st, lb in [("gu", 8, 1, False, 2, 0, 2, 1), ("gu", 2, 1, True, 1, 0, 2, 1),
                                           ("gu", 4, 1, False, 1, 0, 2, 1), ("gu", 16, 1, False, 4, 0, 2, 1),
                                           ("gu", 2, 2, False, 1, 0, 1, 1), ("dn", 4, 1, True, 1, 1, 6, 1),
                                           ("dn", 2, 1, False, 1, 1, 6, 1), ("dn", 16, 1, False, 4, 1, 6, 1),
                                           ("dn", 4, 1, True, 1, 2, 12, 1), ("gu", 2, 1, False, 1, 0, 2, 3),
                                           ("dn", 4, 1, False, 1, 1, 6, 3), ("d2", 4, 1, True, 1, 1, 6, 1),
                                           ("d2", 4, 1, False, 1, 1, 6, 3), ("d2", 8, 1, False, 2, 1, 6, 1),
                                           ("d2", 2, 1, True, 1, 2, 12, 3), ("dn", 4, 2, True, 1, 8, 3, 1),
                                           ("dn", 8, 2, False, 1, 8, 3, 3), ("d2", 4, 2, True, 1, 8, 3, 1),
                                           ("d2", 4, 2, False, 1, 8, 3, 3), ("g2", 1, 1, True, 1, 0, 4, 1),
                                           ("g2", 2, 1, False, 1, 0, 4, 3), ("g2", 4, 1, True, 1, 0, 4, 1),
                                           ("g2", 8, 2, False, 2, 0, 2, 1), ("g2", 4, 2, False, 2, 0, 2, 3),
                                           ("g2", 2, 1, 2, 1, 0, 4, 1), ("g2", 4, 2, 2, 2, 0, 2, 3)]:
    fn = {"gu": m._q4_gate_up_kernel, "g2": m._iq2_gate_up_kernel}.get(kind, m._down_kernel)
    sig = {n: ("i32" if n in INTS else "*i32") for n in fn.arg_names}
    sig.update({n: "*fp32" for n in ("xd_ptr", "wts_ptr", "h_ptr", "hd_ptr", "out_ptr") if n in sig})
    sig.update({n: "*i16" for n in ("sel16_ptr",) if n in sig})
    const = dict(ROWS=rows, WARPS_K=wk, WARPS_ROWS=wr, PF=pf, PDL=True, STEPS=st, LIMBS=lb,
                 **({} if kind in ("gu", "g2") else {"KSTEPS": ks, "Q2": kind == "d2", "FLAT": wk > 1}))
    if kind in ("gu", "g2"):
        sig["clamp"] = "fp32"
    sig.update({k: "constexpr" for k in const})
    # Q2_K rows are 168 words at Flash shapes: not a multiple of 16, so not specialized
    k = compile_gluon_sm90(fn, sig, const, [n for n in DIV if not (kind == "d2" and n == "stride_w")], wk * wr)
    ptx = k.asm["ptx"]
    stack = None
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        stack = int(re.search(r"STACK:(\d+)", res).group(1))
    out[f"{kind}/{rows}/{wk}/{pf}/{wr}/{ks}/{st}/{lb}"] = {
        "dp4a": len(re.findall(r"dp4a\.[su]32\.s32", ptx)), "dp2a": ptx.count("dp2a.lo.s32.s32"),
        "ld16": len(re.findall(r"ld\.global[^;]*\.v4\.b32", ptx)),
        "ld4": len(re.findall(r"ld\.global(?:\.[a-z_:0-9]+)*\.b32 ", ptx)), "prmt": ptx.count("prmt.b32"),
        "ld4_pre": len(re.findall(r"ld\.global(?:\.[a-z_:0-9]+)*\.b32 ", ptx.split("griddepcontrol.wait")[0])),
        "ld2": len(re.findall(r"ld\.global(?:\.[a-z_:0-9]+)*\.[bsu]16 ", ptx)),
        "atom": len(re.findall(r"atom\.global", ptx)),
        "local": ptx.count(".local"), "stack": stack}
print("RESULT", json.dumps(out))
"""


# ptxas' stack frame at most two register pairs: Triton 3.6 and 3.7 spill nothing in these tiles; 3.9 keeps 8 bytes
# and 3.8 16 in the 12-step down tile (F = 4096, not a Flash shape), where both take 254-255 registers against 3.6's
# 114 (their code for the unrolled, prefetched K loop holds more steps' words at once)
MAX_STACK_BYTES = 16


def test_gluon_kernels_compile_for_sm90():
    res = run_gluon_compile_script(_COMPILE)
    assert len(res) == 26
    for key, r in res.items():
        kind, rows, wk, pf, wr, ks, st, lb = key.split("/")
        rpt, mats, steps = int(rows) // int(wr), 2 if kind in ("gu", "g2") else 1, int(st)  # rows per thread; steps
        planes = int(lb)  # (unrolled), activation planes
        # (almost) nothing spilled: MAX_STACK_BYTES
        assert r["local"] == 0 and (r["stack"] or 0) <= MAX_STACK_BYTES, (key, r)
        assert r["atom"] == 0, (key, r)  # no counters, no atomics (h is quantized by its own launch)
        if kind == "g2":  # IQ2_XXS: per row, matrix, step and record (8 weights) one 2-byte selector gather and two
            # dp4a per plane (no redundant dots); the group's 3 words + d by word loads (66-byte blocks); the 8
            # activation words of a lane's group by two 16-byte loads per step and plane, shared by all its rows
            records = rpt * mats * steps * 4
            assert r["dp4a"] == 2 * records * planes and r["ld2"] == records, (key, r)
            assert r["ld16"] == 2 * steps * planes and r["ld4"] >= rpt * mats * steps * 4, (key, r)
            # the weight words before griddepcontrol.wait: every step's with Prefetch.ALL (2), else the first step's
            before = rpt * mats * 4 * (steps if pf == "2" else 1)
            assert before <= r["ld4_pre"] < before + rpt * mats * 4, (key, r)
            continue
        # per row, matrix, step and plane: 2 pieces x 4 code words x 2 nibble halves, 2 pieces' scales; the mins by
        # dp2a on one plane (int sums), in fp32 on three
        assert r["dp4a"] == rpt * mats * 16 * steps * planes, (key, r)
        assert r["dp2a"] == rpt * mats * steps * (4 if planes == 1 else 2 * planes), (key, r)
        if kind == "d2":  # Q2_K: 84-byte blocks, so code and header words by word loads (4 + 3 per row and step);
            # the activations by 16-byte loads, one per shift, step and plane
            assert r["ld16"] == 4 * steps * planes and r["ld4"] >= rpt * steps * 7, (key, r)
            if pf == "True":  # before griddepcontrol.wait: the first step's words (and the expert ids), not more
                assert rpt * 7 <= r["ld4_pre"] < 2 * rpt * 7, (key, r)
        else:  # Q4_K: 2 code pieces + the header per row, matrix and step; 4 activation loads per step and plane
            # (2 pieces x low/high) (Triton 3.6 loads the header once per piece: replicated along the piece axis)
            assert r["ld16"] >= rpt * mats * 3 * steps + 4 * steps * planes, (key, r)


def _q4_weight(fmt, rows: int, k: int, offset: int = 0):
    """A zeroed DeviceWeight of 2 experts [rows, k] whose rows start `offset` bytes into their buffer."""
    import torch

    from dsv4.kernels_triton.blocks import DeviceWeight

    row_bytes = k // 256 * 144
    buf = torch.zeros(2 * rows * row_bytes + offset, dtype=torch.uint8)[offset:].view(2, rows, row_bytes)
    return DeviceWeight(fmt=fmt, shape=(2, rows, k), buf=buf, w=None, s=None, g=None, sel16=None, stride_w=0,
                        stride_s=0, off_s=0)


def test_q4_gluon_plans_check_once_and_reject():
    """The static half of supports()/supports_down() (format, tile, 16-byte rows) is decided once per weight and
    tile and handed to the launcher with the word views; formats, tiles and alignments it cannot take give None,
    and a CPU tensor is never taken."""
    import torch

    from dsv4.kernels_triton import moe_int8, moe_int8_gluon as m
    from dsv4.kernels_triton.configs import detect_device
    from dsv4.quant.formats import QuantFormat

    gate, up = _q4_weight(QuantFormat.Q4_K, 2048, 4096), _q4_weight(QuantFormat.Q4_K, 2048, 4096)
    tile = moe_int8.Int8GluonTile(4)
    plan = m._gate_up_plan(gate, up, tile)
    assert plan is m._gate_up_plan(gate, up, tile) and plan[2] == 4096 // 256 * 36  # words per row
    assert m._gate_up_plan(_q4_weight(QuantFormat.Q2_K, 2048, 4096), up, tile) is None
    assert m._gate_up_plan(gate, up, moe_int8.Int8GluonTile(3)) is None  # 3 rows per thread: not a power of two
    assert m._gate_up_plan(gate, _q4_weight(QuantFormat.Q4_K, 2048, 4096, offset=4), tile) is None  # unaligned
    down = _q4_weight(QuantFormat.Q4_K, 4096, 2048)
    assert m._down_plan(down, tile)[1] == 2048 // 256 * 36
    flat = moe_int8.Int8GluonTile(4, warps_k=2)  # a 4096-wide step over F = 2048: FLAT (two slots per step)
    assert m._down_plan(down, flat)[1] == 2048 // 256 * 36
    assert m.flat_steps(flat, 2048, 6) == 3 and m.flat_steps(flat, 2048, 5) == 0  # 5 slots: no whole steps
    assert m.down_tile(flat, 2048, 6) == flat and m.down_tile(flat, 2048, 5) == moe_int8.Int8GluonTile(4)
    # F = 256: only tiles with warps along K run flat; otherwise the stage is the Triton kernel's
    assert m.down_tile(flat, 256, 16) == flat and m.down_tile(flat, 256, 4) is None
    assert m._down_plan(_q4_weight(QuantFormat.Q4_K, 4096, 256), moe_int8.Int8GluonTile(4)) is None
    assert m._down_plan(_q4_weight(QuantFormat.Q4_K, 4096, 3072), flat) is None  # 4096 not a multiple of F
    six = _q4_weight(QuantFormat.Q4_K, 4104, 2048)  # rows a multiple of 6
    assert m._down_plan(six, moe_int8.Int8GluonTile(6, warps_k=2)) is None  # 6 rows per thread: not a power of two
    assert not m.supports(gate, up, detect_device("cpu"), torch.zeros(1), tile)


def test_iq2_gluon_plan_takes_word_aligned_rows_and_whole_steps():
    """The IQ2_XXS gate/up plan: 66-byte blocks are read by word loads, so a row that is only word-aligned is taken
    (a Q4_K row there is not); a step is IQ2_PAIRS_PER_WARP block pairs per warp along K, and K must be a whole
    number of steps; gate and up must share the format."""
    import torch

    from dsv4.kernels_triton import moe_int8, moe_int8_gluon as m
    from dsv4.kernels_triton.blocks import DeviceWeight
    from dsv4.quant.formats import QuantFormat

    def iq2(rows, k, offset=0):
        row_bytes = k // 256 * 66
        buf = torch.zeros(2 * rows * row_bytes + offset, dtype=torch.uint8)[offset:].view(2, rows, row_bytes)
        return DeviceWeight(fmt=QuantFormat.IQ2_XXS, shape=(2, rows, k), buf=buf, w=None, s=None, g=None, sel16=None,
                            stride_w=0, stride_s=0, off_s=0)

    one, two = moe_int8.Int8GluonTile(1, prefetch=True), moe_int8.Int8GluonTile(4, warps_k=2)
    assert m.iq2_block_k(one) == 1024 and m.iq2_block_k(two) == 2048
    gate = iq2(2048, 4096, offset=4)
    plan = m._gate_up_plan(gate, iq2(2048, 4096, offset=4), one)
    assert plan is not None and plan[2] == 4096 // 256 * 66 // 4  # words per row
    assert m._gate_up_plan(iq2(2048, 3072), iq2(2048, 3072), one) is not None  # 3 steps of 1024
    assert m._gate_up_plan(iq2(2048, 3072), iq2(2048, 3072), two) is None  # 3072 is not whole 2048-input steps
    assert m._gate_up_plan(iq2(2048, 4096), _q4_weight(QuantFormat.Q4_K, 2048, 4096), one) is None  # mixed formats
    assert m._gate_up_plan(iq2(2046, 4096), iq2(2046, 4096), moe_int8.Int8GluonTile(4)) is None  # partial row tile


def test_prefetch_all_only_where_the_kernel_holds_it():
    """Prefetch.ALL reaches a kernel only as the IQ2_XXS gate/up's, with at most ALL_STEPS_MAX steps (its named
    registers); elsewhere it reads as NEXT, and False / True as NONE / NEXT."""
    from dsv4.kernels_triton import moe_int8_gluon as m
    from dsv4.kernels_triton.moe_int8 import Int8GluonTile, Prefetch

    def pf(prefetch, steps=0):
        return m._prefetch(Int8GluonTile(2, prefetch=prefetch), steps)

    assert pf(Prefetch.ALL, m.ALL_STEPS_MAX) == pf(Prefetch.ALL, 1) == Prefetch.ALL
    assert pf(Prefetch.ALL, m.ALL_STEPS_MAX + 1) == Prefetch.NEXT  # more steps than named registers
    assert pf(Prefetch.ALL) == Prefetch.NEXT  # the kernels without the mode (Q4_K gate/up, down)
    assert pf(True, 4) == pf(Prefetch.NEXT) == Prefetch.NEXT and pf(False, 4) == Prefetch.NONE
