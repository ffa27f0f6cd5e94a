"""ROCm config selection (dsv4.kernels_hip.configs) and the CUDA/CPU selection around it, tested on
CPU by passing the vendor and arch explicitly: arch families, wave64-aware thread counts, fp8
flavours, split-K decisions at Flash shapes; and detect_device on a HIP build of torch (faked)."""
from __future__ import annotations

import pytest

from dsv4.kernels_hip import ArchFamily, arch_family, fp8_dtype, hip_gemm, wave_size
from dsv4.kernels_triton.configs import (
    DeviceInfo, DotDtype, Vendor, detect_device, select_gemm, select_gemv, select_moe,
)
from dsv4.quant.formats import QuantFormat

Q = QuantFormat
MI300X = DeviceInfo(Vendor.AMD, "gfx942", n_sm=304, wave=64)
STRIX_HALO = DeviceInfo(Vendor.AMD, "gfx1151", n_sm=40, wave=32)
H200 = DeviceInfo(Vendor.NVIDIA, "sm_90", n_sm=132, wave=32)
CUDA_GEMV_THREADS = 4 * 32  # 4 warps of 32 lanes


@pytest.mark.parametrize("arch,family,wave", [
    ("gfx942:sramecc+:xnack-", ArchFamily.CDNA3, 64), ("gfx942", ArchFamily.CDNA3, 64),
    ("gfx950", ArchFamily.CDNA4, 64), ("gfx1151", ArchFamily.RDNA3, 32), ("gfx1100", ArchFamily.RDNA3, 32),
    ("gfx1201", ArchFamily.RDNA4, 32), ("gfx90a", ArchFamily.OTHER, 64), ("", ArchFamily.OTHER, 64),
])
def test_arch_family_and_wave(arch, family, wave):
    assert arch_family(arch) == family
    assert wave_size(arch) == wave


def test_fp8_flavours():
    assert fp8_dtype("gfx942") == DotDtype.FP8_E4M3_FNUZ
    assert fp8_dtype("gfx950") == DotDtype.FP8_E4M3
    assert fp8_dtype("gfx1151") is None  # RDNA 3.5 WMMA has no fp8
    assert hip_gemm(Q.Q8_0, "gfx942", 2048, use_fp8=True).dot == DotDtype.FP8_E4M3_FNUZ
    assert hip_gemm(Q.Q8_0, "gfx1151", 2048, use_fp8=True).dot == DotDtype.FP16
    assert hip_gemm(Q.Q8_0, "gfx942", 2048).dot == DotDtype.FP16  # fp8 only on request (lossy)


def test_wave64_keeps_cuda_thread_count_on_cdna():
    for fmt in (Q.Q8_0, Q.IQ2_XXS):
        cfg = select_gemv(fmt, 32768, 1024, MI300X)
        assert cfg.num_warps * MI300X.wave == CUDA_GEMV_THREADS
        assert (cfg.block_n * cfg.block_k) % MI300X.wave == 0
        cuda = select_gemv(fmt, 32768, 1024, H200)
        assert cuda.num_warps * H200.wave == CUDA_GEMV_THREADS


def test_rdna_uses_smaller_tiles_than_cdna():
    big = select_gemm(Q.Q8_0, 2048, 4096, 4096, MI300X)
    small = select_gemm(Q.Q8_0, 2048, 4096, 4096, STRIX_HALO)
    assert small.block_m * small.block_n < big.block_m * big.block_n
    assert big.block_m % 64 == 0 and big.block_n % 64 == 0  # MFMA-friendly multiples on CDNA


def test_split_k_only_when_rows_are_few():
    assert select_gemv(Q.Q8_0, 512, 4096, H200).split_k > 1  # attn_kv: 64 row blocks on 132 SMs
    assert select_gemv(Q.Q8_0, 32768, 1024, H200).split_k == 1  # attn_q_b: plenty of rows
    cfg = select_gemv(Q.Q8_0, 512, 4096, H200)
    assert 4096 % (cfg.split_k * cfg.block_k) == 0
    assert select_gemv(Q.Q8_0, 512, 4096, H200, allow_split=False).split_k == 1


def test_block_k_divides_row_length():
    for fmt, k in ((Q.Q8_0, 96), (Q.F16, 80), (Q.Q4_K, 2048), (Q.IQ2_XXS, 4096)):
        for dev in (H200, MI300X, STRIX_HALO):
            assert k % select_gemv(fmt, 100, k, dev).block_k == 0
    m = select_moe(Q.IQ2_XXS, Q.Q2_K, 2048, 4096, H200)
    assert 2048 % m.prefill.block_k == 0 and 4096 % m.decode_gate_up.block_k == 0


def test_cpu_device_is_the_interpreter():
    assert detect_device("cpu").vendor == Vendor.CPU


@pytest.mark.parametrize("hip,props,want", [
    # ROCm builds of torch set torch.version.hip; the arch comes from gcnArchName without its feature suffix
    ("6.2.41133", dict(gcnArchName="gfx942:sramecc+:xnack-", multi_processor_count=304), MI300X),
    ("6.2.41133", dict(gcnArchName="gfx1151", multi_processor_count=40), STRIX_HALO),
    (None, dict(major=9, minor=0, multi_processor_count=132), H200),
])
def test_detect_device_picks_rocm_when_torch_is_a_hip_build(hip, props, want, monkeypatch):
    """The entry to the ROCm tables: a 'cuda' device of a HIP build of torch is an AMD DeviceInfo with the arch's
    wave width (the select_* above then delegate to dsv4.kernels_hip); a CUDA build gives the NVIDIA sm_XY."""
    import types

    import torch

    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(**props))
    assert detect_device("cuda") == want
