"""Q8_0 prefill (T=2048, Flash shapes) in parts: what the fp32 -> fp16 cast of x costs beside cuBLAS.

`qmatmul_fast.gemm_dequant_q8` (the `auto` prefill path) is one Triton launch that dequantizes the weight rows
to fp16 and rounds x to fp16, then one cuBLAS fp16 GEMM with fp32 output. On the narrow matrices (attn_kv
512 rows, attn_q_a 1024) the cast of x (T*K fp32 read, fp16 written) is about half the time. Rows:
  * the whole op for cast tiles (elements per cast program, warps of the launch);
  * the same with torch's own cast (x.to(fp16)) and a dequant-only launch;
  * the parts alone: the fused launch, torch's cast, the cuBLAS GEMM on ready fp16 inputs.
Times are CUDA-graph replays (bench_kernels.graph_time_ms, median; Launch.FLUSH, as the benchmark times prefill,
unless a row names another Launch mode); % bf16 against a same-run bf16 torch.matmul at the shape
(bench_kernels.bf16_tflops: do_bench, eager), as in tools/bench_kernels.py; the bf16 product is also timed
as a graph both ways. GB/s counts the
bytes the part moves (x read, x16 written, weights read, fp16 weights written, output written).
Usage: python tools/probe_q8_prefill.py [--out probe_q8_prefill.md] [--shapes attn_kv attn_q_a ...]
       [--tiles all|default] [--repeat N] [--no-parts]   (--no-parts: only the whole-op rows)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import DENSE, Launch, bf16_tflops, commit_id, graph_time_ms  # noqa: E402
from probe_table import ProbeTable, gb_s, utc_stamp  # noqa: E402
from dsv4.kernels_triton import blocks, qmatmul_fast as qf  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402

T = 2048
# (elements per cast program, warps of the fused launch); the first is the shipped default
CAST_TILES = [(qf.CAST_BLOCK, qf.CAST_WARPS), (2048, 4), (8192, 4), (8192, 8), (16384, 8), (16384, 16), (4096, 8)]


class Sizes(NamedTuple):
    """Bytes each part of the prefill path moves at one shape: x (fp32), x16, w16 (the dequantized weight), y
    (fp32 out), and the whole op (x read, x16 written, Q8_0 weight read, w16 written, y written)."""

    x: int
    x16: int
    w16: int
    y: int
    whole: int


def sizes_of(d, x, dw) -> Sizes:
    x_bytes, x16, w16, y = x.numel() * 4, x.numel() * 2, d.n * d.k * 2, T * d.n * 4
    return Sizes(x_bytes, x16, w16, y, x_bytes + x16 + dw.nbytes + w16 + y)


def parts(d, x, dw, g, add, ref, sz: Sizes):
    """The rows of one shape beside the whole op: torch's cast with the dequant-only launch and the same GEMM,
    then each part alone."""
    w16 = torch.empty((d.n, d.k), device=x.device, dtype=torch.float16)

    def dequant():
        qf.dequant_q8_rows(dw, w16)

    def gemm(x16):
        return qf.fp16_gemm(x16, w16, g)

    def torch_cast_whole():
        x16 = x.to(torch.float16)
        dequant()
        return gemm(x16)

    add("whole, torch cast + dequant launch", graph_time_ms([torch_cast_whole], Launch.FLUSH), sz.whole,
        torch_cast_whole().reshape(T, d.n), ref)
    add("part: torch cast x -> fp16", graph_time_ms([lambda: x.to(torch.float16)], Launch.FLUSH),
        sz.x + sz.x16)
    add("part: dequant launch alone", graph_time_ms([dequant], Launch.FLUSH), dw.nbytes + sz.w16)
    x16 = x.to(torch.float16)
    add("part: cuBLAS GEMM on fp16 inputs", graph_time_ms([lambda: gemm(x16)], Launch.FLUSH),
        sz.x16 + sz.w16 + sz.y)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_q8_prefill.md")
    ap.add_argument("--shapes", nargs="+", default=[d.name for d in DENSE if d.fmt.name == "Q8_0"])
    ap.add_argument("--tiles", choices=("all", "default"), default="all", help="cast tiles: CAST_TILES or the first")
    ap.add_argument("--repeat", type=int, default=1, help="time the whole-op rows this many times, interleaved")
    ap.add_argument("--no-parts", action="store_true", help="skip the launch-mode and per-part rows")
    ap.add_argument("--commit", default=None, help="commit to stamp (default: git here; a box's copy may be stale)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    dev = detect_device(device)
    table = ProbeTable(args.out, f"Q8_0 prefill parts, T={T} ({torch.cuda.get_device_name(device)})",
                       f"{utc_stamp()} · commit {args.commit or commit_id()} · torch {torch.__version__} · "
                       f"triton {triton.__version__}",
                       ["shape", "what", "µs", "GB/s", "TFLOP/s", "% bf16", "max diff vs default"])
    for d in DENSE:
        if d.name not in args.shapes or d.fmt.name != "Q8_0":
            continue
        g = d.groups
        x = torch.randn((T, g, d.k) if g > 1 else (T, d.k), device=device, dtype=torch.float32)
        raw = blocks.synthetic_raw(d.fmt, (d.n, d.k), device=device, seed=1)
        dw = blocks.to_device(raw, d.fmt, (d.n, d.k), device)
        del raw
        flops = 2.0 * T * d.n * d.k
        bf16 = bf16_tflops(T, d.n, d.k, device, g)
        table.add(d.name, "bf16 torch.matmul (eager do_bench)", f"{flops / bf16 / 1e6:.1f}", "", f"{bf16:.1f}",
                  "100.0", "")
        sz = sizes_of(d, x, dw)
        if not args.no_parts:  # the bf16 product as a graph, in each Launch mode
            a16 = torch.randn((g, T, d.k) if g > 1 else (T, d.k), device=device, dtype=torch.bfloat16)
            b16 = torch.randn((g, d.k, d.n // g) if g > 1 else (d.k, d.n), device=device, dtype=torch.bfloat16)
            for mode in Launch:
                ms = graph_time_ms([lambda: torch.bmm(a16, b16) if g > 1 else a16 @ b16], mode)
                tf = flops / (ms * 1e-3) / 1e12
                table.add(d.name, f"bf16 torch.matmul, graph, launch {mode.value}",
                          f"{ms * 1e3:.1f}", "", f"{tf:.1f}", f"{100 * tf / bf16:.1f}", "")
            del a16, b16

        def add(what, ms, nbytes, out=None, ref=None):
            diff = f"{(out - ref).abs().max().item():.3g}" if out is not None and ref is not None else ""
            tf = flops / (ms * 1e-3) / 1e12
            table.add(d.name, what, f"{ms * 1e3:.1f}", f"{gb_s(nbytes, ms):.0f}", f"{tf:.1f}",
                      f"{100 * tf / bf16:.1f}", diff)

        ref = None
        for rep in range(args.repeat):
            for cb, cw in CAST_TILES if args.tiles == "all" else CAST_TILES[:1]:
                def call(cb=cb, cw=cw):
                    return qf.gemm_dequant_q8(x, dw, dev, g, cast_block=cb, cast_warps=cw)
                out = call().reshape(T, d.n).clone()
                ref = out if ref is None else ref
                what = f"whole, cast {cb} elements x {cw} warps"
                add(what, graph_time_ms([call], Launch.FLUSH), sz.whole, out, ref)
                if ref is out and rep == 0 and not args.no_parts:
                    for mode in (Launch.COUNTED, Launch.SPIN):
                        add(f"{what}, launch {mode.value}", graph_time_ms([call], mode), sz.whole)
        if not args.no_parts:
            parts(d, x, dw, g, add, ref, sz)
        dw = x = None  # freed before the next shape allocates
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
