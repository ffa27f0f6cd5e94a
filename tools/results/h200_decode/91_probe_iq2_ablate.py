"""The driver of h200_decode/91 and 94 (run from the repository root with 91_iq2_ablate.patch applied to 5449d89's
dsv4/kernels_triton/moe_int8_gluon.py; the patch and this script were not committed as code): the Gluon IQ2_XXS
gate/up with parts of its work removed, moe_int8_gluon.ABLATE = 1 no selector gather, 2 no third/d word loads (the
loads masked off), 4 no activation loads, sums of them combined. Outputs are wrong by design; only times. q2, tuned
tiles, one plane and three, interleaved twice.
  python3 tools/results/h200_decode/91_probe_iq2_ablate.py ablate OUT.md   (91: every ABLATE value; the gate/up alone
      behind u's codes, quant u + gate/up, the whole call)
  python3 tools/results/h200_decode/91_probe_iq2_ablate.py l2 OUT.md       (94: ABLATE 0 and 7, the gate/up alone on
      the 6 selected experts of each call, on one expert 6 times (1/6 of the bytes), on one expert in every call
      (L2-resident))"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

import probe_decode as pd  # noqa: E402
from dsv4.kernels_triton import moe_int8, moe_int8_gluon  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402

mode, out = sys.argv[1], sys.argv[2]
device = torch.device("cuda")
dev = detect_device(device)
bw, table = pd.bandwidth_table(out, "Decode probes", ["case", "config", "stage", "µs", "MB", "GB/s", "% bw"])


def row(case, cfg, stage, ms, nbytes):
    gbs = pd.gb_s(nbytes, ms)
    table.add(case, cfg, stage, f"{ms * 1e3:.1f}", f"{nbytes / 1e6:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.1f}")


for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in pd.moe_cases(device):
    if recipe != "q2":
        continue
    same = [torch.full_like(s, 7 + i) for i, s in enumerate(sels)]  # one expert per call: 1/6 of the bytes
    one = [torch.full_like(s, 7) for s in sels]  # the same expert in every call: L2-resident
    for limbs, cfg in ((1, moe_int8.TUNED[gate.fmt]), (3, moe_int8.TUNED_LIMB3[gate.fmt])):
        uq = moe_int8.quant_q8_k(u, True, limbs=limbs)

        def alone(ss):
            return pd.graph_time_ms([lambda s=s: moe_int8.gate_up_int8(uq, gate, up, s, wts, pd.CLAMP, True, cfg, True)
                                     for s in ss])

        for _ in range(2):
            for a in ([0, 1, 2, 4, 3, 5, 6, 7] if mode == "ablate" else [0, 7]):
                moe_int8_gluon.ABLATE = a
                if mode == "ablate":
                    row("moe_q2", f"limbs={limbs} ablate {a}", "gate_up alone (u given)", alone(sels), gu_bytes)
                    row("moe_q2", f"limbs={limbs} ablate {a}", "quant u + gate_up",
                        pd.chain_gate_up_ms(u, gate, up, sels, wts, cfg, limbs), gu_bytes)
                    row("moe_q2", f"limbs={limbs} ablate {a}", "whole",
                        pd.whole_ms(u, gate, up, down, sels, wts, dev, cfg, limbs), gu_bytes + dn_bytes)
                else:
                    for label, ss in (("6 experts", sels), ("1 expert x6", same), ("1 expert, every call", one)):
                        row("moe_q2", f"limbs={limbs} ablate {a} {label}", "gate_up alone (u given)", alone(ss),
                            gu_bytes)
    moe_int8_gluon.ABLATE = 0
