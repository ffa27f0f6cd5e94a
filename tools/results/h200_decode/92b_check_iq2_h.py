"""The check of h200_decode/92b (from the repository root, at 5449d89 plus the Prefetch.ALL kernel of 92): the Gluon
IQ2_XXS gate/up's h against the Triton kernel's and float64 (q2, T=1 and 4; tile prefetch 2 = Prefetch.ALL)."""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402

import tests.gpu.test_moe_int8_gluon_gpu as G  # noqa: E402
from dsv4.kernels_triton import moe_int8  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402

for t in (1, 4):
    raws, (gate, up, down), u, sel, wts = G._moe_problem("q2", t)
    for limbs in (1, 3):
        uq = moe_int8.quant_q8_k(u, True, limbs=limbs)
        ref = G._h_reference(raws, uq, sel, wts, True)
        base = (moe_int8.TUNED if limbs == 1 else moe_int8.TUNED_LIMB3)[QuantFormat.IQ2_XXS]
        ht = moe_int8.gate_up_int8(uq, gate, up, sel, wts, G.CLAMP, True, replace(base, gluon_gate_up=None), True)
        for tile in [(1, 1, True, 1), (1, 1, 2, 1), (2, 1, False, 1), (2, 1, 2, 1), (4, 1, False, 1)]:
            hg = moe_int8.gate_up_int8(uq, gate, up, sel, wts, G.CLAMP, True,
                                       replace(base, gluon_gate_up=moe_int8.Int8GluonTile(*tile)), True)
            m = ref.abs().max()
            big = ref.abs() > 1e-3 * m
            rel = lambda h: ((h.double() - ref).abs()[big] / ref.abs()[big]).max().item()
            print(f"T={t} limbs={limbs} tile={tile}: gluon==triton {torch.equal(hg, ht)} "
                  f"n_diff {(hg != ht).sum().item()} max|g-t|/max {((hg - ht).abs().max() / ht.abs().max()).item():.2e} "
                  f"| vs f64: gluon {((hg.double() - ref).abs().max() / m).item():.2e} (elem {rel(hg):.2e}) "
                  f"triton {((ht.double() - ref).abs().max() / m).item():.2e} (elem {rel(ht):.2e})", flush=True)
