"""Where decode time goes: per-launch CUDA-graph times of the int8 routed-MoE stages and tile sweeps.

Timing as tools/bench_kernels.py (CUDA-graph replay over rotating weight copies / expert selections,
median; % of the streaming read measured in this run). Two parts:
  * `moe`: for each recipe (q2, q4) and tile config, the four launches of moe_int8.fused_int8 at T=1
    (Q8_K of u, gate/up, Q8_K of h, down), each timed alone, and the whole call;
  * `q8`: gemv_rows tilings (rows, codes, warps, split-K allowed or not) on the large Q8_0 matrices, T=1;
  * `q8i`: q8_int8.gemv_int8 tilings (Q8_0 activations, dp4a; the ds4-exact mode's decode) on every Q8_0
    shape, beside the quantizer launch alone, gemv_rows' default and a plain streaming read of the same
    bytes (the ceiling at that size: launch ramp and tail included);
  * `ceil`: plain streaming reads of the routed-MoE decode stages' bytes (q2, q4; 6 experts' gate+up, then
    down), alone, back to back (two launches: any two-phase MoE), and with the two Q8_K launches of moe_int8
    between (its four-launch structure without compute): the floor at these sizes;
  * `q8seg`: the long-K matrices (attn_output_a/b) with each row cut into S K-segments stored segment-major
    ([S, rows, K/S]: every program's tile is one contiguous run, as attn_q_b's), run by gemv_rows' grouped
    path (x segment per group) plus a fixed-order sum over S; beside the row-major auto tile and plain reads
    of row-strided vs contiguous tiles (does the strided access itself cost?);
  * `xv`: moe_int8's tuned configs with the activation words (and Q2_K code sums) read by 16-byte loads
    (Int8MoeConfig.x_vec_gate_up / x_vec_down) per stage and without, interleaved twice (stages alone, each
    stage behind its Q8_K launch, whole call; for Q4_K only the code sums change);
  * `sv`: the q4 recipe with Q4_K's d|dmin and scale words by one 16-byte load (Int8MoeConfig.scale_vec_*)
    in both stages, in gate/up only, and in neither, tuned tiles interleaved twice (bitwise check), then the
    moe_sweep tiles of each stage with it;
  * `unroll`: moe_int8's tuned configs with the down loop unrolled at compile time (Int8MoeConfig.unroll_down:
    all K slots' loads can be in flight together) and without, interleaved twice (bitwise check), then down
    tiles with it, each behind its Q8_K launch;
  * `limb`: moe_int8 on fp32-grade activations (limbs=3: three int8 planes, the CUDA auto decode MoE): the tuned
    tiles' whole call with 1 and 3 planes interleaved twice, then every moe_sweep gate/up and down tile and the
    unrolled down tiles with and without 16-byte activation loads, each behind its quantizer launch;
  * `xv_sweep`: the moe_sweep tiles of each stage with and without the 16-byte activation loads, each
    timed behind its Q8_K launch (as in the whole call; moe_sweep timed each stage alone);
  * `q8st`: gemv_rows with its K loop software-pipelined by Triton (`stages` > 1: the code words and scales
    of the next steps arrive by cp.async into shared memory, so bytes in flight no longer cost registers)
    instead of the register double buffer, on the four large Q8_0 matrices, beside the auto tile;
  * `q8l2`: gemv_rows tiles with a rolling L2 prefetch (`l2_prefetch` = D: step s asks L2 for the lines of
    step s + D's codes, bytes in flight without registers) over D, on the four large Q8_0 matrices, twice
    interleaved; the stage column gives the largest difference from the auto tile's output (without the
    prefetch: the LM head's auto tile has one);
  * `q8xs`: split tiles of attn_output_a/b (split 2/4/8) and the auto tiles of the small split matrices with the
    slices summed by the last program (split_sum 1) or by the exchange tree (4: the partials travel in atomic
    exchanges, no fence), twice interleaved; the stage column gives the largest difference from the auto tile's
    output and whether a second call of the tree repeats its bits;
  * `reg`: moe_int8's tuned stages (one plane and three) under register caps (`maxnreg_gate_up` /
    `maxnreg_down`), each behind its quantizer, twice interleaved;
  * `gq4`: q4 whole calls (one plane) with the Q4_K stages on moe_int8_gluon's kernels (gq4_cases), beside the
    tuned Triton stages, twice interleaved (outputs against the first case's); then each gate/up tile behind the
    u quantizer and each down tile behind the h quantizer, twice;
  * `gq4l3`: the same on three activation planes (limbs=3): the Triton stages (TUNED_LIMB3's fields) against the
    Gluon tiles, whole calls and each stage behind its quantizer, twice;
  * `gq2`: q2 whole calls with the Q2_K down stage on moe_int8_gluon's kernel (GQ2_DOWN tiles) beside the tuned
    config, one plane (TUNED) and three (TUNED_LIMB3), twice interleaved; then each down tile behind the h
    quantizer, twice;
  * `gq2g`: q2 whole calls with the IQ2_XXS gate/up on moe_int8_gluon's kernel (GQ2G_GATE_UP tiles, three planes
    GQ2G_L3) beside the tuned config (Triton gate/up), one plane and three, twice interleaved; then each gate/up
    tile behind the u quantizer, twice;
Prints a markdown table and writes it to --out.
Usage: python tools/probe_decode.py [--out probe_decode.md] [--parts moe q8]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import (CLAMP, D, DENSE, F_EXP, K_USED, MOE, N_EXPERT, ROTATE_MAX, graph_time_ms,  # noqa: E402
                           moe_weights, n_copies)
import bench_kernels  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv4.kernels_triton import blocks, moe_int8, q8_gemv, q8_int8  # noqa: E402
from probe_table import bandwidth_table, gb_s  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402

ALL = moe_int8.Prefetch.ALL  # tile tuples (rows, warps_k, prefetch, warps_rows): every step's words before the wait

C = moe_int8.Int8MoeConfig
MOE_CONFIGS = {
    "int8_base": C(),
    "int8_tuned_q2": moe_int8.TUNED[moe_int8.QuantFormat.IQ2_XXS],
    "int8_tuned_q4": moe_int8.TUNED[moe_int8.QuantFormat.Q4_K],
}
# `moe_sweep`: each stage alone over tiles (rows, K step, warps, prefetch)
GATE_UP_TILES = [(4, 2, 1, True), (4, 1, 1, True), (2, 2, 1, True), (4, 2, 1, False), (4, 4, 1, True),
                 (8, 1, 1, True), (2, 4, 1, True), (4, 2, 2, True), (32, 2, 4, False), (64, 2, 8, False),
                 (32, 2, 8, False), (32, 4, 4, False), (64, 1, 4, False), (32, 2, 4, True), (16, 2, 4, False)]
DOWN_TILES = [(8, 8, 4, False), (16, 8, 8, False), (8, 8, 8, False), (4, 8, 4, False), (8, 4, 4, False),
              (32, 8, 8, False), (2, 8, 1, False), (2, 8, 2, False), (2, 4, 1, False), (4, 8, 2, False),
              (2, 8, 1, True), (1, 8, 1, False)]
UNROLL_DOWN_TILES = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4), (16, 4)]  # rows, warps
Q8_TILES = [(bn, bk, w, mp) for bn in (16, 32, 64) for bk in (64, 128) for w in (1, 2)
            for mp in (0, 8, 16, 32)]  # rows, codes per step, warps, split K below mp programs per SM (0: never)
Q8_SHAPES = ("attn_q_a", "attn_q_b", "attn_kv", "attn_output_a", "attn_output_b", "ffn_gate_shexp",
             "ffn_down_shexp", "output")


# `pdl`: the best tiles of the sweeps, each with and without programmatic dependent launch
PDL_Q8_TILES = [(16, 128, 1, 0), (32, 128, 1, 0), (16, 256, 2, 8), (16, 512, 4, 0), (16, 128, 1, 8), (32, 64, 1, 8),
                (32, 128, 1, 8), (32, 128, 2, 0), (16, 256, 4, 8), (8, 512, 2, 8), (16, 128, 2, 8), (16, 64, 1, 8)]
PDL_MOE = {
    "gu4_2_1pf+dn8_8_8": C(block_n_gate_up=4, kstep_gate_up=2, warps_gate_up=1, prefetch_gate_up=True,
                           block_n_down=8, kstep_down=8, warps_down=8),
    "gu4_2_1pf+dn8_8_4pf": C(block_n_gate_up=4, kstep_gate_up=2, warps_gate_up=1, prefetch_gate_up=True,
                             block_n_down=8, kstep_down=8, warps_down=4, prefetch_down=True),
    "gu32_2_4+dn2_8_1pf": C(block_n_gate_up=32, kstep_gate_up=2, warps_gate_up=4,
                            block_n_down=2, kstep_down=8, warps_down=1, prefetch_down=True),
    "gu32_2_4pf+dn2_8_1pf": C(block_n_gate_up=32, kstep_gate_up=2, warps_gate_up=4, prefetch_gate_up=True,
                              block_n_down=2, kstep_down=8, warps_down=1, prefetch_down=True),
}


# `q8x`: per shape, the best tiles of `pdl` (all with PDL) with the weights prefetched 1 or 2 steps ahead, x
# prefetched or not
Q8X_TILES = {
    "attn_q_b": [(16, 128, 1, 8), (16, 128, 1, 0), (32, 128, 1, 0)],
    "attn_output_a": [(16, 512, 4, 0), (16, 128, 1, 8), (32, 64, 1, 8)],
    "attn_output_b": [(32, 128, 1, 8), (16, 128, 1, 8), (32, 64, 1, 8)],
    "output": [(32, 128, 1, 0), (32, 128, 1, 8)],
    "attn_q_a": [(16, 256, 2, 8), (16, 128, 1, 8)],
    "attn_kv": [(16, 256, 2, 8), (8, 512, 2, 8)],
    "ffn_gate_shexp": [(16, 256, 2, 8), (16, 128, 1, 8)],
    "ffn_down_shexp": [(16, 512, 4, 0), (16, 128, 1, 8)],
}


# `q8o`: attn_output_a / attn_output_b around their best tiles (PDL, one step prefetched)
Q8O_TILES = [(bn, bk, w, mp) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (1, 2, 4)
             for mp in (0, 2, 4, 8) if not (bk == 512 and w == 1)]
# `q8w`: K split over the warps of one program instead of over programs (no cross-program reduction):
# BLOCK_K = warps x 128 codes puts each warp on its own 128-code slice of the step
Q8W_TILES = [(bn, 128 * w, w, 0) for bn in (4, 8, 16, 32) for w in (4, 8, 16)] + [(16, 128, 1, 8), (16, 512, 4, 0)]


def moe_problem(fgu, fdn, device):
    """Flash-shaped gate/up/down experts of the given formats, ROTATE_MAX expert selections for one token,
    route weights and u."""
    gate, up, down = moe_weights(fgu, fdn, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    sels = [torch.randperm(N_EXPERT, generator=gen)[:K_USED][None].to(device) for _ in range(ROTATE_MAX)]
    return gate, up, down, sels, torch.rand((1, K_USED), device=device), torch.randn((1, D), device=device)


def moe_cases(device):
    """Per recipe: (recipe, gate, up, down, sels, wts, u, gate/up bytes, down bytes) of moe_problem; the
    previous recipe's weights are dropped before the next are made."""
    for recipe, (fgu, fdn) in MOE.items():
        torch.cuda.empty_cache()
        gate, up, down, sels, wts, u = moe_problem(fgu, fdn, device)
        yield (recipe, gate, up, down, sels, wts, u, *stage_bytes(fgu, fdn))
        del gate, up, down


