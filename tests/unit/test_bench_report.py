"""The kernel benchmark's target summary (tools/bench_kernels.Report) on made-up rows: each column is the worst case
over the target's ops, so a target that must hold on every matrix is never shown met by its best matrix alone."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_kernels  # noqa: E402  (tools/ is not a package; an import error must fail, not skip)

HEADER = {"machine": "test GPU", "date": "2026-11-29 00:00 UTC", "commit": "abc1234", "torch": "x", "triton": "y",
          "bw": 4000.0, "host": "h"}


def _row(op, variant, pct, t=1, eager=None):
    return {"op": op, "shape": "s", "fmt": "Q8_0", "T": t, "variant": variant, "pct_bw": f"{pct:.1f}",
            "pct_bw_eager": "" if eager is None else f"{eager:.1f}", "status": "ok"}


def _target_line(rep, label):
    (line,) = [x for x in rep.targets() if x.startswith(f"| {label} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_targets_take_the_worst_op(tmp_path):
    rep = bench_kernels.Report(tmp_path / "r.md", tmp_path / "r.csv", HEADER)
    # four large Q8_0 matrices: auto is lowest on attn_output_a; the best variant of attn_output_b is its auto
    # (another variant is faster only on the LM head, which must not stand for the target)
    for op, auto, other in (("attn_q_b", 78.0, 40.0), ("attn_output_a", 68.5, 69.9), ("attn_output_b", 68.9, 31.0),
                            ("output", 87.8, 95.0)):
        rep.add(_row(op, "auto", auto, eager=auto / 10))
        rep.add(_row(op, "gemm_hybrid", other))
    rep.add(_row("attn_output_b", "gemv_rows", 99.0, t=4))  # another T: not this target's
    rep.add({**_row("attn_output_b", "broken", 99.0), "status": "FAIL"})  # failed rows never count
    cells = _target_line(rep, "Q8_0 decode GEMV, large matrices")
    assert cells[2] == "68.5%"  # auto, worst matrix
    assert cells[3] == "68.9% (auto on attn_output_b)"  # each matrix's best variant, worst matrix
    assert cells[4] == "6.8%"  # auto eager, worst matrix
    # one op: the best variant, without an op label; targets without rows say so
    rep.add(_row("moe_q2", "auto", 25.6))
    rep.add(_row("moe_q2", "int8", 32.7))
    assert _target_line(rep, "fused MoE decode q2 (6 experts)")[2:4] == ["25.6%", "32.7% (int8)"]
    assert _target_line(rep, "MoE prefill q4, T=2048")[2] == "not measured"
    # the markdown holds the same summary; the CSV every row, the failed one included
    assert "| 68.9% (auto on attn_output_b) |" in (tmp_path / "r.md").read_text()
    with open(tmp_path / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == 12


def test_rotation_outruns_l2_on_the_target_matrices():
    """Decode timings rotate over weight copies: for every matrix of the Q8_0 target, the bytes read between two
    uses of one copy (the other copies, or the copy itself when there is one) exceed L2."""
    for d in bench_kernels.DENSE:
        if d.name in bench_kernels.LARGE_Q8:
            nbytes = d.fmt.row_bytes(d.k) * d.n
            copies = bench_kernels.n_copies(nbytes, 1)
            assert max(copies - 1, 1) * nbytes > bench_kernels.L2_BYTES, d.name
    assert bench_kernels.n_copies(10 << 20, 2048) == 1  # prefill: one copy
