"""Probe: the Q8_0 decode GEMV with its code words brought in by TMA (Hopper bulk tensor copies) instead of
per-lane loads, against gemv_rows' auto tile, on the four large Flash Q8_0 matrices at T=1.

Why: Nsight Compute has gemv_rows' long-K tiles (attn_output_a/b, 35.7 MB) stalled on long scoreboard at
~24 % warp occupancy (121 registers): too few bytes in flight per SM, and every byte in flight costs a
register (h200_decode/12). A plain read of those bytes reaches ~80 % of the streaming read, the kernel 65 %.
A TMA copy moves a whole [rows, codes] tile into shared memory with one instruction and no registers, and
Triton's pipeliner (tl.range num_stages) keeps STAGES of them in flight; the codes are then read from shared
memory. The cp.async pipeline (h200_decode/25) was slower: it issues one LSU copy per 16 bytes per lane.
Measured (tools/results/h200_decode/30-32, 2026-11-29): slower than gemv_rows on every shape but the LM head
(attn_output_a/b best 59.9 / 52.5 % against 65 %, the persistent form 55.3 / 49.3 %; LM head with x and scales
by inline-asm loads 89.8 % against 85.5 %). Kept as a probe; no kernel of the package uses TMA.
Timing as bench_kernels (CUDA-graph replay over rotating weight copies, median, % of the streaming read of this
run). Outputs are compared with the auto tile's (same products, other fp32 order).
Usage: python tools/probe_tma.py [--out probe_tma.md] [--shapes attn_output_a ...] [--commit C]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench_kernels import DENSE, graph_time_ms  # noqa: E402
from probe_decode import q8_problem  # noqa: E402
from probe_table import bandwidth_table, gb_s  # noqa: E402
from dsv4.kernels_triton import blocks, q8_gemv  # noqa: E402
from dsv4.kernels_triton.configs import detect_device, pdl_launch, use_pdl  # noqa: E402
from dsv4.kernels_triton.qmatmul_fast import F32_MAGIC_BITS, Q8_BIAS, _q8_words4  # noqa: E402


@triton.jit
def _scales_x(sp, x_base, k0, NB: tl.constexpr, XASM: tl.constexpr):
    """A step's block scales [BLOCK_N, NB, 1] (fp32) and x's four byte lanes [1, NB, 8]. XASM (NVIDIA): both by
    inline-asm loads, which Triton's pipeliner leaves alone (no shared-memory staging); x lanes by one 16-byte
    load per code word. Else plain loads (pipelined through shared memory with the TMA copies)."""
    if XASM:
        d = tl.inline_asm_elementwise("ld.global.b16 $0, [$1];", "=h,l", [sp.to(tl.int64)], dtype=tl.int16,
                                      is_pure=False, pack=1).to(tl.float16, bitcast=True)
        xp = (x_base + k0 + tl.arange(0, NB)[None, :, None] * 32 + tl.arange(0, 8)[None, None, :] * 4)
        w0, w1, w2, w3 = blocks.load4(xp.to(tl.pointer_type(tl.int32)), True)
        return (d.to(tl.float32)[:, :, None], w0.to(tl.float32, bitcast=True), w1.to(tl.float32, bitcast=True),
                w2.to(tl.float32, bitcast=True), w3.to(tl.float32, bitcast=True))
    else:
        x0, x1, x2, x3 = q8_gemv._x_lanes(x_base, k0, NB)
        return tl.load(sp).to(tl.float32)[:, :, None], x0, x1, x2, x3


@triton.jit
def _tma_step(acc, w_desc, rn0, k0, sp, x_base, magic_bits, BLOCK_N: tl.constexpr, NB: tl.constexpr,
              PRMT: tl.constexpr, XASM: tl.constexpr):
    """acc [BLOCK_N, NB, 8] plus one K step: rows rn0.., codes k0.. by one TMA copy from w_desc, scales at sp."""
    u = tl.reshape(w_desc.load([rn0, k0 >> 2]), (BLOCK_N, NB, 8)) ^ Q8_BIAS
    d, x0, x1, x2, x3 = _scales_x(sp, x_base, k0, NB, XASM)
    q0, q1, q2, q3 = _q8_words4(u, PRMT, magic_bits)
    return acc + (q0 * x0 + q1 * x1 + q2 * x2 + q3 * x3) * d


def _codes_desc(dw, block_n: int, block_k: int):
    """The TMA descriptor of dw's code words: int32 [N, K/4] over the repacked rows (codes first, then scales),
    one [block_n, block_k / 4] box per step."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    words = dw.buf.reshape(dw.n_rows, -1).view(torch.int32)
    return TensorDescriptor(words, [dw.n_rows, dw.k // 4], [words.stride(0), 1], [block_n, block_k // 4])


@triton.jit
def _q8_tma_kernel(x_ptr, w_desc, s_ptr, out_ptr, y_ptr, cnt_ptr, N, R, k_split, stride_xg, stride_os, stride_s,
                   off_s, magic_bits, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                   GROUPED: tl.constexpr, PRMT: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
                   XASM: tl.constexpr = False):
    """gemv_rows at T=1 (one token) with the code words of each [BLOCK_N, BLOCK_K] step as one TMA copy
    (w_desc: int32 words [N, K/4]; rows past N read as zeros, not stored); scales by plain loads."""
    NB: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn0 = pid_n * BLOCK_N
    rn = rn0 + tl.arange(0, BLOCK_N)
    r = tl.minimum(rn, N - 1).to(tl.int64)
    if GROUPED:
        g = rn0 // R
    else:
        g = 0
    x_base = x_ptr + g * stride_xg
    k_lo = pid_k * k_split
    sp = s_ptr + r[:, None] * stride_s + off_s + (k_lo >> 5) + tl.arange(0, NB)[None, :]
    acc = tl.zeros([BLOCK_N, NB, 8], dtype=tl.float32)
    blocks.pdl_wait(PDL)
    for k0 in tl.range(k_lo, k_lo + k_split, BLOCK_K, num_stages=STAGES):
        acc = _tma_step(acc, w_desc, rn0, k0, sp, x_base, magic_bits, BLOCK_N, NB, PRMT, XASM)
        sp += NB
    rt = tl.arange(0, 1)
    acc_t = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    ok = (rt[:, None] < 1) & (rn < N)[None, :]
    tl.store(out_ptr + pid_k * stride_os + rt[:, None] * N + rn[None, :], acc_t, mask=ok)
    if SPLIT > 1:
        q8_gemv._split_sum_last(out_ptr, y_ptr, cnt_ptr, pid_n, rt, rn, ok, stride_os, N, 1, BLOCK_N, SPLIT, True)


def gemv_tma(x, dw, dev, groups: int, block_n: int, block_k: int, stages: int, warps: int, split: int = 1,
             xasm: bool = False):
    """A launcher of _q8_tma_kernel for one token x [1, K] / [1, G, K] (plan built once per call site)."""
    n, k = dw.n_rows, dw.k
    desc = _codes_desc(dw, block_n, block_k)
    n_row_tiles = triton.cdiv(n, block_n)
    counters = torch.zeros(n_row_tiles, device=x.device, dtype=torch.int32)
    use = use_pdl(dev, x)
    r = n // groups
    stride_xg = x.stride(1) if groups > 1 else 0

    def launch(x):
        out = blocks.empty((split, 1, n), x.device)
        y = blocks.empty((1, n), x.device) if split > 1 else out
        _q8_tma_kernel[(n_row_tiles, split)](
            x, desc, dw.s, out, y, counters, n, r, k // split, stride_xg, n, dw.stride_s, dw.off_s,
            F32_MAGIC_BITS.value, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, GROUPED=groups > 1, PRMT=x.is_cuda,
            SPLIT=split, PDL=use, XASM=xasm, num_warps=warps, num_stages=1, **pdl_launch(use))
        return y if split > 1 else out[0]
    return launch


@triton.jit
def _q8_tma_persist_kernel(x_ptr, w_desc, s_ptr, out_ptr, N, R, K, n_row_tiles, stride_xg, stride_s, off_s,
                           magic_bits, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                           GROUPED: tl.constexpr, PRMT: tl.constexpr, PDL: tl.constexpr, XASM: tl.constexpr):
    """The TMA GEMV with a resident grid: program p walks row tiles p, p + P, ... in one flat loop over
    (tile, K step) items, so the TMA pipeline stays full across tile ends (no per-tile fill and drain)."""
    NB: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    steps = K // BLOCK_K
    n_items = ((n_row_tiles - pid + n_prog - 1) // n_prog) * steps
    acc = tl.zeros([BLOCK_N, NB, 8], dtype=tl.float32)
    blocks.pdl_wait(PDL)
    for item in tl.range(0, n_items, num_stages=STAGES):
        j = item // steps
        ks = item - j * steps
        rn0 = (pid + j * n_prog) * BLOCK_N
        k0 = ks * BLOCK_K
        r = tl.minimum(rn0 + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
        if GROUPED:
            g = rn0 // R
        else:
            g = 0
        sp = s_ptr + r[:, None] * stride_s + off_s + (k0 >> 5) + tl.arange(0, NB)[None, :]
        acc = _tma_step(acc, w_desc, rn0, k0, sp, x_ptr + g * stride_xg, magic_bits, BLOCK_N, NB, PRMT, XASM)
        if ks == steps - 1:
            rn = rn0 + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + rn, tl.sum(tl.sum(acc, axis=2), axis=1), mask=rn < N)
            acc = tl.zeros([BLOCK_N, NB, 8], dtype=tl.float32)


def gemv_tma_persist(x, dw, dev, groups: int, block_n: int, block_k: int, stages: int, warps: int,
                     programs_per_sm: int, xasm: bool = False):
    """A launcher of _q8_tma_persist_kernel for one token (grid: programs_per_sm per SM, at most one per tile)."""
    n, k = dw.n_rows, dw.k
    desc = _codes_desc(dw, block_n, block_k)
    n_row_tiles = triton.cdiv(n, block_n)
    programs = min(n_row_tiles, dev.n_sm * programs_per_sm)
    use = use_pdl(dev, x)
    stride_xg = x.stride(1) if groups > 1 else 0

    def launch(x):
        out = blocks.empty((1, n), x.device)
        _q8_tma_persist_kernel[(programs,)](
            x, desc, dw.s, out, n, n // groups, k, n_row_tiles, stride_xg, dw.stride_s, dw.off_s,
            F32_MAGIC_BITS.value, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, GROUPED=groups > 1,
            PRMT=x.is_cuda, PDL=use, XASM=xasm, num_warps=warps, num_stages=1, **pdl_launch(use))
        return out
    return launch


# `persist`: (rows, codes per step, stages, warps, programs per SM) with up to ~200 KB of TMA buffers per SM
PERSIST_TILES = [(bn, bk, st, w, pp) for bn in (2, 4, 8) for bk in (512, 1024) for st in (4, 8) for w in (1, 2, 4)
                 for pp in (1, 2, 4) if (st - 1) * bn * bk * pp <= 160 * 1024 and not (w == 4 and bn * bk < 4096)
                 and not (w == 1 and bn * bk > 8192) and w * pp <= 8]


# (rows, codes per step, pipeline stages, warps, split) per shape: the long-K 35.7 MB matrices get the sweep
LONG_TILES = [(bn, bk, st, w, sp) for bn in (4, 8, 16) for bk in (512, 1024) for st in (3, 5) for w in (1, 2, 4)
              for sp in (1, 2)
              if bn * bk <= 16384 and not (w == 4 and bn * bk < 8192) and not (w == 1 and bn * bk > 8192)]
SHORT_TILES = [(16, 1024, 3, 4, 1), (16, 1024, 5, 4, 1), (32, 512, 3, 4, 1), (32, 1024, 3, 4, 1), (16, 512, 4, 2, 1),
               (32, 512, 5, 4, 1)]
TILES = {"attn_output_a": LONG_TILES, "attn_output_b": LONG_TILES, "attn_q_b": SHORT_TILES, "output": SHORT_TILES}
SHAPES = ("attn_output_a", "attn_output_b", "attn_q_b", "output")


XASM_TILES = [(16, 512, 3, 2, 1), (16, 512, 3, 1, 2), (16, 512, 2, 2, 1), (16, 512, 4, 2, 1), (8, 512, 3, 1, 1),
              (16, 256, 3, 1, 1), (32, 256, 3, 2, 1), (32, 512, 3, 4, 1), (16, 1024, 3, 4, 1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_tma.md")
    ap.add_argument("--parts", nargs="+", default=["tma"],
                    help="tma (tile sweep), persist / persist_xasm (resident grid, flat loop), "
                         "xasm (TMA with x and scales by inline-asm loads)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tiles", type=int, default=0, help="only the first N tiles (0: all)")
    ap.add_argument("--commit", default="")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    dev = detect_device(device)
    bw, table = bandwidth_table(args.out, f"TMA Q8_0 GEMV probe (commit {args.commit or '?'})",
                                ["shape", "config", "µs", "MB", "GB/s", "% bw", "max rel diff"])
    for name in args.shapes:
        d = {e.name: e for e in DENSE}[name]
        ws, x = q8_problem(d, device)
        nbytes = ws[0].nbytes
        ref = q8_gemv.gemv_rows_default(x, ws[0], dev, d.groups).clone()

        def row(cfg, ms, out):
            gbs = gb_s(nbytes, ms)
            diff = ((out - ref).abs().max() / ref.abs().max()).item() if out is not None else float("nan")
            table.add(name, cfg, f"{ms * 1e3:.1f}", f"{nbytes / 1e6:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.1f}",
                      f"{diff:.1e}")

        def timed(cfg, fns):
            try:
                out = fns[0](x).clone()
                ms = graph_time_ms([lambda f=f: f(x) for f in fns])
            except Exception as e:  # a tile that does not compile (shared memory, TMA box limits): say so
                table.add(name, cfg, f"failed: {type(e).__name__}", "", "", "", "")
                return
            row(cfg, ms, out)

        auto = [lambda x, w=w: q8_gemv.gemv_rows_default(x, w, dev, d.groups) for w in ws]
        timed("auto (gemv_rows)", auto)
        if d.name not in TILES:
            continue
        for part in ("persist", "persist_xasm"):
            if part not in args.parts:
                continue
            for bn, bk, st, w, pp in PERSIST_TILES[:args.tiles] if args.tiles else PERSIST_TILES:
                if d.k % bk or (d.groups > 1 and (d.n // d.groups) % bn):
                    continue
                xasm = part == "persist_xasm"
                timed(f"persist {bn}x{bk} st{st} w{w} {pp}/SM{' xasm' if xasm else ''}",
                      [gemv_tma_persist(x, wt, dev, d.groups, bn, bk, st, w, pp, xasm) for wt in ws])
            timed("auto (gemv_rows) again", auto)
        parts = [(p, t) for p in ("tma", "xasm") if p in args.parts
                 for t in (TILES[name] if p == "tma" else XASM_TILES)]
        for part, (bn, bk, st, w, sp) in parts[:args.tiles] if args.tiles else parts:
            if d.k % (bk * sp) or (d.groups > 1 and (d.n // d.groups) % bn):
                continue
            xasm = part == "xasm"
            timed(f"tma {bn}x{bk} st{st} w{w} s{sp}{' xasm' if xasm else ''}",
                  [gemv_tma(x, wt, dev, d.groups, bn, bk, st, w, sp, xasm) for wt in ws])
        if parts:
            timed("auto (gemv_rows) again", auto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