def stage_bytes(fgu, fdn) -> tuple[int, int]:
    """Bytes one token's call reads in the gate/up stage and in the down stage (K_USED experts' rows)."""
    return K_USED * 2 * F_EXP * fgu.row_bytes(D), K_USED * D * fdn.row_bytes(F_EXP)


def chain_gate_up_ms(u, gate, up, sels, wts, cfg, limbs: int = 1) -> float:
    """Graph time of moe_int8's first two launches (Q8_K of u, then gate/up), as in the whole call."""
    iq2 = moe_int8.uses_iq2_order(gate)
    return graph_time_ms([lambda s=s: moe_int8.gate_up_int8(moe_int8.quant_q8_k(u, iq2, True, limbs), gate, up, s, wts,
                                                            CLAMP, True, cfg, True) for s in sels])


def whole_ms(u, gate, up, down, sels, wts, dev, cfg, limbs: int = 1) -> float:
    """Graph time of the whole moe_int8 call (its four launches) over the rotating selections."""
    return graph_time_ms([lambda s=s: moe_int8.fused_int8(u, gate, up, down, s, wts, CLAMP, dev, cfg, limbs)
                          for s in sels])


def bitwise_note(ref, u, gate, up, down, sel, wts, dev, cfg) -> str:
    """' (bitwise equal)' or ' (DIFFERS)': cfg's whole call on sel against ref."""
    same = torch.equal(ref, moe_int8.fused_int8(u, gate, up, down, sel, wts, CLAMP, dev, cfg))
    return " (bitwise equal)" if same else " (DIFFERS)"


def rel_diff(y, ref) -> float:
    """max |y - ref| / max |ref|."""
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def time_whole_cases(row, recipe, limbs, cases, problem, dev, nbytes):
    """Each (label, Int8MoeConfig) of cases as whole moe_int8 calls on `limbs` activation planes, interleaved twice,
    outputs compared bitwise with the first case's; problem = (u, gate, up, down, sels, wts) of moe_cases."""
    u, gate, up, down, sels, wts = problem
    ref = moe_int8.fused_int8(u, gate, up, down, sels[0], wts, CLAMP, dev, cases[0][1], limbs)
    for _ in range(2):
        for label, cfg in cases:
            y = moe_int8.fused_int8(u, gate, up, down, sels[0], wts, CLAMP, dev, cfg, limbs)
            same = "bitwise equal" if torch.equal(y, ref) else f"rel diff {rel_diff(y, ref):.1e}"
            row(f"moe_{recipe}", f"limbs={limbs} {label}", f"whole ({same})",
                whole_ms(u, gate, up, down, sels, wts, dev, cfg, limbs), nbytes)


def time_whole_and_down(row, recipe, limbs, cases, problem, dev, gu_bytes, dn_bytes):
    """time_whole_cases, then each case's quant h + down stage (interleaved twice) on the h of the first case's
    gate/up (cases differ in their down tiles)."""
    u, gate, up, down, sels, wts = problem
    time_whole_cases(row, recipe, limbs, cases, problem, dev, gu_bytes + dn_bytes)
    uq = moe_int8.quant_q8_k(u, iq2_order=moe_int8.uses_iq2_order(gate), limbs=limbs)
    hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, cases[0][1]) for s in sels]
    for _ in range(2):
        for label, cfg in cases:
            row(f"moe_{recipe}", f"limbs={limbs} {label}", "quant h + down", chain_down_ms(hs, down, sels, cfg, limbs),
                dn_bytes)


def qh_cases(tuned, tiles: bool = True):
    """`qh`: the tuned config with the h quantizer launched, fused, fused under QH_REG_CAPS, and (tiles) fused on
    QH_GATE_UP_TILES."""
    base = replace(tuned, fuse_quant_h=False)
    cases = [("tuned", base), ("tuned fuse_quant_h", replace(base, fuse_quant_h=True))]
    cases += [(f"tuned fuse_quant_h maxnreg {cap}", replace(base, fuse_quant_h=True, maxnreg_gate_up=cap))
              for cap in QH_REG_CAPS]
    if tiles:
        cases += [(f"{name} fuse_quant_h", cfg)
                  for name, cfg in (gate_up_tile(base, tile, fuse_quant_h=True) for tile in QH_GATE_UP_TILES)]
    return cases


def qh_reg_cases(tuned):
    """`qh_reg`: gate/up register caps QH_REG_SWEEP, with the h quantizer launched and fused."""
    base = replace(tuned, fuse_quant_h=False, maxnreg_gate_up=0)
    return [(f"{'fuse_quant_h ' if qh else ''}gate_up maxnreg {cap}",
             replace(base, fuse_quant_h=qh, maxnreg_gate_up=cap)) for qh in (False, True) for cap in QH_REG_SWEEP]


def dreg_cases(tuned):
    """`dreg`: down-kernel register caps DOWN_REG_SWEEP on the tuned config."""
    return [(f"tuned, down maxnreg {cap}", replace(tuned, maxnreg_down=cap)) for cap in DOWN_REG_SWEEP]


def gq4_label(tile) -> str:
    rows, wk, pf, wr = tile
    return f"r{rows} wk{wk}{f' wr{wr}' if wr > 1 else ''}{' pf all' if pf == ALL else ' pf' if pf else ''}"


def gq4_cases(tuned, gate_up_tiles, down_tiles, cross):
    """`gq4` whole calls: the tuned config, each gate/up tile and each down tile on their own, and cross's pairs
    (gate/up tiles x down tiles); h has its own launch behind a Gluon gate/up."""
    tile = moe_int8.Int8GluonTile
    cases = [("tuned", tuned)]
    cases += [(f"gluon gate/up {gq4_label(t)}", replace(tuned, gluon_gate_up=tile(*t))) for t in gate_up_tiles]
    cases += [(f"gluon down {gq4_label(t)}", replace(tuned, gluon_down=tile(*t))) for t in down_tiles]
    cases += [(f"gluon gate/up {gq4_label(g)} + down {gq4_label(d)}",
               replace(tuned, gluon_gate_up=tile(*g), gluon_down=tile(*d))) for g in cross[0] for d in cross[1]]
    return cases


def gq4l3_cases(tuned):
    """`gq4l3` whole calls on three planes: the Triton stages (TUNED_LIMB3 without its Gluon tiles, h fused and
    launched), each GQ4L3_GATE_UP tile and each GQ4L3_DOWN tile on their own, and every pair of the first two of
    each."""
    tile = moe_int8.Int8GluonTile
    tuned = replace(tuned, gluon_gate_up=None, gluon_down=None)
    base = replace(tuned, fuse_quant_h=False)
    cases = [("triton", tuned), ("triton, h launched", base)]
    cases += [(f"gluon gate/up {gq4_label(t)}", replace(base, gluon_gate_up=tile(*t))) for t in GQ4L3_GATE_UP]
    cases += [(f"gluon down {gq4_label(t)}", replace(base, gluon_down=tile(*t))) for t in GQ4L3_DOWN]
    cases += [(f"gluon gate/up {gq4_label(g)} + down {gq4_label(d)}",
               replace(base, gluon_gate_up=tile(*g), gluon_down=tile(*d)))
              for g in GQ4L3_GATE_UP[:2] for d in GQ4L3_DOWN[:2]]
    return cases


def chain_down_ms(hs, down, sels, cfg, limbs: int = 1) -> float:
    """Graph time of moe_int8's last two launches (Q8_K of h, then down) for the h of each selection."""
    return graph_time_ms([lambda s=s, h=h: moe_int8.down_int8(moe_int8.quant_q8_k(h, pdl=True, limbs=limbs), down, s,
                                                              True, cfg, True) for s, h in zip(sels, hs)])


