"""The Gluon Q8_0 decode GEMV (dsv4/kernels_triton/q8_gluon.py) compiled for sm_90 on the CPU.

Gluon has no interpreter, so its numerics are checked on the GPU (tests/gpu/test_q8_gluon_gpu.py); here the
properties the kernel exists for are checked in the PTX Triton emits: one 16-byte load per lane per row (and
four for x) per step, no shared memory in a one-warp unsplit program (the x lanes never leave their thread,
unlike gemv_rows), one byte permute per code word lane, the griddepcontrol pair of programmatic dependent launch,
and a split-K sum made of atomic exchanges only (no atomic add: the order of additions is fixed). The CPU-side
routing (which calls reach the kernel) is checked without compiling.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.offline_compile import run_gluon_compile_script

_COMPILE = r"""
import json
from dsv4.kernels_triton import q8_gluon as m
from tests.kernels.offline_compile import compile_gluon_sm90

sig = dict(x_ptr="*fp32", w_ptr="*i8", s_ptr="*fp16", y_ptr="*fp32", slot_ptr="*i64", N="i32", R="i32",
           k_split="i32", stride_xg="i32", stride_w_words="i32", stride_s="i32", off_s="i32", BN="constexpr",
           WARPS="constexpr", PF="constexpr", SPLIT="constexpr", PDL="constexpr")
# the launcher's integers are multiples of 16 at every Flash shape (Triton specializes them so at run time)
ints = [n for n, v in sig.items() if v == "i32"]
out = {}
for bn, warps, pf, split in [(4, 1, False, 1), (8, 1, True, 1), (4, 1, True, 8)]:
    k = compile_gluon_sm90(m._q8_gluon_kernel, sig, dict(BN=bn, WARPS=warps, PF=pf, SPLIT=split, PDL=True), ints,
                           warps)
    ptx = k.asm["ptx"]
    out[f"{bn}/{warps}/{pf}/{split}"] = {
        "v4": ptx.count("ld.global.v4.b32"), "shared": ptx.count(".shared"), "prmt": ptx.count("prmt.b32"),
        "gdc": ptx.count("griddepcontrol.wait") + ptx.count("griddepcontrol.launch_dependents"),
        "exch": sum(1 for ln in ptx.splitlines() if "atom." in ln and ".exch." in ln),
        "other_atom": sum(1 for ln in ptx.splitlines() if "atom." in ln and ".exch." not in ln),
        "cubin": len(k.asm["cubin"])}
print("RESULT", json.dumps(out))
"""


def test_gluon_gemv_compiles_for_sm90():
    res = run_gluon_compile_script(_COMPILE)
    for key, r in res.items():
        bn, warps, pf, split = key.split("/")
        bn, split = int(bn), int(split)
        assert r["cubin"] > 0 and r["gdc"] == 2, (key, r)
        # per step: 16-byte loads of each row's 4 code words and of x's 16 floats (prefetch: the first step's
        # rows once more before the loop)
        assert r["v4"] >= bn + 4, (key, r)
        assert r["prmt"] == bn * 16, (key, r)  # one per code byte lane: 4 words x 4 bytes per row
        assert r["other_atom"] == 0, (key, r)
        if split == 1:
            assert r["exch"] == 0 and r["shared"] == 0, (key, r)  # one warp: no shared memory at all
        else:
            # per row: one exchange per tree level a slice meets a sibling at (log2 split)
            assert r["exch"] == bn * (split.bit_length() - 1), (key, r)


def test_gluon_routing_on_cpu(monkeypatch):
    """gemv_q8_t1 sends a one-token call of a TUNED_T1 shape to the Gluon kernel (when supports() says the device
    can run it) and everything else to gemv_rows_default; supports() refuses CPU tensors and bad tiles."""
    from dsv4.kernels_triton import blocks, q8_gemv, q8_gluon
    from dsv4.kernels_triton.configs import detect_device
    from dsv4.quant.formats import QuantFormat

    dev = detect_device("cpu")
    shape = (64, 1024)
    dw = blocks.to_device(blocks.synthetic_raw(QuantFormat.Q8_0, shape, device="cpu", seed=3), QuantFormat.Q8_0,
                          shape, "cpu")
    x1 = torch.randn(1, shape[1])
    assert not q8_gluon.supports(x1, dw, dev, 1, q8_gluon.GluonTile(4))  # CPU tensor: never
    calls = []
    monkeypatch.setattr(q8_gluon, "gemv_gluon", lambda x, dw, dev, g, tile: calls.append(("gluon", tile)))
    monkeypatch.setattr(q8_gemv, "gemv_rows_default", lambda x, dw, dev, g: calls.append(("rows", None)))
    monkeypatch.setattr(q8_gluon, "supports", lambda x, dw, dev, g, tile: True)
    monkeypatch.setattr(q8_gluon, "TUNED_T1", {(64, 1024, 1): q8_gluon.GluonTile(8, split=2)})
    q8_gluon.gemv_q8_t1(x1, dw, dev)
    q8_gluon.gemv_q8_t1(torch.randn(4, shape[1]), dw, dev)  # four tokens: gemv_rows
    monkeypatch.setattr(q8_gluon, "TUNED_T1", {})
    q8_gluon.gemv_q8_t1(x1, dw, dev)  # shape not in the table: gemv_rows
    assert calls == [("gluon", q8_gluon.GluonTile(8, split=2)), ("rows", None), ("rows", None)]


@pytest.mark.parametrize("tile,ok", [((4, 1, True, 1), True), ((4, 1, True, 3), False), ((4, 1, True, 128), False),
                                     ((4, 4, True, 4), False), ((48, 1, True, 1), False)])
def test_gluon_supports_tiles(tile, ok, monkeypatch):
    """The tile checks of supports() with the device check passed: split a power of two up to 64, K a multiple of
    the step times the split, row tiles inside one group (grouped x)."""
    from dsv4.kernels_triton import blocks, q8_gluon
    from dsv4.kernels_triton.configs import detect_device
    from dsv4.quant.formats import QuantFormat

    monkeypatch.setattr(q8_gluon, "hopper_plus", lambda dev, x: True)
    shape = (2048, 4096)
    dw = blocks.to_device(blocks.synthetic_raw(QuantFormat.Q8_0, shape, device="cpu", seed=5), QuantFormat.Q8_0,
                          shape, "cpu")
    x = torch.randn(1, 2, shape[1])
    assert q8_gluon.supports(x, dw, detect_device("cpu"), 2, q8_gluon.GluonTile(*tile)) == ok
