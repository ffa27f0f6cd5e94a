"""Where routed-MoE prefill time goes (T=2048, Flash shapes): each stage of moe_prefill.grouped_v2 timed
alone, and the two GEMM kernels over tile configs.

Stages: expert sort (moe.expert_tiles), u -> fp16, gate/up kernel, down kernel, the sum over the K slots.
Each is timed with triton.testing.do_bench (median, after warm-up; the stages are single launches or short
torch sequences, so host launch cost is small beside milliseconds). TFLOP/s counts the routed pairs'
useful FLOPs of the stage (not the padding of the expert tiles); % bf16 is against a same-run bf16
torch.matmul at the whole-MoE shape, as in tools/bench_kernels.py. Every config's output is compared
with the first config's (max abs difference; fp32 accumulation order differs between tilings).
Usage: python tools/probe_prefill.py [--out probe_prefill.md] [--recipes q2 q4] [--gate-up NAME ...]
       [--down NAME ...] [--rega NAME ...] [--rega-down NAME ...] [--once]
       (--once: one call per config, for Nsight Compute:
        ncu --kernel-name regex:_gate_up_kernel --launch-skip 1 --launch-count 1 python tools/probe_prefill.py --once ...)
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import (CLAMP, D, F_EXP, K_USED, MOE, N_EXPERT, bf16_tflops, median_time_ms,  # noqa: E402
                           moe_weights)
from probe_table import ProbeTable, utc_stamp  # noqa: E402
from dsv4.kernels_triton import moe, moe_gluon, moe_prefill  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402

T = 2048
P = moe_prefill.PrefillConfig
BASE = moe_prefill.CONFIGS["grouped_v2_n64"]
# gate/up kernel configs (the down fields unused); fuse: one [2N, K] tile and one dot per step;
# swap: weights as the dot's A operand (register A on sm_90), tokens as its N
GATE_UP = {
    "n64 w4 s3": BASE,
    "fuse n64 w4 s3": replace(BASE, fuse=True),
    "fuse n64 w4 s2": replace(BASE, fuse=True, num_stages=2),
    "fuse n128 w8 s3": replace(BASE, fuse=True, block_n=128, num_warps=8),
    "n128 w8 s3": replace(BASE, block_n=128, num_warps=8),
    "fuse n32 w4 s3": replace(BASE, fuse=True, block_n=32),
    "fuse swap n64 w4 s3": replace(BASE, fuse=True, swap=True),
    "fuse swap n64 w8 s3": replace(BASE, fuse=True, swap=True, num_warps=8),
    "n64 w4 s2": replace(BASE, num_stages=2),
    "n32 w4 s3": replace(BASE, block_n=32),
    "n64 w8 s3": replace(BASE, num_warps=8),
    "swap n64 w4 s3": replace(BASE, swap=True),
    "n64 k256 w4 s2": replace(BASE, block_k=256, num_stages=2),
}
# the Gluon gate/up with the decoded weights as wgmma's register A operand (IQ2_XXS only)
REGA = {  # name: (expert tile height, tile)
    "rega k128": (64, moe_gluon.RegATile(128)),
    "rega k128 nopf": (64, moe_gluon.RegATile(128, prefetch=False)),
    "rega k128 r128": (64, moe_gluon.RegATile(128, maxnreg=128)),
    "rega k64": (64, moe_gluon.RegATile(64)),
    "rega k64 nopf": (64, moe_gluon.RegATile(64, prefetch=False)),
    "rega k64 nopf r80": (64, moe_gluon.RegATile(64, prefetch=False, maxnreg=80)),
    "rega k64 nopf tab": (64, moe_gluon.RegATile(64, prefetch=False, smem_table=True)),
    "rega k64 tab": (64, moe_gluon.RegATile(64, smem_table=True)),
    "rega k64 nopf tab r80": (64, moe_gluon.RegATile(64, prefetch=False, smem_table=True, maxnreg=80)),
    "rega m32 k128 nopf tab": (32, moe_gluon.RegATile(128, prefetch=False, smem_table=True)),
    "rega m32 k64": (32, moe_gluon.RegATile(64)),
}
# the Gluon down with the decoded weights as wgmma's register A operand (Q2_K, Q4_K)
REGA_DOWN = {  # name: (expert tile height, tile)
    "rega down k128": (64, moe_gluon.RegATile(128, prefetch=False)),
    "rega down k64": (64, moe_gluon.RegATile(64, prefetch=False)),
    "rega down k64 r80": (64, moe_gluon.RegATile(64, prefetch=False, maxnreg=80)),
    "rega down k64 r64": (64, moe_gluon.RegATile(64, prefetch=False, maxnreg=64)),
    "rega down k128 pf": (64, moe_gluon.RegATile(128)),
    "rega down k256": (64, moe_gluon.RegATile(256, prefetch=False)),
}
DOWN = {
    "n128 k256 w8 s3": BASE,
    "n64 k256 w4 s3": replace(BASE, block_n_down=64, num_warps_down=4),
    "n128 k128 w8 s3": replace(BASE, block_k_down=128),
    "n256 k256 w8 s3": replace(BASE, block_n_down=256),
    "swap n64 k256 w4 s3": replace(BASE, swap_down=True, block_n_down=64, num_warps_down=4),
    "swap n128 k256 w8 s3": replace(BASE, swap_down=True),
    "swap n128 k128 w8 s3": replace(BASE, swap_down=True, block_k_down=128),
    "swap n64 k128 w4 s3": replace(BASE, swap_down=True, block_n_down=64, block_k_down=128, num_warps_down=4),
    "swap n64 k256 w4 s2": replace(BASE, swap_down=True, block_n_down=64, num_warps_down=4, num_stages_down=2),
    "swap n64 k256 w4 s4": replace(BASE, swap_down=True, block_n_down=64, num_warps_down=4, num_stages_down=4),
    "n256 k128 w8 s3": replace(BASE, block_n_down=256, block_k_down=128),
}


def problem(fgu, fdn, device):
    gate, up, down = moe_weights(fgu, fdn, device)
    gen = torch.Generator(device="cpu").manual_seed(T)  # the selection of bench_kernels at T
    sel = torch.stack([torch.randperm(N_EXPERT, generator=gen)[:K_USED] for _ in range(T)]).to(device)
    return gate, up, down, sel, torch.rand((T, K_USED), device=device), torch.randn((T, D), device=device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_prefill.md")
    ap.add_argument("--recipes", nargs="+", default=list(MOE))
    ap.add_argument("--gate-up", nargs="*", default=None, help="only these gate/up configs (none: skip)")
    ap.add_argument("--down", nargs="*", default=None, help="only these down configs (none: skip)")
    ap.add_argument("--rega", nargs="*", default=[], help="these register-A Gluon gate/up tiles too (moe_gluon)")
    ap.add_argument("--rega-down", nargs="*", default=[], help="these register-A Gluon down tiles too (moe_gluon)")
    ap.add_argument("--once", action="store_true", help="one call per config instead of timing (for ncu)")
    args = ap.parse_args(argv)
    gate_up = {k: v for k, v in GATE_UP.items() if args.gate_up is None or k in args.gate_up}
    downs = {k: v for k, v in DOWN.items() if args.down is None or k in args.down}

    def once(fn) -> float:  # --once: a single call, no timing (the profiler measures); rows show 1.0 ms
        fn()
        torch.cuda.synchronize()
        return 1.0

    timed = once if args.once else median_time_ms
    device = torch.device("cuda")
    dev = detect_device(device)
    bf16 = bf16_tflops(T * K_USED, F_EXP, D, device)
    table = ProbeTable(args.out, f"MoE prefill probe ({torch.cuda.get_device_name(device)})",
                       f"date {utc_stamp()} · T={T} · bf16 matmul {bf16:.1f} TFLOP/s (12288x4096 @ 4096x2048, "
                       f"same run)", ["recipe", "stage", "config", "ms", "TFLOP/s", "% bf16", "max abs diff vs first"])

    def row(recipe, stage, cfg, ms, flops, diff=""):
        tf = flops / (ms * 1e-3) / 1e12 if flops else 0.0
        table.add(recipe, stage, cfg, f"{ms:.3f}", f"{tf:.1f}", f"{100 * tf / bf16:.1f}", diff)

    pair_flops = 2.0 * T * K_USED * F_EXP * D  # one projection over the routed pairs
    for recipe in args.recipes:
        fgu, fdn = MOE[recipe]
        gate, up, down, sel, wts, u = problem(fgu, fdn, device)
        tiles = moe_prefill.expert_rows(sel, N_EXPERT, BASE)
        row(recipe, "sort", "expert_tiles", timed(lambda: moe_prefill.expert_rows(sel, N_EXPERT, BASE)), 0)
        x16 = u.to(torch.float16)
        row(recipe, "cast", "u -> fp16", timed(lambda: u.to(torch.float16)), 0)
        # (name, h of the stage, whether it may be the reference): the Triton configs, then the Gluon tiles
        runs = [(name, lambda cfg=cfg: moe_prefill.gate_up_stage(x16, gate, up, wts, CLAMP, tiles, K_USED, dev, cfg),
                 True) for name, cfg in gate_up.items()]
        for name in args.rega:
            bm, t = REGA[name]
            if moe_gluon.supports(u, gate, up, dev, t, bm):
                tiles_r = tiles if bm == BASE.block_m else moe.expert_tiles(sel, N_EXPERT, bm)  # sort once per height
                runs.append((name, lambda bm=bm, t=t, tiles_r=tiles_r: moe_gluon.gate_up_stage(
                    x16, gate, up, wts, CLAMP, tiles_r, K_USED, bm, t), False))
        ref_h = None
        for name, fn, may_ref in runs:
            try:
                h = fn()
                diff = "" if ref_h is None else f"{(h.float() - ref_h.float()).abs().max().item():.3g}"
                ref_h = h if ref_h is None and may_ref else ref_h
                row(recipe, "gate/up", name, timed(fn), 2 * pair_flops, diff)
            except Exception as exc:  # a config that does not compile on this Triton: record and go on
                table.add(recipe, "gate/up", name, f"failed: {type(exc).__name__}: {str(exc)[:160]}", "", "", "")
        ref_y = None
        h_in = ref_h if ref_h is not None else torch.randn((T * K_USED, F_EXP), device=device).half()
        druns = [(name, lambda cfg=cfg: moe_prefill.down_stage(h_in, down, tiles, T, K_USED, dev, cfg))
                 for name, cfg in downs.items()]
        for name in args.rega_down:
            bm, t = REGA_DOWN[name]
            if moe_gluon.supports_down(h_in, down, dev, t, bm):
                tiles_r = tiles if bm == BASE.block_m else moe.expert_tiles(sel, N_EXPERT, bm)  # sort once per height
                druns.append((name, lambda bm=bm, t=t, tiles_r=tiles_r: moe_gluon.down_stage(
                    h_in, down, tiles_r, T, K_USED, bm, t)))
        for name, fn in druns:
            try:
                y = fn()
                diff = "" if ref_y is None else f"{(y - ref_y).abs().max().item():.3g}"
                ref_y = y if ref_y is None else ref_y
                row(recipe, "down", name, timed(fn), pair_flops, diff)
            except Exception as exc:
                table.add(recipe, "down", name, f"failed: {type(exc).__name__}: {str(exc)[:160]}", "", "", "")
        if args.once:
            continue
        if ref_y is not None:
            row(recipe, "sum", "y over K", median_time_ms(lambda: ref_y.view(T, K_USED, D).sum(1)), 0)
        row(recipe, "whole", "grouped_v2_n64", median_time_ms(
            lambda: moe_prefill.grouped_v2(u, gate, up, down, sel, wts, CLAMP, dev, BASE)), 3 * pair_flops)
        row(recipe, "whole", "grouped_v2_tuned (auto)", median_time_ms(
            lambda: moe_prefill.grouped_v2_default(u, gate, up, down, sel, wts, CLAMP, dev)), 3 * pair_flops)
        y_auto = moe_prefill.grouped_v2_default(u, gate, up, down, sel, wts, CLAMP, dev)
        for name in args.rega_down:  # the tuned call with this Gluon down tile
            cfg = replace(moe_prefill.tuned_config(gate), rega_down=REGA_DOWN[name][1])
            fn = lambda cfg=cfg: moe_prefill.grouped_v2(u, gate, up, down, sel, wts, CLAMP, dev, cfg)
            diff = f"{(fn() - y_auto).abs().max().item():.3g}"
            row(recipe, "whole", f"tuned + {name}", median_time_ms(fn), 3 * pair_flops, diff)
        del gate, up, down
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
