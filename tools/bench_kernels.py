"""Kernel benchmark: every registered Triton variant at DeepSeek V4 Flash shapes, T = 1, 4, 2048.

Weights are random GGUF blocks generated on the GPU (values do not change speed). Each case is timed
twice: `graph` = CUDA-graph replay of calls over rotating weight copies / expert selections (kernel
time without launch overhead and without L2 reuse, decode graphs holding the rotation GRAPH_CYCLES times over:
the steady state of a long decode graph; the kernel targets are judged on it) and `eager`
= triton.testing.do_bench around the Python call (adds host launch cost). Reported: achieved GB/s
(weight + activation bytes read once) and % of the streaming-read bandwidth measured in this run, and
for T >= 256 TFLOP/s and % of a same-shape bf16 torch.matmul measured in this run (for the MoE: the dense
[T*K, D] x [D, F] product; a `moe_bf16` row adds the routed MoE itself with bf16 weights, grouped GEMMs on the
same expert groups, as a reference of what unquantized weights reach there). Markdown + CSV, flushed per row. Usage:
    python tools/bench_kernels.py --out-md r.md --out-csv r.csv [--time-limit 300] [--quick]
        [--ops output moe_q2] [--T 1 2048] [--variants auto gemv_dot] [--auto-everywhere] [--ieee]
        [--tuned tuned.json] [--graph-cycles 8]
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4.kernels_triton import blocks, registry  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402

Q = QuantFormat
D, F_EXP, N_EXPERT, K_USED = 4096, 2048, 256, 6
TOKENS = (1, 4, 2048)
PREFILL_MIN_T = 256  # cases at or above this report TFLOP/s vs bf16 matmul
STREAM_BYTES = 4 << 30  # the bandwidth probe reads this much
CLAMP = 10.0


@dataclass(frozen=True)
class Dense:
    name: str
    fmt: QuantFormat
    n: int
    k: int
    groups: int = 1


DENSE = [
    Dense("attn_q_a", Q.Q8_0, 1024, 4096),
    Dense("attn_q_b", Q.Q8_0, 32768, 1024),
    Dense("attn_kv", Q.Q8_0, 512, 4096),
    Dense("attn_output_a", Q.Q8_0, 8192, 4096, groups=8),
    Dense("attn_output_b", Q.Q8_0, 4096, 8192),
    Dense("ffn_gate_shexp", Q.Q8_0, 2048, 4096),
    Dense("ffn_down_shexp", Q.Q8_0, 4096, 2048),
    Dense("output", Q.Q8_0, 129280, 4096),
    Dense("attn_compressor_kv(r4)", Q.F16, 1024, 4096),
    Dense("attn_compressor_kv(r128)", Q.F16, 512, 4096),
    Dense("indexer.attn_q_b", Q.F16, 8192, 1024),
    Dense("indexer.proj", Q.F16, 64, 4096),
    Dense("indexer_compressor_kv", Q.F16, 256, 4096),
    Dense("ffn_gate_inp(router)", Q.F16, 256, 4096),
    Dense("hc_attn_fn", Q.F16, 24, 16384),
]
QUICK = {"attn_q_b", "attn_kv", "attn_output_a", "output", "indexer.attn_q_b"}
MOE = {"q2": (Q.IQ2_XXS, Q.Q2_K), "q4": (Q.Q4_K, Q.Q4_K)}

LARGE_Q8 = ("attn_q_b", "attn_output_a", "attn_output_b", "output")
TARGETS = [  # label, ops, T, column, goal
    ("Q8_0 decode GEMV, large matrices", LARGE_Q8, 1, "pct_bw", ">= 70% bw"),
    ("fused MoE decode q2 (6 experts)", ("moe_q2",), 1, "pct_bw", ">= 60% bw"),
    ("fused MoE decode q4 (6 experts)", ("moe_q4",), 1, "pct_bw", ">= 65% bw"),
    ("Q8_0 prefill GEMM, T=2048", LARGE_Q8 + ("attn_q_a", "attn_kv", "ffn_gate_shexp", "ffn_down_shexp"), 2048,
     "pct_bf16", ">= 50% bf16"),
    ("MoE prefill q2, T=2048", ("moe_q2",), 2048, "pct_bf16", ">= 30% bf16"),
    ("MoE prefill q4, T=2048", ("moe_q4",), 2048, "pct_bf16", ">= 30% bf16"),
]
SKIP_VARIANTS = {"auto_ieee"}  # = auto for decode, gemm_ieee / grouped_ieee for prefill: measured there

FIELDS = ["machine", "date", "commit", "op", "shape", "fmt", "T", "variant", "median_us", "graph_us", "eager_us",
          "gbytes", "gb_s", "pct_bw", "tflops", "pct_bf16", "bf16_tflops", "pct_bw_eager", "pct_bf16_eager", "status"]
L2_BYTES = 60 << 20  # H200 L2 is 50 MiB; decode timings rotate over enough weight copies to defeat it
ROTATE_MAX = 8
GRAPH_REPS = 20
# Decode graphs hold the rotation of copies this many times over (each copy's next use stays more than L2 away):
# the graph's first kernel, which nothing before it overlaps, then counts once per GRAPH_CYCLES * copies calls, as
# in a decode step's graph of hundreds of kernels. One rotation (--graph-cycles 1, the timing before 2026-11-29
# 21:00 UTC) added 0.4-0.6 µs to each call of the 35.7 MB Q8_0 matrices (tools/results/h200_decode/45a).
GRAPH_CYCLES = 8
LAUNCH = None  # Launch.COUNTED under --count-launch; None: by call (default_launch)
L2_FLUSH_BYTES = 256 << 20  # what triton.testing.do_bench zeroes between calls (> L2; ~0.1 ms of GPU work)
SPIN_CYCLES = 200_000  # ~0.1 ms at H200 clocks: longer than the host takes to submit a graph


def median_time_ms(fn) -> float:
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    except TypeError:  # older signature
        return float(do_bench(fn, warmup=10, rep=50, quantiles=[0.5])[0])


class Launch(str, Enum):
    """How a graph replay is timed against the host's submission of it."""

    COUNTED = "counted"  # start event on an idle GPU: the submission latency (1-5 µs) counts into the replay
    SPIN = "spin"  # a GPU spin (torch.cuda._sleep) queued first: the kernels alone, L2 left as it is
    FLUSH = "flush"  # an L2 flush queued first, as triton.testing.do_bench does between eager calls


