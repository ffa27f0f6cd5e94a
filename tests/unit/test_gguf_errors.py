"""Bad model files (issue #2 item 6): each gives one actionable line naming the file, the key or tensor,
expected and found, exit code 2 and no traceback; an unknown extra tensor only warns."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsv4.cli import main
from dsv4.errors import ModelFileError
from dsv4.weights import load_weights
from tests.conftest import write_plain_dsv4


def _inspect(capsys, path) -> tuple[int, str]:
    rc = main(["inspect", str(path), "--json"])
    err = capsys.readouterr().err
    return rc, err


def assert_user_error(capsys, path, *needles: str) -> str:
    """dsv4 inspect PATH exits 2 with one `error:` line holding the path and every needle."""
    rc, err = _inspect(capsys, path)
    lines = err.strip().splitlines()
    assert rc == 2, f"exit code {rc}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err!r}"
    assert "Traceback" not in err
    for n in (str(path), *needles):
        assert n in lines[0], f"{n!r} missing from {lines[0]!r}"
    with pytest.raises(ModelFileError):
        load_weights(path)
    return lines[0]


@pytest.fixture
def valid(tmp_path):
    path = tmp_path / "ok.gguf"
    write_plain_dsv4(path)
    return path


def _cut(src, dst, n: int):
    dst.write_bytes(src.read_bytes()[:n])
    return dst


def test_missing_file(capsys, tmp_path):
    assert_user_error(capsys, tmp_path / "nope.gguf", "no such file")


def test_directory(capsys, tmp_path):
    assert_user_error(capsys, tmp_path, "is a directory", "expected a .gguf model file")


def test_not_gguf(capsys, tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, this is not a model\n")
    assert_user_error(capsys, p, "not a GGUF file", "b'hell'", "expected b'GGUF'")


def test_truncated_header(capsys, valid, tmp_path):
    p = _cut(valid, tmp_path / "cut.gguf", 10)
    assert_user_error(capsys, p, "truncated header", "10 bytes", "needs 24")


def test_truncated_metadata(capsys, valid, tmp_path):
    import gguf

    data_offset = gguf.GGUFReader(str(valid)).data_offset
    p = _cut(valid, tmp_path / "cut.gguf", data_offset // 2)
    assert_user_error(capsys, p, "truncated or corrupt metadata", f"{data_offset // 2} bytes")


def test_truncated_tensor_data(capsys, valid, tmp_path):
    n = valid.stat().st_size - 1000
    p = _cut(valid, tmp_path / "cut.gguf", n)
    line = assert_user_error(capsys, p, "truncated tensor data", f"file has {n} bytes")
    assert "tensor blk.3." in line  # the last tensors of the file are the ones cut


def test_wrong_version(capsys, valid, tmp_path):
    raw = bytearray(valid.read_bytes())
    raw[4:8] = (2).to_bytes(4, "little")
    p = tmp_path / "v2.gguf"
    p.write_bytes(bytes(raw))
    assert_user_error(capsys, p, "GGUF version 2, expected 3")


def test_missing_key(capsys, tmp_path):
    p = tmp_path / "k.gguf"
    write_plain_dsv4(p, drop_keys=("deepseek4.expert_count",))
    assert_user_error(capsys, p, "deepseek4.expert_count", "missing", "expected u32")


@pytest.mark.parametrize("key,value,vtype,sub,found", [
    ("deepseek4.embedding_length", 256, "INT32", None, "has type INT32"),
    ("deepseek4.rope.scaling.factor", "16", "STRING", None, "has type STRING"),
    ("deepseek4.swiglu_clamp_exp", [10] * 4, "ARRAY", "INT32", "has type [ARRAY, INT32]"),
])
def test_mistyped_key(capsys, tmp_path, key, value, vtype, sub, found):
    p = tmp_path / "k.gguf"
    write_plain_dsv4(p, keys={key: (value, vtype, sub)})
    assert_user_error(capsys, p, key, found, "expected")


def test_engine_constant_mismatch(capsys, tmp_path):
    p = tmp_path / "k.gguf"
    write_plain_dsv4(p, keys={"deepseek4.expert_weights_scale": (2.5, "FLOAT32", None)})
    assert_user_error(capsys, p, "deepseek4.expert_weights_scale", "expected 1.5, found 2.5")


def test_layer_count_vs_compress_ratios(capsys, tmp_path):
    p = tmp_path / "k.gguf"
    write_plain_dsv4(p, keys={"deepseek4.attention.compress_ratios": ([0, 0, 4], "ARRAY", "UINT32")})
    assert_user_error(capsys, p, "deepseek4.attention.compress_ratios", "has 3 entries", "at least 4 (block_count)")


def test_wrong_ratio_layout(capsys, tmp_path):
    p = tmp_path / "k.gguf"
    write_plain_dsv4(p, keys={"deepseek4.attention.compress_ratios": ([0, 0, 128, 4], "ARRAY", "UINT32")})
    assert_user_error(capsys, p, "compress_ratios", "expected [0, 0, 4, 128]", "found [0, 0, 128, 4]")


def test_missing_tensor(capsys, tmp_path):
    p = tmp_path / "t.gguf"
    write_plain_dsv4(p, drop_tensors=("blk.1.attn_kv.weight",))
    assert_user_error(capsys, p, "tensor blk.1.attn_kv.weight is missing", "Q8_0", "[128, 256]")


def test_wrong_shape(capsys, tmp_path):
    p = tmp_path / "t.gguf"
    write_plain_dsv4(p, tensors={"blk.0.attn_q_a.weight": ([256, 64], "Q8_0")})
    assert_user_error(capsys, p, "tensor blk.0.attn_q_a.weight", "expected shape [128, 256]", "found [64, 256]")


@pytest.mark.parametrize("name,dims,ty,expected", [
    ("blk.0.attn_norm.weight", [256], "F16", "expected type F32, found F16"),
    ("blk.2.ffn_down_exps.weight", [256, 256, 8], "F16", "expected type IQ2_XXS/Q2_K/Q4_K/Q8_0, found F16"),
    ("blk.1.ffn_up_exps.weight", [256, 256, 8], "Q4_K", "expected the type of blk.1.ffn_gate_exps.weight (IQ2_XXS)"),
])
def test_wrong_dtype(capsys, tmp_path, name, dims, ty, expected):
    p = tmp_path / "t.gguf"
    write_plain_dsv4(p, tensors={name: (dims, ty)})
    assert_user_error(capsys, p, f"tensor {name}", expected)


def test_unknown_tensor_only_warns(capsys, tmp_path):
    p = tmp_path / "t.gguf"
    write_plain_dsv4(p, tensors={"blk.0.mystery.weight": ([32], "F32")})
    with pytest.warns(UserWarning, match="blk.0.mystery.weight"):
        w = load_weights(p)
    assert "blk.0.mystery.weight" not in w.tensors
    rc, err = _inspect(capsys, p)
    assert rc == 0 and "warning:" in err and "blk.0.mystery.weight" in err


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    """The installed `dsv4` entry point: exit 2, one line, no traceback; DSV4_DEBUG=1 shows one."""
    bad = tmp_path / "missing.gguf"
    cmd = [sys.executable, "-c", "import sys; from dsv4.cli import main; sys.exit(main())", "inspect", str(bad)]
    env = {k: v for k, v in os.environ.items() if k != "DSV4_DEBUG"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {bad}: no such file (give the path of a .gguf model file)"
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, "DSV4_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.strip().endswith("model file)")
