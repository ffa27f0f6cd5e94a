"""TritonOps: the reference backend with its hot ops (qmatmul, qmatmul_grouped, moe) on Triton kernels.

Inherits every other op from `dsv4.reference.TorchOps`. `prepare` uploads each quantized weight once
into its kernel layout (blocks.DeviceWeight, kept in `QTensor.cache`; the QTensor's own bytes stay
as they are, so inherited reference ops still read them). F16/BF16/F32 matrices are uploaded on their
first qmatmul. The kernel variant per op comes from the registry (scoped `use(...)` override, else the
`kernels=` choice at construction, else "auto"). Formats the kernels do not cover (I32) run the
reference op. With `act_quant=True` (ds4-exact mode) Q8_0 matmuls keep that mode's Q8_0 activation rounding:
decode (T <= 8) on the `auto` choice runs q8_int8 (ds4's own int8 scheme; not on ROCm, where its dp4a is
emulated), anything else rounds x first (TorchOps.quant_q8_0) and runs the chosen float kernel; MoE decode runs moe_int8 (Q8_K semantics), MoE
prefill the reference op. Knows nothing of the model's structure.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..quant.formats import QTensor, QuantFormat
from ..reference import TorchOps
from .blocks import SUPPORTED, DeviceWeight, from_qtensor
from .configs import Vendor, detect_device
from .qmatmul import DECODE_MAX_T
from .registry import AUTO, KernelOp, _check_names, get, resolve

# Formats uploaded at prepare time (the large ones; plain float matrices go up on first use).
UPLOAD_AT_PREPARE = (QuantFormat.Q8_0, QuantFormat.Q2_K, QuantFormat.Q4_K, QuantFormat.IQ2_XXS)


class TritonOps(TorchOps):
    """`TritonOps(device='cuda', dtype=torch.float32, kernels={'moe': 'grouped'})`."""

    name = "triton"

    def __init__(self, device="cuda", dtype=torch.float32, kernels: Optional[dict] = None, **kw):
        super().__init__(device=device, dtype=dtype, **kw)
        self.device_info = detect_device(self.device)
        self.kernels = _check_names(kernels or {})

    # ---- plumbing -------------------------------------------------------------------------------
    def prepare(self, w: QTensor) -> QTensor:
        w = super().prepare(w)
        if w.fmt in UPLOAD_AT_PREPARE and len(w.shape) >= 2:
            from_qtensor(w, self.device)
        return w

    def _dw(self, w: QTensor) -> DeviceWeight:
        return from_qtensor(w, self.device)

    def _fast(self, w: QTensor) -> bool:
        return w.fmt in SUPPORTED and len(w.shape) >= 2

    # ---- math -----------------------------------------------------------------------------------
    def _run_qmatmul(self, x, w: QTensor, groups: int):
        v = resolve(KernelOp.QMATMUL, w.fmt, self.kernels)
        dw = self._dw(w)
        T = x.shape[0]
        if self.act_quant and w.fmt == QuantFormat.Q8_0 and not v.act_quant:
            if v.name == AUTO and T <= DECODE_MAX_T and self.device_info.vendor != Vendor.AMD:
                v = get(KernelOp.QMATMUL, "q8_int8")  # ds4's scheme: quantized x, integer dots (PTX dp4a)
            else:  # the mode's semantics on a float kernel: round x to Q8_0 first
                x = self.quant_q8_0(x)
        if v.max_t is None or T <= v.max_t:
            y = v.fn(x, dw, self.device_info, groups)
        else:  # a decode-only variant forced onto a long input: run it in decode-sized chunks
            y = torch.cat([v.fn(x[s:s + v.max_t], dw, self.device_info, groups) for s in range(0, T, v.max_t)])
        return y.to(self.dtype)

    def qmatmul(self, x, w: QTensor):
        if not self._fast(w):
            return super().qmatmul(x, w)
        lead = x.shape[:-1]
        y = self._run_qmatmul(x.reshape(-1, x.shape[-1]), w, 1)
        return y.reshape(*lead, y.shape[-1])

    def qmatmul_grouped(self, x, w: QTensor, groups: int):
        if not self._fast(w):
            return super().qmatmul_grouped(x, w, groups)
        return self._run_qmatmul(x, w, groups)

    def moe(self, u, gate: QTensor, up: QTensor, down: QTensor, sel, weights, clamp):
        if not all(t.fmt in SUPPORTED for t in (gate, up, down)):
            return super().moe(u, gate, up, down, sel, weights, clamp)
        if self.act_quant:
            # ds4-exact mode: decode runs ds4's own scheme (Q8_K activations, integer dots), which is this
            # mode's semantics exactly; prefill and other formats stay on the reference
            from . import moe_int8

            dg, du, dd = self._dw(gate), self._dw(up), self._dw(down)
            if u.shape[0] <= moe_int8.MAX_T and moe_int8.supports(dg, dd):
                return moe_int8.fused_int8(u, dg, du, dd, sel, weights, clamp, self.device_info).to(self.dtype)
            return super().moe(u, gate, up, down, sel, weights, clamp)
        v = resolve(KernelOp.MOE, gate.fmt, self.kernels)  # variants specialise on the gate/up format
        y = v.fn(u, self._dw(gate), self._dw(up), self._dw(down), sel, weights, clamp, self.device_info)
        return y.to(self.dtype)
