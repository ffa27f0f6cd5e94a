"""Session fixtures: tiny DSV4 GGUF files built once per test run, the ds4 reference fixture model,
and a plain-gguf writer of the DSV4 layout (independent of dsv4.synth) for loader and error tests.

tiny_q2_path / tiny_q4_path / tiny_q2_seed1_path: `dsv4.synth.write_model` (tiny preset) into a temp
dir; tiny_q2_written / tiny_q4_written also carry the per-tensor sha256 recorded while writing.
ds4_fixture_model: the reference engine's model (shared/fixtures/ds4-reference, seed 7); skipped with a
reason where `shared/` is absent (a user's checkout).
"""
from __future__ import annotations

import os

# Triton picks interpreter or compiler when first imported: decide before any test module imports it.
# Without a GPU, kernels run in the interpreter (tools/gpu_check.sh runs them natively on the box).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
RUN_BIG = "--run-big"


def pytest_addoption(parser):
    parser.addoption(RUN_BIG, action="store_true", help="also run tests marked `big` (they write multi-GB files)")


def pytest_configure(config):
    config.addinivalue_line("markers", "big: writes a multi-GB Flash-shaped file; runs only with --run-big")


def pytest_collection_modifyitems(config, items):
    if config.getoption(RUN_BIG):
        return
    skip = pytest.mark.skip(reason=f"writes a multi-GB file; run with {RUN_BIG}")
    for item in items:
        if "big" in item.keywords:
            item.add_marker(skip)
