"""The Gluon Q8_0 decode GEMV (dsv4/kernels_triton/q8_gluon.py) natively on an NVIDIA sm_90+ GPU.

Gluon has no interpreter, so these run only on the GPU (tools/gpu_check.sh); the CPU suite compiles the kernel
for sm_90 offline (tests/kernels/test_q8_gluon_compile.py). Each Flash Q8_0 shape at T=1 with every tile the
probe and the tuned table use, against the float64 product of the dequantized weight (tolerance `triton_gemv`
fp32, as gemv_rows), NaN-poisoned output, split-K slots back to zero after each call, the same bits on a second
call, and odd shapes (rows not a multiple of the tile, K of one step) that the launcher must still get right.
"""
from __future__ import annotations

import pytest
import torch

from tests.gpu.test_triton_gpu import (NVIDIA_SM90, Q8_DENSE, _assert, _dense_reference, _dequant64, _weight,  # noqa: F401
                                      poison)

pytestmark = NVIDIA_SM90


def _tiles():
    from dsv4.kernels_triton.q8_gluon import TUNED_T1, GluonTile

    tiles = {GluonTile(4), GluonTile(8, split=4), GluonTile(16, warps=2, prefetch=False, split=2), GluonTile(2, split=8)}
    return sorted(tiles | set(TUNED_T1.values()), key=repr)


@pytest.mark.parametrize("name,fmt,n,k,groups", Q8_DENSE, ids=[d[0] for d in Q8_DENSE])
def test_gluon_gemv_flash_shapes(name, fmt, n, k, groups, poison):
    from dsv4.kernels_triton import q8_gluon
    from dsv4.kernels_triton.configs import detect_device

    raw, dw, qf = _weight(fmt, (n, k), seed=n + k)
    dev = detect_device("cuda")
    x = torch.randn((1, groups, k) if groups > 1 else (1, k), device="cuda",
                    generator=torch.Generator(device="cuda").manual_seed(7))
    ref = _dense_reference(x.double(), _dequant64(raw, qf, k), groups)
    ran = 0
    for tile in _tiles():
        if not q8_gluon.supports(x, dw, dev, groups, tile):
            continue
        ran += 1
        y = q8_gluon.gemv_gluon(x, dw, dev, groups, tile)
        _assert(y, ref, "triton_gemv", "fp32", f"{name} {tile}")
        y2 = q8_gluon.gemv_gluon(x, dw, dev, groups, tile)
        assert torch.equal(y, y2), f"{name} {tile}: not reproducible"
        slots = next(p for key, p in dw.plans.items() if key[0] == "gemv_gluon" and key[-1] == tile).slots
        assert int(slots.abs().sum()) == 0, f"{name} {tile}: exchange slots left dirty"
    assert ran >= 2, f"{name}: the Gluon kernel took fewer than two tiles"
    # the auto path (qmatmul_auto at T=1) on this shape, whichever kernel the table picks
    y = q8_gluon.gemv_q8_t1(x, dw, dev, groups)
    _assert(y, ref, "triton_gemv", "fp32", f"{name} gemv_q8_t1")


@pytest.mark.parametrize("n,k,groups,tile", [
    (1000, 1024, 1, (8, 1, True, 2)),   # rows not a multiple of the tile: the clamped rows are not stored
    (260, 512, 1, (4, 1, True, 1)),     # one K step: the prefetch is switched off
    (2048, 2048, 4, (8, 2, False, 2)),  # grouped x, two warps, split-K
    (96, 4096, 1, (32, 1, True, 8)),
])
def test_gluon_gemv_odd_shapes(n, k, groups, tile, poison):
    from dsv4.kernels_triton import q8_gluon
    from dsv4.kernels_triton.configs import detect_device

    raw, dw, qf = _weight("Q8_0", (n, k), seed=n)
    dev = detect_device("cuda")
    t = q8_gluon.GluonTile(*tile)
    x = torch.randn((1, groups, k) if groups > 1 else (1, k), device="cuda",
                    generator=torch.Generator(device="cuda").manual_seed(n))
    assert q8_gluon.supports(x, dw, dev, groups, t)
    ref = _dense_reference(x.double(), _dequant64(raw, qf, k), groups)
    _assert(q8_gluon.gemv_gluon(x, dw, dev, groups, t), ref, "triton_gemv", "fp32", f"{n}x{k} {t}")
