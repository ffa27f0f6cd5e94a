"""Tile/warp configurations of the Triton kernels and the device description they are chosen for.

`DeviceInfo` says what the kernels run on (vendor, arch, SM/CU count, wave width); `select_gemv`,
`select_gemm` and `select_moe` return the config for a (format, shape) on that device. CUDA tables
live here; on ROCm (`torch.version.hip` set) the choice is delegated to `dsv4.kernels_hip.configs`.
Knows kernel knobs only: no kernels, no model structure.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Optional

import triton

from ..quant.formats import QuantFormat


class Vendor(enum.Enum):
    NVIDIA = "nvidia"
    AMD = "amd"
    CPU = "cpu"  # the Triton interpreter


class DotDtype(enum.Enum):
    """Element type fed to tl.dot in the prefill GEMM (accumulation is always fp32)."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP8_E4M3 = "fp8e4nv"  # OCP e4m3 (H100+, MI350, RDNA4)
    FP8_E4M3_FNUZ = "fp8e4b8"  # AMD CDNA3 flavour (MI300)
    FP32_IEEE = "fp32"  # no rounding of the operands: accurate, several times slower than fp16


@dataclass(frozen=True)
class DeviceInfo:
    vendor: Vendor
    arch: str = ""  # "sm_90", "gfx942", "gfx1151", ...
    n_sm: int = 132  # SMs (NVIDIA) or CUs (AMD)
    wave: int = 32  # threads per warp / wavefront


@dataclass(frozen=True)
class GemvConfig:
    """Decode GEMV: one program per BLOCK_N output rows (x SPLIT_K slices of the input dim)."""

    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 1
    num_stages: int = 1
    dot_m: int = 0  # > 0: run through the tl.dot kernel with this token tile (qmatmul.gemv_dot)


@dataclass(frozen=True)
class GemmConfig:
    """Prefill GEMM: BLOCK_M tokens x BLOCK_N rows tiles, tl.dot on dequantized tiles."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 2
    dot: DotDtype = DotDtype.FP16


@dataclass(frozen=True)
class MoeConfig:
    """Fused routed MoE: GEMV tiles for decode, GEMM tiles for the grouped prefill."""

    decode_gate_up: GemvConfig
    decode_down: GemvConfig
    prefill: GemmConfig
    down_per_slot: bool = False  # decode down projection: one program per (slot, row block), ordered sum after


# ---- CUDA (Hopper-class) tables --------------------------------------------------------------------
# Larger BLOCK_K for the byte-dense formats (Q8_0, F16) keeps 16-byte loads per thread; the 2-bit
# formats decode more weights per byte, so fewer K per step keeps register pressure sane.
_CUDA_GEMV = {
    QuantFormat.Q8_0: GemvConfig(block_n=8, block_k=512, num_warps=4),
    QuantFormat.F16: GemvConfig(block_n=8, block_k=512, num_warps=4),
    QuantFormat.BF16: GemvConfig(block_n=8, block_k=512, num_warps=4),
    QuantFormat.F32: GemvConfig(block_n=8, block_k=256, num_warps=4),
    QuantFormat.Q4_K: GemvConfig(block_n=8, block_k=256, num_warps=4),
    QuantFormat.Q2_K: GemvConfig(block_n=8, block_k=256, num_warps=4),
    QuantFormat.IQ2_XXS: GemvConfig(block_n=8, block_k=256, num_warps=4),
}
_CUDA_GEMM = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
_CUDA_GEMM_SMALL_M = GemmConfig(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=3)
# Grouped MoE prefill: the K-quant/IQ2 tile decoders gather from several words per weight; pipelining
# those loads (num_stages > 1) multiplies their shared-memory buffers (Q4_K: 352 KiB > 227 KiB on
# H200), so these formats run unpipelined with a smaller N tile.
_CUDA_MOE_PREFILL = GemmConfig(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=2)
_CUDA_MOE_PREFILL_GATHER = GemmConfig(block_m=32, block_n=64, block_k=32, num_warps=4, num_stages=1)
GATHER_FORMATS = (QuantFormat.Q2_K, QuantFormat.Q4_K, QuantFormat.IQ2_XXS)

# Per-shape choices measured on an H200 (tools/tune_kernels.py): (fmt, out rows, in, T) -> config.
# Looked up before the generic tables; `load_tuned` merges a tuning run's JSON over them.
TUNED_GEMV: dict[tuple, GemvConfig] = {}
TUNED_GEMM: dict[tuple, GemmConfig] = {}
TUNED_MOE: dict[tuple, MoeConfig] = {}  # key (gate/up fmt, down fmt, F, D, T)

# Aim for this many programs per SM before splitting K (decode GEMVs with few output rows).
PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 8
CPU_BLOCK_N = 2048  # interpreter tile width (no register limits; wide tiles mean fewer Python-level programs)


TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2])  # (major, minor): codegen differs by it


def detect_device(device) -> DeviceInfo:
    """DeviceInfo of a torch device (CPU -> interpreter)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return DeviceInfo(Vendor.CPU, "interpreter", n_sm=4, wave=32)
    p = torch.cuda.get_device_properties(dev)
    if getattr(torch.version, "hip", None):
        arch = getattr(p, "gcnArchName", "").split(":")[0]
        from ..kernels_hip.configs import wave_size

        return DeviceInfo(Vendor.AMD, arch, p.multi_processor_count, wave_size(arch))
    return DeviceInfo(Vendor.NVIDIA, f"sm_{p.major}{p.minor}", p.multi_processor_count, 32)


