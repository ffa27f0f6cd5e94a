"""The Gluon MoE tiles that tools/probe_decode.py sweeps (parts gq4, gq4l3, gq2, gq2g, gflat) against the rules by which
moe_int8_gluon's plans take a tile at Flash shapes. A tile they reject runs the Triton fallback under a Gluon label on
the GPU: a lost device run and a wrongly labelled row. Each part's case labels must also be unique, because the rows
are told apart by them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import probe_decode as pd  # noqa: E402  (tools/ is not a package; an import error must fail, not skip)

from dsv4.kernels_triton import moe_int8, moe_int8_gluon as m  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402

F, D, K = pd.F_EXP, pd.D, pd.K_USED


def _gate_up_ok(tile: moe_int8.Int8GluonTile, iq2: bool) -> bool:
    """What _gate_up_plan asks of the tile (the row alignment aside: Flash rows are 16-byte aligned)."""
    return m._tile_ok(tile, F, D, m.iq2_block_k(tile) if iq2 else None)


def _down_ok(tile: moe_int8.Int8GluonTile) -> bool:
    """What down_int8 asks: the tile down_tile keeps at this F and K, which _down_plan takes (whole or flat steps)."""
    kept = m.down_tile(tile, F, K)
    return kept is not None and (m._tile_ok(kept, D, F) or m._flat_ok(kept, D, F))


@pytest.mark.parametrize("name,iq2", [("GQ4_GATE_UP", False), ("GQ4L3_GATE_UP", False), ("GQ2G_GATE_UP", True),
                                      ("GQ2G_L3", True)])
def test_gate_up_tiles_are_taken_at_flash(name, iq2):
    bad = [t for t in getattr(pd, name) if not _gate_up_ok(moe_int8.Int8GluonTile(*t), iq2)]
    assert not bad, f"{name}: tiles the Gluon gate/up plan rejects at F={F}, D={D}: {bad}"


@pytest.mark.parametrize("name", ["GQ4_DOWN", "GQ4L3_DOWN", "GQ2_DOWN", "GFLAT_DOWN"])
def test_down_tiles_are_taken_at_flash(name):
    bad = [t for t in getattr(pd, name) if not _down_ok(moe_int8.Int8GluonTile(*t))]
    assert not bad, f"{name}: tiles the Gluon down plan rejects at D={D}, F={F}, K={K}: {bad}"


def test_flat_down_tiles_stay_flat():
    """`gflat` times flat tiles: each must keep its warps along the token's slots (a step wider than F), in whole
    steps at K slots, rather than fall back to a one-warp tile."""
    for t in pd.GFLAT_DOWN:
        kept = m.down_tile(moe_int8.Int8GluonTile(*t), F, K)
        assert kept is not None and kept.warps_k > 1 and kept.block_k > F and m.flat_steps(kept, F, K), t


def _cases():
    q4, q2 = QuantFormat.Q4_K, QuantFormat.IQ2_XXS
    return {"gq4": (pd.gq4_cases(moe_int8.TUNED[q4], pd.GQ4_GATE_UP, pd.GQ4_DOWN, pd.GQ4_CROSS), False),
            "gq4l3": (pd.gq4l3_cases(moe_int8.TUNED_LIMB3[q4]), False),
            "gq2": (pd.gq2_cases(moe_int8.TUNED[q2]), True),
            "gq2 three planes": (pd.gq2_cases(moe_int8.TUNED_LIMB3[q2]), True)}


@pytest.mark.parametrize("part", list(_cases()))
def test_case_labels_are_unique_and_their_tiles_taken(part):
    cases, iq2 = _cases()[part]
    labels = [label for label, _ in cases]
    assert len(set(labels)) == len(labels), f"{part}: repeated labels {sorted(labels)}"
    for label, cfg in cases:
        assert cfg.gluon_gate_up is None or _gate_up_ok(cfg.gluon_gate_up, iq2), (part, label)
        assert cfg.gluon_down is None or _down_ok(cfg.gluon_down), (part, label)


def test_labels_tell_prefetch_modes_apart():
    """A tile with every step's words before the wait (Prefetch.ALL) and the same tile with the next step prefetched
    are different rows."""
    assert pd.gq4_label((2, 1, moe_int8.Prefetch.ALL, 1)) != pd.gq4_label((2, 1, True, 1)) != pd.gq4_label(
        (2, 1, False, 1))
