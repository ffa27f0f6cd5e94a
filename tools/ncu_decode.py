"""One call each of the T=1 decode kernels that miss their targets, for Nsight Compute: Q8_0 attn_output_a and
attn_output_b through gemv_rows_default (the auto tiles), then moe_int8.fused_int8 for q2 and q4 (two calls each;
the first one compiles). Synthetic Flash-shaped weights as tools/bench_kernels.py builds them.
Usage (on the GPU box, clocks left as they are):
  ncu --clock-control none --kernel-name regex:"_q8_rows_kernel|_gate_up_int8_kernel|_down_int8_kernel" \\
      --metrics <list> python tools/ncu_decode.py
(tools/results/h200_decode/12_ncu_decode.txt names the metrics it was run with)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import CLAMP, D, DENSE, K_USED, MOE, N_EXPERT, moe_weights  # noqa: E402
from dsv4.kernels_triton import blocks, moe_int8, q8_gemv  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402


def main() -> int:
    dev = detect_device(torch.device("cuda"))
    for d in DENSE:
        if d.name in ("attn_output_a", "attn_output_b"):
            w = blocks.to_device(blocks.synthetic_raw(d.fmt, (d.n, d.k), device="cuda", seed=1), d.fmt, (d.n, d.k),
                                 "cuda")
            x = torch.randn((1, d.groups, d.k) if d.groups > 1 else (1, d.k), device="cuda")
            for _ in range(2):
                q8_gemv.gemv_rows_default(x, w, dev, d.groups)
            torch.cuda.synchronize()
    for fgu, fdn in MOE.values():
        gate, up, down = moe_weights(fgu, fdn, "cuda")
        sel = torch.randperm(N_EXPERT)[:K_USED][None].cuda()
        u = torch.randn((1, D), device="cuda")
        wts = torch.rand((1, K_USED), device="cuda")
        for _ in range(2):
            moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev)
        torch.cuda.synchronize()
        del gate, up, down
    return 0


if __name__ == "__main__":
    sys.exit(main())
