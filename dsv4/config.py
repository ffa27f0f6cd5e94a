"""Model configuration: every shape and constant of DeepSeek V4 Flash (model.md §1-2).

`Config` is a frozen dataclass. `Config.from_gguf()` builds one from the `deepseek4.*` metadata
(strict: a missing or mistyped key is an error naming the key, expected and found values);
`flash()` and `tiny()` are the presets. Knows nothing about tensors.
"""
from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

# Constants hard-wired in the engine (model.md §1); the GGUF is validated against them.
RMS_EPS = 1e-6
HC_EPS = 1e-6
SWIGLU_CLAMP = 10.0
ROUTER_WEIGHT_FLOOR = 6.103515625e-5  # 2**-14
EXPERT_WEIGHTS_SCALE = 1.5
NEG_SENTINEL = -1e30
SINKHORN_ITERS = 20
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
YARN_ORIG_CTX = 65536
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 7.052966104933725e-38
FP8_BLOCK = 64
FP4_BLOCK = 32


class LayerKind(enum.IntEnum):
    """Attention class of a layer, by its compress ratio."""

    RAW = 0  # raw window only (layers 0, 1)
    RATIO4 = 4  # compressed KV + indexer
    RATIO128 = 128  # compressed KV only


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int  # D
    n_vocab: int  # V
    n_head: int  # H
    head_dim: int  # Dh (= key_length = value_length)
    rope_dim: int  # R (last R dims of a head are rotated)
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    n_expert: int  # E
    n_expert_used: int  # K
    expert_ff: int  # F
    n_shared: int
    n_hash_layers: int
    window: int  # W
    idx_heads: int
    idx_dim: int
    idx_topk: int
    n_hc: int  # S
    sinkhorn_iters: int
    compress_ratios: tuple[int, ...]
    swiglu_clamp: tuple[float, ...]
    hc_eps: float = HC_EPS
    rms_eps: float = RMS_EPS
    rope_base: float = 10000.0
    compress_rope_base: float = 160000.0
    yarn_factor: float = 16.0
    yarn_beta_fast: float = YARN_BETA_FAST
    yarn_beta_slow: float = YARN_BETA_SLOW
    yarn_orig_ctx: int = YARN_ORIG_CTX
    expert_weights_scale: float = EXPERT_WEIGHTS_SCALE
    expert_weights_norm: bool = True
    context_length: int = 1048576
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def n_head_kv(self) -> int:
        return 1

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    def ratio(self, layer: int) -> int:
        return int(self.compress_ratios[layer])

    def kind(self, layer: int) -> LayerKind:
        return LayerKind(self.ratio(layer))

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def compressor_width(self, layer: int) -> int:
        """Wc: projection width of the attention compressor (two halves for ratio 4)."""
        r = self.ratio(layer)
        return 2 * self.head_dim if r == 4 else self.head_dim

    def fingerprint(self) -> str:
        """Stable hash of every semantic field: snapshots and caches from another model are refused."""
        d = asdict(self)
        d.pop("extra", None)
        d.pop("name", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:32]

    def with_layers(self, n: int) -> "Config":
        return replace(self, n_layer=n, compress_ratios=self.compress_ratios[:n], swiglu_clamp=self.swiglu_clamp[:n])

    @staticmethod
    def from_gguf(reader, path: str = "") -> "Config":
        from .weights import config_from_reader  # binding/validation lives with the GGUF code

        return config_from_reader(reader, path)


def default_ratios(n_layer: int) -> tuple[int, ...]:
    return tuple(0 if l < 2 else (4 if l % 2 == 0 else 128) for l in range(n_layer))


def flash(n_layer: int = 43) -> Config:
    """DeepSeek V4 Flash as published (optionally with fewer layers, for speed work)."""
    return Config(
        n_layer=n_layer, n_embd=4096, n_vocab=129280, n_head=64, head_dim=512, rope_dim=64,
        q_lora_rank=1024, o_lora_rank=1024, o_groups=8, n_expert=256, n_expert_used=6, expert_ff=2048,
        n_shared=1, n_hash_layers=3, window=128, idx_heads=64, idx_dim=128, idx_topk=512, n_hc=4,
        sinkhorn_iters=SINKHORN_ITERS, compress_ratios=default_ratios(n_layer),
        swiglu_clamp=(SWIGLU_CLAMP,) * n_layer, name="deepseek-v4-flash",
    )


def tiny(n_layer: int = 6) -> Config:
    """Test/demo preset of design.md §4: every layer class, real vocabulary, small widths."""
    return Config(
        n_layer=n_layer, n_embd=256, n_vocab=129280, n_head=4, head_dim=128, rope_dim=64,
        q_lora_rank=128, o_lora_rank=64, o_groups=2, n_expert=16, n_expert_used=6, expert_ff=256,
        n_shared=1, n_hash_layers=3, window=128, idx_heads=4, idx_dim=128, idx_topk=32, n_hc=4,
        sinkhorn_iters=SINKHORN_ITERS, compress_ratios=default_ratios(n_layer),
        swiglu_clamp=(SWIGLU_CLAMP,) * n_layer, name="dsv4-tiny",
    )


PRESETS = {"tiny": tiny, "flash": flash}
