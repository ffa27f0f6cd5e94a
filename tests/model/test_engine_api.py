"""dsv4.load with an Ops instance: a researcher's TorchOps subclass runs the whole model and its
overrides are actually used (call count), with logits equal to the stock backend's."""
from __future__ import annotations

import numpy as np
import torch

import dsv4
from dsv4.reference import TorchOps
from tests.tolerances import assert_close

torch.set_num_threads(1)


class CountingOps(TorchOps):
    """Same math as TorchOps; counts qmatmul calls so the test proves the instance was used."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def qmatmul(self, x, w):
        self.calls += 1
        return super().qmatmul(x, w)


def test_load_accepts_an_ops_instance(tiny_q2_path):
    ids = [0, 128803, 1201, 7, 64, 93, 128804, 128822]
    ref = dsv4.load(tiny_q2_path, backend="torch").new_session(ctx=64).prefill(ids)
    ops = CountingOps(device="cpu", dtype=torch.float32)
    eng = dsv4.load(tiny_q2_path, backend=ops)
    assert eng.ops is ops
    got = eng.new_session(ctx=64).prefill(ids)
    assert ops.calls > 0
    assert_close(got, ref, "model", "same_math", "Ops-instance backend vs stock torch backend")
    assert np.isfinite(got).all()
