"""Triton backend (CUDA and ROCm): `TritonOps` plus the kernel families it runs.

qmatmul.py (dequant GEMV/GEMM), qmatmul_fast.py / q8_gemv.py (the Q8_0 decode GEMVs and prefill GEMMs),
q8_int8.py (Q8_0 decode on dp4a with Q8_0 activations: the ds4-exact mode), moe.py / moe_fast.py (fused routed
MoE decode, float), moe_int8.py (MoE decode on dp4a with Q8_K activations; its Q4_K stages on sm_90+ in Gluon:
moe_int8_gluon.py), moe_prefill.py (grouped MoE prefill; its IQ2_XXS gate/up on sm_90+ in Gluon: moe_gluon.py),
q8_gluon.py (the Q8_0 one-token GEMV in Gluon),
blocks.py (in-kernel block decoders and device layouts), configs.py (tile tables), registry.py (named variants,
`use(...)` overrides).
ROCm tables are in dsv4.kernels_hip. On CPU the kernels run under TRITON_INTERPRET=1 (tests only).
"""
from dsv4 import settings

settings.pin_triton_knobs()  # before any kernel compiles (Triton reads its knobs at compile time)

from . import moe, qmatmul  # noqa: F401,E402 - registers the kernel variants
from . import moe_fast  # noqa: F401,E402 - fused_dot* MoE decode variants
from . import moe_prefill  # noqa: F401,E402 - grouped_v2* MoE prefill variants
from . import moe_int8  # noqa: F401,E402 - int8* MoE decode variants (dp4a, Q8_K activations)
from .registry import KernelOp, register, use, variants

__all__ = ["TritonOps", "KernelOp", "register", "use", "variants"]


def __getattr__(name):
    if name == "TritonOps":
        from .ops import TritonOps

        return TritonOps
    raise AttributeError(name)
from . import qmatmul_fast  # noqa: E402,F401 - registers gemv_persist, gemm_hybrid
from . import q8_gemv  # noqa: E402,F401 - registers gemv_rows*, gemm_f16w*
from . import q8_int8  # noqa: E402,F401 - registers q8_int8 (Q8_0 activations, dp4a; the ds4-exact mode's decode)
from . import q8_gluon  # noqa: E402,F401 - registers gemv_gluon (Q8_0 one-token GEMV in Gluon, sm_90+)
