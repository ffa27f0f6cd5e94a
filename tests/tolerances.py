"""The one tolerance table of the test suite: (op, dtype/format) -> (atol, rtol, reason).

Every numeric comparison in tests/ takes its tolerance from here; each row says why the bound is
what it is. Add rows; never widen one to make a failing test pass without a new reason.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    reason: str


TOLERANCES: dict[tuple[str, str], Tol] = {
    ("dequant", "all"): Tol(0.0, 0.0, "dequantization is exact arithmetic on the same bits: bit-exact"),
    ("softmax", "float64"): Tol(1e-14, 1e-12, "sampler probabilities vs a hand softmax, both float64 on <= 1000 "
                            "values: only summation-order rounding differs"),
    ("log_softmax", "float64"): Tol(1e-13, 1e-12, "top_logprobs (float64 logsumexp) vs torch.log_softmax in "
                                "float64: summation-order rounding only"),
    # ---- synthetic model files (helper H2) ----
    ("synth_scale", "rms"): Tol(0.0, 0.2, "random synthetic weights are scaled so RMS(W x) = 1 for x ~ N(0,1); one "
                                          "random product over >= 128 outputs has ~6% sampling noise, plus f16 "
                                          "rounding of the block scales"),
    # ---- MLX backend (helper H6) ----
    ("mlx_qmatmul", "fp32"): Tol(2e-4, 1e-5, "exactly decoded weights, fp32 accumulation of <= 1024 products of "
                                             "O(1) terms vs a float64 reference: ~sqrt(n)*2^-24*sum|x w| << 2e-4"),
    ("mlx_hc", "fp32"): Tol(1e-6, 1e-5, "HC Sinkhorn/sum/post: ~60 fp32 divisions and exps of O(1) values vs "
                                        "float64; each step adds ~1 ulp relative"),
    ("mlx_ops", "fp32"): Tol(5e-5, 1e-5, "MlxOps vs TorchOps on the same fp32 inputs: different reduction orders "
                                         "and libm (exp, rsqrt, cos) give a few ulp per element"),
    ("mlx_model", "logits"): Tol(5e-3, 1e-3, "tiny model end to end in fp32: op-level ulp differences flip FP8/FP4/"
                                             "F16 roundings of cached KV rows (steps up to 1/8 relative), damped by "
                                             "attention and the norms; measured <= 1e-3 on |logits| ~ 6"),
    ("mlx_metal", "twin"): Tol(1e-4, 1e-5, "Metal kernel vs its MLX twin: same decoded weights, fp32 sums in a "
                                           "different order (simd_sum over lanes)"),
    # ---- Triton backend (helper H5); kernel outputs are divided by max |reference| of the call ----
    ("triton_gemv", "fp32"): Tol(1e-5, 0.0, "exactly decoded weights, fp32 FMA accumulation of <= 8192 products vs "
                                            "float64: error ~K*2^-24 of the largest output (<= 5e-4 only if K=8192 "
                                            "and all terms align; random signs measured ~1e-7)"),
    ("triton_gemm", "fp16dot"): Tol(3e-3, 0.0, "weights and activations rounded to fp16 (2^-11 relative each) "
                                               "before tl.dot with fp32 accumulation; random rounding errors over "
                                               "K terms grow ~sqrt(K)*2^-11 of a typical output; measured <= 8e-4"),
    ("triton_moe", "decode"): Tol(2e-5, 0.0, "two fp32 GEMV stages (gate/up, down) on exactly decoded weights with "
                                             "an fp32 SwiGLU between; measured ~2e-7 of the largest output"),
    ("triton_moe", "grouped"): Tol(5e-3, 0.0, "two fp16 tl.dot stages (u and h rounded to fp16, weights rounded to "
                                              "fp16) with fp32 accumulation; measured <= 1e-3 of the largest output"),
    ("triton_model", "logits"): Tol(2e-2, 0.0, "tiny model, TritonOps vs TorchOps: fp16-dot prefill GEMMs (2^-11 "
                                               "relative per operand) pass through 6 layers, FP8/FP4 KV roundings "
                                               "and norms; logits divided by max |reference logit|"),
    # ---- CLI (helper H8) ----
    ("dump_logprobs", "float64"): Tol(1e-12, 0.0, "within one --dump-logprobs step, logit - logprob gives back the "
                                              "step's float64 logsumexp; one float64 subtraction of O(10) values "
                                              "after a JSON round trip (exact repr) rounds at ~2e-15"),
}


def tol(op: str, kind: str) -> Tol:
    return TOLERANCES[(op, kind)]


def assert_close(actual, expected, op: str, kind: str, what: str = "") -> None:
    """Compare with the table's tolerance; the failure message names count, worst index, max-abs and rel error."""
    import numpy as np

    t = tol(op, kind)
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = np.abs(a - e)
    bound = t.atol + t.rtol * np.abs(e)
    bad = ~(err <= bound)
    if bad.any():
        i = int(np.argmax(np.where(bad, err - bound, -np.inf)))
        idx = np.unravel_index(i, a.shape)
        rel = float(err.flat[i] / max(abs(e.flat[i]), 1e-30))
        raise AssertionError(
            f"{what} ({op}, {kind}): {int(bad.sum())}/{bad.size} elements out of tolerance "
            f"atol={t.atol} rtol={t.rtol}; worst at {idx}: got {a.flat[i]!r} expected {e.flat[i]!r} "
            f"(abs {err.flat[i]:.3e}, rel {rel:.3e}); max abs err {err.max():.3e}. Reason for bound: {t.reason}"
        )