def gate_up_tile(base, tile, **kw):
    """(row name, config) of a moe_sweep gate/up tile (rows, K step, warps, prefetch) on base, kw set too."""
    bn, ks, w, pf = tile
    return (f"{'pf_' if pf else ''}gu_{bn}_{ks}_{w}",
            replace(base, block_n_gate_up=bn, kstep_gate_up=ks, warps_gate_up=w, prefetch_gate_up=pf, **kw))


def down_tile(base, tile, **kw):
    """(row name, config) of a moe_sweep down tile (rows, K step, warps, prefetch) on base, looped (not unrolled)."""
    bn, ks, w, pf = tile
    return (f"{'pf_' if pf else ''}dn_{bn}_{ks}_{w}",
            replace(base, block_n_down=bn, kstep_down=ks, warps_down=w, prefetch_down=pf, unroll_down=False, **kw))


def unroll_down_tile(base, tile, **kw):
    """(row name, config) of an UNROLL_DOWN_TILES tile (rows, warps): 8 super-blocks per step, unrolled."""
    bn, w = tile
    return (f"unroll dn_{bn}_8_{w}",
            replace(base, block_n_down=bn, kstep_down=8, warps_down=w, prefetch_down=False, unroll_down=True, **kw))


def q8_problem(d, device):
    """Enough copies of a Q8_0 matrix of DENSE shape d to defeat L2, and one token of x."""
    ws = [blocks.to_device(blocks.synthetic_raw(d.fmt, (d.n, d.k), device=device, seed=1 + i), d.fmt, (d.n, d.k),
                           device) for i in range(n_copies(d.fmt.row_bytes(d.k) * d.n, 1))]
    return ws, torch.randn((1, d.groups, d.k) if d.groups > 1 else (1, d.k), device=device)


# `q8r`: few rows per one-warp program (the grid alone fills the SMs, little or no split-K) on the 35.7 MB
# matrices whose row tiles are long in K
Q8R_TILES = [(bn, bk, 1, mp, pf) for bn in (4, 8) for bk in (256, 512) for mp in (0, 8, 16) for pf in (1, 2)
             if not (pf == 2 and mp == 16)] + [(32, 128, 1, 8, 1), (16, 128, 1, 0, 1), (16, 512, 4, 0, 1)]  # defaults


# `q8s`: how split-K slices are summed (gemv_rows split_sum 0 / 1 / 2) on the split tiles
Q8S_TILES = {"attn_output_b": [(32, 128, 1, 8), (16, 128, 1, 8)], "attn_output_a": [(16, 128, 1, 8), (32, 64, 1, 8)],
             "attn_q_a": [(16, 256, 2, 8)], "attn_kv": [(16, 256, 2, 8)], "ffn_gate_shexp": [(16, 256, 2, 8)]}


# `q8xs`: (rows, codes, warps, split below mp programs per SM): the split each gives is in the row label
Q8XS_TILES = {"attn_output_b": [(32, 128, 1, 1), (32, 128, 1, 2), (32, 128, 1, 8), (16, 128, 1, 2), (16, 128, 1, 4),
                                (16, 128, 1, 8), (32, 256, 2, 8), (16, 256, 1, 2), (64, 128, 2, 8)],
              "attn_output_a": [(32, 128, 1, 2), (32, 128, 1, 8), (16, 128, 1, 8), (8, 128, 1, 8), (16, 256, 2, 8),
                                (8, 256, 1, 8)],
              "attn_q_a": [], "attn_kv": [], "ffn_gate_shexp": []}  # the small ones: their auto (split) tile only


# `q8cyc`: tiles of the 35.7 MB matrices timed in 7-call graphs (one rotation) and in graphs holding the rotation
# 8 times over (the steady state of a long decode graph, where every kernel's ramp overlaps the one before it)
Q8CYC_TILES = {"attn_output_a": [(16, 512, 4, 0), (16, 256, 2, 0), (32, 256, 2, 0), (16, 128, 1, 0), (32, 128, 1, 0),
                                 (8, 512, 2, 0), (32, 512, 4, 0), (16, 128, 1, 8), (32, 128, 1, 2), (32, 128, 1, 8),
                                 (8, 128, 1, 8), (16, 256, 2, 8), (8, 256, 1, 8)],
               "attn_output_b": [(32, 128, 1, 8), (32, 128, 1, 2), (32, 128, 1, 4), (16, 128, 1, 4), (16, 128, 1, 8),
                                 (32, 256, 2, 8), (64, 128, 2, 8), (16, 256, 1, 8), (64, 256, 4, 8), (32, 512, 4, 8),
                                 (16, 512, 4, 0), (32, 256, 2, 0)],
               "attn_q_b": [(16, 128, 1, 0), (32, 128, 1, 0), (8, 128, 1, 0)]}
Q8CYC_CYCLES = (1, 8)
# `q8xm`: x read as four stride-4 gathers (x_mode 2: L1 hits, no conversion through shared memory, so no CTA barrier
# per K step in multi-warp programs) against natural order split in registers (x_mode 0), per tile
Q8XM_TILES = {"attn_output_a": [(16, 512, 4, 0), (32, 512, 4, 0), (16, 256, 2, 0), (16, 1024, 8, 0), (16, 128, 1, 8),
                                (32, 256, 4, 0)],
              "attn_output_b": [(32, 128, 1, 8), (16, 128, 1, 8), (32, 256, 2, 8), (16, 512, 4, 8), (32, 512, 4, 8)],
              "attn_q_b": [(16, 128, 1, 0), (16, 512, 4, 0)], "output": [(32, 128, 1, 0)]}

# `q8kf`: gemv_rows' code words through [rows, codes] pointers (k_flat: a warp's lanes along K on every Triton)
# against [rows, blocks, words] pointers (lanes over rows on Triton 3.6, along K from 3.7): both one-token tables' tiles
# with and without it, q8cyc's tiles with it (codes evict_first; the smaller matrices: the auto tile without and with),
# then T=4 on every Q8_0 shape (auto, without and with)
Q8KF_T = 4


# `q8wc`: the L1 policy of gemv_rows' weight loads (q8_gemv.WeightCache: default, .cg = L2 only, evict_first, evict_first
# on the codes only) on the tuned tile of every Q8_0 shape and on the next-best tiles of attn_output_a/b
Q8WC_TILES = {"attn_output_a": [(16, 128, 1, 8)], "attn_output_b": [(16, 128, 1, 8)]}

# `q8pfe`: the 35.7 MB matrices' tiles with evict_first on the code words (their tuned policy) and 1 or 2 K steps
# of codes in flight in registers (prefetch=2 also puts two steps' loads before griddepcontrol.wait)
Q8PFE_TILES = {"attn_output_a": [(16, 512, 4, 0), (16, 256, 2, 0), (8, 512, 2, 0), (32, 256, 2, 0), (32, 512, 4, 0),
                                 (16, 1024, 4, 0)],
               "attn_output_b": [(32, 128, 1, 8), (16, 128, 1, 8), (32, 256, 2, 8), (16, 256, 2, 8)]}

# `qh`: h quantized inside the gate/up kernel (Int8MoeConfig.fuse_quant_h: three launches instead of four) on the
# tuned configs and on these gate/up tiles (rows, K step, warps, prefetch), one plane and three
QH_GATE_UP_TILES = [(4, 2, 1, True), (8, 1, 1, True), (8, 2, 1, True), (16, 2, 2, True), (32, 2, 4, False)]
QH_REG_CAPS = (128, 168)  # the fused three-plane Q4_K gate/up kernel took 180 registers, 128 unfused (55)
# `qh_reg`: register caps of the gate/up kernel above 128 (41 tried 64-128 only), with the h quantizer fused and not
def gq2_cases(tuned):
    """`gq2` whole calls: the tuned config, then the tuned config with each GQ2_DOWN tile on the Gluon down kernel
    and, where the tuned config has a Gluon down tile, the Triton down stage."""
    cases = [("tuned", tuned)]
    if tuned.gluon_down is not None:
        cases.append(("triton down", replace(tuned, gluon_down=None)))
    return cases + [(f"gluon down {gq4_label(t)}", replace(tuned, gluon_down=moe_int8.Int8GluonTile(*t)))
                    for t in GQ2_DOWN]


QH_REG_SWEEP = (0, 144, 168, 192, 216, 255)
# `dreg`: register caps of the down kernel above 128 on the tuned configs (the three-plane Q4_K down took 255, 55)
DOWN_REG_SWEEP = (0, 128, 144, 168, 192, 216)

# `gq4`: the q4 stages on moe_int8_gluon's kernels, tiles moe_int8.Int8GluonTile(rows, warps along K, prefetch,
# warps along rows)
GQ4_GATE_UP = [(4, 1, False, 1), (8, 1, False, 2), (2, 1, True, 1), (16, 1, False, 4)]
GQ4_DOWN = [(4, 1, True, 1), (2, 1, True, 1), (8, 1, False, 2)]
GQ4_CROSS = ([(8, 1, False, 2), (2, 1, True, 1)], [(2, 1, True, 1)])

# `gq4l3`: the same kernels on three activation planes (limbs=3, h launched)
GQ4L3_GATE_UP = [(2, 1, True, 1), (4, 1, False, 2), (2, 1, False, 1), (8, 1, False, 4), (4, 1, False, 1)]
GQ4L3_DOWN = [(4, 1, False, 2), (2, 1, False, 1), (2, 1, True, 1), (8, 1, False, 4), (4, 1, False, 1)]

# `gq2`: the q2 recipe's Q2_K down on moe_int8_gluon's kernel (one plane and three)
GQ2_DOWN = [(4, 1, True, 1), (4, 1, False, 1), (2, 1, True, 1), (8, 1, False, 2), (16, 1, False, 4), (1, 1, True, 1),
            (8, 1, True, 2)]

