"""Bandwidth ceilings for the Q8_0 decode GEMV shapes: how fast can a kernel merely READ these bytes?

For each large Q8_0 matrix of the Flash model (attn_q_b, attn_output_a/b, output) this times, over
rotating weight copies in one CUDA graph (as tools/bench_kernels.py does):
  * `triton_read`: a Triton kernel that loads the repacked code words with the gemv_rows tiling and
    only xor-folds them (no decode, no FMA) - the ceiling any GEMV with that tiling can reach;
  * `torch_copy`: a device-to-device copy of the same bytes (read + write, counted as read bytes x 2);
  * `cublas_bf16_gemv`: torch.mv on a bf16 matrix of the same byte size (what cuBLAS reaches).
It prints a markdown table with GB/s and % of the streaming read (4 GiB sum) of the same run.
Usage: python tools/probe_bandwidth.py [--out probe.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import graph_time_ms, n_copies  # noqa: E402
from probe_table import bandwidth_table, gb_s  # noqa: E402

SHAPES = {"attn_q_b": (32768, 1024), "attn_output_a": (8192, 4096), "attn_output_b": (4096, 8192),
          "output": (129280, 4096)}
TILINGS = [(8, 1024, 4), (16, 1024, 8), (4, 1024, 4), (2, 2048, 4), (8, 512, 4)]  # rows, codes, warps


@triton.jit
def _read_kernel(w_ptr, out_ptr, N, K, stride_words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    W: tl.constexpr = BLOCK_K // 4
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.minimum(rn, N - 1).to(tl.int64)
    acc = tl.zeros([BLOCK_N, W], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        acc ^= tl.load(w_ptr + r[:, None] * stride_words + (k0 >> 2) + tl.arange(0, W)[None, :])
    tl.store(out_ptr + rn, tl.xor_sum(acc, axis=1), mask=rn < N)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_bandwidth.md")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    bw, table = bandwidth_table(args.out, "Read-bandwidth ceilings",
                                ["shape", "MB", "probe", "tiling", "µs", "GB/s", "% bw"])

    def row(name, mb, probe, tiling, ms, nbytes):
        gbs = gb_s(nbytes, ms)
        table.add(name, f"{mb:.1f}", probe, tiling, f"{ms * 1e3:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.1f}")

    for name, (n, k) in SHAPES.items():
        row_bytes = k * 34 // 32
        nbytes = n * row_bytes
        copies = [torch.randint(-2**31, 2**31 - 1, (n, row_bytes // 4), dtype=torch.int32, device=dev)
                  for _ in range(n_copies(nbytes, 1))]
        out = torch.empty(n, dtype=torch.int32, device=dev)
        for bn, bk, warps in TILINGS:
            calls = [lambda w=w, bn=bn, bk=bk, warps=warps: _read_kernel[(triton.cdiv(n, bn),)](
                w, out, n, k, row_bytes // 4, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps) for w in copies]
            row(name, nbytes / 1e6, "triton_read", f"{bn}x{bk} w{warps}", graph_time_ms(calls), nbytes)
        dst = torch.empty_like(copies[0])
        calls = [lambda w=w: dst.copy_(w) for w in copies]
        row(name, nbytes / 1e6, "torch_copy", "", graph_time_ms(calls), 2 * nbytes)
        del copies, dst
        mats = [torch.randn(n, row_bytes // 2, dtype=torch.bfloat16, device=dev) for _ in range(n_copies(nbytes, 1))]
        x = torch.randn(row_bytes // 2, dtype=torch.bfloat16, device=dev)
        calls = [lambda m=m: torch.mv(m, x) for m in mats]
        row(name, nbytes / 1e6, "cublas_bf16_gemv", "", graph_time_ms(calls), nbytes)
        del mats
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
