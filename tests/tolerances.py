"""The one tolerance table of the test suite: (op, dtype/format) -> (atol, rtol, reason).

Every numeric comparison in tests/ takes its tolerance from here; each row says why the bound is
what it is. Add rows; never widen one to make a failing test pass without a new reason.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    reason: str


TOLERANCES: dict[tuple[str, str], Tol] = {
    ("dequant", "all"): Tol(0.0, 0.0, "dequantization is exact arithmetic on the same bits: bit-exact"),
}


def tol(op: str, kind: str) -> Tol:
    return TOLERANCES[(op, kind)]


def assert_close(actual, expected, op: str, kind: str, what: str = "") -> None:
    """Compare with the table's tolerance; the failure message names count, worst index, max-abs and rel error."""
    import numpy as np

    t = tol(op, kind)
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = np.abs(a - e)
    bound = t.atol + t.rtol * np.abs(e)
    bad = ~(err <= bound)
    if bad.any():
        i = int(np.argmax(np.where(bad, err - bound, -np.inf)))
        idx = np.unravel_index(i, a.shape)
        rel = float(err.flat[i] / max(abs(e.flat[i]), 1e-30))
        raise AssertionError(
            f"{what} ({op}, {kind}): {int(bad.sum())}/{bad.size} elements out of tolerance "
            f"atol={t.atol} rtol={t.rtol}; worst at {idx}: got {a.flat[i]!r} expected {e.flat[i]!r} "
            f"(abs {err.flat[i]:.3e}, rel {rel:.3e}); max abs err {err.max():.3e}. Reason for bound: {t.reason}"
        )
