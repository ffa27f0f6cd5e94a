"""Q8_0 decode GEMV for one token, written in Gluon (Triton's layout-explicit dialect): NVIDIA sm_90+ only.

Why a second Q8_0 GEMV: in the Triton kernel (q8_gemv.gemv_rows) the compiler moves x's lanes through
shared memory at every K step, and every way of avoiding that in plain Triton cost more than it saved
(tools/results/h200_decode/13, 31, 49). Here one register layout covers the code words [rows, blocks, words]
and x [blocks, words, bytes]: a lane owns four consecutive code words (one 16-byte load) of every row of its
tile and the 16 floats of x they multiply, so x is read once per lane and no byte leaves its thread; the only
cross-lane step is the final reduction. Codes become exact fp32 by one byte permute each (2^23 + code + 128),
products and sums are fp32, so the result is gemv_rows' up to the summation order.
Programmatic dependent launch as gemv_rows: the first weight step loads before griddepcontrol.wait, x after.
Split-K partials are summed pairwise by atomic exchanges (blocks.split_sum_xchg's tree, written for Gluon's
layouts): deterministic, one launch.

Gluon does not run under TRITON_INTERPRET, so this kernel is checked on the GPU only
(tests/gpu/test_q8_gluon_gpu.py) and compiled for sm_90 offline in the CPU suite
(tests/kernels/test_q8_gluon_compile.py); gemv_rows stays the portable kernel and the fallback everywhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

from . import blocks
from .blocks import DeviceWeight
from .configs import DeviceInfo, hopper_plus, pdl_launch, use_pdl
from .qmatmul_fast import F32_MAGIC_BITS, F32_MAGIC_OFFSET, Q8_BIAS

# without Gluon (Triton < 3.5) the variant falls back to gemv_rows
from .gluon_compat import HAVE_GLUON, gl, gluon

WORD_GROUPS = 2  # a lane holds 4 of a block's 8 code words: two lanes per 32-code block
WORDS_PER_LANE = 8 // WORD_GROUPS  # one 16-byte load
LANES_PER_BLOCK_ROW = 32 // WORD_GROUPS  # blocks side by side in one warp's step
CODES_PER_WARP_STEP = LANES_PER_BLOCK_ROW * 32
MAX_SPLIT = 64  # the exchange tree's depth limit (6 levels)

if HAVE_GLUON:
    _WORD_GROUPS: gl.constexpr = gl.constexpr(WORD_GROUPS)
    _WORDS_PER_LANE: gl.constexpr = gl.constexpr(WORDS_PER_LANE)
    _LANES_PER_BLOCK_ROW: gl.constexpr = gl.constexpr(LANES_PER_BLOCK_ROW)
    # (F32_MAGIC_BITS | (code ^ 0x80)) read as fp32, minus F32_MAGIC_OFFSET (2^23 + 128), is the signed code

    @gluon.jit
    def _q8_gluon_kernel(x_ptr, w_ptr, s_ptr, y_ptr, slot_ptr, N, R, k_split, stride_xg, stride_w_words, stride_s,
                         off_s, BN: gl.constexpr, WARPS: gl.constexpr, PF: gl.constexpr, SPLIT: gl.constexpr,
                         PDL: gl.constexpr):
        """y[n] = sum_k x[g(n), k] * d[n, k // 32] * q[n, k] for rows pid*BN .. +BN, g(n) = n // R; program
        axis 1 takes K slice pid_k of k_split codes. Step tile [BN rows, 16*WARPS blocks, 8 words] (x: 4 bytes per
        word): a lane holds WORDS_PER_LANE words of one block for every row, a warp LANES_PER_BLOCK_ROW blocks."""
        L4: gl.constexpr = gl.BlockedLayout([BN, 1, _WORDS_PER_LANE, 4], [1, _LANES_PER_BLOCK_ROW, _WORD_GROUPS, 1],
                                            [1, WARPS, 1, 1], [3, 2, 1, 0])
        L3: gl.constexpr = gl.SliceLayout(3, L4)  # [BN, NB, 8] code words
        LX: gl.constexpr = gl.SliceLayout(0, L4)  # [NB, 8, 4] x
        LS: gl.constexpr = gl.SliceLayout(2, L3)  # [BN, NB] scales
        LR: gl.constexpr = gl.SliceLayout(1, LS)  # [BN] rows
        NB: gl.constexpr = _LANES_PER_BLOCK_ROW * WARPS
        BK: gl.constexpr = NB * 32
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        k_lo = pid_k * k_split
        w32 = w_ptr.to(gl.pointer_type(gl.int32))
        r3 = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        b3 = gl.arange(0, NB, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
        i3 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        rows = gl.minimum(pid * BN + r3, N - 1).to(gl.int64)
        wp = (w32 + gl.expand_dims(gl.expand_dims(rows * stride_w_words + k_lo // 4, 1), 2)
              + gl.expand_dims(gl.expand_dims(b3 * 8, 0), 2) + gl.expand_dims(gl.expand_dims(i3, 0), 1))
        rs = gl.arange(0, BN, layout=LR)
        bs = gl.arange(0, NB, layout=gl.SliceLayout(0, LS))
        rows_s = gl.minimum(pid * BN + rs, N - 1).to(gl.int64)
        sp = s_ptr + gl.expand_dims(rows_s * stride_s + off_s + k_lo // 32, 1) + gl.expand_dims(bs, 0)
        bx = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
        ix = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX)))
        jx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
        g = (pid * BN) // R
        xp = (x_ptr + g * stride_xg + k_lo + gl.expand_dims(gl.expand_dims(bx * 32, 1), 2)
              + gl.expand_dims(gl.expand_dims(ix * 4, 0), 2) + gl.expand_dims(gl.expand_dims(jx, 0), 1))
        # byte j of the biased word into the mantissa of 2^23: prmt selector j | 0x7540 (0, 0, 0x4B above it)
        jj = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        zero4 = gl.full([BN, NB, 8, 4], 0, gl.int32, layout=L4)
        sel = gl.expand_dims(gl.expand_dims(gl.expand_dims(jj | 0x7540, 0), 1), 2) + zero4
        high = gl.full([BN, NB, 8, 4], F32_MAGIC_BITS, gl.int32, layout=L4)
        acc = gl.zeros([BN, NB, 8], gl.float32, layout=L3)
        if PF:  # the first step's weights are in flight before the previous kernel has finished
            u_next = gl.load(wp)
            d_next = gl.load(sp)
        blocks.pdl_wait(PDL)  # x (and the exchange slots) only after the previous kernel is done
        for k0 in range(0, k_split, BK):
            if PF:
                u = u_next
                d = d_next
                u_next = gl.load(wp + (BK // 4), mask=(gl.full([BN, NB, 8], 0, gl.int32, layout=L3) + k0 + BK)
                                 < k_split)
                d_next = gl.load(sp + (BK // 32), mask=(gl.full([BN, NB], 0, gl.int32, layout=LS) + k0 + BK)
                                 < k_split)
            else:
                u = gl.load(wp)
                d = gl.load(sp)
            wp += BK // 4
            sp += BK // 32
            x = gl.load(xp + k0).to(gl.float32)
            u4 = gl.expand_dims(u ^ Q8_BIAS, 3) + zero4
            bits = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [u4, high, sel],
                                             dtype=gl.int32, is_pure=True, pack=1)
            q = bits.to(gl.float32, bitcast=True) - F32_MAGIC_OFFSET
            p = gl.sum(q * gl.expand_dims(x, 0), axis=3)
            acc += p * gl.expand_dims(d.to(gl.float32), 2)
        tot = gl.sum(gl.sum(acc, axis=2), axis=1)
        rn = pid * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        live = rn < N
        # split-K: pairwise tree over the slices, the partials carried by 64-bit exchanges (tag 1 | fp32 bits);
        # per element the second arrival at a node adds left + right (fixed order), clears it, goes one up
        for lvl in gl.static_range(6):
            if (2 << lvl) <= SPLIT:
                node = SPLIT - (SPLIT >> lvl) + (pid_k >> (lvl + 1))
                p_slot = slot_ptr + node.to(gl.int64) * N + rn
                packed = tot.to(gl.uint32, bitcast=True).to(gl.int64) + 4294967296
                old = gl.atomic_xchg(p_slot, packed, mask=live, sem="relaxed")
                second = live & ((old >> 32) != 0)
                other = old.to(gl.uint32).to(gl.float32, bitcast=True)
                tot = gl.where(((pid_k >> lvl) & 1) == 0, tot + other, other + tot)
                gl.store(p_slot, old * 0, mask=second)
                live = second
        gl.store(y_ptr + rn, tot, mask=live)


@dataclass(frozen=True)
class GluonTile:
    """One program's work: `rows` rows x 512*`warps` codes per step; `prefetch`: next step's weights in
    registers; `split`: K slices over programs (a power of two)."""

    rows: int
    warps: int = 1
    prefetch: bool = True
    split: int = 1

    @property
    def block_k(self) -> int:
        return CODES_PER_WARP_STEP * self.warps


def supports(x, dw: DeviceWeight, dev: DeviceInfo, groups: int, tile: GluonTile) -> bool:
    """Whether the Gluon kernel takes this call: one token, Q8_0, CUDA sm_90+, K slices whole steps, the
    code rows 16-byte aligned, row tiles inside one group."""
    if not HAVE_GLUON or dw.fmt.name != "Q8_0" or x.shape[0] != 1 or not hopper_plus(dev, x):
        return False
    n, k = dw.n_rows, dw.k
    if tile.split < 1 or tile.split & (tile.split - 1) or tile.split > MAX_SPLIT:
        return False
    if k % (tile.block_k * tile.split) or dw.stride_w % 16 or (groups > 1 and (n // groups) % tile.rows):
        return False
    return True


def gemv_gluon(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1, tile: GluonTile = GluonTile(4)):
    """y [1, N] fp32 = x [1, K] (or [1, G, K]) times the Q8_0 weight, by _q8_gluon_kernel. Calls the kernel
    cannot take (see supports) go to q8_gemv.gemv_rows_default."""
    from .q8_gemv import gemv_rows_default
    from .qmatmul import _check, _plan

    x = x if x.dtype.is_floating_point and x.stride(-1) == 1 else x.contiguous()

    def build():  # once per (T, groups, x strides, dtype, tile) of this weight: supports() is decided here too
        import torch

        if not supports(x, dw, dev, groups, tile):
            return lambda x: gemv_rows_default(x, dw, dev, groups)
        _x, _T, N, R, stride_xg, _t = _check(x, dw, groups)
        tiles = triton.cdiv(N, tile.rows)
        use = use_pdl(dev, x)
        # one int64 slot per tree node and row, zero between calls (each node's second arrival clears it)
        slots = torch.zeros((max(1, tile.split - 1), N), device=x.device, dtype=torch.int64)

        def launch(x):
            y = blocks.empty((1, N), x.device)
            _q8_gluon_kernel[(tiles, tile.split)](
                x, dw.w, dw.s, y, slots, N, R, dw.k // tile.split, stride_xg, dw.stride_w // 4, dw.stride_s,
                dw.off_s, BN=tile.rows, WARPS=tile.warps, PF=tile.prefetch and dw.k // tile.split > tile.block_k,
                SPLIT=tile.split, PDL=use, num_warps=tile.warps, **pdl_launch(use))
            return y
        launch.slots = slots  # for the tests: zero after every call
        return launch

    return _plan("gemv_gluon", x, dw, groups, tile, build)(x)


# One token on sm_90: the Gluon tile per (rows, K, groups) of a Flash Q8_0 matrix where it beat gemv_rows' tuned
# tile in the H200 sweeps (tools/results/h200_decode/50, 51: probe_gluon_q8, CUDA-graph replay of 8 rotations, two
# interleaved passes). The LM head: 4 rows, one warp, no prefetch 129.4-129.5 us (101 % of the same-run streaming
# read) against gemv_rows' 148.5-148.7 us (88 %); attn_q_a 3.0-3.1 against 3.6 us; ffn_down_shexp 4.7 against
# 5.0 us. On attn_q_b and attn_output_a/b every Gluon tile was slower (best 12.3, 12.4 and 13.8 us against 10.6,
# 12.2 and 12.0), on attn_kv and ffn_gate_shexp the best ties (2.6 / 5.2 against 2.7 / 5.3): those stay on
# gemv_rows.
TUNED_T1: dict[tuple[int, int, int], GluonTile] = {
    (129280, 4096, 1): GluonTile(4, prefetch=False),  # output (LM head)
    (1024, 4096, 1): GluonTile(4, warps=2, split=2),  # attn_q_a
    (4096, 2048, 1): GluonTile(8, warps=2),  # ffn_down_shexp
}


def gemv_q8_t1(x, dw: DeviceWeight, dev: DeviceInfo, groups: int = 1):
    """qmatmul's auto path for Q8_0 decode on CUDA: the Gluon kernel where TUNED_T1 has the shape (one token,
    sm_90+), else q8_gemv.gemv_rows_default."""
    from .q8_gemv import gemv_rows_default

    tile = TUNED_T1.get((dw.n_rows, dw.k, groups)) if x.shape[0] == 1 else None
    if tile is not None:  # gemv_gluon checks supports() itself and falls back to gemv_rows_default
        return gemv_gluon(x, dw, dev, groups, tile)
    return gemv_rows_default(x, dw, dev, groups)


# ---- registered variant (op "qmatmul"; signature fn(x, dw, dev, groups)) -----------------------------
from ..quant.formats import QuantFormat  # noqa: E402
from .qmatmul import DECODE_MAX_T  # noqa: E402
from .registry import KernelOp, register  # noqa: E402

register(KernelOp.QMATMUL, "gemv_gluon",
         lambda x, dw, dev, groups=1: gemv_gluon(x, dw, dev, groups,
                                                 TUNED_T1.get((dw.n_rows, dw.k, groups), GluonTile(4))),
         formats=(QuantFormat.Q8_0,), max_t=DECODE_MAX_T,
         doc="Q8_0 one-token GEMV in Gluon (hand-laid registers, sm_90+; TUNED_T1 tile, else 4 rows x 512 codes); "
             "other calls: gemv_rows")
