"""Experiment: the Q8_0 decode GEMV (T=1) written in Gluon, with the register layouts chosen by hand.

Why: in the Triton kernel (q8_gemv.gemv_rows) the x lanes go through shared memory every K step, and every
attempt to avoid that in plain Triton cost more than it saved (tools/results/h200_decode/13). Here one layout
covers the code words [rows, blocks, words] and x [blocks, words, bytes]: each lane owns 4 consecutive code
words of every row of its tile and the 16 floats of x they multiply, so x is read once per lane (no copies
per row) and the byte lanes never leave the thread. Rows of a tile are all in one thread's registers.
GPU only (Gluon does not run under TRITON_INTERPRET); the output is compared with gemv_rows on the same call.
Times as tools/bench_kernels.py (CUDA-graph replay over rotating weight copies, % of the same-run streaming
read). Usage: python tools/probe_gluon_q8.py [--out probe_gluon_q8.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import DENSE, graph_time_ms  # noqa: E402
from probe_decode import q8_problem  # noqa: E402
from probe_table import bandwidth_table, gb_s  # noqa: E402
from dsv4.kernels_triton import q8_gemv  # noqa: E402
from dsv4.kernels_triton.configs import detect_device  # noqa: E402

MAGIC_OFFSET = gl.constexpr(8388736.0)  # 2^23 + 128: (0x4B0000 | (code + 128)) as fp32, minus this, is the signed code


@gluon.jit
def _q8_gemv_gluon(x_ptr, w_ptr, s_ptr, out_ptr, y_ptr, cnt_ptr, N, K, R, stride_xg, stride_w_words, stride_s,
                   off_s, k_split, BN: gl.constexpr, NBT: gl.constexpr, WARPS: gl.constexpr, PF: gl.constexpr,
                   SPLIT: gl.constexpr):
    """out[n] = sum_k x[g(n), k] * d[n, k // 32] * q[n, k] for rows pid*BN .. +BN (g(n) = n // R).
    Tile per step: [BN rows, NB = NBT*WARPS blocks, 8 words] of codes; lane (block, word group) holds 4 words
    of all BN rows and x[32 b + 16 h .. +16] as [4 words, 4 bytes]. SPLIT > 1: program axis 1 takes k_split
    inputs each, partials go to out[split, n] and the last program of a row tile (counter, as gemv_rows) sums
    them in order into y."""
    L4: gl.constexpr = gl.BlockedLayout([BN, 1, 4, 4], [1, NBT, 2, 1], [1, WARPS, 1, 1], [3, 2, 1, 0])
    L3: gl.constexpr = gl.SliceLayout(3, L4)  # [BN, NB, 8] code words
    LX: gl.constexpr = gl.SliceLayout(0, L4)  # [NB, 8, 4] x
    LS: gl.constexpr = gl.SliceLayout(2, L3)  # [BN, NB] scales
    NB: gl.constexpr = NBT * WARPS
    BK: gl.constexpr = NB * 32
    pid = gl.program_id(0)
    pid_k = gl.program_id(1)
    k_lo = pid_k * k_split
    w32 = w_ptr.to(gl.pointer_type(gl.int32))  # the codes are int8 bytes: read them 4 to a word
    r3 = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    b3 = gl.arange(0, NB, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    i3 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    rows = gl.minimum(pid * BN + r3, N - 1).to(gl.int64)
    wp = (w32 + gl.expand_dims(gl.expand_dims(rows * stride_w_words + k_lo // 4, 1), 2)
          + gl.expand_dims(gl.expand_dims(b3 * 8, 0), 2) + gl.expand_dims(gl.expand_dims(i3, 0), 1))
    rs = gl.arange(0, BN, layout=gl.SliceLayout(1, LS))
    bs = gl.arange(0, NB, layout=gl.SliceLayout(0, LS))
    rows_s = gl.minimum(pid * BN + rs, N - 1).to(gl.int64)
    sp = s_ptr + gl.expand_dims(rows_s * stride_s + off_s + k_lo // 32, 1) + gl.expand_dims(bs, 0)
    bx = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
    ix = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX)))
    jx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
    g = (pid * BN) // R
    xp = (x_ptr + g * stride_xg + k_lo + gl.expand_dims(gl.expand_dims(bx * 32, 1), 2)
          + gl.expand_dims(gl.expand_dims(ix * 4, 0), 2) + gl.expand_dims(gl.expand_dims(jx, 0), 1))
    # byte j of a biased word into the mantissa of 2^23: prmt selector j | 0x7540 (bytes 0, 0, 0x4B above it)
    jj = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    sel = gl.expand_dims(gl.expand_dims(gl.expand_dims(jj | 0x7540, 0), 1), 2)
    acc = gl.zeros([BN, NB, 8], gl.float32, layout=L3)
    if PF:
        u_next = gl.load(wp)
        d_next = gl.load(sp)
    for k0 in range(0, k_split, BK):
        if PF:
            u = u_next
            d = d_next
            u_next = gl.load(wp + (BK // 4), mask=(gl.zeros([BN, NB, 8], gl.int32, layout=L3) + k0 + BK) < k_split)
            d_next = gl.load(sp + (BK // 32), mask=(gl.zeros([BN, NB], gl.int32, layout=LS) + k0 + BK) < k_split)
        else:
            u = gl.load(wp)
            d = gl.load(sp)
        wp += BK // 4
        sp += BK // 32
        x = gl.load(xp + k0)
        u4 = gl.expand_dims(u ^ -2139062144, 3) + gl.zeros([BN, NB, 8, 4], gl.int32, layout=L4)  # ^ 0x80808080
        bits = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                         [u4, gl.full([BN, NB, 8, 4], 0x4B000000, gl.int32, layout=L4),
                                          sel + gl.zeros([BN, NB, 8, 4], gl.int32, layout=L4)],
                                         dtype=gl.int32, is_pure=True, pack=1)
        q = bits.to(gl.float32, bitcast=True) - MAGIC_OFFSET
        p = gl.sum(q * gl.expand_dims(x.to(gl.float32), 0), axis=3)
        acc += p * gl.expand_dims(d.to(gl.float32), 2)
    tot = gl.sum(gl.sum(acc, axis=2), axis=1)
    rn = pid * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    gl.store(out_ptr + pid_k * N + rn, tot, mask=rn < N)
    if SPLIT > 1:
        gl.thread_barrier()
        arrived = gl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
            for sk in gl.static_range(SPLIT):
                total += gl.load(out_ptr + sk * N + rn, mask=rn < N, other=0.0, cache_modifier=".cg")
            gl.store(y_ptr + rn, total, mask=rn < N)
            gl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")


_COUNTERS: dict = {}


def gemv_gluon(x, dw, groups: int, bn: int, nbt: int, warps: int, pf: bool, split: int = 1):
    N, K = dw.n_rows, dw.k
    R = N // groups
    tiles = triton.cdiv(N, bn)
    out = torch.empty((split, N), device=x.device, dtype=torch.float32)
    y = torch.empty((1, N), device=x.device, dtype=torch.float32) if split > 1 else out
    key = (x.device, tiles)
    if key not in _COUNTERS:  # zero between calls: the last program of a tile resets its counter
        _COUNTERS[key] = torch.zeros(tiles, device=x.device, dtype=torch.int32)
    stride_xg = K if groups > 1 else 0
    _q8_gemv_gluon[(tiles, split)](x, dw.w, dw.s, out, y, _COUNTERS[key], N, K, R, stride_xg, dw.stride_w // 4,
                                   dw.stride_s, dw.off_s, K // split, BN=bn, NBT=nbt, WARPS=warps, PF=pf,
                                   SPLIT=split, num_warps=warps)
    return y[:1] if split > 1 else out


# rows, lanes over blocks (16: a warp's 32 lanes are 16 blocks x 2 word groups), warps, prefetch
TILES = [(4, 16, 1, False, 1), (4, 16, 2, False, 1), (8, 16, 1, False, 1),
         (4, 16, 1, False, 2), (4, 16, 1, False, 4), (8, 16, 1, False, 2), (8, 16, 1, False, 4),
         (2, 16, 1, False, 2), (4, 16, 2, False, 2), (8, 16, 2, False, 2), (16, 16, 1, False, 4),
         (4, 16, 1, True, 2), (8, 16, 1, True, 4)]  # rows, lanes over blocks, warps, prefetch, K split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_gluon_q8.md")
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
        if d.name not in ("attn_q_b", "attn_output_a", "attn_output_b", "output"):
            continue
        ws, x = q8_problem(d, device)
        ref = q8_gemv.gemv_rows_default(x, ws[0], dev, d.groups)
        ms = graph_time_ms([lambda w=w: q8_gemv.gemv_rows_default(x, w, dev, d.groups) for w in ws])
        row(d.name, "gemv_rows (auto)", ms, ws[0].nbytes, 0)
        for bn, nbt, w, pf, sp in TILES:
            if d.k % (nbt * w * 32 * sp):
                continue
            try:
                y = gemv_gluon(x, ws[0], d.groups, bn, nbt, w, pf, sp)
                y2 = gemv_gluon(x, ws[0], d.groups, bn, nbt, w, pf, sp)  # the counters were reset
                diff = f"{float((y - ref).abs().max()):.3g}{'' if torch.equal(y, y2) else ' (not repeatable)'}"
                ms = graph_time_ms([lambda w_=w_: gemv_gluon(x, w_, d.groups, bn, nbt, w, pf, sp) for w_ in ws])
                row(d.name, f"gluon {bn} rows x {nbt * w * 32} codes, {w} warp{'s' if w > 1 else ''}"
                            f"{', prefetch' if pf else ''}{f', split-K {sp}' if sp > 1 else ''}", ms, ws[0].nbytes, diff)
            except Exception as e:  # noqa: BLE001 - a probe: record and go on
                table.add(d.name, f"gluon {bn}/{nbt}/{w}/{pf}/{sp}",
                          f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}", "", "", "")
        del ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