# `gq2g`: the q2 recipe's IQ2_XXS gate/up on moe_int8_gluon's kernel, one plane and three (rows per thread <= 4 there)
GQ2G_GATE_UP = [(4, 1, True, 1), (4, 1, False, 1), (2, 1, True, 1), (2, 1, False, 1), (8, 1, False, 1),
                (8, 1, False, 2), (4, 2, False, 1), (4, 2, True, 1), (8, 2, False, 2), (1, 1, True, 1),
                (16, 1, True, 4), (2, 1, ALL, 1), (1, 1, ALL, 1), (4, 1, ALL, 2)]  # ALL: every step's words before
# the PDL wait
GQ2G_L3 = [(2, 1, True, 1), (2, 1, False, 1), (4, 1, False, 1), (4, 1, True, 1), (1, 1, True, 1), (2, 2, False, 1),
           (4, 2, False, 2), (8, 1, False, 2), (2, 1, ALL, 1)]

# `gflat`: flat down tiles (two warps along the token's slots: a step takes two slots, 3 steps at K = 6)
GFLAT_DOWN = [(4, 2, True, 1), (4, 2, False, 1), (2, 2, True, 1), (2, 2, False, 1), (8, 2, False, 2), (8, 2, True, 2),
              (8, 2, False, 1)]

# `reg`: register caps (PTX .maxnreg) of the int8 MoE stages; 0 = none
REG_CAPS = (0, 64, 80, 96, 128)

