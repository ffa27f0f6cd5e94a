"""Experiment: tile sweep of the Gluon Q8_0 decode GEMV (dsv4/kernels_triton/q8_gluon.py) against gemv_rows.

The kernel started here (tools/results/h200_decode/15, 16: hand-laid registers, no programmatic dependent
launch then); it now lives in dsv4 with PDL and the exchange-tree split-K sum. This probe times its tiles
on the Flash Q8_0 matrices (by default the four large ones) beside gemv_rows' tuned tile (qmatmul's choice
before the Gluon kernel), interleaved: every case twice, in two passes. GPU only (Gluon does not run under
TRITON_INTERPRET). Times as tools/bench_kernels.py (CUDA-graph replay over rotating weight copies, GRAPH_CYCLES
rotations per graph, % of the same-run streaming read); outputs compared with gemv_rows'.
Usage: python tools/probe_gluon_q8.py [--out probe_gluon_q8.md] [--shapes attn_output_a ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import DENSE, graph_time_ms  # noqa: E402
from probe_decode import q8_problem  # noqa: E402
from probe_table import bandwidth_table, gb_s  # noqa: E402
from dsv4.kernels_triton import q8_gemv, q8_gluon  # noqa: E402
from dsv4.kernels_triton.q8_gluon import GluonTile  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402

LARGE = ("attn_q_b", "attn_output_a", "attn_output_b", "output")  # the four of the 70 % target
SMALL = ("attn_q_a", "attn_kv", "ffn_gate_shexp", "ffn_down_shexp")
SHAPES = LARGE + SMALL


def tiles_for(name: str) -> list[GluonTile]:
    """The sweep per matrix: rows x warps x split-K (split only where the row tiles are few), prefetched, and
    a few unprefetched one-warp tiles; the four small matrices (not a target, but every decode step reads
    them): 2-8 rows x 1-2 warps x split-K 1-8."""
    if name in SMALL:  # 512-4096 rows: few row tiles, so split-K over more programs
        return [GluonTile(r, w, True, sp) for r in (2, 4, 8) for w in (1, 2) for sp in (1, 2, 4, 8)]
    if name == "output":  # 129280 rows: the grid fills the GPU many times over; no split
        return [GluonTile(r, 1, pf) for r in (4, 8, 16) for pf in (True, False)]
    if name == "attn_q_b":  # 32768 rows, K = 1024 (two 512-code steps at one warp)
        return [GluonTile(r, w) for r in (2, 4, 8, 16) for w in (1, 2)] + [GluonTile(r, 1, False) for r in (4, 8)]
    splits = (1, 2, 4) if name == "attn_output_a" else (1, 2, 4, 8)
    return ([GluonTile(r, w, True, sp) for r in (4, 8, 16) for w in (1, 2) for sp in splits]
            + [GluonTile(r, 1, False) for r in (4, 8)]
            + ([GluonTile(32, 1, True, sp) for sp in (4, 8)] if name == "attn_output_b" else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_gluon_q8.md")
    ap.add_argument("--shapes", nargs="+", default=list(LARGE), choices=SHAPES)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    dev = detect_device(device)
    bw, table = bandwidth_table(args.out, "Gluon Q8_0 decode GEMV probe",
                                ["case", "config", "µs", "GB/s", "% bw", "max abs diff vs gemv_rows"],
                                extra=f"triton {triton.__version__} · ")

    def row(case, cfg, ms, nbytes, diff):
        gbs = gb_s(nbytes, ms)
        table.add(case, cfg, f"{ms * 1e3:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.1f}", diff)

    for d in DENSE:
        if d.name not in args.shapes:
            continue
        ws, x = q8_problem(d, device)
        ref = q8_gemv.gemv_rows_default(x, ws[0], dev, d.groups)
        cases = [("gemv_rows (tuned)", None)] + [(str(t), t) for t in tiles_for(d.name)
                                                  if q8_gluon.supports(x, ws[0], dev, d.groups, t)]
        for rep in range(2):  # two interleaved passes
            for label, t in cases:
                try:
                    if t is None:
                        fn = q8_gemv.gemv_rows_default
                        diff = "0"
                    else:
                        fn = lambda x_, w_, dev_, g_, t=t: q8_gluon.gemv_gluon(x_, w_, dev_, g_, t)  # noqa: E731
                        y = fn(x, ws[0], dev, d.groups)
                        y2 = fn(x, ws[0], dev, d.groups)
                        diff = f"{float((y - ref).abs().max()):.3g}{'' if torch.equal(y, y2) else ' (not repeatable)'}"
                    ms = graph_time_ms([lambda w_=w_, fn=fn: fn(x, w_, dev, d.groups) for w_ in ws])
                    row(d.name, f"{label} (pass {rep + 1})", ms, ws[0].nbytes, diff)
                except Exception as e:  # noqa: BLE001 - a probe: record and go on
                    table.add(d.name, label, f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}", "", "", "")
        del ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
