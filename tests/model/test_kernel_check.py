"""Kernel check mode: an overridden op is shadow-run against the reference and its error recorded;
a deliberately wrong override is caught (the mode can fail), an exact one reports zero error."""
from __future__ import annotations

import torch

import dsv4
from dsv4.reference import TorchOps

torch.set_num_threads(1)
IDS = [0, 128803, 1201, 7, 64, 93, 128804, 128822]


class ExactOps(TorchOps):
    def swiglu(self, gate, up, clamp):  # same math, separate code path
        return torch.nn.functional.silu(torch.clamp(gate, max=clamp)) * torch.clamp(up, -clamp, clamp)


class WrongOps(TorchOps):
    def swiglu(self, gate, up, clamp):  # forgets the clamp on `up`: a kernel bug the check must see
        return torch.nn.functional.silu(torch.clamp(gate, max=clamp)) * up * 1.01


def test_check_mode_records_errors(tiny_q2_path):
    eng = dsv4.load(tiny_q2_path, backend=ExactOps(device="cpu", dtype=torch.float32), check=True)
    eng.new_session(ctx=64).prefill(IDS)
    e = eng.ops.check_stats.ops["swiglu"]
    assert e.calls > 0 and e.max_abs == 0.0, eng.ops.check_stats.table()

    bad = dsv4.load(tiny_q2_path, backend=WrongOps(device="cpu", dtype=torch.float32), check=True)
    bad.new_session(ctx=64).prefill(IDS)
    assert bad.ops.check_stats.ops["swiglu"].max_rel > 5e-3, bad.ops.check_stats.table()
    assert "qmatmul" not in bad.ops.check_stats.ops  # not overridden: never run twice
