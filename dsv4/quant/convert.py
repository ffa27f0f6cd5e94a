"""The official Hugging Face checkpoint layout of DeepSeek V4 Flash, read as float32 under GGUF names.

Owns the HF -> GGUF name map (model.md §3.5), config.json -> Config, the decoders of the source encodings
(FP8-E4M3 with 128x128 UE8M0 block scales, packed FP4-E2M1 experts with a UE8M0 scale per 32, BF16/F32,
I64 hash tables) and `write_hf_checkpoint`, a synthetic checkpoint in the same layout for tests and
notebooks. Knows nothing of GGUF block formats or recipes: requant.py turns these floats into a file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..config import (
    EXPERT_WEIGHTS_SCALE, HC_EPS, RMS_EPS, SINKHORN_ITERS, SWIGLU_CLAMP, YARN_BETA_FAST, YARN_BETA_SLOW,
    YARN_ORIG_CTX, Config, default_ratios,
)
from ..errors import ModelFileError
from ..numerics import FP4_MAX, FP8_MAX

# The layout, as ds4's converter (gguf-tools/deepseek4-quantize.c) reads the official release:
# * dense FP8: `X.weight` F8_E4M3 [out, in] + `X.scale` F8_E8M0 [ceil(out/128), ceil(in/128)];
#   value = e4m3(w) * 2^(s-127) per 128x128 block. ds4 requires exact multiples of 128; ceil blocks are
#   accepted here, as DeepSeek's weight_dequant does. E4M3 NaN codes (0x7f/0xff) read as 0, as in ds4.
# * routed experts (MXFP4): `layers.L.ffn.experts.E.wK.weight` I8 [out, in/2], two E2M1 codes per byte,
#   element 2j in the LOW nibble and 2j+1 in the high one; code bit 3 = sign, bits 0-2 index
#   {0, .5, 1, 1.5, 2, 3, 4, 6}; `...wK.scale` F8_E8M0 [out, in/32] scales each run of 32 inputs.
# * all other tensors BF16/F16/F32; the hash table `ffn.gate.tid2eid` I64 (I32 accepted).
# * E8M0 byte e is 2^(e-127); e = 0 is 2^-127 (as ds4), e = 255 (NaN) is rejected.
# HF shapes are PyTorch order, i.e. dsv4's logical (math) shapes; experts are stacked to [E, out, in].
FP8_BLOCK = 128  # dense weights: one E8M0 scale per 128x128 block
FP4_GROUP = 32  # experts: one E8M0 scale per 32 input elements
E8M0_BIAS = 127
E8M0_NAN = 255
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_SIGN = 0x8
SCALE_SUFFIX = ".scale"
WEIGHT_SUFFIX = ".weight"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"


class HfDtype:
    """safetensors dtype names of the official checkpoint."""

    FP8 = "F8_E4M3"
    E8M0 = "F8_E8M0"
    FP4_PACKED = "I8"
    BF16 = "BF16"
    F16 = "F16"
    F32 = "F32"
    I64 = "I64"
    I32 = "I32"


# ---- names (model.md §3.5) -------------------------------------------------------------------------

HF_TOP = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "head.weight",
    "output_hc_base.weight": "hc_head_base",
    "output_hc_fn.weight": "hc_head_fn",
    "output_hc_scale.weight": "hc_head_scale",
}
HF_LAYER = {  # GGUF suffix (after blk.N.) -> HF suffix (after layers.N.)
    "hc_attn_base.weight": "hc_attn_base", "hc_attn_fn.weight": "hc_attn_fn", "hc_attn_scale.weight": "hc_attn_scale",
    "hc_ffn_base.weight": "hc_ffn_base", "hc_ffn_fn.weight": "hc_ffn_fn", "hc_ffn_scale.weight": "hc_ffn_scale",
    "attn_sinks.weight": "attn.attn_sink",
    "attn_q_a.weight": "attn.wq_a.weight", "attn_q_b.weight": "attn.wq_b.weight",
    "attn_q_a_norm.weight": "attn.q_norm.weight",
    "attn_kv.weight": "attn.wkv.weight", "attn_kv_a_norm.weight": "attn.kv_norm.weight",
    "attn_output_a.weight": "attn.wo_a.weight", "attn_output_b.weight": "attn.wo_b.weight",
    "attn_compressor_ape.weight": "attn.compressor.ape",
    "attn_compressor_kv.weight": "attn.compressor.wkv.weight",
    "attn_compressor_gate.weight": "attn.compressor.wgate.weight",
    "attn_compressor_norm.weight": "attn.compressor.norm.weight",
    "indexer.attn_q_b.weight": "attn.indexer.wq_b.weight",
    "indexer.proj.weight": "attn.indexer.weights_proj.weight",
    "indexer_compressor_ape.weight": "attn.indexer.compressor.ape",
    "indexer_compressor_kv.weight": "attn.indexer.compressor.wkv.weight",
    "indexer_compressor_gate.weight": "attn.indexer.compressor.wgate.weight",
    "indexer_compressor_norm.weight": "attn.indexer.compressor.norm.weight",
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate_shexp.weight": "ffn.shared_experts.w1.weight",
    "ffn_up_shexp.weight": "ffn.shared_experts.w3.weight",
    "ffn_down_shexp.weight": "ffn.shared_experts.w2.weight",
    "ffn_gate_inp.weight": "ffn.gate.weight",
    "exp_probs_b.bias": "ffn.gate.bias",
    "ffn_gate_tid2eid.weight": "ffn.gate.tid2eid",
}
EXPERT_PARTS = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}


@dataclass(frozen=True)
class HfName:
    """Where a GGUF tensor lives in the checkpoint: one tensor, or one per expert (`expert_prefix`.E.wK)."""

    gguf: str
    hf: str  # the tensor's name; for experts the name of expert 0's weight
    layer: int = -1
    part: Optional[str] = None  # w1/w2/w3 for routed experts

    @property
    def is_expert(self) -> bool:
        return self.part is not None

    def expert_weight(self, e: int) -> str:
        return f"layers.{self.layer}.ffn.experts.{e}.{self.part}{WEIGHT_SUFFIX}"

    def expert_scale(self, e: int) -> str:
        return f"layers.{self.layer}.ffn.experts.{e}.{self.part}{SCALE_SUFFIX}"


def hf_name(gguf_name: str) -> HfName:
    """The checkpoint location of a GGUF tensor name (model.md §3.5); ValueError for unknown names."""
    if gguf_name in HF_TOP:
        return HfName(gguf_name, HF_TOP[gguf_name])
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        layer, suffix = int(parts[1]), parts[2]
        if suffix in EXPERT_PARTS:
            part = EXPERT_PARTS[suffix]
            return HfName(gguf_name, f"layers.{layer}.ffn.experts.0.{part}{WEIGHT_SUFFIX}", layer, part)
        if suffix in HF_LAYER:
            return HfName(gguf_name, f"layers.{layer}.{HF_LAYER[suffix]}", layer)
    raise ValueError(f"no Hugging Face name is known for GGUF tensor {gguf_name!r}")


# ---- config.json -> Config ----------------------------------------------------------------------------

# Config field -> config.json key of the official checkpoint (shapes: required).
_HF_SHAPE_KEYS = {
    "n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_vocab": "vocab_size",
    "n_head": "num_attention_heads", "head_dim": "head_dim", "rope_dim": "qk_rope_head_dim",
    "q_lora_rank": "q_lora_rank", "o_lora_rank": "o_lora_rank", "o_groups": "o_groups",
    "n_expert": "n_routed_experts", "n_expert_used": "num_experts_per_tok", "expert_ff": "moe_intermediate_size",
    "n_shared": "n_shared_experts", "n_hash_layers": "num_hash_layers", "window": "sliding_window",
    "idx_heads": "index_n_heads", "idx_dim": "index_head_dim", "idx_topk": "index_topk", "n_hc": "hc_mult",
}
# Constants (optional keys; default = the engine's hard-wired value).
_HF_CONST_KEYS = {
    "sinkhorn_iters": ("hc_sinkhorn_iters", SINKHORN_ITERS), "hc_eps": ("hc_eps", HC_EPS),
    "rms_eps": ("rms_norm_eps", RMS_EPS), "rope_base": ("rope_theta", 10000.0),
    "compress_rope_base": ("compress_rope_theta", 160000.0),
    "expert_weights_scale": ("routed_scaling_factor", EXPERT_WEIGHTS_SCALE),
    "context_length": ("max_position_embeddings", 1048576),
}
_HF_ROPE_SCALING = {"yarn_factor": ("factor", 16.0), "yarn_orig_ctx": ("original_max_position_embeddings", YARN_ORIG_CTX),
                    "yarn_beta_fast": ("beta_fast", YARN_BETA_FAST), "yarn_beta_slow": ("beta_slow", YARN_BETA_SLOW)}


def config_from_hf(data: dict, where: str = CONFIG_FILE) -> Config:
    """Config from the checkpoint's config.json (keys of the official release); missing shape keys are errors."""
    missing = [k for k in _HF_SHAPE_KEYS.values() if k not in data]
    if missing:
        raise ModelFileError(f"{where}: key {missing[0]!r} is missing" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                             "; the official DeepSeek V4 config.json has it")
    kw = {f: int(data[k]) for f, k in _HF_SHAPE_KEYS.items()}
    for f, (k, default) in _HF_CONST_KEYS.items():
        kw[f] = type(default)(data.get(k, default))
    rs = data.get("rope_scaling") or {}
    for f, (k, default) in _HF_ROPE_SCALING.items():
        kw[f] = type(default)(rs.get(k, default))
    n = kw["n_layer"]
    ratios = data.get("compress_ratios")
    kw["compress_ratios"] = tuple(int(r) for r in ratios[:n]) if ratios else default_ratios(n)
    if len(kw["compress_ratios"]) < n:
        raise ModelFileError(f"{where}: compress_ratios has {len(ratios)} entries, expected {n} (num_hidden_layers)")
    kw["swiglu_clamp"] = (float(data.get("swiglu_limit", SWIGLU_CLAMP)),) * n
    return Config(**kw, name=str(data.get("name") or data.get("model_type") or "deepseek-v4"))


