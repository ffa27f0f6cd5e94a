"""dsv4.settings.pin_triton_knobs: the Triton knobs the kernels were tuned with are set on import of the Triton
backend unless the user set them, and with them Triton 3.9 compiles our kernels without its FP-fusion deprecation
warning (3.10 turns FP fusion off by default). Subprocesses: the pin acts on os.environ at import."""
from __future__ import annotations

import pytest

from dsv4 import settings
from tests.kernels.offline_compile import require_ptxas, run_compile_script

_SCRIPT = r"""
import json, os, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import dsv4.kernels_triton
    from dsv4.kernels_triton import q8_gemv
    if sys.argv[1] == "compile":  # q8_gemv's split-sum kernel compiled for sm_90 (no GPU needed)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        fn = q8_gemv._sum_splits_kernel
        const = dict(SPLIT=2, BLOCK=128, PDL=False)
        sig = {n: "constexpr" if n in const else ("*fp32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v
                                                                   for n, v in const.items()}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("RESULT" + json.dumps({"knob": os.environ.get("TRITON_DEFAULT_FP_FUSION"),
                             "fusion_warnings": sum("FP_FUSION" in str(w.message) for w in caught)}))
"""


def _run(env_value, mode="import"):
    """The script's result with TRITON_DEFAULT_FP_FUSION unset, or set to env_value by the 'user'."""
    knob = "TRITON_DEFAULT_FP_FUSION"
    return run_compile_script(_SCRIPT, argv=(mode,), env_unset=(knob,),
                              env_extra=None if env_value is None else {knob: env_value})


def test_pinned_values():
    assert settings.TRITON_PINNED == {"TRITON_DEFAULT_FP_FUSION": "1"}


def test_fp_fusion_pinned_on_import():
    assert _run(None)["knob"] == "1"


def test_compile_without_fp_fusion_warning():
    """A kernel compiled for sm_90 after the import raises no FP-fusion warning (Triton 3.9 warns once whenever the
    variable is unset at compile time; earlier Tritons have no such warning)."""
    require_ptxas()
    res = _run(None, "compile")
    assert res["knob"] == "1" and res["fusion_warnings"] == 0, res


@pytest.mark.parametrize("value", ["0", "1"])
def test_user_value_wins(value):
    assert _run(value)["knob"] == value