# `q8i`: gemv_int8 tiles with 2..64 code words per thread per step; (rows, codes, warps, split below mp programs/SM)
Q8I_TILES = [(bn, bk, w, mp) for bn in (8, 16, 32, 64) for bk in (128, 256, 512) for w in (1, 2, 4) for mp in (0, 8)
             if 2 <= bn * bk // (128 * w) <= 64]
Q8I_SMALL = ("attn_q_a", "attn_kv", "ffn_gate_shexp", "ffn_down_shexp")  # these get the split tiles only
READ_BLOCK = 4096  # int32 words per program of the plain read

# `q8t`: gemv_rows tiles for T > 1 (before 20: the auto path used one tile, DEFAULT_ROWS_WIDE, for every shape)
Q8T_TOKENS = (4, 8)
Q8T_TILES = [(bn, bk, w, 8) for bn in (8, 16, 32) for bk in (128, 256) for w in (1, 2, 4)]

# `q8st`: (rows, codes, warps) x pipeline stages x split-K threshold (0: never split; the row-rich matrices
# attn_q_b and the LM head never split)
Q8ST_TILES = [(16, 128, 1), (32, 128, 1), (16, 256, 1), (16, 256, 2), (32, 256, 2), (16, 512, 4), (8, 512, 2),
              (32, 512, 4)]
Q8ST_STAGES = (2, 3, 4, 6)
Q8ST_SHAPES = {"attn_q_b": (0,), "output": (0,), "attn_output_a": (0, 4, 8), "attn_output_b": (0, 4, 8)}
# `q8l2`: (rows, codes, warps, split below mp programs per SM) x L2 prefetch distance
Q8L2_TILES = [(16, 128, 1, 0), (16, 128, 1, 8), (32, 128, 1, 8), (32, 128, 1, 0), (16, 256, 2, 0), (16, 512, 4, 0)]
Q8L2_DIST = (0, 2, 4, 8)
Q8L2_AUTO_DIST = (0, 2, 3, 4, 6)


def q8l2_tiles(d) -> list:
    """Q8L2_TILES for shape d: every tile on the grouped attn_output_a; split tiles only on attn_output_b
    (the other two never split), the 4-warp 512-code tile only where it is the auto tile."""
    if d.groups > 1:
        return Q8L2_TILES
    return [t for t in Q8L2_TILES if (t[3] == 0 or d.name == "attn_output_b") and t[:3] != (16, 512, 4)]


@triton.jit
def _read_kernel(p, out, n, BLOCK: tl.constexpr):
    """out[pid] = xor of BLOCK int32 words: a plain streaming read (16-byte loads, no reuse)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(p + i, mask=i < n, other=0)
    tl.store(out + tl.program_id(0), tl.xor_sum(v, axis=0))


def plain_read(buf, out, block: int = READ_BLOCK, warps: int = 4):
    w = buf.view(-1).view(torch.int32)
    _read_kernel[(triton.cdiv(w.numel(), block),)](w, out, w.numel(), BLOCK=block, num_warps=warps)


@triton.jit
def _read_tiles_kernel(p, out, stride_row, seg_bytes, n_rows, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program (row tile, segment): xor of BLOCK_N rows x seg_bytes, read BLOCK_B bytes per row per step
    (int32 words; rows stride_row bytes apart): the access pattern of a split-K GEMV tile without compute."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = p + rows.to(tl.int64)[:, None] * (stride_row // 4) + tl.program_id(1) * (seg_bytes // 4)
    acc = tl.zeros([BLOCK_N, BLOCK_B // 4], dtype=tl.int32)
    for o in range(0, seg_bytes // 4, BLOCK_B // 4):
        acc ^= tl.load(base + o + tl.arange(0, BLOCK_B // 4)[None, :], mask=(rows < n_rows)[:, None], other=0)
    tl.store(out + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


def read_tiles(buf, out, n_rows: int, stride_row: int, seg_bytes: int, n_seg: int, bn: int = 16, bb: int = 128):
    _read_tiles_kernel[(triton.cdiv(n_rows, bn), n_seg)](buf.view(-1).view(torch.int32), out, stride_row, seg_bytes,
                                                         n_rows, BLOCK_N=bn, BLOCK_B=bb, num_warps=1)


def segment_major(d, seg: int, device, seed: int):
    """(DeviceWeight [seg * rows, K/seg] of matrix d's rows cut into seg K-segments, segment-major; groups)."""
    raw = blocks.synthetic_raw(d.fmt, (d.n, d.k), device=device, seed=seed)
    kb = d.fmt.row_bytes(d.k) // seg
    raw = raw.reshape(d.n, seg, kb).transpose(0, 1).contiguous().reshape(seg * d.n, kb)
    return blocks.to_device(raw, d.fmt, (seg * d.n, d.k // seg), device), seg * d.groups


# `xv`: the fastest Q2_K down tiles with 16-byte activation loads in `xv_sweep` (23), besides the tuned one
XV_DOWN_TILES = [(4, 8, 4), (4, 8, 2), (2, 8, 1), (8, 8, 4)]
# `xv_sweep`: gate/up tiles between the one-warp and the 4-warp ones, besides GATE_UP_TILES
XV_SWEEP_GATE_UP_EXTRA = [(16, 2, 2, False), (16, 2, 2, True), (8, 2, 2, True), (16, 1, 2, True), (8, 2, 1, True),
                          (32, 1, 4, True), (16, 2, 4, True)]


def split_label(d, dev, bn: int, bk: int, warps: int, mp: int) -> str:
    """A gemv_rows tile's row label with the split-K it gets on matrix d."""
    split = q8_gemv._rows_split(-(-d.n // bn), d.k, bk, dev, mp > 0, max(mp, 1))
    return f"{bn}x{bk} w{warps} split{split}"


def time_q8_cases(row, d, ws, x, dev, cases, cycles=(None,)):
    """Each (label, gemv_rows keywords) of `cases` twice, interleaved: its largest difference from the first case's
    output, and its graph time with the rotation over ws held each count of `cycles` times (None: bench_kernels')."""
    ref = q8_gemv.gemv_rows(x, ws[0], dev, d.groups, **cases[0][1]).clone()
    for _ in range(2):
        for label, kw in cases:
            diff = (q8_gemv.gemv_rows(x, ws[0], dev, d.groups, **kw) - ref).abs().max().item()
            for c in cycles:
                ms = graph_time_ms([lambda w=w, kw=kw: q8_gemv.gemv_rows(x, w, dev, d.groups, **kw) for w in ws],
                                   cycles=c)
                per_graph = f", {len(ws)} x {c} calls per graph" if c else ""
                row(d.name, label, f"gemv_rows (diff {diff:.1e}){per_graph}", ms, ws[0].nbytes)


def q8_part(row, d, dev, device, cases, cycles=(None,)):
    """A probe part over gemv_rows cases of matrix d: its rotating weight copies made, time_q8_cases, freed."""
    ws, x = q8_problem(d, device)
    time_q8_cases(row, d, ws, x, dev, cases, cycles)
    del ws
    torch.cuda.empty_cache()


def tile_kw(bn: int, bk: int, warps: int, mp: int, **extra) -> dict:
    """gemv_rows keywords of a tile: rows, codes per step, warps, split K below mp programs per SM (0: never)."""
    return dict(dict(block_n=bn, block_k=bk, num_warps=warps, prefetch=True, allow_split=mp > 0,
                     min_programs_per_sm=max(mp, 1)), **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_decode.md")
    ap.add_argument("--parts", nargs="+", default=["moe", "q8"],
                    help="moe, moe_sweep, sv, unroll, q8, pdl, q8x, q8o, q8w, q8s, q8xs, q8r, q8i, q8seg, q8t, q8st, "
                         "q8l2, q8cyc, q8xm, q8wc, q8wcs, q8kf, q8pfe, ceil, qh (qh_tuned: without its tile sweep), qh_reg, dreg, "
                         "xv, xv_sweep, limb, reg, gq4, gq4l3, gq2, gq2g, launches, qwarps, gflat")
    ap.add_argument("--wcs-policy", type=int, default=int(q8_gemv.WeightCache.EVICT_FIRST),
                    help="q8wcs: the q8_gemv.WeightCache value the tiles are timed with")
    ap.add_argument("--graph-cycles", type=int, default=bench_kernels.GRAPH_CYCLES,
                    help="decode graphs hold the rotation of copies this many times over (bench_kernels)")
    args = ap.parse_args(argv)
    bench_kernels.GRAPH_CYCLES = max(1, args.graph_cycles)
    device = torch.device("cuda")
    dev = detect_device(device)
    bw, table = bandwidth_table(args.out, "Decode probes", ["case", "config", "stage", "µs", "MB", "GB/s", "% bw"])

    def row(case, cfg, stage, ms, nbytes):
        gbs = gb_s(nbytes, ms)
        table.add(case, cfg, stage, f"{ms * 1e3:.1f}", f"{nbytes / 1e6:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.1f}")

    def xv_rows(case, stage, tiles, make, base, xv_field, time_ms, nbytes, label=""):
        """A row per tile, without and with the 16-byte activation loads: make(base, tile, **{xv_field: xv})."""
        for tile in tiles:
            for xv in (False, True):
                name, cfg = make(base, tile, **{xv_field: xv})
                row(case, f"{label}{name}{' xv' if xv else ''}", stage, time_ms(cfg), nbytes)

    if "pdl" in args.parts:
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            nbytes = gu_bytes + dn_bytes
            for name, cfg in PDL_MOE.items():
                for pdl in (False, True):
                    c = replace(cfg, pdl=pdl)
                    row(f"moe_{recipe}", f"{name}{' pdl' if pdl else ''}", "whole",
                        whole_ms(u, gate, up, down, sels, wts, dev, c), nbytes)
            del gate, up, down
    if "moe" in args.parts or "moe_sweep" in args.parts:
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            configs = dict(MOE_CONFIGS) if "moe" in args.parts else {}
            if "moe_sweep" in args.parts:
                configs.update(gate_up_tile(C(), t) for t in GATE_UP_TILES)
                configs.update(down_tile(C(), t) for t in DOWN_TILES)
            for name, cfg in configs.items():
                uq = moe_int8.quant_q8_k(u, iq2_order=moe_int8.uses_iq2_order(gate))
                hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, cfg) for s in sels]
                hqs = [moe_int8.quant_q8_k(h) for h in hs]
                case = f"moe_{recipe}"
                if name == "int8_base":
                    row(case, name, "quant u", graph_time_ms([lambda: moe_int8.quant_q8_k(u)]), u.numel() * 4)
                    row(case, name, "quant h", graph_time_ms([lambda h=h: moe_int8.quant_q8_k(h) for h in hs]),
                        hs[0].numel() * 4)
                if not name.startswith(("dn_", "pf_dn_")):
                    row(case, name, "gate_up", graph_time_ms(
                        [lambda s=s: moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, cfg) for s in sels]),
                        gu_bytes)
                if not name.startswith(("gu_", "pf_gu_")):
                    row(case, name, "down", graph_time_ms(
                        [lambda s=s, hq=hq: moe_int8.down_int8(hq, down, s, True, cfg) for s, hq in zip(sels, hqs)]),
                        dn_bytes)
                if name.startswith(("gu_", "dn_", "pf_gu_", "pf_dn_")) and name not in MOE_CONFIGS:
                    continue
                row(case, name, "whole", whole_ms(u, gate, up, down, sels, wts, dev, cfg), gu_bytes + dn_bytes)
            del gate, up, down

    if "xv" in args.parts:
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            tuned = moe_int8.TUNED[gate.fmt]
            ref = moe_int8.fused_int8(u, gate, up, down, sels[0], wts, CLAMP, dev, tuned)
            xvs = {"": dict(x_vec_gate_up=False, x_vec_down=False),
                   " xv down": dict(x_vec_gate_up=False, x_vec_down=True),
                   " xv gate_up": dict(x_vec_gate_up=True, x_vec_down=False)}
            if gate.fmt == moe_int8.QuantFormat.IQ2_XXS:  # the best down tiles of xv_sweep (23), with xv
                xvs.update({f" xv dn_{bn}_{ks}_{w}": dict(x_vec_gate_up=False, x_vec_down=True, block_n_down=bn,
                                                         kstep_down=ks, warps_down=w)
                            for bn, ks, w in XV_DOWN_TILES})
            uq = moe_int8.quant_q8_k(u, iq2_order=moe_int8.uses_iq2_order(gate), pdl=True)
            for label, kw in list(xvs.items()) * 2:  # interleaved twice: drift shows as a difference between runs
                cfg = replace(tuned, **kw)
                if "block_n_down" in kw:  # another tile sums in another fp32 order: no bitwise check
                    note = ""
                else:
                    note = bitwise_note(ref, u, gate, up, down, sels[0], wts, dev, cfg)
                name = f"tuned{label}{note}"
                hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, cfg) for s in sels]
                hqs = [moe_int8.quant_q8_k(h) for h in hs]
                row(f"moe_{recipe}", name, "gate_up", graph_time_ms(
                    [lambda s=s: moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, cfg, True) for s in sels]),
                    gu_bytes)
                row(f"moe_{recipe}", name, "down", graph_time_ms(
                    [lambda s=s, hq=hq: moe_int8.down_int8(hq, down, s, True, cfg, True) for s, hq in zip(sels, hqs)]),
                    dn_bytes)
                row(f"moe_{recipe}", name, "quant u + gate_up", chain_gate_up_ms(u, gate, up, sels, wts, cfg), gu_bytes)
                row(f"moe_{recipe}", name, "quant h + down", chain_down_ms(hs, down, sels, cfg), dn_bytes)
                row(f"moe_{recipe}", name, "whole", whole_ms(u, gate, up, down, sels, wts, dev, cfg),
                    gu_bytes + dn_bytes)
                row(f"moe_{recipe}", name, "whole, no PDL",
                    whole_ms(u, gate, up, down, sels, wts, dev, replace(cfg, pdl=False)), gu_bytes + dn_bytes)
            del gate, up, down

    if "sv" in args.parts:  # Q4_K scale words by one 16-byte load (Int8MoeConfig.scale_vec_*), q4 recipe
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            if gate.fmt != moe_int8.QuantFormat.Q4_K:
                continue
            tuned = moe_int8.TUNED[gate.fmt]
            ref = moe_int8.fused_int8(u, gate, up, down, sels[0], wts, CLAMP, dev, tuned)
            uq = moe_int8.quant_q8_k(u, pdl=True)
            hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, tuned) for s in sels]
            svs = {"": dict(scale_vec_gate_up=False, scale_vec_down=False),
                   " sv": dict(scale_vec_gate_up=True, scale_vec_down=True),
                   " sv gate_up": dict(scale_vec_gate_up=True, scale_vec_down=False)}
            for label, kw in list(svs.items()) * 2:  # interleaved twice: drift shows as a difference between runs
                cfg = replace(tuned, **kw)
                name = f"tuned{label}{bitwise_note(ref, u, gate, up, down, sels[0], wts, dev, cfg)}"
                row(f"moe_{recipe}", name, "quant u + gate_up", chain_gate_up_ms(u, gate, up, sels, wts, cfg), gu_bytes)
                row(f"moe_{recipe}", name, "quant h + down", chain_down_ms(hs, down, sels, cfg), dn_bytes)
                row(f"moe_{recipe}", name, "whole", whole_ms(u, gate, up, down, sels, wts, dev, cfg),
                    gu_bytes + dn_bytes)
            for tile in GATE_UP_TILES:
                name, cfg = gate_up_tile(tuned, tile, scale_vec_gate_up=True)
                row(f"moe_{recipe}", f"{name} sv", "quant u + gate_up", chain_gate_up_ms(u, gate, up, sels, wts, cfg),
                    gu_bytes)
            for tile in DOWN_TILES:
                name, cfg = down_tile(tuned, tile, scale_vec_down=True)
                row(f"moe_{recipe}", f"{name} sv", "quant h + down", chain_down_ms(hs, down, sels, cfg), dn_bytes)
            del gate, up, down

    if "unroll" in args.parts:  # the down loop unrolled at compile time (Int8MoeConfig.unroll_down)
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            tuned = moe_int8.TUNED[gate.fmt]
            uq = moe_int8.quant_q8_k(u, iq2_order=moe_int8.uses_iq2_order(gate), pdl=True)
            hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, tuned) for s in sels]
            ref = moe_int8.fused_int8(u, gate, up, down, sels[0], wts, CLAMP, dev, tuned)
            for un in (False, True, False, True):  # interleaved twice: drift shows as a difference between runs
                cfg = replace(tuned, unroll_down=un)
                name = f"tuned{' unroll' if un else ''}{bitwise_note(ref, u, gate, up, down, sels[0], wts, dev, cfg)}"
                row(f"moe_{recipe}", name, "quant h + down", chain_down_ms(hs, down, sels, cfg), dn_bytes)
                row(f"moe_{recipe}", name, "whole", whole_ms(u, gate, up, down, sels, wts, dev, cfg),
                    gu_bytes + dn_bytes)
            xv_rows(f"moe_{recipe}", "quant h + down", UNROLL_DOWN_TILES, unroll_down_tile, tuned, "x_vec_down",
                    lambda cfg: chain_down_ms(hs, down, sels, cfg), dn_bytes)
            del gate, up, down

    if "limb" in args.parts:  # fp32-grade activations as three int8 planes (fused_int8(limbs=3), the auto decode)
        L = moe_int8.LIMBS_FP32
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            tuned = moe_int8.TUNED[gate.fmt]
            for limbs in (1, L, 1, L):  # interleaved twice
                row(f"moe_{recipe}", f"tuned limbs={limbs}", "whole",
                    whole_ms(u, gate, up, down, sels, wts, dev, tuned, limbs), gu_bytes + dn_bytes)
            uq = moe_int8.quant_q8_k(u, iq2_order=moe_int8.uses_iq2_order(gate), limbs=L)
            hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, tuned) for s in sels]
            xv_rows(f"moe_{recipe}", "quant u + gate_up", GATE_UP_TILES, gate_up_tile, tuned, "x_vec_gate_up",
                    lambda cfg: chain_gate_up_ms(u, gate, up, sels, wts, cfg, L), gu_bytes, "limb3 ")
            for make, tiles in ((down_tile, DOWN_TILES), (unroll_down_tile, UNROLL_DOWN_TILES)):
                xv_rows(f"moe_{recipe}", "quant h + down", tiles, make, tuned, "x_vec_down",
                        lambda cfg: chain_down_ms(hs, down, sels, cfg, L), dn_bytes, "limb3 ")
            del gate, up, down

    whole_parts = {"qh": qh_cases, "qh_tuned": lambda tuned: qh_cases(tuned, tiles=False), "qh_reg": qh_reg_cases,
                   "dreg": dreg_cases}
    if any(part in args.parts for part in whole_parts):  # whole moe_int8 calls per recipe and plane count
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            for limbs, tuned in ((1, moe_int8.TUNED[gate.fmt]), (moe_int8.LIMBS_FP32, moe_int8.TUNED_LIMB3[gate.fmt])):
                for part, make_cases in whole_parts.items():
                    if part in args.parts:
                        time_whole_cases(row, recipe, limbs, make_cases(tuned), (u, gate, up, down, sels, wts), dev,
                                         gu_bytes + dn_bytes)
            del gate, up, down

    if "gq4" in args.parts:  # q4 (one plane): the tuned config against moe_int8_gluon's tiles
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            if recipe != "q4":
                continue
            tuned = moe_int8.TUNED[gate.fmt]
            time_whole_cases(row, recipe, 1, gq4_cases(tuned, GQ4_GATE_UP, GQ4_DOWN, GQ4_CROSS),
                             (u, gate, up, down, sels, wts), dev, gu_bytes + dn_bytes)
            uq = moe_int8.quant_q8_k(u)
            hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, tuned) for s in sels]
            base = replace(tuned, fuse_quant_h=False)
            for _ in range(2):
                row(f"moe_{recipe}", "tuned", "quant u + gate_up", chain_gate_up_ms(u, gate, up, sels, wts, base),
                    gu_bytes)
                for t in GQ4_GATE_UP:
                    cfg = replace(base, gluon_gate_up=moe_int8.Int8GluonTile(*t))
                    row(f"moe_{recipe}", f"gluon {gq4_label(t)}", "quant u + gate_up",
                        chain_gate_up_ms(u, gate, up, sels, wts, cfg), gu_bytes)
                row(f"moe_{recipe}", "tuned", "quant h + down", chain_down_ms(hs, down, sels, base), dn_bytes)
                for t in GQ4_DOWN:
                    cfg = replace(base, gluon_down=moe_int8.Int8GluonTile(*t))
                    row(f"moe_{recipe}", f"gluon {gq4_label(t)}", "quant h + down", chain_down_ms(hs, down, sels, cfg),
                        dn_bytes)
            del gate, up, down

    if "gq4l3" in args.parts:  # q4 on three planes: TUNED_LIMB3 (Triton) against moe_int8_gluon's tiles
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            if recipe != "q4":
                continue
            L = moe_int8.LIMBS_FP32
            tuned = moe_int8.TUNED_LIMB3[gate.fmt]
            time_whole_cases(row, recipe, L, gq4l3_cases(tuned), (u, gate, up, down, sels, wts), dev,
                             gu_bytes + dn_bytes)
            base = replace(tuned, fuse_quant_h=False, gluon_gate_up=None, gluon_down=None)
            uq = moe_int8.quant_q8_k(u, limbs=L)
            hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, base) for s in sels]
            for _ in range(2):
                row(f"moe_{recipe}", "limb3 triton", "quant u + gate_up",
                    chain_gate_up_ms(u, gate, up, sels, wts, base, L), gu_bytes)
                for t in GQ4L3_GATE_UP:
                    row(f"moe_{recipe}", f"limb3 gluon {gq4_label(t)}", "quant u + gate_up", chain_gate_up_ms(
                        u, gate, up, sels, wts, replace(base, gluon_gate_up=moe_int8.Int8GluonTile(*t)), L), gu_bytes)
                row(f"moe_{recipe}", "limb3 triton", "quant h + down", chain_down_ms(hs, down, sels, base, L), dn_bytes)
                for t in GQ4L3_DOWN:
                    row(f"moe_{recipe}", f"limb3 gluon {gq4_label(t)}", "quant h + down", chain_down_ms(
                        hs, down, sels, replace(base, gluon_down=moe_int8.Int8GluonTile(*t)), L), dn_bytes)
            del gate, up, down

    if "gq2" in args.parts:  # q2: the tuned Q2_K down stage against moe_int8_gluon's tiles, one plane and three
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            if recipe != "q2":
                continue
            for limbs, tuned in ((1, moe_int8.TUNED[gate.fmt]), (moe_int8.LIMBS_FP32, moe_int8.TUNED_LIMB3[gate.fmt])):
                time_whole_and_down(row, recipe, limbs, gq2_cases(tuned), (u, gate, up, down, sels, wts), dev,
                                    gu_bytes, dn_bytes)
            del gate, up, down

    if "gq2g" in args.parts:  # q2: the tuned (Triton) IQ2_XXS gate/up against moe_int8_gluon's tiles
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            if recipe != "q2":
                continue
            for limbs, tuned, tiles in ((1, moe_int8.TUNED[gate.fmt], GQ2G_GATE_UP),
                                        (moe_int8.LIMBS_FP32, moe_int8.TUNED_LIMB3[gate.fmt], GQ2G_L3)):
                base = replace(tuned, gluon_gate_up=None)
                cases = [("triton gate/up", base)] + [
                    (f"gluon gate/up {gq4_label(t)}", replace(base, gluon_gate_up=moe_int8.Int8GluonTile(*t)))
                    for t in tiles]
                time_whole_cases(row, recipe, limbs, cases, (u, gate, up, down, sels, wts), dev, gu_bytes + dn_bytes)
                for _ in range(2):
                    for label, cfg in cases:
                        row(f"moe_{recipe}", f"limbs={limbs} {label}", "quant u + gate_up",
                            chain_gate_up_ms(u, gate, up, sels, wts, cfg, limbs), gu_bytes)
            del gate, up, down

    if "launches" in args.parts:  # the tuned calls with the Q8_K launches of u and/or h left out (given): what
        # the launch boundaries cost (the floor of a call that quantizes u and h inside the GEMV kernels)
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            for limbs, cfg in ((1, moe_int8.TUNED[gate.fmt]), (moe_int8.LIMBS_FP32, moe_int8.TUNED_LIMB3[gate.fmt])):
                iq2 = moe_int8.uses_iq2_order(gate)
                uq = moe_int8.quant_q8_k(u, iq2, limbs=limbs)
                hqs = [moe_int8.quant_q8_k(moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, cfg), limbs=limbs)
                       for s in sels]

                def gu(s, q=None):
                    return moe_int8.gate_up_int8(q or moe_int8.quant_q8_k(u, iq2, True, limbs), gate, up, s, wts,
                                                 CLAMP, True, cfg, True)

                def dn(s, h=None, hq=None):
                    return moe_int8.down_int8(hq or moe_int8.quant_q8_k(h, pdl=True, limbs=limbs), down, s, True, cfg,
                                              True)
                chains = {
                    "4 launches (whole call)": [lambda s=s: dn(s, gu(s)) for s in sels],
                    "3 launches (h given)": [lambda s=s, hq=hq: (gu(s), dn(s, hq=hq)) for s, hq in zip(sels, hqs)],
                    "3 launches (u given)": [lambda s=s: dn(s, gu(s, uq)) for s in sels],
                    "2 launches (u, h given)": [lambda s=s, hq=hq: (gu(s, uq), dn(s, hq=hq)) for s, hq in zip(sels, hqs)],
                    "gate/up alone (u given)": [lambda s=s: gu(s, uq) for s in sels],
                    "down alone (h given)": [lambda s=s, hq=hq: dn(s, hq=hq) for s, hq in zip(sels, hqs)],
                }
                for _ in range(2):
                    for label, calls in chains.items():
                        nb = gu_bytes if label.startswith("gate") else dn_bytes if label.startswith("down") else \
                            gu_bytes + dn_bytes
                        row(f"moe_{recipe}", f"limbs={limbs} tuned", label, graph_time_ms(calls), nb)
            del gate, up, down

    if "qwarps" in args.parts:  # warps of the Q8_K quantizer launches (moe_int8.QUANT_LAUNCH), whole tuned calls
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            for limbs, cfg in ((1, moe_int8.TUNED[gate.fmt]), (moe_int8.LIMBS_FP32, moe_int8.TUNED_LIMB3[gate.fmt])):
                base = dict(moe_int8.QUANT_LAUNCH)
                for _ in range(2):
                    for w in (2, 1, 4, 8):
                        moe_int8.QUANT_LAUNCH.update(num_warps=w)
                        row(f"moe_{recipe}", f"limbs={limbs} tuned, quantizer {w} warps", "whole",
                            whole_ms(u, gate, up, down, sels, wts, dev, cfg, limbs), gu_bytes + dn_bytes)
                moe_int8.QUANT_LAUNCH.update(base)
            del gate, up, down

    if "gflat" in args.parts:  # moe_int8_gluon's down kernel in FLAT mode (warps along the token's slots)
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            for limbs, tuned in ((1, moe_int8.TUNED[gate.fmt]), (moe_int8.LIMBS_FP32, moe_int8.TUNED_LIMB3[gate.fmt])):
                cases = [("tuned", tuned)] + [(f"flat down {gq4_label(t)}",
                                               replace(tuned, gluon_down=moe_int8.Int8GluonTile(*t))) for t in GFLAT_DOWN]
                time_whole_and_down(row, recipe, limbs, cases, (u, gate, up, down, sels, wts), dev, gu_bytes, dn_bytes)
            del gate, up, down

    if "reg" in args.parts:  # register caps on the tuned stages (one and three planes), interleaved twice
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            for limbs, base in ((1, moe_int8.TUNED[gate.fmt]), (moe_int8.LIMBS_FP32, moe_int8.TUNED_LIMB3[gate.fmt])):
                uq = moe_int8.quant_q8_k(u, iq2_order=moe_int8.uses_iq2_order(gate), limbs=limbs)
                hs = [moe_int8.gate_up_int8(uq, gate, up, s, wts, CLAMP, True, base) for s in sels]
                for rep in range(2):
                    for cap in REG_CAPS:
                        cfg = replace(base, maxnreg_gate_up=cap)
                        row(f"moe_{recipe}", f"limbs={limbs} gate_up maxnreg {cap}", "quant u + gate_up",
                            chain_gate_up_ms(u, gate, up, sels, wts, cfg, limbs), gu_bytes)
                        cfg = replace(base, maxnreg_down=cap)
                        row(f"moe_{recipe}", f"limbs={limbs} down maxnreg {cap}", "quant h + down",
                            chain_down_ms(hs, down, sels, cfg, limbs), dn_bytes)
            del gate, up, down

    if "xv_sweep" in args.parts:
        for recipe, gate, up, down, sels, wts, u, gu_bytes, dn_bytes in moe_cases(device):
            base = moe_int8.TUNED[gate.fmt]
            hs = [moe_int8.gate_up_int8(moe_int8.quant_q8_k(u, moe_int8.uses_iq2_order(gate)), gate, up, s, wts, CLAMP,
                                        True, base) for s in sels]
            xv_rows(f"moe_{recipe}", "quant u + gate_up", GATE_UP_TILES + XV_SWEEP_GATE_UP_EXTRA, gate_up_tile, base,
                    "x_vec_gate_up", lambda cfg: chain_gate_up_ms(u, gate, up, sels, wts, cfg), gu_bytes)
            xv_rows(f"moe_{recipe}", "quant h + down", DOWN_TILES, down_tile, base, "x_vec_down",
                    lambda cfg: chain_down_ms(hs, down, sels, cfg), dn_bytes)
            del gate, up, down

    if "ceil" in args.parts:
        out = torch.empty(1 << 20, device=device, dtype=torch.int32)
        for recipe, (fgu, fdn) in MOE.items():
            gu_bytes, dn_bytes = stage_bytes(fgu, fdn)
            n = n_copies(gu_bytes + dn_bytes, 1)
            gus = [torch.empty(gu_bytes // 4, device=device, dtype=torch.int32) for _ in range(n)]
            dns = [torch.empty(dn_bytes // 4, device=device, dtype=torch.int32) for _ in range(n)]
            u = torch.randn((1, D), device=device)
            h = torch.randn((K_USED, F_EXP), device=device)
            case = f"moe_{recipe}"
            row(case, "plain read", "gate+up bytes", graph_time_ms([lambda b=b: plain_read(b, out) for b in gus]),
                gu_bytes)
            row(case, "plain read", "down bytes", graph_time_ms([lambda b=b: plain_read(b, out) for b in dns]), dn_bytes)
            row(case, "plain reads", "both, 2 launches", graph_time_ms(
                [lambda a=a, b=b: (plain_read(a, out), plain_read(b, out)) for a, b in zip(gus, dns)]),
                gu_bytes + dn_bytes)
            row(case, "plain reads + 2 Q8_K", "both, 4 launches", graph_time_ms(
                [lambda a=a, b=b: (moe_int8.quant_q8_k(u, pdl=True), plain_read(a, out), moe_int8.quant_q8_k(h, pdl=True),
                                   plain_read(b, out)) for a, b in zip(gus, dns)]), gu_bytes + dn_bytes)
            row(case, "plain reads + Q8_K of u", "both, 3 launches", graph_time_ms(
                [lambda a=a, b=b: (moe_int8.quant_q8_k(u, pdl=True), plain_read(a, out), plain_read(b, out))
                 for a, b in zip(gus, dns)]), gu_bytes + dn_bytes)
            del gus, dns
            torch.cuda.empty_cache()

    for d in DENSE:  # the Q8_0 parts: (label, gemv_rows keywords) per shape
        cases = []
        if "q8" in args.parts and d.name in Q8_SHAPES:
            cases += [(f"{bn}x{bk} w{w} mp{mp}", tile_kw(bn, bk, w, mp, max_split=64)) for bn, bk, w, mp in Q8_TILES]
        if "pdl" in args.parts and d.name in Q8_SHAPES:
            cases += [(f"{bn}x{bk} w{w} mp{mp}{' pdl' if pdl else ''}", tile_kw(bn, bk, w, mp, pdl=pdl))
                      for bn, bk, w, mp in PDL_Q8_TILES for pdl in (False, True)]
        if "q8x" in args.parts and d.name in Q8X_TILES:
            cases += [(f"{bn}x{bk} w{w} mp{mp} pf{pf}{' xpf' if xpf else ''}",
                       tile_kw(bn, bk, w, mp, prefetch=pf, x_prefetch=xpf))
                      for bn, bk, w, mp in Q8X_TILES[d.name] for pf in (1, 2) for xpf in (False, True)]
        if "q8o" in args.parts and d.name in ("attn_output_a", "attn_output_b"):
            cases += [(f"{bn}x{bk} w{w} mp{mp}", tile_kw(bn, bk, w, mp)) for bn, bk, w, mp in Q8O_TILES]
        if "q8w" in args.parts and d.name in ("attn_output_a", "attn_output_b", "attn_q_b"):
            cases += [(f"{bn}x{bk} w{w} mp{mp}", tile_kw(bn, bk, w, mp)) for bn, bk, w, mp in Q8W_TILES]
        if "q8r" in args.parts and d.name in ("attn_output_a", "attn_output_b", "attn_q_b"):
            cases += [(f"{bn}x{bk} w{w} mp{mp} pf{pf}", tile_kw(bn, bk, w, mp, prefetch=pf, max_split=64))
                      for bn, bk, w, mp, pf in Q8R_TILES]
        if "q8s" in args.parts and d.name in Q8S_TILES:
            cases += [(f"{bn}x{bk} w{w} mp{mp} sum{ss}", tile_kw(bn, bk, w, mp, split_sum=ss))
                      for bn, bk, w, mp in Q8S_TILES[d.name] for ss in (0, 1, 2)]
        if "q8st" in args.parts and d.name in Q8ST_SHAPES:
            cases += [("auto", q8_gemv.rows_config(1, d.n, d.k, d.groups))]
            cases += [(f"{bn}x{bk} w{w} mp{mp} st{st}", tile_kw(bn, bk, w, mp, prefetch=False, stages=st))
                      for bn, bk, w in Q8ST_TILES for st in Q8ST_STAGES for mp in Q8ST_SHAPES[d.name]]
        if "q8i" in args.parts and d.name in Q8_SHAPES:
            ws, x = q8_problem(d, device)
            out = torch.empty(triton.cdiv(ws[0].nbytes // 4, READ_BLOCK) + 1, device=device, dtype=torch.int32)
            row(d.name, "plain read", "read", graph_time_ms([lambda w=w: plain_read(w.buf, out) for w in ws]),
                ws[0].nbytes)
            row(d.name, "auto", "gemv_rows", graph_time_ms(
                [lambda w=w: q8_gemv.gemv_rows_default(x, w, dev, d.groups) for w in ws]), ws[0].nbytes)
            xs = x.reshape(1, -1)
            row(d.name, "quant x", "quant", graph_time_ms([lambda: q8_int8.quant_q8_0(xs, pdl=True)] * 8), x.numel() * 4)
            tiles = [c + (True,) for c in Q8I_TILES if c[3] or d.name not in Q8I_SMALL]
            tiles += [(16, 256, 1, 8, False), (16, 256, 1, 0, False)]  # x broadcast through a layout conversion
            for bn, bk, nw, mp, xf in tiles:
                kw = dict(block_n=bn, block_k=bk, num_warps=nw, allow_split=mp > 0, min_programs_per_sm=max(mp, 1),
                          x_full=xf)
                row(d.name, f"{bn}x{bk} w{nw} mp{mp}{'' if xf else ' xb'}", "gemv_int8", graph_time_ms(
                    [lambda w=w, kw=kw: q8_int8.gemv_int8(x, w, dev, d.groups, **kw) for w in ws]), ws[0].nbytes)
            del ws
            torch.cuda.empty_cache()
        if "q8t" in args.parts and d.name in Q8_SHAPES:
            ws, x1 = q8_problem(d, device)
            for t in Q8T_TOKENS:
                x = x1.expand(t, *x1.shape[1:]).contiguous() + torch.arange(t, device=device).view(
                    t, *([1] * (x1.dim() - 1)))  # distinct tokens
                case = f"{d.name} T={t}"
                row(case, "auto", "gemv_rows", graph_time_ms(
                    [lambda w=w: q8_gemv.gemv_rows_default(x, w, dev, d.groups) for w in ws]), ws[0].nbytes)
                row(case, "q8_int8 auto", "gemv_int8", graph_time_ms(
                    [lambda w=w: q8_int8.gemv_int8_default(x, w, dev, d.groups) for w in ws]), ws[0].nbytes)
                for bn, bk, nw, mp in Q8T_TILES:
                    if d.k % bk:
                        continue
                    kw = tile_kw(bn, bk, nw, mp)
                    row(case, f"{bn}x{bk} w{nw} mp{mp}", "gemv_rows", graph_time_ms(
                        [lambda w=w, kw=kw: q8_gemv.gemv_rows(x, w, dev, d.groups, **kw) for w in ws]), ws[0].nbytes)
            del ws
            torch.cuda.empty_cache()
        if "q8seg" in args.parts and d.name in ("attn_q_b", "attn_output_a", "attn_output_b"):
            ws, x = q8_problem(d, device)
            nbytes = ws[0].nbytes
            row_b = d.fmt.row_bytes(d.k)
            out = torch.empty(1 << 20, device=device, dtype=torch.int32)
            row(d.name, "auto", "gemv_rows", graph_time_ms(
                [lambda w=w: q8_gemv.gemv_rows_default(x, w, dev, d.groups) for w in ws]), nbytes)
            for bb in (4096, 16384):
                row(d.name, f"plain read {bb * 4 // 1024} KiB/program", "read", graph_time_ms(
                    [lambda w=w, bb=bb: plain_read(w.buf, out, bb) for w in ws]), nbytes)
            for seg in (1, 2, 4, 8):
                if row_b % (seg * 64):
                    continue
                bb = 128 if (row_b // seg) % 128 == 0 else 64
                for bn in (16, 32):  # 16/32 rows x 128-byte steps, one warp: contiguous rows (GGUF) of row_b bytes
                    row(d.name, f"tiles {bn} rows x {row_b // seg} B, row stride {row_b}", "read", graph_time_ms(
                        [lambda w=w, seg=seg, bn=bn, bb=bb: read_tiles(w.buf, out, d.n, row_b, row_b // seg, seg, bn,
                                                                        bb) for w in ws]), nbytes)
            del ws
            torch.cuda.empty_cache()
            for seg in (2, 4, 8):
                if d.k // seg < 1024 or (d.k // seg) % 128:
                    continue
                pairs = [segment_major(d, seg, device, 1 + i) for i in range(n_copies(nbytes, 1))]
                g = pairs[0][1]
                xs = x.reshape(1, d.groups, seg, d.k // seg).transpose(1, 2).reshape(1, g, d.k // seg).contiguous()
                sb = pairs[0][0].buf.shape[-1]
                bb = 128 if sb % 128 == 0 else 64
                row(d.name, f"seg{seg}: plain tiles 16 rows contiguous", "read", graph_time_ms(
                    [lambda w=w, bb=bb: read_tiles(w.buf, out, seg * d.n, sb, sb, 1, 16, bb) for w, _ in pairs]), nbytes)
                for tile in ((16, 128, 1, 0), (32, 128, 1, 0), (16, 256, 2, 0), (8, 128, 1, 0)):
                    kw = tile_kw(*tile)
                    lbl = f"seg{seg} {tile[0]}x{tile[1]} w{tile[2]}"
                    row(d.name, lbl, "gemv only", graph_time_ms(
                        [lambda w=w, kw=kw: q8_gemv.gemv_rows(xs, w, dev, g, **kw) for w, _ in pairs]), nbytes)
                    row(d.name, lbl, "gemv + sum", graph_time_ms(
                        [lambda w=w, kw=kw: q8_gemv.gemv_rows(xs, w, dev, g, **kw).view(seg, -1).sum(0)
                         for w, _ in pairs]), nbytes)
                del pairs
                torch.cuda.empty_cache()
        if "q8xs" in args.parts and d.name in Q8XS_TILES:
            ws, x = q8_problem(d, device)
            auto = q8_gemv.rows_config(1, d.n, d.k, d.groups)
            xs_cases = [(f"auto sum{ss}", dict(auto, split_sum=ss)) for ss in (1, 4)]
            for tile in Q8XS_TILES[d.name]:  # every tile here splits (mp > 0)
                xs_cases += [(f"{split_label(d, dev, *tile)} sum{ss}", tile_kw(*tile, split_sum=ss)) for ss in (1, 4)]
            ref = q8_gemv.gemv_rows(x, ws[0], dev, d.groups, **auto).clone()
            for rep in range(2):
                for label, kw in xs_cases:
                    y = q8_gemv.gemv_rows(x, ws[0], dev, d.groups, **kw).clone()
                    diff = (y - ref).abs().max().item()
                    again = torch.equal(y, q8_gemv.gemv_rows(x, ws[0], dev, d.groups, **kw))
                    ms = graph_time_ms([lambda w=w, kw=kw: q8_gemv.gemv_rows(x, w, dev, d.groups, **kw) for w in ws])
                    row(d.name, label, f"gemv_rows (diff {diff:.1e}, {'repeats' if again else 'DIFFERS on repeat'})",
                        ms, ws[0].nbytes)
            del ws
            torch.cuda.empty_cache()
        auto = q8_gemv.rows_config(1, d.n, d.k, d.groups)
        if "q8cyc" in args.parts and d.name in Q8CYC_TILES:
            q8_part(row, d, dev, device, [("auto", auto)] + [(split_label(d, dev, *tile), tile_kw(*tile))
                                                            for tile in Q8CYC_TILES[d.name]], Q8CYC_CYCLES)
        if "q8xm" in args.parts and d.name in Q8XM_TILES:
            q8_part(row, d, dev, device, [("auto", auto)] + [
                (f"{split_label(d, dev, *tile)} x_mode{xm}", tile_kw(*tile, x_mode=xm))
                for tile in Q8XM_TILES[d.name] for xm in (0, 2)])
        if "q8wc" in args.parts and d.fmt == moe_int8.QuantFormat.Q8_0:
            q8_part(row, d, dev, device, [(f"auto {wc.name}", dict(auto, w_cache=wc)) for wc in q8_gemv.WeightCache] + [
                (f"{split_label(d, dev, *tile)} {wc.name}", tile_kw(*tile, w_cache=wc))
                for tile in Q8WC_TILES.get(d.name, []) for wc in q8_gemv.WeightCache])
        if "q8wcs" in args.parts and d.name in Q8CYC_TILES:  # q8wc over q8cyc's tiles: default and --wcs-policy
            wc, default = q8_gemv.WeightCache(args.wcs_policy), q8_gemv.WeightCache.DEFAULT
            q8_part(row, d, dev, device, [(f"auto {default.name}", dict(auto, w_cache=default)),
                                          (f"auto {wc.name}", dict(auto, w_cache=wc))] + [
                (f"{split_label(d, dev, *tile)} {wc.name}", tile_kw(*tile, w_cache=wc)) for tile in Q8CYC_TILES[d.name]])
        if "q8kf" in args.parts and d.fmt == moe_int8.QuantFormat.Q8_0:
            ef = q8_gemv.WeightCache.EVICT_FIRST_CODES
            tables = (("ROWS_T1", q8_gemv.ROWS_T1), ("ROWS_T1_TRITON37", q8_gemv.ROWS_T1_TRITON37))
            if d.name in Q8CYC_TILES:
                kf_cases = [(f"{name} {flat}", dict(table[(d.n, d.k, d.groups)], k_flat=flat))
                            for name, table in tables for flat in (False, True)]
                kf_cases += [(f"{split_label(d, dev, *tile)} {ef.name} k_flat", tile_kw(*tile, w_cache=ef, k_flat=True))
                             for tile in Q8CYC_TILES[d.name]]
            else:  # the smaller matrices: their one-token auto tile without and with
                kf_cases = [(f"auto k_flat {flat}", dict(auto, k_flat=flat)) for flat in (False, True)]
            ws, x = q8_problem(d, device)  # one set of weight copies for both token counts
            time_q8_cases(row, d, ws, x, dev, kf_cases)
            tn = q8_gemv.rows_config(Q8KF_T, d.n, d.k, d.groups)
            time_q8_cases(row, d, ws, torch.randn((Q8KF_T, *x.shape[1:]), device=device), dev,
                          [(f"T={Q8KF_T} auto k_flat {flat}", dict(tn, k_flat=flat)) for flat in (False, True)])
            del ws
            torch.cuda.empty_cache()
        if "q8pfe" in args.parts and d.name in Q8PFE_TILES:
            ef = q8_gemv.WeightCache.EVICT_FIRST_CODES
            q8_part(row, d, dev, device, [("auto", auto)] + [
                (f"{split_label(d, dev, *tile)} pf{pf} {ef.name}", tile_kw(*tile, prefetch=pf, w_cache=ef))
                for tile in Q8PFE_TILES[d.name] for pf in (1, 2)])
        if "q8l2" in args.parts and d.name in Q8ST_SHAPES:  # the four large matrices
            ws, x = q8_problem(d, device)
            l2_cases = [(f"auto l2pf{dist}", dict(auto, l2_prefetch=dist)) for dist in Q8L2_AUTO_DIST]
            l2_cases += [(f"{bn}x{bk} w{w} mp{mp} l2pf{dist}", tile_kw(bn, bk, w, mp, l2_prefetch=dist))
                         for bn, bk, w, mp in q8l2_tiles(d) for dist in Q8L2_DIST]
            ref = q8_gemv.gemv_rows(x, ws[0], dev, d.groups, **dict(auto, l2_prefetch=0)).clone()
            for rep in range(2):
                for label, kw in l2_cases:
                    diff = (q8_gemv.gemv_rows(x, ws[0], dev, d.groups, **kw) - ref).abs().max().item()
                    ms = graph_time_ms([lambda w=w, kw=kw: q8_gemv.gemv_rows(x, w, dev, d.groups, **kw) for w in ws])
                    row(d.name, label, f"gemv_rows (diff {diff:.1e})", ms, ws[0].nbytes)
            del ws
            torch.cuda.empty_cache()
        if not cases:
            continue
        ws, x = q8_problem(d, device)
        for label, kw in cases:
            ms = graph_time_ms([lambda w=w, kw=kw: q8_gemv.gemv_rows(x, w, dev, d.groups, **kw) for w in ws])
            row(d.name, label, "gemv_rows", ms, ws[0].nbytes)
        del ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
