"""Opt-in kernel check mode (DSV4_KERNEL_CHECK=1 or `dsv4.load(..., check=True)`).

Every pure op that a torch-based backend overrides (Triton kernels, a researcher's TorchOps subclass)
is shadow-run with the reference implementation of `dsv4.reference.TorchOps` on the same inputs; the
error is logged per call (logger `dsv4.check`) and accumulated per op in `CheckStats`. Ops that write
session state in place are never run twice. Slow by design: a debugging aid, not a mode to benchmark.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("dsv4.check")

# Ops without side effects whose outputs can be compared directly (tuples compared element-wise).
CHECKED_OPS = ("qmatmul", "qmatmul_grouped", "moe", "rms_norm", "hc_pre", "hc_post", "hc_head", "swiglu",
               "router", "embed", "sink_attention")


@dataclass
class OpError:
    calls: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0  # max |a - r| / max |r| over a call


@dataclass
class CheckStats:
    ops: dict[str, OpError] = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{'op':<18}{'calls':>7}{'max abs err':>14}{'max rel err':>14}"]
        for name, e in sorted(self.ops.items()):
            rows.append(f"{name:<18}{e.calls:>7}{e.max_abs:>14.3e}{e.max_rel:>14.3e}")
        return "\n".join(rows)


def _compare(name: str, got, ref, stats: CheckStats) -> None:
    import torch

    pairs = list(zip(got, ref)) if isinstance(got, tuple) else [(got, ref)]
    e = stats.ops.setdefault(name, OpError())
    e.calls += 1
    for a, r in pairs:
        if not (torch.is_tensor(a) and a.is_floating_point()):
            if torch.is_tensor(a) and not torch.equal(a, r):  # integer outputs (router ids) must agree exactly
                e.max_abs = max(e.max_abs, float("inf"))
                log.warning("%s: integer output differs from the reference", name)
            continue
        d = (a.double() - r.double()).abs().max().item() if a.numel() else 0.0
        scale = r.double().abs().max().item() if r.numel() else 0.0
        rel = d / scale if scale > 0 else d
        e.max_abs, e.max_rel = max(e.max_abs, d), max(e.max_rel, rel)
        log.info("%s: max abs err %.3e, rel %.3e", name, d, rel)


def enable(ops) -> CheckStats:
    """Wrap the overridden pure ops of a TorchOps-derived backend in place; returns the live stats."""
    from .reference import TorchOps

    stats = CheckStats()
    if not isinstance(ops, TorchOps):
        log.warning("kernel check mode needs a torch-based backend; %s is not checked", type(ops).__name__)
        return stats
    for name in CHECKED_OPS:
        mine = getattr(type(ops), name, None)
        ref = getattr(TorchOps, name)
        if mine is None or mine is ref:
            continue  # the backend runs the reference itself: nothing to compare

        def checked(*args, _mine=mine, _ref=ref, _name=name, **kw):
            got = _mine(ops, *args, **kw)
            _compare(_name, got, _ref(ops, *args, **kw), stats)
            return got

        setattr(ops, name, checked)
    ops.check_stats = stats
    return stats