def config_to_hf(cfg: Config) -> dict:
    """The config.json of a checkpoint with config `cfg` (inverse of config_from_hf)."""
    out = {k: getattr(cfg, f) for f, k in _HF_SHAPE_KEYS.items()}
    out.update({k: getattr(cfg, f) for f, (k, _) in _HF_CONST_KEYS.items()})
    out["rope_scaling"] = {k: getattr(cfg, f) for f, (k, _) in _HF_ROPE_SCALING.items()}
    out["rope_scaling"]["type"] = "yarn"
    out["compress_ratios"] = list(cfg.compress_ratios)
    out["swiglu_limit"] = float(cfg.swiglu_clamp[0])
    out["model_type"] = "deepseek_v4"
    out["name"] = cfg.name or "deepseek-v4"
    return out


# ---- encodings ------------------------------------------------------------------------------------------

def _e4m3_table() -> np.ndarray:
    v = np.arange(256)
    e, m = (v >> 3) & 0xF, v & 0x7
    mag = np.where(e == 0, np.ldexp(m.astype(np.float64), -9), np.ldexp(1.0 + m / 8.0, e - 7))
    mag = np.where((v & 0x7F) == 0x7F, 0.0, mag)  # NaN codes read as 0 (ds4)
    return np.where(v & 0x80, -mag, mag).astype(np.float32)