FIXTURE_DIR = SHARED_DIR / "fixtures" / "ds4-reference"
FIXTURE_SEED = 7


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE_DIR / "make_tiny_gguf.py").is_file():
        pytest.skip(f"reference fixture not found at {FIXTURE_DIR} (the shared/ folder beside the checkout)")
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def ds4_fixture_model(fixture_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds4fixture") / f"seed{FIXTURE_SEED}.gguf"
    subprocess.run([sys.executable, str(fixture_dir / "make_tiny_gguf.py"), str(out), "--seed", str(FIXTURE_SEED)],
                   check=True, capture_output=True)
    return out


def _write(tmp_path_factory, recipe: str, seed: int):
    from dsv4.synth import write_model

    out = tmp_path_factory.mktemp(f"tiny_{recipe}_s{seed}") / f"tiny_{recipe}_s{seed}.gguf"
    return write_model(out, preset="tiny", recipe=recipe, seed=seed, digests=True)


@pytest.fixture(scope="session")
def tiny_q2_written(tmp_path_factory):
    return _write(tmp_path_factory, "q2", 0)


@pytest.fixture(scope="session")
def tiny_q4_written(tmp_path_factory):
    return _write(tmp_path_factory, "q4", 0)


@pytest.fixture(scope="session")
def tiny_q2_path(tiny_q2_written) -> Path:
    return tiny_q2_written.path


@pytest.fixture(scope="session")
def tiny_q4_path(tiny_q4_written) -> Path:
    return tiny_q4_written.path


@pytest.fixture(scope="session")
def tiny_q2_weights(tiny_q2_path):
    """The tiny q2 file loaded once per session (read-only: do not mutate)."""
    from dsv4.weights import load_weights

    return load_weights(tiny_q2_path)


@pytest.fixture(scope="session")
def tiny_q4_weights(tiny_q4_path):
    from dsv4.weights import load_weights

    return load_weights(tiny_q4_path)


@pytest.fixture(scope="session")
def tiny_q2_seed1_path(tmp_path_factory) -> Path:
    return _write(tmp_path_factory, "q2", 1).path


# ---- the DSV4 layout written with plain gguf calls (model.md §2-3 typed in again, not dsv4 code) ----

# Small widths so files are tiny and open in milliseconds; every layer class present with 4 layers.
PLAIN_DIMS = dict(n_layer=4, d=256, vocab=512, heads=4, head_dim=128, rot=64, q_lora=128, o_groups=2, o_lora=64,
                  experts=8, used=6, ff=256, hash_layers=3, swa=128, idx_heads=4, idx_dim=128, idx_topk=32, n_hc=4)


def plain_layout(c: dict) -> list[tuple[str, list[int], str]]:
    """(name, GGUF dims ne0-first, type name) for every tensor, straight from the model.md §3 tables."""
    D, V, H, Dh, QL = c["d"], c["vocab"], c["heads"], c["head_dim"], c["q_lora"]
    G, R, E, F, S = c["o_groups"], c["o_lora"], c["experts"], c["ff"], c["n_hc"]
    I, Di, K = c["idx_heads"], c["idx_dim"], c["used"]
    ctrl = 2 * S + S * S
    out = [("token_embd.weight", [D, V], "F16"), ("output_hc_fn.weight", [S * D, S], "F16"),
           ("output_hc_scale.weight", [1], "F32"), ("output_hc_base.weight", [S], "F32"),
           ("output_norm.weight", [D], "F32"), ("output.weight", [D, V], "Q8_0")]
    for l in range(c["n_layer"]):
        r = 0 if l < 2 else (4 if l % 2 == 0 else 128)
        b = f"blk.{l}."
        t = [("hc_attn_fn.weight", [S * D, ctrl], "F16"), ("hc_attn_scale.weight", [3], "F32"),
             ("hc_attn_base.weight", [ctrl], "F32"), ("attn_norm.weight", [D], "F32"),
             ("attn_q_a.weight", [D, QL], "Q8_0"), ("attn_q_a_norm.weight", [QL], "F32"),
             ("attn_q_b.weight", [QL, H * Dh], "Q8_0"), ("attn_kv.weight", [D, Dh], "Q8_0"),
             ("attn_kv_a_norm.weight", [Dh], "F32"), ("attn_sinks.weight", [H], "F32"),
             ("attn_output_a.weight", [H // G * Dh, G * R], "Q8_0"), ("attn_output_b.weight", [G * R, D], "Q8_0"),
             ("hc_ffn_fn.weight", [S * D, ctrl], "F16"), ("hc_ffn_scale.weight", [3], "F32"),
             ("hc_ffn_base.weight", [ctrl], "F32"), ("ffn_norm.weight", [D], "F32"),
             ("ffn_gate_inp.weight", [D, E], "F16"), ("ffn_gate_exps.weight", [D, F, E], "IQ2_XXS"),
             ("ffn_up_exps.weight", [D, F, E], "IQ2_XXS"), ("ffn_down_exps.weight", [F, D, E], "Q2_K"),
             ("ffn_gate_shexp.weight", [D, F], "Q8_0"), ("ffn_up_shexp.weight", [D, F], "Q8_0"),
             ("ffn_down_shexp.weight", [F, D], "Q8_0")]
        if r:
            wc = 2 * Dh if r == 4 else Dh
            t += [("attn_compressor_ape.weight", [wc, r], "F16"), ("attn_compressor_kv.weight", [D, wc], "F16"),
                  ("attn_compressor_gate.weight", [D, wc], "F16"), ("attn_compressor_norm.weight", [Dh], "F32")]
        if r == 4:
            t += [("indexer.attn_q_b.weight", [QL, I * Di], "F16"), ("indexer.proj.weight", [D, I], "F16"),
                  ("indexer_compressor_ape.weight", [2 * Di, 4], "F16"),
                  ("indexer_compressor_kv.weight", [D, 2 * Di], "F16"),
                  ("indexer_compressor_gate.weight", [D, 2 * Di], "F16"),
                  ("indexer_compressor_norm.weight", [Di], "F32")]
        if l < c["hash_layers"]:
            t += [("ffn_gate_tid2eid.weight", [K, V], "I32")]
        else:
            t += [("exp_probs_b.bias", [E], "F32")]
        out += [(b + n, dims, ty) for n, dims, ty in t]
    return out


def plain_metadata(c: dict) -> dict:
    """key -> (value, GGUFValueType name, array sub-type name or None); alternate accepted types on purpose."""
    p = "deepseek4."
    u32 = {"block_count": c["n_layer"], "embedding_length": c["d"], "vocab_size": c["vocab"],
           "attention.head_count": c["heads"], "attention.head_count_kv": 1, "attention.key_length": c["head_dim"],
           "attention.value_length": c["head_dim"], "rope.dimension_count": c["rot"],
           "attention.q_lora_rank": c["q_lora"], "attention.output_lora_rank": c["o_lora"],
           "attention.output_group_count": c["o_groups"], "expert_count": c["experts"],
           "expert_used_count": c["used"], "expert_feed_forward_length": c["ff"], "expert_shared_count": 1,
           "hash_layer_count": c["hash_layers"], "attention.sliding_window": c["swa"],
           "attention.indexer.head_count": c["idx_heads"], "attention.indexer.key_length": c["idx_dim"],
           "attention.indexer.top_k": c["idx_topk"], "hyper_connection.count": c["n_hc"],
           "hyper_connection.sinkhorn_iterations": 20}
    md = {p + k: (v, "UINT32", None) for k, v in u32.items()}
    md.update({p + "hyper_connection.epsilon": (1e-6, "FLOAT64", None),
               p + "attention.layer_norm_rms_epsilon": (1e-6, "FLOAT32", None),
               p + "attention.compress_ratios": ([0 if l < 2 else (4 if l % 2 == 0 else 128) for l in range(c["n_layer"])],
                                                 "ARRAY", "INT32"),
               p + "swiglu_clamp_exp": ([10.0] * c["n_layer"], "ARRAY", "FLOAT32"),
               p + "rope.freq_base": (10000, "UINT32", None),
               p + "attention.compress_rope_freq_base": (160000.0, "FLOAT32", None),
               p + "rope.scaling.factor": (16.0, "FLOAT32", None), p + "rope.scaling.yarn_beta_fast": (32.0, "FLOAT32", None),
               p + "rope.scaling.yarn_beta_slow": (1.0, "FLOAT32", None),
               p + "rope.scaling.original_context_length": (65536, "UINT32", None),
               p + "expert_weights_scale": (1.5, "FLOAT32", None), p + "expert_weights_norm": (True, "BOOL", None),
               "tokenizer.ggml.model": ("gpt2", "STRING", None),
               "tokenizer.ggml.tokens": ([f"t{i}" for i in range(c["vocab"])], "ARRAY", "STRING"),
               "tokenizer.ggml.merges": (["t 0", "t 1"], "ARRAY", "STRING")})
    return md


def write_plain_dsv4(path: Path, dims: dict | None = None, *, drop_keys=(), keys: dict | None = None,
                     drop_tensors=(), tensors: dict | None = None, seed: int = 0) -> dict[str, bytes]:
    """Write the layout with plain gguf.GGUFWriter calls. keys/tensors override or add entries:
    keys {key: (value, type, subtype)}, tensors {name: (GGUF dims, type name)}. Returns name -> bytes written."""
    import gguf

    c = dict(PLAIN_DIMS, **(dims or {}))
    rng = np.random.default_rng(seed)
    md = plain_metadata(c)
    md.update(keys or {})
    w = gguf.GGUFWriter(str(path), "deepseek4")
    VT = gguf.GGUFValueType
    for k, (v, ty, sub) in md.items():
        if k not in drop_keys:
            w.add_key_value(k, v, VT[ty], sub_type=VT[sub] if sub else None)
    layout = {n: (dims_, ty) for n, dims_, ty in plain_layout(c)}
    layout.update(tensors or {})
    written = {}
    for name, (gdims, ty) in layout.items():
        if name in drop_tensors:
            continue
        qt = gguf.GGMLQuantizationType[ty]
        shape = tuple(reversed(gdims))  # numpy order
        if ty in ("F16", "F32", "I32"):
            dt = {"F16": np.float16, "F32": np.float32, "I32": np.int32}[ty]
            arr = (rng.integers(0, 6, size=shape) if ty == "I32" else rng.standard_normal(shape) * 0.1).astype(dt)
            w.add_tensor(name, arr)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qt]
            arr = np.zeros((*shape[:-1], shape[-1] // block * size), np.uint8)  # all-zero blocks decode to 0
            w.add_tensor(name, arr, raw_dtype=qt)
        written[name] = arr.tobytes()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture
def plain_model(tmp_path):
    """A valid small DSV4 file written by plain gguf calls; returns (path, name -> bytes)."""
    path = tmp_path / "plain.gguf"
    return path, write_plain_dsv4(path)
