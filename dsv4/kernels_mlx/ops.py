"""MlxOps: every op of the contract (dsv4/ops.py) on MLX arrays, float32 compute.

Weight forms, made once by `prepare` and kept in `QTensor.cache` (the file's bytes are never expanded to
float for quantized tensors): Q8_0 / Q4_K -> exact MLX affine repack (repack.py) used with
mx.quantized_matmul / mx.gather_qmm; Q2_K / IQ2_XXS -> the raw blocks as a uint8 array, multiplied by
the Metal kernels or their MLX twins (metal.KernelSet); F16/F32/BF16/I32 -> arrays of their own dtype.
The math of each op is the reference's (dsv4/reference.py, the oracle). Knows nothing of the model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..config import FP4_AMAX_FLOOR, FP4_BLOCK, FP8_AMAX_FLOOR, FP8_BLOCK, NEG_SENTINEL
from ..numerics import FP4_MAX, FP8_MAX, HADAMARD_N, SOFTPLUS_LINEAR, hadamard_np, rope_constants
from ..ops import RopeParams
from ..quant.dequant import dequantize
from ..quant.formats import QTensor, QuantFormat
from .metal import KernelSet
from .repack import EXACT_AFFINE_FORMATS, AffineWeight, repack_affine

FP8_MANTISSA_BITS = 3
FP8_MIN_EXP = -6  # E4M3: smallest normal exponent; below it the step stays 2**-9
FP4_MANTISSA_BITS = 1
FP4_MIN_EXP = 0  # E2M1: below 1.0 the step stays 0.5
Q8_0_BLOCK = 32
Q8_K_BLOCK = 256
_F32_EXP_SHIFT, _F32_EXP_MASK, _F32_EXP_BIAS, _F32_MANT_MASK = 23, 0xFF, 127, 0x7FFFFF
_U32_MAX, _F32_SIGN = 0xFFFFFFFF, 0x80000000
_INDEX_BITS = 24  # top-k keys: up to 2**24 candidates per row (experts, or compressed rows of a 64M context)
_RAW_KERNEL_FORMATS = frozenset({QuantFormat.Q2_K, QuantFormat.IQ2_XXS})
_PLAIN_MX = {QuantFormat.F32: np.float32, QuantFormat.F16: np.float16, QuantFormat.I32: np.int32}
_FORM = "mlx"  # QTensor.cache key of the prepared form
_DENSE = "mlx:f32"  # QTensor.cache key of a small tensor as a compute-dtype array


def hadamard(n: int = HADAMARD_N) -> np.ndarray:
    """numerics.hadamard_np in float32."""
    return hadamard_np(n).astype(np.float32)


def _exponent(a: mx.array) -> mx.array:
    """Unbiased binary exponent floor(log2 |a|) of float32 normals, read from the bits (exact)."""
    bits = mx.view(a.astype(mx.float32), mx.uint32)
    return ((bits >> _F32_EXP_SHIFT) & _F32_EXP_MASK).astype(mx.int32) - _F32_EXP_BIAS


def _pow2_ceil_scale(amax: mx.array, vmax: float) -> mx.array:
    """2**ceil(log2(amax / vmax)) computed from the float32 bits (exact at powers of two)."""
    y = amax / vmax
    e = _exponent(y)
    exact = (mx.view(y, mx.uint32) & _F32_MANT_MASK) == 0
    return mx.power(2.0, mx.where(exact, e, e + 1).astype(mx.float32))


def _round_minifloat(v: mx.array, mant_bits: int, min_exp: int) -> mx.array:
    """Round |v| <= max to the nearest value with `mant_bits` mantissa bits, ties to even (FP8/FP4 sim)."""
    e = mx.maximum(_exponent(v), min_exp)
    step = mx.power(2.0, (e - mant_bits).astype(mx.float32))
    return mx.round(v / step) * step  # mx.round: half to even; division by a power of two is exact


class MlxOps:
    """The MLX backend. `MlxOps(device=None, dtype=None, act_quant=False, use_metal=None)`.

    device: None (MLX default), "cpu" or "gpu" (sets MLX's default device); dtype: float32 only;
    act_quant: the reference's ds4-exact mode (activations rounded to Q8_0 before Q8_0 matmuls, to Q8_K
    before routed-expert matmuls); use_metal: None = Metal kernels on macOS arm64 when available, else
    their MLX twins (False forces the twins, e.g. for checking)."""

    name = "mlx"

    def __init__(self, device=None, dtype=None, act_quant: bool = False, use_metal: Optional[bool] = None):
        if dtype not in (None, mx.float32, "float32", "fp32"):
            raise ValueError(f"MlxOps computes in float32, got dtype={dtype!r}")
        if device is not None:
            mx.set_default_device(mx.gpu if str(device) == "gpu" else mx.cpu)
        self.dtype = mx.float32
        self.act_quant = bool(act_quant)
        self.kernels = KernelSet(use_metal)
        # exact cos/sin of the fp32 RoPE angles where float64 exists (the CPU); fp32 on the GPU
        self._trig_dtype = mx.float64 if mx.default_device() == mx.cpu else mx.float32
        self._hadamard = mx.array(hadamard())

    # ---- plumbing -------------------------------------------------------------------------------
    def prepare(self, w: QTensor) -> QTensor:
        if _FORM in w.cache:
            return w
        raw = np.asarray(w.data)
        if w.fmt in EXACT_AFFINE_FORMATS:
            form = repack_affine(raw, w.fmt, w.shape[-1])
        elif w.fmt in _RAW_KERNEL_FORMATS:
            form = mx.array(raw)  # the blocks themselves (still 2.06 / 2.63 bits per weight)
        elif w.fmt in _PLAIN_MX:
            form = mx.array(raw.view(_PLAIN_MX[w.fmt]).reshape(w.shape))
        elif w.fmt == QuantFormat.BF16:
            form = mx.view(mx.array(raw.view(np.uint16).reshape(w.shape)), mx.bfloat16)
        else:
            raise ValueError(f"MlxOps cannot hold {w.fmt.name} tensor {w.name}")
        w.cache[_FORM] = form
        return w

    def _form(self, w: QTensor):
        if _FORM not in w.cache:
            self.prepare(w)
        return w.cache[_FORM]

    def asarray(self, x) -> mx.array:
        x = np.asarray(x)
        if x.dtype.kind == "b":
            return mx.array(x)
        if x.dtype.kind in "iu":
            return mx.array(x.astype(np.int64))
        return mx.array(x.astype(np.float32))

    def numpy(self, x: mx.array) -> np.ndarray:
        if mx.issubdtype(x.dtype, mx.floating):
            x = x.astype(mx.float32)
        return np.array(x)

    def weight(self, w: QTensor) -> mx.array:
        hit = w.cache.get(_DENSE)
        if hit is None:
            form = self._form(w)
            if isinstance(form, AffineWeight):
                hit = mx.dequantize(form.wq, form.scales, form.biases, group_size=form.group_size, bits=form.bits)
            elif w.fmt in _RAW_KERNEL_FORMATS:
                hit = mx.array(dequantize(w))
            elif w.fmt == QuantFormat.I32:
                hit = form.astype(mx.int64)
            else:
                hit = form.astype(mx.float32)
            w.cache[_DENSE] = hit
        return hit

    def _plain(self, w: QTensor) -> mx.array:
        """Float matrix of a plain-format weight in the compute dtype (F16 stays F16 in memory)."""
        return self._form(w).astype(mx.float32)

    # ---- activation quantization (ds4-exact mode, as reference.TorchOps) ----------------------------
    @staticmethod
    def quant_q8_0(x: mx.array) -> mx.array:
        """Q8_0 round trip of the last dim in 32-blocks: d = amax/127, q = round-half-even(x/d); ds4 keeps
        the activation scale d in fp32."""
        xb = x.reshape(*x.shape[:-1], -1, Q8_0_BLOCK)
        d = mx.abs(xb).max(-1, keepdims=True) / 127.0
        inv = mx.where(d > 0, 1.0 / mx.where(d > 0, d, 1.0), 0.0)
        q = mx.clip(mx.round(xb * inv), -127, 127)
        return (q * d).reshape(x.shape)

    @staticmethod
    def quant_q8_k(x: mx.array) -> mx.array:
        """Q8_K round trip in 256-blocks: iscale = -127/max (signed max of |x|), q = min(127, rint(iscale x))."""
        xb = x.reshape(*x.shape[:-1], -1, Q8_K_BLOCK)
        i = mx.argmax(mx.abs(xb), axis=-1, keepdims=True)
        big = mx.take_along_axis(xb, i, axis=-1)
        nz = big != 0
        iscale = mx.where(nz, -127.0 / mx.where(nz, big, 1.0), 0.0)
        q = mx.minimum(mx.round(iscale * xb), 127.0)
        d = mx.where(nz, 1.0 / mx.where(nz, iscale, 1.0), 0.0)
        return (q * d).reshape(x.shape)

    # ---- math -----------------------------------------------------------------------------------
    def embed(self, table: QTensor, ids: mx.array) -> mx.array:
        form = self._form(table)
        if isinstance(form, AffineWeight):
            rows = [mx.take(a, ids, axis=0) for a in (form.wq, form.scales, form.biases)]
            return mx.dequantize(*rows, group_size=form.group_size, bits=form.bits)
        if table.fmt in _RAW_KERNEL_FORMATS:
            return mx.take(self.weight(table), ids, axis=0)
        return mx.take(form, ids, axis=0).astype(mx.float32)

    def qmatmul(self, x: mx.array, w: QTensor) -> mx.array:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        if self.act_quant and w.fmt == QuantFormat.Q8_0:
            x2 = self.quant_q8_0(x2)
        form = self._form(w)
        if isinstance(form, AffineWeight):
            y = mx.quantized_matmul(x2, form.wq, form.scales, form.biases, transpose=True,
                                    group_size=form.group_size, bits=form.bits)
        elif w.fmt in _RAW_KERNEL_FORMATS:
            y = self.kernels.raw_matmul(x2, form, w.fmt)
        else:
            y = x2 @ self._plain(w).T
        return y.reshape(*lead, y.shape[-1])

    def qmatmul_grouped(self, x: mx.array, w: QTensor, groups: int) -> mx.array:
        t = x.shape[0]
        r = w.shape[0] // groups
        form = self._form(w)
        if self.act_quant and w.fmt == QuantFormat.Q8_0:
            x = self.quant_q8_0(x)
        if isinstance(form, AffineWeight):
            # group g = expert g of a [G, r, in] view: one gather_qmm for all groups
            gw = [a.reshape(groups, r, a.shape[-1]) for a in (form.wq, form.scales, form.biases)]
            y = mx.gather_qmm(x[:, :, None, :], *gw, rhs_indices=mx.arange(groups)[None, :], transpose=True,
                              group_size=form.group_size, bits=form.bits)
            return y.reshape(t, groups * r)
        if w.fmt in _RAW_KERNEL_FORMATS:
            sel = mx.broadcast_to(mx.arange(groups, dtype=mx.int32)[None, :], (t, groups))
            raw = form.reshape(groups, r, form.shape[-1])
            return self.kernels.raw_gather_matmul(x, raw, w.fmt, sel).reshape(t, groups * r)
        W = self._plain(w).reshape(groups, r, -1)
        return mx.einsum("tgi,goi->tgo", x, W).reshape(t, groups * r)

    def rms_norm(self, x: mx.array, w: Optional[QTensor], eps: float) -> mx.array:
        return mx.fast.rms_norm(x, None if w is None else self.weight(w), eps)

    def _float_matrix(self, w: QTensor) -> mx.array:
        """A float weight in its own dtype (F16 stays F16); quantized ones dequantized (small tensors only)."""
        if w.fmt in _PLAIN_MX or w.fmt == QuantFormat.BF16:
            return self._form(w)
        return self.weight(w)

    def hc_pre(self, X, fn, scale, base, iters, eps, rms_eps):
        return self.kernels.hc_pre(X, self._float_matrix(fn), self.weight(scale), self.weight(base), iters, eps,
                                   rms_eps)

    def hc_post(self, X, y, post, comb):
        return self.kernels.hc_post(X, y, post, comb)

    def hc_head(self, X, fn, scale, base, eps, rms_eps):
        return self.kernels.hc_head(X, self._float_matrix(fn), self.weight(scale), self.weight(base), eps, rms_eps)

    def rope_cos_sin(self, pos: mx.array, rope: RopeParams) -> tuple[mx.array, mx.array]:
        """[T] positions -> cos, sin [T, R/2] by the CPU fp32 recipe of model.md §4.3.4 (as the reference)."""
        c = rope_constants(rope)
        theta = pos.astype(mx.float32)
        ext = []
        for _ in range(rope.n_dims // 2):  # repeated fp32 multiplication, as the CPU builds theta_ext
            ext.append(theta)
            theta = theta * c.theta_scale
        ext = mx.stack(ext, -1)  # [T, R/2]
        ang = ext * float(c.freq_scale)
        if c.ramp is not None:
            ramp = mx.array(c.ramp)
            ang = ang * (1.0 - ramp) + ext * ramp
        mscale = c.mscale
        a = ang.astype(self._trig_dtype)
        cos, sin = mx.cos(a).astype(mx.float32), mx.sin(a).astype(mx.float32)
        return cos * float(mscale), sin * float(mscale)

    def rope_tail(self, x, pos, rope: RopeParams, inverse: bool = False):
        cos, sin = self.rope_cos_sin(pos, rope)
        if inverse:
            sin = -sin
        r = rope.n_dims
        tail = x[..., -r:].reshape(*x.shape[:-1], r // 2, 2)
        x0, x1 = tail[..., 0], tail[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        rot = mx.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).reshape(*x.shape[:-1], r)
        return mx.concatenate((x[..., :-r], rot), -1)

    def kv_fp8_sim(self, x, n_rot):
        dn = x.shape[-1] - n_rot
        nope = x[..., :dn]
        xb = nope.reshape(*nope.shape[:-1], -1, FP8_BLOCK)
        amax = mx.maximum(mx.abs(xb).max(-1, keepdims=True), FP8_AMAX_FLOOR)
        scale = _pow2_ceil_scale(amax, FP8_MAX)
        v = mx.clip(xb / scale, -FP8_MAX, FP8_MAX)
        q = _round_minifloat(v, FP8_MANTISSA_BITS, FP8_MIN_EXP) * scale
        return mx.concatenate((q.reshape(nope.shape), x[..., dn:]), -1)

    def f16_round(self, x):
        return x.astype(mx.float16).astype(mx.float32)

    def indexer_fp4_sim(self, x):
        h = x @ self._hadamard
        xb = h.reshape(*h.shape[:-1], -1, FP4_BLOCK)
        amax = mx.maximum(mx.abs(xb).max(-1, keepdims=True), FP4_AMAX_FLOOR)
        scale = _pow2_ceil_scale(amax, FP4_MAX)
        v = mx.clip(xb / scale, -FP4_MAX, FP4_MAX)
        return (_round_minifloat(v, FP4_MANTISSA_BITS, FP4_MIN_EXP) * scale).reshape(h.shape)

    def swiglu(self, gate, up, clamp):
        return self.kernels.swiglu(gate, up, clamp)

    def router(self, u, w, bias, tid2eid, ids, k, scale, floor):
        logits = u @ self._plain(w).T  # [T, E]
        sp = mx.where(logits > SOFTPLUS_LINEAR, logits,
                      mx.where(logits < -SOFTPLUS_LINEAR, mx.exp(logits), mx.log1p(mx.exp(logits))))
        p = mx.sqrt(sp)
        if tid2eid is not None:
            sel = mx.take(self.weight(tid2eid), ids, axis=0)[:, :k]
        else:
            score = p + self.weight(bias) if bias is not None else p
            sel = _stable_top(score, k)
        ps = mx.take_along_axis(p, sel, axis=1)
        return sel, ps / mx.maximum(ps.sum(-1, keepdims=True), floor) * scale

    def _gathered(self, x: mx.array, w: QTensor, sel: mx.array) -> mx.array:
        """x [T, in] (shared by the K experts) or [T, K, in] -> [T, K, out] with expert sel[t, k] of w [E, out, in]."""
        form = self._form(w)
        if w.fmt in _RAW_KERNEL_FORMATS:
            return self.kernels.raw_gather_matmul(x, form, w.fmt, sel.astype(mx.int32))
        xb = x[:, None, None, :] if x.ndim == 2 else x[:, :, None, :]
        if isinstance(form, AffineWeight):
            y = mx.gather_qmm(xb, form.wq, form.scales, form.biases, rhs_indices=sel, transpose=True,
                              group_size=form.group_size, bits=form.bits)
        else:
            y = mx.gather_mm(xb, self._plain(w).swapaxes(-1, -2), rhs_indices=sel)
        return y.squeeze(-2)

    def moe(self, u, gate, up, down, sel, weights, clamp):
        raw = all(t.fmt in _RAW_KERNEL_FORMATS for t in (gate, up, down)) and gate.fmt == up.fmt
        if raw and not self.act_quant:  # q2 files: fused gate+up+SwiGLU and down+K-sum kernels
            return self.kernels.moe_raw(u, self._form(gate), self._form(up), self._form(down), gate.fmt, down.fmt,
                                        sel.astype(mx.int32), weights, clamp)
        if self.act_quant:
            u = self.quant_q8_k(u)
        h = self.kernels.swiglu(self._gathered(u, gate, sel), self._gathered(u, up, sel), clamp, weights)  # [T, K, F]
        if self.act_quant:
            h = self.quant_q8_k(h)
        return self._gathered(h, down, sel).sum(1)

    # ---- attention and its state ------------------------------------------------------------------
    def zeros(self, shape: Sequence[int], fill: float = 0.0, integer: bool = False):
        return mx.full(tuple(shape), fill, dtype=mx.int64 if integer else mx.float32)

    def cat(self, xs, axis: int = 0):
        return mx.concatenate(list(xs), axis=axis)

    def take(self, x, idx):
        return mx.take(x, idx, axis=0)

    def put(self, buf, idx, rows):
        buf[idx] = rows.astype(buf.dtype)  # MLX item assignment rebinds `buf` in place

    def compress(self, kv, score, ape, front_kv, front_score, p0, ratio):
        t, wc = kv.shape
        phase = mx.array((np.arange(t) + p0) % ratio)
        score = score + mx.take(self.weight(ape), phase, axis=0)
        ph0 = p0 % ratio
        if ratio == 4:
            dc, keep = wc // 2, 4 + ph0
        else:
            dc, keep = wc, ph0
        ext_kv = mx.concatenate((front_kv[:keep], kv))
        ext_sc = mx.concatenate((front_score[:keep], score))
        n = ext_kv.shape[0]
        nw, rem = n // ratio, n % ratio  # complete windows in ext (ratio 4: including the previous one)
        full = nw * ratio
        wk = ext_kv[:full].reshape(nw, ratio, wc)
        ws = ext_sc[:full].reshape(nw, ratio, wc)
        if ratio == 4:
            cand_k = mx.concatenate((wk[:-1, :, :dc], wk[1:, :, dc:]), 1)  # [nw-1, 8, dc]
            cand_s = mx.concatenate((ws[:-1, :, :dc], ws[1:, :, dc:]), 1)
        else:
            cand_k, cand_s = wk, ws
        if cand_k.shape[0]:
            pooled = (mx.softmax(cand_s, axis=1, precise=True) * cand_k).sum(1)
        else:
            pooled = mx.zeros((0, dc), mx.float32)
        # new frontier: last complete window -> previous (ratio 4), trailing partial window -> current
        fr = front_kv.shape[0]
        cur0 = 4 if ratio == 4 else 0
        kv_parts, sc_parts = [], []
        if ratio == 4:
            kv_parts.append(ext_kv[full - 4 : full])
            sc_parts.append(ext_sc[full - 4 : full])
        kv_parts.append(ext_kv[full:])
        sc_parts.append(ext_sc[full:])
        pad = fr - cur0 - rem
        kv_parts.append(mx.zeros((pad, wc), mx.float32))
        sc_parts.append(mx.full((pad, wc), NEG_SENTINEL, mx.float32))
        front_kv[:] = mx.concatenate(kv_parts)
        front_score[:] = mx.concatenate(sc_parts)
        return pooled

    def indexer_topk(self, q, w, keys, n_vis, top_k, scale):
        t, c = q.shape[0], keys.shape[0]
        dots = mx.maximum(mx.einsum("tid,cd->tic", q, keys), 0.0)
        s = mx.einsum("ti,tic->tc", w * scale, dots)
        visible = mx.arange(c)[None, :] < n_vis[:, None]
        s = mx.where(visible, s, -mx.inf)
        kk = min(top_k, c)
        order = _stable_top(s, kk)
        chosen = mx.put_along_axis(mx.zeros((t, c), mx.bool_), order, mx.array(True), axis=1) & visible
        return mx.where((n_vis > top_k)[:, None], chosen, visible)

    def sink_attention(self, q, kv, allowed, sinks, scale):
        z = mx.einsum("thd,nd->thn", q, kv) * scale
        z = mx.where(allowed[:, None, :], z, -mx.inf)
        sk = self.weight(sinks)[None, :, None]  # [1, H, 1]
        mu = mx.maximum(z.max(-1, keepdims=True), sk)
        e = mx.exp(z - mu)
        den = mx.exp(sk - mu) + e.sum(-1, keepdims=True)
        return mx.einsum("thn,nd->thd", e / den, kv)


def _stable_top(score: mx.array, k: int) -> mx.array:
    """Indices of the k largest scores per row, descending; equal scores -> lower index first.
    Sorts one int64 key (order-preserving float bits, inverted, then the index) so the result does not
    depend on whether the device's sort is stable."""
    bits = mx.view(score.astype(mx.float32) + 0.0, mx.uint32).astype(mx.int64)  # + 0.0: -0 -> +0 (a tie)
    neg = (bits >> 31) == 1
    ordered = mx.where(neg, _U32_MAX - bits, bits | _F32_SIGN)  # ascending in the float's order
    idx = mx.arange(score.shape[-1], dtype=mx.int64)
    key = ((_U32_MAX - ordered) << _INDEX_BITS) | idx  # descending score, then ascending index
    return mx.argsort(key, axis=-1)[:, :k]