E4M3_TABLE = _e4m3_table()
E2M1_TABLE = np.concatenate([E2M1_VALUES, -E2M1_VALUES]).astype(np.float32)  # by 4-bit code


def e8m0_to_f32(b: np.ndarray, what: str = "scale") -> np.ndarray:
    b = np.asarray(b, dtype=np.uint8)
    if (b == E8M0_NAN).any():
        raise ModelFileError(f"{what}: E8M0 scale byte 255 (NaN) in the checkpoint")
    return np.ldexp(np.float32(1.0), b.astype(np.int32) - E8M0_BIAS).astype(np.float32)


def dequant_fp8(w: np.ndarray, scale: np.ndarray, what: str = "") -> np.ndarray:
    """F8_E4M3 bytes [out, in] and E8M0 block scales [ceil(out/128), ceil(in/128)] -> float32 [out, in]."""
    out, inn = w.shape
    want = (math.ceil(out / FP8_BLOCK), math.ceil(inn / FP8_BLOCK))
    if tuple(scale.shape) != want:
        raise ModelFileError(f"{what}: FP8 scale has shape {list(scale.shape)}, expected {list(want)} "
                             f"(one per {FP8_BLOCK}x{FP8_BLOCK} block of {[out, inn]})")
    s = e8m0_to_f32(scale, what)
    s = np.repeat(np.repeat(s, FP8_BLOCK, 0)[:out], FP8_BLOCK, 1)[:, :inn]
    return E4M3_TABLE[w.view(np.uint8)] * s


