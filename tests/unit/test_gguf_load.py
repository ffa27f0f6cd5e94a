"""Loading DSV4 GGUF files: every tensor bound with the bytes that were written, zero copy, config
from metadata; files from dsv4.synth, from plain gguf calls, and the ds4 reference fixture."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from dsv4.config import tiny
from dsv4.quant.formats import QuantFormat
from dsv4.weights import LAYER_TENSORS, OPTIONAL_LAYER_TENSORS, load_weights
from tests.conftest import PLAIN_DIMS, plain_layout


def _sha(q) -> str:
    return hashlib.sha256(np.ascontiguousarray(q.data).reshape(-1).view(np.uint8)).hexdigest()


@pytest.mark.parametrize("which", ["tiny_q2_written", "tiny_q4_written"])
def test_written_tensors_load_back_byte_identical(which, request):
    res = request.getfixturevalue(which)
    w = load_weights(res.path)
    assert set(w.tensors) == set(res.sha256), "tensor names differ from what the writer wrote"
    bad = [n for n, q in w.tensors.items() if _sha(q) != res.sha256[n]]
    assert not bad, f"{len(bad)} tensors differ from the written bytes, first {bad[:3]}"
    assert dataclasses.replace(w.config, name="") == dataclasses.replace(tiny(), name="")
    gate = w.layers[3].ffn_gate_exps
    down = w.layers[3].ffn_down_exps
    want = {"tiny_q2_written": (QuantFormat.IQ2_XXS, QuantFormat.Q2_K), "tiny_q4_written": (QuantFormat.Q4_K,) * 2}
    assert (gate.fmt, down.fmt) == want[which]
    assert gate.shape == (16, 256, 256) and down.shape == (16, 256, 256)


def test_binding_is_zero_copy_and_typed(tiny_q2_weights):
    w = tiny_q2_weights
    mm = w.reader.data  # the reader's view of the memory map
    hc = lambda h: [h.fn, h.scale, h.base]  # noqa: E731
    every = [w.token_embd, w.output, w.output_norm, *hc(w.output_hc)]
    for lw in w.layers:
        every += [*hc(lw.hc_attn), *hc(lw.hc_ffn)] + [getattr(lw, a) for a in LAYER_TENSORS.values()]
        every += [getattr(lw, a) for a in OPTIONAL_LAYER_TENSORS.values() if getattr(lw, a) is not None]
    assert sorted(q.name for q in every) == sorted(w.tensors), "typed weights do not cover every tensor once"
    for q in every:
        assert np.shares_memory(q.data, mm), f"{q.name} is a copy, not a view of the file"
        assert q.data.dtype == np.uint8 and q.data.shape[-1] == q.fmt.row_bytes(q.shape[-1])
    # layer-class-specific tensors
    kinds = [(lw.attn_compressor_kv is not None, lw.indexer_proj is not None, lw.ffn_gate_tid2eid is not None,
              lw.exp_probs_b is not None) for lw in w.layers]
    assert kinds == [(False, False, True, False), (False, False, True, False), (True, True, True, False),
                     (True, False, False, True), (True, True, False, True), (True, False, False, True)]
    assert w.layers[2].attn_compressor_ape.shape == (4, 256) and w.layers[3].attn_compressor_ape.shape == (128, 128)
    tid = w.layers[0].ffn_gate_tid2eid
    ids = np.asarray(tid.data).view(np.int32).reshape(tid.shape)
    assert ids.min() >= 0 and ids.max() < 16
    assert (np.sort(ids, axis=1)[:, 1:] != np.sort(ids, axis=1)[:, :-1]).all(), "hash-table rows repeat an expert"


def test_plain_gguf_writer_file_loads(plain_model):
    """The same layout written by plain gguf.GGUFWriter calls (alternate metadata types) loads byte-exact."""
    path, written = plain_model
    w = load_weights(path)
    c = w.config
    assert (c.n_layer, c.n_embd, c.n_vocab, c.n_expert, c.compress_ratios) == (4, 256, 512, 8, (0, 0, 4, 128))
    assert c.rope_base == 10000.0 and c.hc_eps == 1e-6 and c.yarn_orig_ctx == 65536
    assert set(w.tensors) == {n for n, _, _ in plain_layout(PLAIN_DIMS)}
    bad = [n for n, q in w.tensors.items() if np.ascontiguousarray(q.data).tobytes() != written[n]]
    assert not bad, f"bytes differ for {bad[:3]}"
    assert w.layers[3].exp_probs_b.shape == (8,) and w.layers[2].ffn_gate_tid2eid.shape == (512, 6)


def test_ds4_reference_fixture_loads(ds4_fixture_model):
    w = load_weights(ds4_fixture_model)
    assert dataclasses.replace(w.config, name="") == dataclasses.replace(tiny(), name="")
    assert len(w.tensors) == 178
    assert w.layers[2].ffn_gate_exps.fmt is QuantFormat.IQ2_XXS and w.output.fmt is QuantFormat.Q8_0


RSS_PROBE = """
import sys, json, time
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) * 1024
import numpy, gguf
from dsv4.weights import load_weights
r0, t = rss(), time.time()
w = load_weights(sys.argv[1])
print(json.dumps({"rss_delta": rss() - r0, "load_s": time.time() - t, "n_layer": w.config.n_layer,
                  "experts_shared": bool(numpy.shares_memory(w.layers[0].ffn_gate_exps.data, w.reader.data))}))
"""
MAX_OPEN_RSS = 300 * 2**20


@pytest.mark.slow
@pytest.mark.big
def test_flash_layer_file_opens_memory_mapped(tmp_path):
    """A 2+ GB `--preset flash --layers 1` file opens raising RSS by < 300 MB (nothing copied/dequantized)."""
    import json
    import subprocess
    import sys
    import time

    if not Path("/proc/self/status").exists():
        pytest.skip("RSS is read from /proc (Linux)")
    out = tmp_path / "flash1.gguf"
    t = time.time()
    subprocess.run([sys.executable, "-c", "import sys; from dsv4.cli import main; sys.exit(main())", "make-tiny",
                    str(out), "--preset", "flash", "--layers", "1"], check=True, capture_output=True)
    write_s = time.time() - t
    size = out.stat().st_size
    assert size > 2 * 10**9
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, str(out)], check=True, capture_output=True, text=True)
    probe = json.loads(r.stdout)
    print(f"flash --layers 1: {size:,} bytes written in {write_s:.1f} s; open: +{probe['rss_delta'] / 2**20:.0f} MB RSS "
          f"in {probe['load_s']:.2f} s")
    assert probe["n_layer"] == 1 and probe["experts_shared"]
    assert probe["rss_delta"] < MAX_OPEN_RSS, f"opening raised RSS by {probe['rss_delta'] / 2**20:.0f} MB"
