"""The ROCm path, compiled for AMD targets on the CPU (no AMD GPU here).

The default variants (also the ds4-exact int8 MoE decode and the opt-in fp8 prefill GEMM) run in the interpreter
with an AMD DeviceInfo, so every launch carries the tiles dsv4.kernels_hip picks for that architecture; each distinct
launch (kernel, constexprs, argument types, warps, stages) is recorded and then compiled through Triton's AMD
backend, in a subprocess without the interpreter, for CDNA3 (gfx942, wave64) and RDNA 3.5 (gfx1151, wave32). This
catches what only a ROCm build would: NVIDIA-only inline assembly on the AMD path, layouts a wave64 target rejects,
dot shapes or dtypes its matrix cores do not take. It says nothing about speed or numerics on AMD hardware, which
stay unverified.
"""
from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language as tl  # noqa: E402

from dsv4.kernels_triton import registry  # noqa: E402
from dsv4.kernels_triton.configs import DeviceInfo, Vendor  # noqa: E402
from dsv4.kernels_triton.registry import AUTO, KernelOp  # noqa: E402
from dsv4.quant.formats import QuantFormat  # noqa: E402
from tests.kernels.offline_compile import run_compile_script  # noqa: E402
from tests.kernels.test_triton_moe import CLAMP, make_problem  # noqa: E402
from tests.kernels.test_triton_qmatmul import make_weight, make_x  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches through the interpreter (CPU runs)")

Q = QuantFormat
AMD_DEVICES = {"gfx942": DeviceInfo(Vendor.AMD, "gfx942", n_sm=304, wave=64),  # MI300X
               "gfx1151": DeviceInfo(Vendor.AMD, "gfx1151", n_sm=40, wave=32)}  # Strix Halo
ROW_K = {Q.Q8_0: 256, Q.Q2_K: 512, Q.Q4_K: 512, Q.IQ2_XXS: 512}  # a few blocks per row
TOKENS = (1, 37)  # decode GEMV and prefill GEMM
MOE_TOKENS = (1, 9)  # decode and the grouped prefill
MOE_DS4_EXACT = ("int8", "int8_limb3")  # moe_int8 on ROCm runs its plain-Triton dp4a emulation
LAUNCH_OPTIONS = ("num_warps", "num_stages")
_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8",
       torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
       torch.float8_e4m3fn: "fp8e4nv", torch.float8_e4m3fnuz: "fp8e4b8"}