def dequant_fp4(packed: np.ndarray, scale: np.ndarray, what: str = "") -> np.ndarray:
    """I8 [out, in/2] (low nibble = even element) and E8M0 [out, in/32] -> float32 [out, in]."""
    out, half = packed.shape
    inn = 2 * half
    if inn % FP4_GROUP or tuple(scale.shape) != (out, inn // FP4_GROUP):
        raise ModelFileError(f"{what}: FP4 scale has shape {list(scale.shape)}, expected {[out, inn // FP4_GROUP]} "
                             f"(one per {FP4_GROUP} of {inn} inputs)")
    b = packed.view(np.uint8)
    codes = np.empty((out, inn), np.uint8)
    codes[:, 0::2] = b & 0xF
    codes[:, 1::2] = b >> 4
    v = E2M1_TABLE[codes].reshape(out, -1, FP4_GROUP)
    return (v * e8m0_to_f32(scale, what)[:, :, None]).reshape(out, inn)


def _pow2_scale_bytes(amax: np.ndarray, vmax: float) -> np.ndarray:
    """Smallest power of two s with amax / s <= vmax, as an E8M0 byte (all-zero blocks get 2^-127)."""
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(np.maximum(amax, 1e-38) / vmax))
    return np.clip(e + E8M0_BIAS, 0, E8M0_NAN - 1).astype(np.uint8)


def encode_fp8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (E4M3 bytes [out, in], E8M0 scales [ceil(out/128), ceil(in/128)]), RNE."""
    import torch

    out, inn = x.shape
    ro, ri = math.ceil(out / FP8_BLOCK), math.ceil(inn / FP8_BLOCK)
    pad = np.zeros((ro * FP8_BLOCK, ri * FP8_BLOCK), np.float32)
    pad[:out, :inn] = x
    blocks = pad.reshape(ro, FP8_BLOCK, ri, FP8_BLOCK)
    sb = _pow2_scale_bytes(np.abs(blocks).max(axis=(1, 3)), FP8_MAX)
    s = e8m0_to_f32(sb)
    q = (blocks / s[:, None, :, None]).reshape(pad.shape)[:out, :inn]
    w = torch.from_numpy(np.ascontiguousarray(q)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return w, sb


def encode_fp4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (packed int8 [out, in/2], E8M0 [out, in/32]); nearest E2M1, ties to the even code."""
    out, inn = x.shape
    g = x.reshape(out, -1, FP4_GROUP).astype(np.float32)
    sb = _pow2_scale_bytes(np.abs(g).max(-1), FP4_MAX)
    v = np.clip(g / e8m0_to_f32(sb)[:, :, None], -FP4_MAX, FP4_MAX)
    a = np.abs(v)[..., None]
    d = np.abs(a - E2M1_VALUES)
    # ties: prefer the even magnitude index (E2M1's even mantissa), i.e. the lower of two equidistant codes
    # when that one is even; argmin picks the first (lower) on exact ties, fix up the odd ones
    idx = np.argmin(d, -1)
    tie = (idx % 2 == 1) & (idx + 1 < len(E2M1_VALUES))
    tie &= np.take_along_axis(d, np.minimum(idx + 1, len(E2M1_VALUES) - 1)[..., None], -1)[..., 0] == \
        np.take_along_axis(d, idx[..., None], -1)[..., 0]
    idx = np.where(tie, idx + 1, idx)
    codes = (idx | np.where(v < 0, E2M1_SIGN, 0)).astype(np.uint8).reshape(out, inn)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed.view(np.int8), sb


# ---- reading a checkpoint -------------------------------------------------------------------------------

