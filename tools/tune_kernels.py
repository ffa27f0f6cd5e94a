"""Config sweep for the Triton kernels at DeepSeek V4 Flash shapes on the GPU at hand.

Times candidate tile/warp configs (CUDA-graph replay over rotating weight copies or expert sets, as
tools/bench_kernels.py does) for: the Q8_0 block-dot GEMV (T=1, 4), the fused MoE decode (T=1, q2/q4),
the Q8_0 prefill GEMM and the grouped MoE prefill (T=2048). Writes every timing to a markdown table
and the best config per key to a JSON that `dsv4.kernels_triton.configs.load_tuned` (and
`bench_kernels.py --tuned`) merges into the selection tables. Usage:
    python tools/tune_kernels.py --out-json tuned.json --out-md tune.md [--time-limit 150] [--only gemv moe gemm grouped]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4.kernels_triton import blocks, moe, qmatmul  # noqa: E402
from dsv4.kernels_triton.configs import GemmConfig, GemvConfig, MoeConfig, detect_device, select_moe  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402
from tools.bench_kernels import (CLAMP, D, DENSE, F_EXP, K_USED, MOE, N_EXPERT, ROTATE_MAX, graph_time_ms,  # noqa: E402
                                 median_time_ms, n_copies, read_bandwidth)

Q = QuantFormat
_ORDER = ("attn_q_b", "attn_output_a", "attn_output_b", "output", "attn_q_a", "ffn_down_shexp", "ffn_gate_shexp", "attn_kv")
GEMV_SHAPES = sorted([c for c in DENSE if c.fmt == Q.Q8_0], key=lambda c: _ORDER.index(c.name))
SHARE = {"gemv": 0.35, "gemv_dot": 0.4, "moe": 0.3, "gemm": 0.2, "grouped": 0.3}  # of --time-limit per section
GEMV_DOT_CANDIDATES = [  # block_n, block_k, num_warps, num_stages (token tile 16)
    (64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 6), (32, 256, 4, 4), (128, 256, 8, 3),
    (64, 128, 4, 6), (256, 64, 8, 4),
]
GEMV_CANDIDATES = [  # block_n, block_k, num_warps, num_stages
    (8, 512, 4, 1), (4, 1024, 4, 1), (16, 256, 4, 1), (16, 512, 8, 1), (32, 256, 8, 1), (8, 1024, 8, 1),
    (16, 512, 8, 3),
]
SPLITS = (1, 2, 4, 8)  # tried for matrices with few rows
FEW_ROWS = 8192
MOE_GU = [(8, 512, 4, 1), (4, 512, 4, 1), (4, 1024, 4, 1), (8, 1024, 8, 1), (2, 1024, 4, 1), (4, 1024, 8, 1),
          (8, 512, 8, 1), (4, 512, 2, 1)]
MOE_DN = [(4, 512, 4, 1), (4, 1024, 4, 1), (8, 1024, 8, 1), (2, 1024, 4, 1), (8, 512, 4, 1), (4, 512, 2, 1)]
GEMM_CANDIDATES = [  # block_m, block_n, block_k, num_warps, num_stages
    (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (128, 128, 32, 4, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 4, 3),
]
GEMM_SHAPES = ("attn_q_b", "attn_output_b", "attn_q_a", "ffn_gate_shexp")
GROUPED_CANDIDATES = {  # per recipe: block_m, block_n, block_k, num_warps, num_stages
    "q2": [(64, 32, 32, 4, 1), (128, 32, 32, 4, 1), (64, 32, 32, 4, 2)],
    "q4": [(64, 32, 32, 4, 1), (128, 32, 32, 4, 1), (64, 32, 32, 4, 2)],
}


class Log:
    def __init__(self, md: Path, bw: float):
        self.md, self.lines = md, [f"# Kernel config sweep (read bandwidth {bw:.0f} GB/s)", "",
                                   "| kind | shape | T | config | graph µs | GB/s | % bw | TFLOP/s | note |",
                                   "|---|---|---|---|---|---|---|---|---|"]
        self.bw = bw

    def add(self, kind, shape, t, cfg, ms, nbytes, flops=0.0, note=""):
        gbs = nbytes / (ms * 1e-3) / 1e9 if ms else 0
        tf = flops / (ms * 1e-3) / 1e12 if ms and flops else 0
        line = (f"| {kind} | {shape} | {t} | {cfg} | {ms * 1e3:.1f} | {gbs:.0f} | {100 * gbs / self.bw:.1f} | "
                f"{tf:.1f} | {note} |") if ms else f"| {kind} | {shape} | {t} | {cfg} | | | | | {note} |"
        self.lines.append(line)
        self.md.write_text("\n".join(self.lines) + "\n")
        print(line, flush=True)


def timed(calls, graph=True):
    calls[0]()
    torch.cuda.synchronize()
    return graph_time_ms(calls) if graph else median_time_ms(calls[0])


def tune_gemv(log, dev, device, deadline, best):
    for case in GEMV_SHAPES:
        dws = [blocks.to_device(blocks.synthetic_raw(case.fmt, (case.n, case.k), device, seed=s), case.fmt,
                                (case.n, case.k), device) for s in range(n_copies(case.fmt.row_bytes(case.k) * case.n, 1))]
        for t in (1,):
            shape = (t, case.groups, case.k) if case.groups > 1 else (t, case.k)
            x = torch.randn(shape, device=device)
            nbytes = dws[0].nbytes + x.numel() * 4 + t * case.n * 4
            cands = [GemvConfig(bn, bk, w, 1, st) for bn, bk, w, st in GEMV_CANDIDATES]
            if case.n <= FEW_ROWS:
                cands = [replace(c, split_k=s) for c in cands for s in SPLITS if case.k % (s * c.block_k) == 0]
            results = []
            for c in cands:
                if time.time() > deadline:
                    return
                try:
                    ms = timed([lambda w=w, c=c: qmatmul.gemv_q8_0_blocked(x, w, dev, case.groups, cfg=c) for w in dws])
                    results.append((ms, c))
                    log.add("gemv_q8blk", case.name, t, c, ms, nbytes)
                except Exception as e:  # noqa: BLE001
                    log.add("gemv_q8blk", case.name, t, c, None, nbytes, note=f"FAIL {type(e).__name__}: {str(e)[:80]}")
            if results:
                ms, c = min(results, key=lambda r: r[0])
                best["gemv"].append([["Q8_0", case.n, case.k, t], asdict(c)])
        del dws
        torch.cuda.empty_cache()


def tune_gemv_dot(log, dev, device, deadline, best):
    """The 16-token tl.dot decode path per Q8_0 shape, against the block-dot GEMV config already in the
    tables (from --base); the faster of all goes to the JSON."""
    from dsv4.kernels_triton.configs import select_gemv

    for case in GEMV_SHAPES:
        if case.name == "attn_kv":
            continue
        dws = [blocks.to_device(blocks.synthetic_raw(case.fmt, (case.n, case.k), device, seed=s), case.fmt,
                                (case.n, case.k), device) for s in range(n_copies(case.fmt.row_bytes(case.k) * case.n, 1))]
        t = 1
        shape = (t, case.groups, case.k) if case.groups > 1 else (t, case.k)
        x = torch.randn(shape, device=device)
        nbytes = dws[0].nbytes + x.numel() * 4 + t * case.n * 4
        base = select_gemv(case.fmt, case.n, case.k, dev, tokens=t)
        cands = [("gemv_q8blk", base)]
        dots = [GemvConfig(bn, bk, w, 1, st, dot_m=qmatmul.DOT_GEMV_M) for bn, bk, w, st in GEMV_DOT_CANDIDATES]
        if case.n <= FEW_ROWS:
            dots = [replace(c, split_k=s) for c in dots for s in SPLITS if case.k % (s * c.block_k) == 0]
        cands += [("gemv_dot", c) for c in dots]
        results = []
        for name, c in cands:
            if time.time() > deadline:
                break
            fn = qmatmul.gemv_dot if c.dot_m else qmatmul.gemv_q8_0_blocked
            try:
                ms = timed([lambda w=w, c=c, fn=fn: fn(x, w, dev, case.groups, cfg=c) for w in dws])
                results.append((ms, c))
                log.add(name, case.name, t, c, ms, nbytes)
            except Exception as e:  # noqa: BLE001
                log.add(name, case.name, t, c, None, nbytes, note=f"FAIL {type(e).__name__}: {str(e)[:80]}")
        if results:
            ms, c = min(results, key=lambda r: r[0])
            best["gemv"].append([["Q8_0", case.n, case.k, t], asdict(c)])
        del dws
        torch.cuda.empty_cache()
        if time.time() > deadline:
            return


def _moe_weights(recipe, device):
    fgu, fdn = MOE[recipe]
    mk = lambda f, shape, s: blocks.to_device(blocks.synthetic_raw(f, shape, device, s), f, shape, device)  # noqa: E731
    return (mk(fgu, (N_EXPERT, F_EXP, D), 1), mk(fgu, (N_EXPERT, F_EXP, D), 2), mk(fdn, (N_EXPERT, D, F_EXP), 3))


def tune_moe(log, dev, device, deadline, best):
    for recipe, (fgu, fdn) in MOE.items():
        gate, up, down = _moe_weights(recipe, device)
        per_expert = (gate.nbytes + up.nbytes + down.nbytes) // N_EXPERT
        gen = torch.Generator(device="cpu").manual_seed(1)
        sels = [torch.randperm(N_EXPERT, generator=gen)[:K_USED][None].to(device) for _ in range(ROTATE_MAX)]
        wts = torch.rand((1, K_USED), device=device)
        u = torch.randn((1, D), device=device)
        nbytes = K_USED * per_expert
        base = select_moe(fgu, fdn, F_EXP, D, dev)

        def run(cfg):
            return timed([lambda s=s: moe.fused_blockdot(u, gate, up, down, s, wts, CLAMP, dev, cfg) for s in sels])

        cur = base
        for stage in ("gu", "dn"):
            results = []
            cands = ([replace(cur, decode_gate_up=GemvConfig(bn, bk, w, 1, st)) for bn, bk, w, st in MOE_GU]
                     if stage == "gu" else
                     [replace(cur, decode_down=GemvConfig(bn, bk, w, 1, st), down_per_slot=ps)
                      for bn, bk, w, st in MOE_DN for ps in (False, True)])
            for c in cands:
                if time.time() > deadline:
                    return
                try:
                    ms = run(c)
                    results.append((ms, c))
                    log.add(f"moe_{stage}", recipe, 1, c.decode_gate_up if stage == "gu" else
                            f"{c.decode_down} per_slot={c.down_per_slot}", ms, nbytes)
                except Exception as e:  # noqa: BLE001
                    log.add(f"moe_{stage}", recipe, 1, c, None, nbytes, note=f"FAIL {type(e).__name__}: {str(e)[:80]}")
            if results:
                cur = min(results, key=lambda r: r[0])[1]
        best["moe"].append([[fgu.name, fdn.name, F_EXP, D, 1],
                            {**asdict(cur), "prefill": {**asdict(cur.prefill), "dot": cur.prefill.dot.value}}])
        del gate, up, down
        torch.cuda.empty_cache()


def tune_gemm(log, dev, device, deadline, best):
    t = 2048
    for case in [c for c in GEMV_SHAPES if c.name in GEMM_SHAPES]:
        w = blocks.to_device(blocks.synthetic_raw(case.fmt, (case.n, case.k), device, seed=1), case.fmt,
                             (case.n, case.k), device)
        x = torch.randn((t, case.k), device=device)
        a = torch.randn(t, case.k, device=device, dtype=torch.bfloat16)
        b = torch.randn(case.k, case.n, device=device, dtype=torch.bfloat16)
        bf = median_time_ms(lambda: a @ b)
        flops = 2.0 * t * case.n * case.k
        log.add("bf16 matmul", case.name, t, "torch", bf, 0, flops)
        results = []
        for bm, bn, bk, nw, st in GEMM_CANDIDATES:
            if time.time() > deadline:
                return
            c = GemmConfig(bm, bn, bk, nw, st)
            try:
                ms = timed([lambda c=c: qmatmul.gemm(x, w, dev, 1, cfg=c)])
                results.append((ms, c))
                log.add("gemm", case.name, t, c, ms, w.nbytes, flops, note=f"{100 * bf / ms:.0f}% of bf16")
            except Exception as e:  # noqa: BLE001
                log.add("gemm", case.name, t, c, None, 0, note=f"FAIL {type(e).__name__}: {str(e)[:80]}")
        if results:
            ms, c = min(results, key=lambda r: r[0])
            best["gemm"].append([["Q8_0", case.n, case.k, t], {**asdict(c), "dot": c.dot.value}])
        del w
        torch.cuda.empty_cache()


def tune_grouped(log, dev, device, deadline, best):
    t = 2048
    for recipe, (fgu, fdn) in MOE.items():
        gate, up, down = _moe_weights(recipe, device)
        gen = torch.Generator(device="cpu").manual_seed(t)
        sel = torch.stack([torch.randperm(N_EXPERT, generator=gen)[:K_USED] for _ in range(t)]).to(device)
        wts = torch.rand((t, K_USED), device=device)
        u = torch.randn((t, D), device=device)
        flops = 2.0 * t * K_USED * 3 * F_EXP * D
        base = select_moe(fgu, fdn, F_EXP, D, dev)
        results = []
        for bm, bn, bk, nw, st in GROUPED_CANDIDATES[recipe]:
            if time.time() > deadline:
                return
            c = replace(base, prefill=GemmConfig(bm, bn, bk, nw, st))
            try:
                ms = timed([lambda c=c: moe.grouped(u, gate, up, down, sel, wts, CLAMP, dev, c)], graph=False)
                results.append((ms, c))
                log.add("grouped", recipe, t, c.prefill, ms, 0, flops, note="eager")
            except Exception as e:  # noqa: BLE001
                log.add("grouped", recipe, t, c.prefill, None, 0, note=f"FAIL {type(e).__name__}: {str(e)[:80]}")
        if results:
            ms, c = min(results, key=lambda r: r[0])
            best["moe"].append([[fgu.name, fdn.name, F_EXP, D, t],
                                {**asdict(c), "prefill": {**asdict(c.prefill), "dot": c.prefill.dot.value}}])
        del gate, up, down
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-json", default="tuned.json")
    ap.add_argument("--out-md", default="tune.md")
    ap.add_argument("--time-limit", type=float, default=150.0)
    ap.add_argument("--only", nargs="*", default=["gemv", "moe", "gemm", "grouped"])
    ap.add_argument("--base", default=None, help="earlier tuned JSON: loaded first; its entries are kept unless re-tuned")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    dev = detect_device(device)
    base_json = {"gemv": [], "gemm": [], "moe": []}
    if args.base:
        from dsv4.kernels_triton.configs import load_tuned

        load_tuned(args.base)
        base_json = json.loads(Path(args.base).read_text())
    bw = read_bandwidth(device)
    log = Log(Path(args.out_md), bw)
    best = {"gemv": [], "gemm": [], "moe": []}
    deadline = time.time()
    total = sum(SHARE[n] for n in args.only)
    for name in args.only:
        deadline += args.time_limit * SHARE[name] / total
        try:
            {"gemv": tune_gemv, "gemv_dot": tune_gemv_dot, "moe": tune_moe, "gemm": tune_gemm, "grouped": tune_grouped}[name](
                log, dev, device, deadline, best)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        merged = {k: {json.dumps(key): cfg for key, cfg in base_json.get(k, []) + best[k]} for k in best}
        Path(args.out_json).write_text(json.dumps({k: [[json.loads(key), cfg] for key, cfg in v.items()]
                                                   for k, v in merged.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
