"""One call each of the T=1 decode kernels that miss their targets, for Nsight Compute: Q8_0 attn_output_a and
attn_output_b through gemv_rows_default (the auto tiles), then moe_int8.fused_int8 for q2 and q4 (two calls each;
the first one compiles). The problems of tools/probe_decode.py (q8_problem, moe_problem: the first selection).
--fused: each MoE call once more with h quantized inside the gate/up kernel (Int8MoeConfig.fuse_quant_h), one
plane and three, to set its gate/up kernel beside the unfused one.
Usage (on the GPU box, clocks left as they are):
  ncu --clock-control none --kernel-name regex:"_q8_rows_kernel|_gate_up_int8_kernel|_down_int8_kernel" \\
      --metrics <list> python tools/ncu_decode.py
(tools/results/h200_decode/12_ncu_decode.txt names the metrics it was run with)."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import CLAMP, DENSE, MOE  # noqa: E402
from probe_decode import moe_problem, q8_problem  # noqa: E402
from dsv4.kernels_triton import moe_int8, q8_gemv  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402


def main(argv=None) -> int:
    fused = "--fused" in (sys.argv[1:] if argv is None else argv)
    dev = detect_device(torch.device("cuda"))
    for d in DENSE:
        if d.name in ("attn_output_a", "attn_output_b"):
            ws, x = q8_problem(d, "cuda")
            for _ in range(2):
                q8_gemv.gemv_rows_default(x, ws[0], dev, d.groups)
            torch.cuda.synchronize()
            del ws
    for fgu, fdn in MOE.values():
        gate, up, down, sels, wts, u = moe_problem(fgu, fdn, "cuda")
        for _ in range(2):
            moe_int8.fused_int8(u, gate, up, down, sels[0], wts, CLAMP, dev)
        if fused:
            for limbs, table in ((1, moe_int8.TUNED), (moe_int8.LIMBS_FP32, moe_int8.TUNED_LIMB3)):
                for qh in (False, True):
                    cfg = replace(table[gate.fmt], fuse_quant_h=qh)
                    for _ in range(2):
                        moe_int8.fused_int8(u, gate, up, down, sels[0], wts, CLAMP, dev, cfg, limbs)
        torch.cuda.synchronize()
        del gate, up, down
    return 0


if __name__ == "__main__":
    sys.exit(main())