class SafetensorsDir:
    """Tensors of a safetensors checkpoint directory (sharded with an index, or *.safetensors), memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFileError(f"{self.path}: not a directory; give the Hugging Face checkpoint folder "
                                 "(config.json + *.safetensors)")
        idx = self.path / INDEX_FILE
        self.where: dict[str, Path] = {}
        if idx.is_file():
            try:
                wm = json.loads(idx.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelFileError(f"{idx}: unreadable index ({e})") from None
            self.where = {k: self.path / v for k, v in wm.items()}
        else:
            from safetensors import safe_open

            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise ModelFileError(f"{self.path}: no *.safetensors files")
            for f in files:
                with safe_open(str(f), "pt") as h:
                    self.where.update({k: f for k in h.keys()})
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _handle(self, name: str):
        from safetensors import safe_open

        f = self.where[name]
        if f not in self._open:
            if not f.is_file():
                raise ModelFileError(f"{f}: shard named by {INDEX_FILE} is missing")
            self._open[f] = safe_open(str(f), "pt")
        return self._open[f]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        sl = self._handle(name).get_slice(name)
        return sl.get_dtype(), tuple(int(s) for s in sl.get_shape())

    def read(self, name: str) -> np.ndarray:
        """The tensor as numpy: float8/E8M0 as raw uint8, BF16 widened to float32, others as stored."""
        import torch

        t = self._handle(name).get_tensor(name)
        if t.dtype == torch.bfloat16:
            return t.float().numpy()
        if t.dtype.itemsize == 1 and t.dtype not in (torch.int8, torch.uint8):
            return t.view(torch.uint8).numpy()
        return t.numpy()


class HfCheckpoint:
    """A DeepSeek V4 checkpoint folder in the official layout, read as float32 under GGUF names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / CONFIG_FILE
        if not cfg_path.is_file():
            raise ModelFileError(f"{self.path}: no {CONFIG_FILE}; a Hugging Face checkpoint folder needs it")
        try:
            data = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ModelFileError(f"{cfg_path}: not valid JSON ({e})") from None
        self.config = config_from_hf(data, str(cfg_path))
        self.st = SafetensorsDir(self.path)

    def has(self, gguf_name: str) -> bool:
        h = hf_name(gguf_name)
        return h.hf in self.st

    def missing(self, gguf_name: str) -> list[str]:
        """HF tensors that `gguf_name` needs but the checkpoint lacks (weights and FP8/FP4 scales)."""
        h = hf_name(gguf_name)
        if h.is_expert:
            need = [n for e in range(self.config.n_expert) for n in (h.expert_weight(e), h.expert_scale(e))]
        else:
            need = [h.hf]
            if h.hf in self.st and self.st.info(h.hf)[0] == HfDtype.FP8:
                need.append(_scale_name(h.hf))
        return [n for n in need if n not in self.st]

    def _decode(self, name: str, what: str) -> np.ndarray:
        dtype, _ = self.st.info(name)
        if dtype in (HfDtype.FP8, HfDtype.FP4_PACKED):
            scale = self.st.read(_scale_name(name))
            raw = self.st.read(name)
            return dequant_fp8(raw, scale, what) if dtype == HfDtype.FP8 else dequant_fp4(raw, scale, what)
        if dtype in (HfDtype.I64, HfDtype.I32):
            v = self.st.read(name)
            if v.size and (v.min() < np.iinfo(np.int32).min or v.max() > np.iinfo(np.int32).max):
                raise ModelFileError(f"{what}: integer values out of the I32 range")
            return v.astype(np.int32)
        if dtype in (HfDtype.BF16, HfDtype.F16, HfDtype.F32):
            return np.asarray(self.st.read(name), dtype=np.float32)
        raise ModelFileError(f"{what}: unsupported checkpoint dtype {dtype}")

    def tensor(self, gguf_name: str) -> np.ndarray:
        """A non-expert tensor as float32 (int32 for the hash table) in its logical shape."""
        h = hf_name(gguf_name)
        assert not h.is_expert, "use expert() for routed experts"
        return self._decode(h.hf, f"{self.path}: {h.hf} (for {gguf_name})")

    def expert(self, gguf_name: str, e: int) -> np.ndarray:
        """Routed expert e of a stacked [E, out, in] GGUF tensor, as float32 [out, in]."""
        h = hf_name(gguf_name)
        return self._decode(h.expert_weight(e), f"{self.path}: {h.expert_weight(e)} (for {gguf_name}[{e}])")

    def shape(self, gguf_name: str) -> tuple[int, ...]:
        """Logical shape of a GGUF tensor as the checkpoint stores it (experts stacked)."""
        h = hf_name(gguf_name)
        dtype, shape = self.st.info(h.hf)
        if dtype == HfDtype.FP4_PACKED:
            shape = (*shape[:-1], 2 * shape[-1])
        return (self.config.n_expert, *shape) if h.is_expert else shape