def hopper_plus(dev: DeviceInfo, x) -> bool:
    """CUDA tensor x on NVIDIA sm_90 or newer: where griddepcontrol exists and where the PTX hints of the decode
    kernels (gemv_rows' L2 prefetch) were measured."""
    if dev.vendor != Vendor.NVIDIA or not x.is_cuda or not dev.arch.startswith("sm_") or not dev.arch[3:].isdigit():
        return False
    return int(dev.arch[3:]) >= 90


def use_pdl(dev: DeviceInfo, x) -> bool:
    """Programmatic dependent launch (PTX griddepcontrol, launch attribute) for a kernel on tensor x:
    CUDA tensors on NVIDIA sm_90 and newer, unless DSV4_PDL=0. A kernel launched this way may start while
    the previous one finishes; it must read that kernel's outputs only after gdc_wait (inputs of older
    kernels and weights: any time)."""
    from .. import settings

    return hopper_plus(dev, x) and bool(settings.get("DSV4_PDL"))


def pdl_launch(pdl: bool) -> dict:
    """Extra launch keyword for a kernel whose PDL constexpr is `pdl` (empty when off: the interpreter
    and ROCm launchers do not take it)."""
    return {"launch_pdl": True} if pdl else {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n (n > 0)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _split_k(n_rows: int, k: int, cfg: GemvConfig, dev: DeviceInfo, tokens: int = 1) -> int:
    """Split the input dim when there are too few row blocks to fill the machine."""
    programs = -(-n_rows // cfg.block_n) * tokens
    want = dev.n_sm * PROGRAMS_PER_SM
    split = 1
    while programs * split * 2 <= want and split * 2 <= MAX_SPLIT_K and k % (split * 2 * cfg.block_k) == 0:
        split *= 2
    return split


TUNED_ARCHS = ("sm_90",)  # the tables below were measured on an H200; other GPUs use the generic tables
TUNED_FILE = "tuned_h200.json"  # beside this module, loaded at import (tools/tune_kernels.py writes it)
TUNED_DECODE_MAX_T = 8  # decode entries (tuned at T=1) serve T <= this
TUNED_PREFILL_MIN_T = 256  # prefill entries (tuned at T=2048) serve T >= this


def _bucket(tokens: int) -> int:
    """The token count a tuned entry was measured at that serves `tokens` (other counts: no entry)."""
    if tokens <= TUNED_DECODE_MAX_T:
        return 1
    if tokens >= TUNED_PREFILL_MIN_T:
        return 2048
    return -1


def load_tuned(path) -> None:
    """Merge a tools/tune_kernels.py JSON ({"gemv": [[key, cfg], ...], "gemm": ..., "moe": ...}) into the tables."""
    import json

    data = json.loads(open(path).read())
    for key, cfg in data.get("gemv", []):
        TUNED_GEMV[(QuantFormat[key[0]], *key[1:])] = GemvConfig(**cfg)
    for key, cfg in data.get("gemm", []):
        TUNED_GEMM[(QuantFormat[key[0]], *key[1:])] = GemmConfig(**{**cfg, "dot": DotDtype(cfg.get("dot", "fp16"))})
    for key, cfg in data.get("moe", []):
        TUNED_MOE[(QuantFormat[key[0]], QuantFormat[key[1]], *key[2:])] = MoeConfig(
            GemvConfig(**cfg["decode_gate_up"]), GemvConfig(**cfg["decode_down"]),
            GemmConfig(**{**cfg["prefill"], "dot": DotDtype(cfg["prefill"].get("dot", "fp16"))}),
            cfg.get("down_per_slot", False))


def _load_packaged() -> None:
    from pathlib import Path

    path = Path(__file__).with_name(TUNED_FILE)
    if path.exists():
        load_tuned(path)


_load_packaged()


def select_gemv(fmt: QuantFormat, n_rows: int, k: int, dev: DeviceInfo, allow_split: bool = True,
                tokens: int = 1, dot_ok: bool = True) -> GemvConfig:
    """dot_ok=False: the caller is an FMA GEMV kernel; table entries for the tl.dot decode path are skipped."""
    if dev.vendor == Vendor.NVIDIA and dev.arch in TUNED_ARCHS:
        tuned = TUNED_GEMV.get((QuantFormat(fmt), n_rows, k, _bucket(tokens)))
        if tuned is not None and (dot_ok or not tuned.dot_m):
            return tuned if allow_split else replace(tuned, split_k=1)
    if dev.vendor == Vendor.AMD:
        from ..kernels_hip.configs import hip_gemv

        cfg = hip_gemv(fmt, dev.arch)
    else:
        cfg = _CUDA_GEMV.get(QuantFormat(fmt), _CUDA_GEMV[QuantFormat.Q8_0])
    if dev.vendor == Vendor.CPU:  # interpreter: cost is per program, so fewer, wider programs
        cfg = replace(cfg, block_n=CPU_BLOCK_N)
    cfg = replace(cfg, block_n=min(cfg.block_n, _next_pow2(n_rows)), block_k=pow2_divisor(k, cfg.block_k))
    if allow_split:
        cfg = replace(cfg, split_k=_split_k(n_rows, k, cfg, dev))
    return cfg


FP8_MIN_SM = 89  # NVIDIA: fp8 (e4m3) tensor-core dots from Ada / Hopper on


def fp8_dot(dev: DeviceInfo) -> Optional[DotDtype]:
    """The fp8 flavour this device's matrix cores take, or None: AMD per kernels_hip (CDNA3 e4m3fnuz, CDNA4 /
    RDNA4 OCP e4m3, RDNA 3.5 none), NVIDIA e4m3 from sm_89, the interpreter e4m3 (tests)."""
    if dev.vendor == Vendor.AMD:
        from ..kernels_hip.configs import fp8_dtype

        return fp8_dtype(dev.arch)
    if dev.vendor == Vendor.NVIDIA:
        sm = dev.arch[3:] if dev.arch.startswith("sm_") else ""
        return DotDtype.FP8_E4M3 if sm.isdigit() and int(sm) >= FP8_MIN_SM else None
    return DotDtype.FP8_E4M3


def select_gemm(fmt: QuantFormat, tokens: int, n_rows: int, k: int, dev: DeviceInfo, fp8: bool = False) -> GemmConfig:
    """fp8: the device's fp8 dot flavour where it has one (fp8_dot; the tuned fp16 tiles are then not used)."""
    if dev.vendor == Vendor.NVIDIA and dev.arch in TUNED_ARCHS and not fp8:
        tuned = TUNED_GEMM.get((QuantFormat(fmt), n_rows, k, _bucket(tokens)))
        if tuned is not None:
            return tuned
    if dev.vendor == Vendor.AMD:
        from ..kernels_hip.configs import hip_gemm

        cfg = hip_gemm(fmt, dev.arch, tokens, use_fp8=fp8)
    else:
        cfg = _CUDA_GEMM_SMALL_M if tokens <= 64 else _CUDA_GEMM
        if fp8 and (f8 := fp8_dot(dev)) is not None:
            cfg = replace(cfg, dot=f8)
    if dev.vendor == Vendor.CPU:  # interpreter: tl.dot needs >= 16 per dim; small tiles stay cheap
        cfg = replace(cfg, block_m=32, block_n=CPU_BLOCK_N // 2, num_stages=1)
    return replace(cfg, block_n=max(16, min(cfg.block_n, _next_pow2(n_rows))),
                   block_k=max(16, pow2_divisor(k, cfg.block_k)))


def select_moe(fmt_gate_up: QuantFormat, fmt_down: QuantFormat, f: int, d: int, dev: DeviceInfo,
               tokens: int = 1) -> MoeConfig:
    if dev.vendor == Vendor.NVIDIA and dev.arch in TUNED_ARCHS:
        tuned = TUNED_MOE.get((QuantFormat(fmt_gate_up), QuantFormat(fmt_down), f, d, _bucket(tokens)))
        if tuned is not None:
            return tuned
    gu = select_gemv(fmt_gate_up, f, d, dev, allow_split=False)
    dn = select_gemv(fmt_down, d, f, dev, allow_split=False)
    if dev.vendor == Vendor.AMD:
        from ..kernels_hip.configs import hip_gemm

        pf = hip_gemm(fmt_gate_up, dev.arch, 32)
    elif QuantFormat(fmt_gate_up) in GATHER_FORMATS or QuantFormat(fmt_down) in GATHER_FORMATS:
        pf = _CUDA_MOE_PREFILL_GATHER
    else:
        pf = _CUDA_MOE_PREFILL
    if dev.vendor == Vendor.CPU:
        pf = replace(pf, block_m=32, block_n=CPU_BLOCK_N // 2, num_stages=1)
    pf = replace(pf, block_n=max(16, min(pf.block_n, _next_pow2(min(f, d)))), block_k=max(16, min(pow2_divisor(d, pf.block_k), pow2_divisor(f, pf.block_k))))
    return MoeConfig(gu, dn, pf)
