"""TorchOps: every op of the contract (dsv4/ops.py) in plain torch: the executable spec.

fp32 by default, fp64 on request, any torch device. Weights stay as raw GGUF blocks; each use
dequantizes (small tensors are cached within a byte budget, never the 3-D expert tensors of a full
model). `act_quant=True` is the "ds4-exact" mode of model.md §7: activations are quantized to Q8_0
before Q8_0 matmuls and to Q8_K before routed-expert matmuls, as the ds4 CPU engine does.
Knows nothing of the model's structure; no host synchronization inside an op (except the fallback
path for expert tensors too large to cache).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from .config import FP4_AMAX_FLOOR, FP4_BLOCK, FP8_AMAX_FLOOR, FP8_BLOCK, NEG_SENTINEL
from .numerics import FP4_MAX, FP8_MAX, HADAMARD_N, SOFTPLUS_LINEAR, hadamard_np, rope_constants
from .numerics import yarn_corr_dims  # noqa: F401 - re-exported (tests and callers import it from here)
from .ops import RopeParams
from .quant.formats import QTensor, QuantFormat

Q8_0_BLOCK = 32
Q8_K_BLOCK = 256
DEFAULT_CACHE_BUDGET = 1 << 30  # bytes of dequantized weights kept per TorchOps
ROPE_TABLE_MIN = 4096  # positions tabulated up front per RoPE class
EXPERT_CACHE_MAX = 256 << 20  # a 3-D expert tensor is cached only below this (tiny models)

_PLAIN = {QuantFormat.F32: np.float32, QuantFormat.F16: np.float16, QuantFormat.I32: np.int32}


def _dequant_numpy(w: QTensor) -> np.ndarray:
    """Raw GGUF bytes -> float32 (or int32) numpy array of the logical shape."""
    raw = np.asarray(w.data)
    if w.fmt in _PLAIN:
        return raw.view(_PLAIN[w.fmt]).reshape(w.shape)
    if w.fmt == QuantFormat.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(w.shape)
    import gguf

    out = gguf.quants.dequantize(raw.reshape(-1, raw.shape[-1]), gguf.GGMLQuantizationType(int(w.fmt)))
    return np.asarray(out, dtype=np.float32).reshape(w.shape)


def hadamard(n: int = HADAMARD_N, dtype=torch.float64) -> torch.Tensor:
    """numerics.hadamard_np as a torch tensor of `dtype`."""
    return torch.tensor(hadamard_np(n), dtype=dtype)


def _round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """|v| <= 6 -> nearest E2M1 magnitude {0,.5,1,1.5,2,3,4,6}, ties to even mantissa."""
    out = torch.full_like(a, 6.0)
    for hi, val, incl in ((5.0, 4.0, True), (3.5, 3.0, False), (2.5, 2.0, True), (1.75, 1.5, False),
                          (1.25, 1.0, True), (0.75, 0.5, False), (0.25, 0.0, True)):
        m = (a <= hi) if incl else (a < hi)
        out = torch.where(m, torch.full_like(a, val), out)
    return out


class TorchOps:
    """The reference backend. `TorchOps(device='cpu', dtype=torch.float32, act_quant=False)`."""

    name = "torch"

    def __init__(self, device="cpu", dtype=torch.float32, act_quant: bool = False,
                 cache_budget: int = DEFAULT_CACHE_BUDGET):
        self.device = torch.device(device)
        self.dtype = dtype
        self.act_quant = act_quant
        self.cache_budget = cache_budget
        self._cached_bytes = 0
        self._hadamard = hadamard(HADAMARD_N, dtype).to(self.device)
        self._rope_tables: dict = {}

    # ---- plumbing -------------------------------------------------------------------------------
    def prepare(self, w: QTensor) -> QTensor:
        return w

    def asarray(self, x) -> torch.Tensor:
        x = np.asarray(x)
        t = torch.from_numpy(np.ascontiguousarray(x))
        if x.dtype.kind in "iub":
            return t.to(self.device, torch.int64) if x.dtype.kind != "b" else t.to(self.device)
        return t.to(self.device, self.dtype)

    def numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        if x.is_floating_point():
            x = x.to(torch.float32)
        return x.cpu().numpy()

    def _key(self) -> str:
        return f"torch:{self.device}:{self.dtype}"

    def dequant(self, w: QTensor) -> torch.Tensor:
        """Whole tensor in the compute dtype; cached while within the budget."""
        hit = w.cache.get(self._key())
        if hit is not None:
            return hit
        t = self._dequant_uncached(w)
        size = t.numel() * t.element_size()
        big_expert = len(w.shape) == 3 and size > EXPERT_CACHE_MAX
        if not big_expert and self._cached_bytes + size <= self.cache_budget:
            w.cache[self._key()] = t
            self._cached_bytes += size
        return t

    def _dequant_uncached(self, w: QTensor) -> torch.Tensor:
        try:
            from .quant.dequant import dequantize_torch  # helper H1's torch dequantizer
        except ImportError:
            dequantize_torch = None
        if dequantize_torch is not None:
            raw = torch.from_numpy(np.ascontiguousarray(np.asarray(w.data))).to(self.device)
            t = dequantize_torch(raw, w.fmt, w.shape[-1], self.dtype).reshape(w.shape)
            return t.to(torch.int64) if w.fmt == QuantFormat.I32 else t
        arr = _dequant_numpy(w)
        if arr.dtype == np.int32:
            return torch.from_numpy(arr.astype(np.int64)).to(self.device)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).to(self.device, self.dtype)

    def weight(self, w: QTensor) -> torch.Tensor:
        return self.dequant(w)

    # ---- activation quantization (ds4-exact mode) ------------------------------------------------
    @staticmethod
    def quant_q8_0(x: torch.Tensor) -> torch.Tensor:
        """Q8_0 round trip of the last dim in 32-blocks: d = amax/127, q = round-half-even(x/d)."""
        shp = x.shape
        xb = x.to(torch.float32).reshape(*shp[:-1], -1, Q8_0_BLOCK)
        d = xb.abs().amax(-1, keepdim=True) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(xb * inv).clamp(-127, 127)
        return (q * d).reshape(shp).to(x.dtype)  # ds4 keeps the activation scale in fp32

    @staticmethod
    def quant_q8_k(x: torch.Tensor) -> torch.Tensor:
        """Q8_K round trip in 256-blocks: iscale = -127/max (signed max of |x|), q = min(127, rint(iscale x))."""
        shp = x.shape
        xb = x.to(torch.float32).reshape(*shp[:-1], -1, Q8_K_BLOCK)
        i = xb.abs().argmax(-1, keepdim=True)
        mx = torch.gather(xb, -1, i)
        iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
        q = torch.round(iscale * xb).clamp(max=127)
        d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
        return (q * d).reshape(shp).to(x.dtype)

    # ---- math -----------------------------------------------------------------------------------
    def embed(self, table: QTensor, ids: torch.Tensor) -> torch.Tensor:
        if table.fmt in (QuantFormat.F16, QuantFormat.F32):
            t = table.cache.get("torch:raw")
            if t is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # read-only memmap: we never write through it
                    t = torch.from_numpy(np.asarray(table.data).view(_PLAIN[table.fmt]).reshape(table.shape))
                table.cache["torch:raw"] = t
            return t.index_select(0, ids.cpu()).to(self.device, self.dtype)
        return self.dequant(table).index_select(0, ids)

    def qmatmul(self, x: torch.Tensor, w: QTensor) -> torch.Tensor:
        if self.act_quant and w.fmt == QuantFormat.Q8_0:
            x = self.quant_q8_0(x)
        return x @ self.dequant(w).T

    def qmatmul_grouped(self, x: torch.Tensor, w: QTensor, groups: int) -> torch.Tensor:
        if self.act_quant and w.fmt == QuantFormat.Q8_0:
            x = self.quant_q8_0(x)
        W = self.dequant(w)
        r = W.shape[0] // groups
        y = x.transpose(0, 1) @ W.reshape(groups, r, W.shape[1]).transpose(1, 2)  # [G, T, r]
        return y.transpose(0, 1).reshape(x.shape[0], groups * r)

    def rms_norm(self, x: torch.Tensor, w: Optional[QTensor], eps: float) -> torch.Tensor:
        # sum of squares in double, as the CPU engine (model.md §4 notation)
        ms = x.to(torch.float64).square().mean(-1, keepdim=True).to(self.dtype)
        y = x * torch.rsqrt(ms + eps)
        return y if w is None else y * self.weight(w)

    def _sinkhorn(self, C: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        C = torch.softmax(C, dim=-1) + eps
        C = C / (C.sum(-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            C = C / (C.sum(-1, keepdim=True) + eps)
            C = C / (C.sum(-2, keepdim=True) + eps)
        return C

    def hc_pre(self, X, fn, scale, base, iters, eps, rms_eps):
        T, S, D = X.shape
        m = self.rms_norm(X.reshape(T, S * D), None, rms_eps) @ self.dequant(fn).T  # [T, 24]
        sc, bs = self.weight(scale), self.weight(base)
        a = torch.sigmoid(m[:, :S] * sc[0] + bs[:S]) + eps
        b = 2.0 * torch.sigmoid(m[:, S:2 * S] * sc[1] + bs[S:2 * S])
        C = (m[:, 2 * S:] * sc[2] + bs[2 * S:]).reshape(T, S, S)
        comb = self._sinkhorn(C, iters, eps)
        x = (a[:, :, None] * X).sum(1)
        return x, b, comb

    def hc_post(self, X, y, post, comb):
        return post[:, :, None] * y[:, None, :] + comb.transpose(1, 2) @ X

    def hc_head(self, X, fn, scale, base, eps, rms_eps):
        T, S, D = X.shape
        m = self.rms_norm(X.reshape(T, S * D), None, rms_eps) @ self.dequant(fn).T  # [T, S]
        w = torch.sigmoid(m * self.weight(scale)[0] + self.weight(base)) + eps
        return (w[:, :, None] * X).sum(1)

    def rope_cos_sin(self, pos: torch.Tensor, rope: RopeParams) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin [T, R/2] by the CPU fp32 recipe of model.md §4.3.4 (tabulated per
        RopeParams; the table grows by doubling. Reading pos.max() is a host sync: fine for the CPU reference,
        a graph-captured backend overrides this op)."""
        need = int(pos.max()) + 1 if pos.numel() else 0
        hit = self._rope_tables.get(rope)
        if hit is None or hit[0].shape[0] < need:
            n = max(need, ROPE_TABLE_MIN, 2 * (hit[0].shape[0] if hit else 0))
            hit = self._rope_compute(torch.arange(n, device=self.device), rope)
            self._rope_tables[rope] = hit
        return hit[0].index_select(0, pos), hit[1].index_select(0, pos)

    def _rope_compute(self, pos: torch.Tensor, rope: RopeParams) -> tuple[torch.Tensor, torch.Tensor]:
        c = rope_constants(rope)
        theta = pos.to(torch.float32)
        ext = []
        for _ in range(rope.n_dims // 2):  # repeated fp32 multiplication, as the CPU builds theta_ext
            ext.append(theta)
            theta = theta * c.theta_scale
        ext = torch.stack(ext, -1)  # [T, R/2] fp32
        ang = ext * float(c.freq_scale)
        if c.ramp is not None:
            ramp = torch.from_numpy(c.ramp).to(ang.device)
            ang = ang * (1.0 - ramp) + ext * ramp
        mscale = c.mscale
        ang64 = ang.to(torch.float64)
        cos, sin = torch.cos(ang64), torch.sin(ang64)
        if self.dtype != torch.float64:  # cosf/sinf: correctly rounded fp32, then the fp32 mscale
            cos, sin = cos.to(torch.float32), sin.to(torch.float32)
        return (cos * float(mscale)).to(self.dtype), (sin * float(mscale)).to(self.dtype)

    def rope_tail(self, x, pos, rope: RopeParams, inverse: bool = False):
        cos, sin = self.rope_cos_sin(pos, rope)
        if inverse:
            sin = -sin
        R = rope.n_dims
        tail = x[..., -R:].reshape(*x.shape[:-1], R // 2, 2)
        x0, x1 = tail[..., 0], tail[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        rot = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).reshape(*x.shape[:-1], R)
        return torch.cat((x[..., :-R], rot), -1)

    def kv_fp8_sim(self, x, n_rot):
        nope = x[..., : x.shape[-1] - n_rot]
        xb = nope.reshape(*nope.shape[:-1], -1, FP8_BLOCK).to(torch.float32)
        amax = xb.abs().amax(-1, keepdim=True).clamp(min=FP8_AMAX_FLOOR)
        scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
        q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale
        return torch.cat((q.reshape(nope.shape).to(x.dtype), x[..., x.shape[-1] - n_rot:]), -1)

    def f16_round(self, x):
        return x.to(torch.float16).to(x.dtype)

    def indexer_fp4_sim(self, x):
        h = (x @ self._hadamard).to(torch.float32)
        xb = h.reshape(*h.shape[:-1], -1, FP4_BLOCK)
        amax = xb.abs().amax(-1, keepdim=True).clamp(min=FP4_AMAX_FLOOR)
        scale = torch.exp2(torch.ceil(torch.log2(amax / FP4_MAX)))
        v = (xb / scale).clamp(-FP4_MAX, FP4_MAX)
        q = torch.sign(v) * _round_e2m1(v.abs()) * scale
        return q.reshape(h.shape).to(x.dtype)

    def swiglu(self, gate, up, clamp):
        g = gate.clamp(max=clamp)
        return torch.nn.functional.silu(g) * up.clamp(-clamp, clamp)

    def router(self, u, w, bias, tid2eid, ids, k, scale, floor):
        logits = u @ self.dequant(w).T  # [T, E]
        sp = torch.where(logits > SOFTPLUS_LINEAR, logits,
                         torch.where(logits < -SOFTPLUS_LINEAR, torch.exp(logits), torch.log1p(torch.exp(logits))))
        p = torch.sqrt(sp)
        if tid2eid is not None:
            sel = self.dequant(tid2eid).index_select(0, ids.to(self.device))[:, :k].to(torch.int64)
        else:
            score = p + self.weight(bias) if bias is not None else p
            # stable descending sort: equal scores keep ascending expert order (ties -> lower id)
            sel = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
        ps = torch.gather(p, 1, sel)
        wsum = ps.sum(-1, keepdim=True).clamp(min=floor)
        return sel, ps / wsum * scale

    def _expert_mats(self, t: QTensor):
        """Whole dequantized expert tensor when cacheable, else None (per-expert path)."""
        key = self._key()
        if key in t.cache:
            return t.cache[key]
        size = int(np.prod(t.shape)) * torch.finfo(self.dtype).bits // 8
        if size <= EXPERT_CACHE_MAX and self._cached_bytes + size <= self.cache_budget:
            return self.dequant(t)
        return None

    def moe(self, u, gate, up, down, sel, weights, clamp):
        T, K = sel.shape
        ua = self.quant_q8_k(u) if self.act_quant else u
        Wg, Wu, Wd = self._expert_mats(gate), self._expert_mats(up), self._expert_mats(down)
        out = torch.zeros(T, down.shape[1], dtype=self.dtype, device=self.device)
        if Wg is None or Wu is None or Wd is None:
            experts = sorted(set(sel.flatten().tolist()))  # large model: host read of the routing
            mats = lambda t, e: self.dequant(t.expert(e))  # noqa: E731
        elif T * K <= gate.shape[0]:
            # few tokens: gather the selected experts' matrices (no host sync)
            s = sel.reshape(-1)
            uk = ua.repeat_interleave(K, 0)[:, :, None]  # [T*K, D, 1]
            g = (Wg[s] @ uk)[:, :, 0]
            up_ = (Wu[s] @ uk)[:, :, 0]
            h = self.swiglu(g, up_, clamp) * weights.reshape(-1, 1)
            if self.act_quant:
                h = self.quant_q8_k(h)
            y = (Wd[s] @ h[:, :, None])[:, :, 0]
            return y.reshape(T, K, -1).sum(1)
        else:
            experts = range(gate.shape[0])
            mats = lambda t, e: {id(gate): Wg, id(up): Wu, id(down): Wd}[id(t)][e]  # noqa: E731
        for e in experts:
            we = (weights * (sel == e)).sum(-1)  # [T] route weight of expert e per token (0 if unused)
            g = ua @ mats(gate, e).T
            h = self.swiglu(g, ua @ mats(up, e).T, clamp) * we[:, None]
            if self.act_quant:
                h = self.quant_q8_k(h)
            out = out + h @ mats(down, e).T
        return out

    # ---- attention and its state ------------------------------------------------------------------
    def zeros(self, shape: Sequence[int], fill: float = 0.0, integer: bool = False):
        dt = torch.int64 if integer else self.dtype
        return torch.full(tuple(shape), fill, dtype=dt, device=self.device)

    def cat(self, xs, axis: int = 0):
        return torch.cat(list(xs), dim=axis)

    def take(self, x, idx):
        return x.index_select(0, idx)

    def put(self, buf, idx, rows):
        buf.index_copy_(0, idx, rows.to(buf.dtype))

    def compress(self, kv, score, ape, front_kv, front_score, p0, ratio):
        T, Wc = kv.shape
        phase = (torch.arange(T, device=self.device) + p0) % ratio
        score = score + self.weight(ape).index_select(0, phase)
        ph0 = p0 % ratio
        if ratio == 4:
            dc = Wc // 2
            prev = 4
            ext_kv = torch.cat((front_kv[: prev + ph0], kv))
            ext_sc = torch.cat((front_score[: prev + ph0], score))
        else:
            dc, prev = Wc, 0
            ext_kv = torch.cat((front_kv[:ph0], kv))
            ext_sc = torch.cat((front_score[:ph0], score))
        n = ext_kv.shape[0]
        nw, rem = n // ratio, n % ratio  # complete windows in ext (for ratio 4 including the previous one)
        full = nw * ratio
        wk = ext_kv[:full].reshape(nw, ratio, Wc)
        ws = ext_sc[:full].reshape(nw, ratio, Wc)
        if ratio == 4:
            cand_k = torch.cat((wk[:-1, :, :dc], wk[1:, :, dc:]), 1)  # [nw-1, 8, dc]
            cand_s = torch.cat((ws[:-1, :, :dc], ws[1:, :, dc:]), 1)
        else:
            cand_k, cand_s = wk, ws
        pooled = (torch.softmax(cand_s, dim=1) * cand_k).sum(1) if cand_k.shape[0] else kv.new_zeros(0, dc)
        # new frontier: last complete window -> previous (ratio 4), trailing partial window -> current
        new_kv = torch.zeros_like(front_kv)
        new_sc = torch.full_like(front_score, NEG_SENTINEL)
        if ratio == 4:
            new_kv[:4], new_sc[:4] = ext_kv[full - 4:full], ext_sc[full - 4:full]
            new_kv[4:4 + rem], new_sc[4:4 + rem] = ext_kv[full:], ext_sc[full:]
        else:
            new_kv[:rem], new_sc[:rem] = ext_kv[full:], ext_sc[full:]
        front_kv.copy_(new_kv)
        front_score.copy_(new_sc)
        return pooled

    def indexer_topk(self, q, w, keys, n_vis, top_k, scale):
        T, C = q.shape[0], keys.shape[0]
        dots = torch.relu(q @ keys.T)  # [T, I, C]
        s = ((w * scale)[:, None, :] @ dots)[:, 0]  # [T, C]
        c = torch.arange(C, device=self.device)
        visible = c[None, :] < n_vis[:, None]
        s = torch.where(visible, s, torch.full_like(s, -math.inf))
        kk = min(top_k, C)
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :kk]
        chosen = torch.zeros(T, C, dtype=torch.bool, device=self.device)
        chosen.scatter_(1, order, True)
        chosen = chosen & visible
        return torch.where((n_vis > top_k)[:, None], chosen, visible)

    def sink_attention(self, q, kv, allowed, sinks, scale):
        z = (q @ kv.T) * scale  # [T, H, N]
        z = z.masked_fill(~allowed[:, None, :], -math.inf)
        sk = self.weight(sinks)[None, :, None]  # [1, H, 1]
        mu = torch.maximum(z.amax(-1, keepdim=True), sk)
        e = torch.exp(z - mu)
        den = torch.exp(sk - mu) + e.sum(-1, keepdim=True)
        return (e / den) @ kv