def _scale_name(weight_name: str) -> str:
    base = weight_name[: -len(WEIGHT_SUFFIX)] if weight_name.endswith(WEIGHT_SUFFIX) else weight_name
    return base + SCALE_SUFFIX


# ---- writing a synthetic checkpoint ---------------------------------------------------------------------

def _hf_encoding(fmt, ndim: int) -> str:
    """How the official release stores a tensor that the published GGUFs keep as QuantFormat `fmt`."""
    from .formats import QuantFormat

    if fmt == QuantFormat.I32:
        return HfDtype.I64
    if ndim == 1 or fmt == QuantFormat.F32:
        return HfDtype.F32
    if fmt == QuantFormat.Q8_0:
        return HfDtype.FP8
    if fmt in (QuantFormat.IQ2_XXS, QuantFormat.Q2_K, QuantFormat.Q4_K):
        return HfDtype.FP4_PACKED
    return HfDtype.BF16


def iter_hf_tensors(cfg: Config, seed: int = 0) -> Iterator[tuple[str, np.ndarray, str]]:
    """(HF name, float or int values, target HF dtype) of a random checkpoint with config `cfg`, in file order.

    Values come from dsv4.synth's generators (norm gains ~1, HC scales, sinks, ...) for float tensors and
    N(0, 1/in) for the matrices the GGUFs quantize, so activations stay of order 1."""
    from ..synth import inventory, tensor_data

    for i, slot in enumerate(inventory(cfg, "q2")):
        h = hf_name(slot.name)
        enc = _hf_encoding(slot.fmt, len(slot.shape))
        rng = np.random.default_rng([seed, i])
        if slot.fmt.is_quantized:
            std = np.float32(1.0 / math.sqrt(slot.shape[-1]))
            if h.is_expert:
                for e in range(slot.shape[0]):
                    yield h.expert_weight(e), rng.standard_normal(slot.shape[1:], dtype=np.float32) * std, enc
            else:
                yield h.hf, rng.standard_normal(slot.shape, dtype=np.float32) * std, enc
        else:
            yield h.hf, np.asarray(tensor_data(slot, cfg, seed, i)), enc


def write_hf_checkpoint(path: str | Path, cfg: Config, seed: int = 0, shards: int = 2,
                        drop: tuple[str, ...] = ()) -> Path:
    """Write a random checkpoint in the official layout (config.json, sharded safetensors + index).

    FP8 (128x128 E8M0 blocks) for the dense projections the GGUFs keep as Q8_0, packed FP4 with E8M0 per
    32 for routed experts, F32 vectors, BF16 other matrices, I64 hash tables. `drop`: HF names to leave
    out (tests of missing tensors). Holds one shard's tensors in memory at a time."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config_to_hf(cfg), indent=1))
    items = list(_names_in_order(cfg))
    per = max(1, math.ceil(len(items) / shards))
    weight_map: dict[str, str] = {}
    gen = iter_hf_tensors(cfg, seed)
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for _ in range(per):
            try:
                name, x, enc = next(gen)
            except StopIteration:
                break
            if name in drop:
                continue
            if enc == HfDtype.FP8:
                w, s = encode_fp8(x)
                tensors[name] = torch.from_numpy(w).view(torch.float8_e4m3fn)
                tensors[_scale_name(name)] = torch.from_numpy(s).view(torch.float8_e8m0fnu)
            elif enc == HfDtype.FP4_PACKED:
                w, s = encode_fp4(x)
                tensors[name] = torch.from_numpy(w)
                tensors[_scale_name(name)] = torch.from_numpy(s).view(torch.float8_e8m0fnu)
            elif enc == HfDtype.I64:
                tensors[name] = torch.from_numpy(x.astype(np.int64))
            elif enc == HfDtype.BF16:
                tensors[name] = torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16)
            else:
                tensors[name] = torch.from_numpy(np.asarray(x, np.float32))
        if not tensors:
            continue
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return path


def _names_in_order(cfg: Config) -> Iterator[str]:
    from ..synth import inventory

    for slot in inventory(cfg, "q2"):
        h = hf_name(slot.name)
        if h.is_expert:
            yield from (h.expert_weight(e) for e in range(slot.shape[0]))
        else:
            yield h.hf
