"""The IQ2_XXS selector decode shared by moe_int8 (decode) and moe_prefill (prefill): the 512-byte table
(blocks.iq2_sel16), its two-instruction spread (iq2_levels), the sign spread (iq2_signs) and the byte
permutes, checked exhaustively (all 256 grid records x all 128 sign indices) against dsv4.quant's grid and
ksigns tables. Exact integers: no tolerance. Runs in the interpreter on CPU (prmt emulated) and natively
(PTX prmt) on the GPU box."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv4.kernels_triton import blocks, moe_prefill  # noqa: E402
from dsv4.quant.tables import IQ2XXS_GRID, IQ2XXS_LEVELS, SIGN_VALUES  # noqa: E402
from tests.kernels.test_triton_qmatmul import DEVICE  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

N_REC, N_SIGN = 256, 128
# (coordinates of the low word's bytes, of the high word's) as the decode prmts leave them
SEL_ORDER = ((0, 4, 1, 5), (2, 6, 3, 7))


@triton.jit
def _decode_kernel(sel16_ptr, out_ptr, PRMT: tl.constexpr, BIASED: tl.constexpr):
    """out[g, s] = the two signed grid words of record g with sign index s: moe_int8's words (unbiased, selector
    byte order) or moe_prefill's (biased by 128, natural order)."""
    g = tl.arange(0, 256)[:, None]
    s = tl.arange(0, 128)[None, :]
    lv = blocks.iq2_levels(sel16_ptr, g + s * 0)
    if BIASED:
        lo, hi = moe_prefill._iq2_record(lv, (s << 14) + g * 0, 2, PRMT)  # sign index of record KQ=2
    else:
        lo, hi = blocks.iq2_signed(lv, s + g * 0, blocks.IQ2_POS_BYTES, blocks.IQ2_NEG_BYTES, PRMT)
    o = out_ptr + (g * 128 + s) * 2
    tl.store(o, lo)
    tl.store(o + 1, hi)


def _expected(biased: bool) -> np.ndarray:
    """int8 [256, 128, 8] signed grid values (or 128 + value as uint8), in the byte order the kernel writes."""
    signed = IQ2XXS_GRID.astype(np.int32)[:, None, :] * SIGN_VALUES.astype(np.int32)[None, :, :]
    if biased:
        return (signed + 128).astype(np.uint8)
    order = [c for word in SEL_ORDER for c in word]
    return signed[:, :, order].astype(np.int8)


def test_sel16_table_is_the_grid():
    """Each 16-bit record spread by the documented bit positions gives back the grid's levels."""
    t = blocks.iq2_sel16("cpu").numpy().view(np.uint16).astype(np.int64)
    pos = 4 * (blocks.IQ2_SEL_NIBBLE % 4) + 2 * (blocks.IQ2_SEL_NIBBLE // 4)
    assert np.array_equal((t[:, None] >> pos[None, :]) & 3, IQ2XXS_LEVELS)


@pytest.mark.parametrize("biased", [False, True], ids=["int8_decode", "prefill_biased"])
def test_selector_decode_all_records_and_signs(biased):
    """Every record x every sign index decodes to the grid value times its ksigns sign, in the order the
    kernels expect; the output starts as garbage so a missed store shows."""
    out = torch.full((N_REC * N_SIGN * 2,), 0x5A5A5A5A, dtype=torch.int32, device=DEVICE)
    _decode_kernel[(1,)](blocks.iq2_sel16(DEVICE), out, PRMT=DEVICE != "cpu", BIASED=biased)
    got = out.cpu().numpy().view(np.uint8 if biased else np.int8).reshape(N_REC, N_SIGN, 8)
    assert_close(got.astype(np.int64), _expected(biased).astype(np.int64), "triton_moe_int8", "bitexact",
                 "IQ2_XXS selector decode, every record x sign index")