def _launch_record(fn, arg_names, args, kwargs) -> str:
    """JSON of one launch: module, kernel name, signature, constexpr values, launch options."""
    params = inspect.signature(fn).parameters
    bound = dict(zip(arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    sig, const = {}, {}
    for name, p in params.items():
        v = bound.get(name, p.default)
        if "constexpr" in str(p.annotation) or v is None:
            v = v.value if isinstance(v, tl.constexpr) else v
            const[name] = {"tl_dtype": v.name} if isinstance(v, tl.dtype) else v
            sig[name] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TT[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    opts = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    return json.dumps([fn.__module__, fn.__name__, sig, const, opts], sort_keys=True)


def _record_amd_launches(dev: DeviceInfo, monkeypatch) -> list:
    """Every distinct launch of the ROCm defaults at small shapes on `dev` (run in the interpreter)."""
    from triton.runtime import interpreter

    seen = {}
    run = interpreter.InterpretedFunction.run
    record_only = []  # non-empty: record the launch without interpreting it

    def recording_run(self, *args, grid, warmup, **kwargs):
        seen[_launch_record(self.fn, self.arg_names, args, kwargs)] = None
        return None if record_only else run(self, *args, grid=grid, warmup=warmup, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(interpreter.InterpretedFunction, "run", recording_run)
        auto = registry.get(KernelOp.QMATMUL, AUTO)
        for fmt, k in ROW_K.items():
            dw, _ = make_weight(fmt, (48, k), seed=k)
            for t in TOKENS:
                auto.fn(make_x(t, k), dw, dev, 1)
        dw, _ = make_weight(Q.Q8_0, (48, 256), seed=3)
        auto.fn(make_x(1, 256, 2), dw, dev, 2)  # grouped (attn_output_a's form)
        # CDNA3: e4m3fnuz dots, which the interpreters of Triton 3.6 and 3.7 cannot run (nothing here reads the result)
        record_only.append(True)
        registry.get(KernelOp.QMATMUL, "gemm_fp8").fn(make_x(TOKENS[-1], 256), dw, dev, 1)
        record_only.clear()
        for recipe in ("q2", "q4"):
            for t in MOE_TOKENS:
                (gate, up, down, u, sel, wts), _ = make_problem(recipe, 4, 256, 256, t, 2, seed=t)
                registry.get(KernelOp.MOE, AUTO).fn(u, gate, up, down, sel, wts, CLAMP, dev)
                if t == 1:
                    for name in MOE_DS4_EXACT:
                        registry.get(KernelOp.MOE, name).fn(u, gate, up, down, sel, wts, CLAMP, dev)
    return [json.loads(s) for s in seen]


_COMPILE_FOR_AMD = r"""
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

arch, wave, launches = json.loads(sys.stdin.read())
out = []
for module, name, sig, const, opts in launches:
    fn = getattr(importlib.import_module(module), name)
    cx = {(fn.arg_names.index(k),): tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v for k, v in const.items()}
    try:
        k = triton.compile(ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=cx),
                           target=GPUTarget("hip", arch, wave), options=opts)
        out.append([name, len(k.asm["hsaco"]), ""])
    except Exception as e:  # reported by the test with the kernel's name
        out.append([name, 0, (type(e).__name__ + ": " + str(e))[-1500:]])
print("RESULT" + json.dumps(out))
"""


def _amd_backend_available() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "amd" in backends


@pytest.mark.skipif(not _amd_backend_available(), reason="this Triton build has no AMD backend")
@pytest.mark.parametrize("arch", sorted(AMD_DEVICES))
def test_rocm_launches_compile_for_amd(arch, monkeypatch):
    dev = AMD_DEVICES[arch]
    launches = _record_amd_launches(dev, monkeypatch)
    names = {rec[1] for rec in launches}
    # the families the ROCm defaults run: decode GEMVs, the prefill GEMM, the float MoE decode, the grouped MoE
    # prefill with its device-side sort, and the int8 MoE (ds4-exact mode) on its dp4a emulation
    assert {"_qgemv_kernel", "_q8_0_gemv_blocked_kernel", "_qgemm_kernel", "_moe_gate_up_blockdot_kernel",
            "_moe_down_blockdot_kernel", "_gate_up_kernel", "_down_kernel", "_expert_rows_kernel",
            "_q8k_quant_kernel", "_gate_up_int8_kernel", "_down_int8_kernel"} <= names, sorted(names)
    # the ROCm tables reach the launches: a decode GEMV block keeps CUDA's 128 threads in wavefronts of this arch
    gemv_warps = {rec[4]["num_warps"] for rec in launches if rec[1] == "_qgemv_kernel"}
    assert gemv_warps == {128 // dev.wave}, gemv_warps
    # the fp8 GEMM where the arch has fp8 dots (gfx942: CDNA3's e4m3fnuz), the fp16 one where it has none
    dots = {rec[3]["DOT"]["tl_dtype"] for rec in launches if rec[1] == "_qgemm_kernel"}
    assert dots == ({"fp16", "fp8e4b8"} if arch == "gfx942" else {"fp16"}), dots

    results = run_compile_script(_COMPILE_FOR_AMD, stdin=json.dumps([arch, dev.wave, launches]), timeout=900)
    assert len(results) == len(launches)
    failed = [f"{name}: {err}" for name, size, err in results if err or size == 0]
    assert not failed, f"{len(failed)} of {len(results)} launches do not compile for {arch}:\n" + "\n".join(failed)