def default_launch(prefill: bool) -> Launch:
    """LAUNCH where --count-launch set it, else FLUSH for prefill calls and SPIN for decode calls."""
    return LAUNCH or (Launch.FLUSH if prefill else Launch.SPIN)


def graph_time_ms(calls, launch: Launch | None = None, cycles: int | None = None) -> float:
    """Kernel time without launch overhead: the calls (one per rotating input set) are captured once
    in a CUDA graph (decode calls: `cycles`, default GRAPH_CYCLES, times over); median over GRAPH_REPS replays
    timed with CUDA events, divided by the calls in the graph.
    Decode will run CUDA-graph captured, so this is the figure the kernel targets are judged on.
    launch (default: default_launch(prefill=False)): SPIN for decode calls (they rotate over weight copies,
    so L2 is cold anyway; a flush would leave dirty lines whose write-back lands in a 10 µs kernel), FLUSH
    for prefill calls: timed as the same-run bf16 reference is (do_bench: cold L2, submission hidden).
    COUNTED: as before 2026-11-29 (tools/results/h200_q8/12_*)."""
    launch = launch or default_launch(prefill=False)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if launch == Launch.FLUSH else None
    calls = list(calls) * (max(1, cycles or GRAPH_CYCLES) if launch == Launch.SPIN else 1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(GRAPH_REPS):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if flush is not None:
            flush.zero_()
        elif launch == Launch.SPIN:
            torch.cuda._sleep(SPIN_CYCLES)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / len(calls))
    del g
    times.sort()
    return times[len(times) // 2]


def n_copies(nbytes: int, t: int) -> int:
    """Weight copies to rotate over so consecutive decode calls do not hit L2 (prefill: 1)."""
    if t >= PREFILL_MIN_T:
        return 1
    return max(1, min(ROTATE_MAX, -(-4 * L2_BYTES // max(1, nbytes))))


def read_bandwidth(device) -> float:
    """GB/s of one large streaming read (a sum over 4 GiB of fp16)."""
    x = torch.ones(STREAM_BYTES // 2, dtype=torch.float16, device=device)
    ms = median_time_ms(lambda: x.sum(dtype=torch.float32))
    del x
    torch.cuda.empty_cache()
    return STREAM_BYTES / (ms * 1e-3) / 1e9


def bf16_tflops(t: int, n: int, k: int, device, groups: int = 1) -> float:
    if groups > 1:
        a = torch.randn(groups, t, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(groups, k, n // groups, device=device, dtype=torch.bfloat16)
        ms = median_time_ms(lambda: torch.bmm(a, b))
    else:
        a = torch.randn(t, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        ms = median_time_ms(lambda: a @ b)
    return 2.0 * t * n * k / (ms * 1e-3) / 1e12


def moe_bf16_grouped(u, sel, gate, up, down):
    """The routed-MoE prefill with bf16 weights at the call's own expert groups: (token, slot) pairs sorted by
    expert, then three grouped GEMMs (torch._grouped_mm; gate/up/down [E, in, out]) with SwiGLU between, no route
    weights or slot sum (tiny next to the GEMMs). A reference for the quantized kernels: the same FLOPs on the
    same groups, reading 2 bytes per weight."""
    k = sel.shape[1]
    e = sel.reshape(-1)
    order = torch.argsort(e, stable=True)
    offs = torch.cumsum(torch.bincount(e, minlength=gate.shape[0]), 0).to(torch.int32)
    x = u.to(torch.bfloat16)[order // k]
    h = torch.nn.functional.silu(torch._grouped_mm(x, gate, offs=offs)) * torch._grouped_mm(x, up, offs=offs)
    return torch._grouped_mm(h, down, offs=offs)


def bf16_moe_weights(device):
    """bf16 gate, up [E, D, F] and down [E, F, D], stored transposed (the grouped GEMM's column-major operand)."""
    def w(n_in, n_out):
        return torch.randn(N_EXPERT, n_out, n_in, device=device, dtype=torch.bfloat16).transpose(-2, -1)
    return w(D, F_EXP), w(D, F_EXP), w(F_EXP, D)


class Report:
    def __init__(self, md: Path, csv_path: Path, header: dict):
        self.md, self.csv_path, self.header = md, csv_path, header
        self.rows: list[dict] = []
        with open(csv_path, "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()

    def add(self, row: dict) -> None:
        row = {**{k: self.header[k] for k in ("machine", "date", "commit")}, **row}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: row.get(k, "") for k in FIELDS})
        self.write_md()
        print(" | ".join(str(row.get(k, "")) for k in FIELDS[3:]), flush=True)

    def _value(self, ops, t, key, variant=None):
        """(auto value, best value, its label) of `key` over ok rows of ops at T, each the worst case over the ops
        (a target holds for every op): auto = the lowest auto value; best = the lowest of the ops' best variants,
        labelled with that variant (and its op where the target has several)."""
        rows = [r for r in self.rows if r.get("op") in ops and r.get("T") == t and r.get("status") == "ok"
                and r.get(key) not in (None, "")]
        if not rows:
            return None
        auto = [float(r[key]) for r in rows if r["variant"] == (variant or "auto")]
        best_of_op: dict[str, dict] = {}
        for r in rows:
            if r["op"] not in best_of_op or float(r[key]) > float(best_of_op[r["op"]][key]):
                best_of_op[r["op"]] = r
        worst = min(best_of_op.values(), key=lambda r: float(r[key]))
        label = worst["variant"] + (f" on {worst['op']}" if len(best_of_op) > 1 else "")
        return (min(auto) if auto else float("nan")), float(worst[key]), label

    def targets(self) -> list[str]:
        """The issue's acceptance figures, from the rows so far (auto = what TritonOps runs by default)."""
        out = ["| target | goal | auto, graph (worst case) | best variant per op, graph (worst case) "
               "| auto, eager (worst case) |",
               "|---|---|---|---|---|"]
        for label, ops, t, key, goal in TARGETS:
            v = self._value(ops, t, key)
            ve = self._value(ops, t, key + "_eager")
            if v is None:
                out.append(f"| {label} | {goal} | not measured | | |")
            else:
                eager = f"{ve[0]:.1f}%" if ve else ""
                out.append(f"| {label} | {goal} | {v[0]:.1f}% | {v[1]:.1f}% ({v[2]}) | {eager} |")
        return out

    def write_md(self) -> None:
        h = self.header
        lines = [f"# Triton kernel benchmark ({h['machine']})", "",
                 f"date {h['date']} · commit {h['commit']} · torch {h['torch']} · triton {h['triton']} · "
                 f"read bandwidth {h['bw']:.0f} GB/s (sum over 4 GiB fp16, same run)", "",
                 "Timing: `graph µs` = CUDA-graph replay over rotating weight copies / expert sets (kernel time",
                 "without launch overhead; decode will be graph-captured, the kernel targets are judged on it;",
                 f"decode graphs hold the rotation {GRAPH_CYCLES} times over: the steady state of a long decode graph;",
                 ("the host's graph submission hidden: a GPU spin queued before the start event, or for prefill an"
                  " L2 flush as do_bench does for the bf16 reference);" if LAUNCH is None else
                  "--count-launch: the host's graph submission counted in, as before 2026-11-29 06:40 UTC);"),
                 "`eager µs` = triton.testing.do_bench around the Python call (includes host launch cost, an",
                 "engine concern). GB/s, % bw, TFLOP/s, % bf16 use graph µs where the call could be captured.", "",
                 "| op | shape | fmt | T | variant | graph µs | eager µs | GB/s | % bw | TFLOP/s | % bf16 | status |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines[4:4] = self.targets() + [""]
        for r in self.rows:
            lines.append("| " + " | ".join(str(r.get(k, "")) for k in
                                           ("op", "shape", "fmt", "T", "variant", "graph_us", "eager_us", "gb_s", "pct_bw",
                                            "tflops", "pct_bf16", "status")) + " |")
        self.md.write_text("\n".join(lines) + "\n")


def _fmt(v, nd=1):
    return f"{v:.{nd}f}" if isinstance(v, float) else v


def run_case(rep: Report, bw: float, base: dict, fn, nbytes: int, flops: float, bf16: float | None, calls=None,
             graph: bool = True):
    """fn: one call (eager timing); calls: the rotating calls for graph timing (default [fn]); graph=False: eager
    timing only (a reference timed as the bf16 ones are; graph_us left empty)."""
    try:
        fn()  # compile + first run outside the timing
        torch.cuda.synchronize()
        eager = median_time_ms(fn)
        graph_ms = None
        if graph:
            try:
                graph_ms = graph_time_ms(calls or [fn], default_launch(prefill=bf16 is not None))
            except Exception as e:  # noqa: BLE001 - e.g. a host sync inside the op: eager figure only
                print(f"graph capture failed for {base}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                torch.cuda.synchronize()
        ms = graph_ms if graph_ms is not None else eager
        gbs = nbytes / (ms * 1e-3) / 1e9
        row = {**base, "median_us": _fmt(ms * 1e3),
               "graph_us": _fmt(graph_ms * 1e3) if graph_ms is not None else ("n/a" if graph else ""),
               "eager_us": _fmt(eager * 1e3), "gbytes": _fmt(nbytes / 1e9, 4), "gb_s": _fmt(gbs, 0),
               "pct_bw": _fmt(100 * gbs / bw), "status": "ok"}
        row["pct_bw_eager"] = _fmt(100 * nbytes / (eager * 1e-3) / 1e9 / bw)
        if bf16:
            tf = flops / (ms * 1e-3) / 1e12
            row.update(tflops=_fmt(tf, 2), pct_bf16=_fmt(100 * tf / bf16), bf16_tflops=_fmt(bf16, 1),
                       pct_bf16_eager=_fmt(100 * flops / (eager * 1e-3) / 1e12 / bf16))
    except Exception as e:  # noqa: BLE001 - record and continue: a first GPU run surfaces compile errors
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        traceback.print_exc()
        row = {**base, "status": "FAIL " + msg.replace("|", "/")}
    rep.add(row)


def _want(args, op: str, t: int, variant: str) -> bool:
    if args.auto_everywhere and variant == registry.AUTO:
        return True
    return ((not args.ops or op in args.ops) and (not args.T or t in args.T)
            and (not args.variants or variant in args.variants))


def _want_op(args, op: str) -> bool:
    return args.auto_everywhere or not args.ops or op in args.ops


def _want_t(args, t: int) -> bool:
    return args.auto_everywhere or not args.T or t in args.T


def bench_dense(rep: Report, bw: float, device, dev, deadline: float, args):
    for case in DENSE:
        if (args.quick and case.name not in QUICK) or not _want_op(args, case.name):
            continue
        dws = []
        for t in TOKENS:
            if not _want_t(args, t):
                continue
            shape = (t, case.groups, case.k // 1) if case.groups > 1 else (t, case.k)
            x = torch.randn(shape, device=device, dtype=torch.float32)
            while len(dws) < n_copies(case.fmt.row_bytes(case.k) * case.n, t):
                raw = blocks.synthetic_raw(case.fmt, (case.n, case.k), device=device, seed=1 + len(dws))
                dws.append(blocks.to_device(raw, case.fmt, (case.n, case.k), device))
                del raw
            dw = dws[0]
            use = dws[:n_copies(dw.nbytes, t)]
            bf16 = bf16_tflops(t, case.n, case.k, device, case.groups) if t >= PREFILL_MIN_T else None
            for v in registry.variants(registry.KernelOp.QMATMUL):
                if time.time() > deadline:
                    return False
                if (v.max_t is not None and t > v.max_t) or not v.supports(case.fmt) or v.name in SKIP_VARIANTS:
                    continue
                if v.name == "gemm_ieee" and t < PREFILL_MIN_T or not _want(args, case.name, t, v.name):
                    continue
                if v.name.endswith("_ieee") and not args.ieee:
                    continue
                base = {"op": case.name, "shape": f"{case.n}x{case.k}" + (f" G{case.groups}" if case.groups > 1 else ""),
                        "fmt": case.fmt.name, "T": t, "variant": v.name}
                nbytes = dw.nbytes + x.numel() * 4 + t * case.n * 4
                calls = [lambda v=v, x=x, w=w: v.fn(x, w, dev, case.groups) for w in use]
                run_case(rep, bw, base, calls[0], nbytes, 2.0 * t * case.n * case.k, bf16, calls)
        del dws
        torch.cuda.empty_cache()
    return True


def moe_weights(fgu, fdn, device):
    """Flash-shaped synthetic routed experts (gate, up, down) of the recipe's formats, seeds 1, 2, 3."""
    shp_gu, shp_dn = (N_EXPERT, F_EXP, D), (N_EXPERT, D, F_EXP)
    return (blocks.to_device(blocks.synthetic_raw(fgu, shp_gu, device, 1), fgu, shp_gu, device),
            blocks.to_device(blocks.synthetic_raw(fgu, shp_gu, device, 2), fgu, shp_gu, device),
            blocks.to_device(blocks.synthetic_raw(fdn, shp_dn, device, 3), fdn, shp_dn, device))


def moe_selections(t: int, count: int, device) -> list:
    """count expert selections [t, K_USED] (distinct experts per token), seeded by t: the first is the same for
    every count, so the quantized cases and the bf16 reference route the same pairs."""
    gen = torch.Generator(device="cpu").manual_seed(t)
    return [torch.stack([torch.randperm(N_EXPERT, generator=gen)[:K_USED] for _ in range(t)]).to(device)
            for _ in range(count)]


def moe_flops(t: int) -> float:
    """FLOPs of a T-token routed-MoE call: gate, up and down for each of the K_USED slots."""
    return 2.0 * t * K_USED * 3 * F_EXP * D


def bench_moe_bf16(rep: Report, bw: float, device, dense: dict) -> None:
    """Row `moe_bf16` for each T of `dense` (T -> the dense bf16 rate the quantized MoE cases are judged against,
    measured once): moe_bf16_grouped on the selection those cases use (same seed), timed as the bf16 references
    are (do_bench), % of that rate."""
    if not dense:
        return
    gate, up, down = bf16_moe_weights(device)
    for t, bf16 in dense.items():
        sel = moe_selections(t, 1, device)[0]
        u = torch.randn((t, D), device=device)
        try:
            moe_bf16_grouped(u, sel, gate, up, down)
        except (RuntimeError, NotImplementedError) as e:  # grouped GEMM not available on this device
            rep.add({"op": "moe_bf16", "T": t, "variant": "bf16 grouped", "status": f"n/a: {str(e)[:60]}"})
            continue
        nbytes = int(torch.unique(sel).numel()) * 3 * F_EXP * D * 2 + u.numel() * 4
        run_case(rep, bw, {"op": "moe_bf16", "shape": f"E{N_EXPERT} F{F_EXP} D{D} K{K_USED}", "fmt": "BF16", "T": t,
                           "variant": "bf16 grouped (reference)"},
                 lambda: moe_bf16_grouped(u, sel, gate, up, down), nbytes, moe_flops(t), bf16, graph=False)
    del gate, up, down
    torch.cuda.empty_cache()


def bench_moe(rep: Report, bw: float, device, dev, deadline: float, args):
    if not any(_want_op(args, f"moe_{recipe}") for recipe in MOE):
        return True
    # the dense bf16 rate per prefill T, measured once for both recipes and the bf16 reference row
    dense = {t: bf16_tflops(t * K_USED, F_EXP, D, device) for t in TOKENS if t >= PREFILL_MIN_T and _want_t(args, t)}
    bench_moe_bf16(rep, bw, device, dense)
    for recipe, (fgu, fdn) in MOE.items():
        if not _want_op(args, f"moe_{recipe}"):
            continue
        gate, up, down = moe_weights(fgu, fdn, device)
        per_expert = (gate.nbytes + up.nbytes + down.nbytes) // N_EXPERT
        for t in TOKENS:
            if not _want_t(args, t):
                continue
            sels = moe_selections(t, ROTATE_MAX if t < PREFILL_MIN_T else 1, device)
            sel = sels[0]
            wts = torch.rand((t, K_USED), device=device)
            u = torch.randn((t, D), device=device)
            n_unique = int(torch.unique(sel).numel())
            nbytes = n_unique * per_expert + u.numel() * 4 + t * D * 4
            flops = moe_flops(t)
            bf16 = dense.get(t)
            for v in registry.variants(registry.KernelOp.MOE):
                if time.time() > deadline:
                    return False
                if (v.max_t is not None and t > v.max_t) or not v.supports(fgu) or v.name in SKIP_VARIANTS:
                    continue
                if not _want(args, f"moe_{recipe}", t, v.name) or (v.name.endswith("_ieee") and not args.ieee):
                    continue
                base = {"op": f"moe_{recipe}", "shape": f"E{N_EXPERT} F{F_EXP} D{D} K{K_USED}",
                        "fmt": f"{fgu.name}/{fdn.name}", "T": t, "variant": v.name}
                calls = [lambda v=v, u=u, s=s, wts=wts: v.fn(u, gate, up, down, s, wts, CLAMP, dev) for s in sels]
                run_case(rep, bw, base, calls[0], nbytes, flops, bf16, calls)
        del gate, up, down
        torch.cuda.empty_cache()
    return True


def commit_id() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None) -> int:
    global LAUNCH, GRAPH_CYCLES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-md", default="bench_kernels.md")
    ap.add_argument("--out-csv", default="bench_kernels.csv")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds; stops starting new cases after it")
    ap.add_argument("--quick", action="store_true", help="only the large dense shapes and MoE")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--ops", nargs="*", default=None, help="only these ops (e.g. output moe_q2)")
    ap.add_argument("--T", nargs="*", type=int, default=None, help="only these token counts")
    ap.add_argument("--variants", nargs="*", default=None, help="only these variants")
    ap.add_argument("--auto-everywhere", action="store_true",
                    help="also time the auto variant on every shape and token count (outside --ops/--T/--variants)")
    ap.add_argument("--ieee", action="store_true", help="also time the slow fp32-IEEE variants")
    ap.add_argument("--tuned", default=None, help="JSON of tools/tune_kernels.py merged into the config tables")
    ap.add_argument("--graph-cycles", type=int, default=GRAPH_CYCLES,
                    help="decode graphs hold the rotation of copies this many times over")
    ap.add_argument("--count-launch", action="store_true",
                    help="graph timing as before: the host's graph submission counted into each replay")
    args = ap.parse_args(argv)
    LAUNCH = Launch.COUNTED if args.count_launch else None
    GRAPH_CYCLES = max(1, args.graph_cycles)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA/ROCm device", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")
    dev = detect_device(device)
    if args.tuned:
        from dsv4.kernels_triton.configs import load_tuned

        load_tuned(args.tuned)
    deadline = time.time() + args.time_limit
    bw = read_bandwidth(device)
    header = {"machine": f"{torch.cuda.get_device_name(device)} ({dev.arch}, {dev.n_sm} SMs)",
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": args.commit or commit_id(), "torch": torch.__version__, "triton": triton.__version__,
              "bw": bw, "host": platform.node()}
    print(f"read bandwidth {bw:.0f} GB/s on {header['machine']}", flush=True)
    rep = Report(Path(args.out_md), Path(args.out_csv), header)
    rep.add({"op": "stream_read", "shape": "4 GiB fp16 sum", "fmt": "F16", "T": "", "variant": "torch.sum",
             "gb_s": _fmt(bw, 0), "pct_bw": "100.0", "status": "ok"})
    ok = bench_moe(rep, bw, device, dev, deadline, args)
    ok = bench_dense(rep, bw, device, dev, deadline, args) and ok
    if not ok:
        rep.add({"op": "(time limit reached: remaining cases skipped)", "status": "TIMEOUT"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
