"""`dsv4 kernels` lists registered variants; `--kernel` is validated with one clear line (exit 2)."""
from __future__ import annotations

from dsv4.cli import main


def test_kernels_lists_registered_variants(capsys):
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    for name in ("gemv", "gemm", "fused_blockdot", "grouped"):
        assert name in out, out


def test_kernel_flag_errors(tiny_q2_path, capsys):
    rc = main(["run", "-m", str(tiny_q2_path), "-p", "hi", "-n", "1", "--backend", "torch",
               "--kernel", "moe=grouped", "--no-kv-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "triton backend" in err and "Traceback" not in err, err
    rc = main(["run", "-m", str(tiny_q2_path), "-p", "hi", "-n", "1", "--kernel", "moe", "--no-kv-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "OP=NAME" in err, err
