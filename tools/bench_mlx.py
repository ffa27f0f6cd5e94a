"""MLX decode benchmark: tokens/s and % of the machine's memory-bandwidth bound (quant.md §5).

    python tools/bench_mlx.py -m ds4flash.gguf               # Apple Silicon: chip detected via sysctl
    python tools/bench_mlx.py -m model.gguf --bandwidth 400   # any machine: bandwidth in GB/s
    python tools/bench_mlx.py                                 # the embedded tiny demo model

Bound: decode at batch 1 must read every weight byte a token uses once (all dense tensors, K of E
routed experts per layer, one embedding row), as held by MlxOps (Q8_0 repacked = 40 B per 32 weights,
Q4_K = 192 B per 256, Q2_K / IQ2_XXS raw blocks). bound tok/s = bandwidth / bytes per token. KV-cache
traffic is ignored (< 1 % of the weight bytes at short context).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Unified-memory bandwidth per chip, GB/s (Apple's published figures; binned variants noted).
CHIP_BANDWIDTH_GBS = {
    "Apple M1": 68.25, "Apple M1 Pro": 200.0, "Apple M1 Max": 400.0, "Apple M1 Ultra": 800.0,
    "Apple M2": 100.0, "Apple M2 Pro": 200.0, "Apple M2 Max": 400.0, "Apple M2 Ultra": 800.0,
    "Apple M3": 100.0, "Apple M3 Pro": 150.0,
    "Apple M3 Max": 400.0,  # 300 on the 14-core-CPU / 30-core-GPU bin: pass --bandwidth 300
    "Apple M3 Ultra": 819.0,
    "Apple M4": 120.0, "Apple M4 Pro": 273.0,
    "Apple M4 Max": 546.0,  # 410 on the 14-core-CPU / 32-core-GPU bin: pass --bandwidth 410
}
GB = 1e9


def detect_chip() -> str:
    if platform.system() != "Darwin":
        return ""
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _held_bytes(qt) -> int:
    """Bytes of a weight as MlxOps holds it (its prepared form), else the file's bytes."""
    form = qt.cache.get("mlx")
    if form is None:
        return qt.nbytes
    return int(getattr(form, "nbytes", qt.nbytes))


def bytes_per_token(weights) -> int:
    """Weight bytes a decode step reads: dense tensors whole, routed experts K/E, one embedding row."""
    from dataclasses import fields

    from dsv4.quant.formats import QTensor

    cfg = weights.config
    frac = cfg.n_expert_used / cfg.n_expert
    total = 0

    def walk(obj):
        nonlocal total
        for f in fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, QTensor):
                if f.name == "token_embd":
                    total += _held_bytes(v) // v.shape[0]
                elif f.name == "ffn_gate_tid2eid":
                    total += v.nbytes // v.shape[0]
                elif f.name.endswith("_exps"):
                    total += int(_held_bytes(v) * frac)
                else:
                    total += _held_bytes(v)
            elif hasattr(v, "__dataclass_fields__") and f.name != "config":
                walk(v)

    walk(weights)
    for lw in weights.layers:
        walk(lw)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="", help="GGUF file (default: the embedded tiny demo model)")
    ap.add_argument("--bandwidth", type=float, default=0.0, help="memory bandwidth in GB/s (default: by chip)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen", type=int, default=32, help="decode steps to time")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (kernel compilation)")
    ap.add_argument("--twins", action="store_true", help="force the MLX twins instead of the Metal kernels")
    a = ap.parse_args(argv)

    import dsv4
    from dsv4.resolve import resolve_model

    path = Path(a.model) if a.model else resolve_model(None).path
    t0 = time.perf_counter()
    eng = dsv4.load(path, backend="mlx", **({"use_metal": False} if a.twins else {}))
    load_s = time.perf_counter() - t0
    cfg = eng.config
    sess = eng.new_session(ctx=a.prompt_tokens + a.warmup + a.gen + 8)
    ids = np.random.default_rng(0).integers(2, cfg.n_vocab, a.prompt_tokens)
    t0 = time.perf_counter()
    logits = sess.prefill(ids.tolist())
    prefill_s = time.perf_counter() - t0
    tok = int(np.argmax(logits))
    for _ in range(a.warmup):
        tok = int(np.argmax(sess.decode(tok)))
    t0 = time.perf_counter()
    for _ in range(a.gen):
        tok = int(np.argmax(sess.decode(tok)))  # greedy: the host read of the logits ends each step
    gen_s = time.perf_counter() - t0

    tps = a.gen / gen_s
    bpt = bytes_per_token(eng.weights)
    chip = detect_chip()
    bw = a.bandwidth or CHIP_BANDWIDTH_GBS.get(chip, 0.0)
    metal = eng.ops.kernels.use_metal
    print(f"model      {path.name}  ({cfg.name}, {cfg.n_layer} layers, E={cfg.n_expert} K={cfg.n_expert_used})")
    print(f"machine    {chip or platform.platform()}  kernels: {'Metal' if metal else 'MLX twins (no Metal)'}")
    print(f"load       {load_s:.1f} s   prefill {a.prompt_tokens} tok: {a.prompt_tokens / prefill_s:.1f} tok/s")
    print(f"decode     {tps:.2f} tok/s  ({1e3 / tps:.1f} ms/token over {a.gen} steps)")
    print(f"bytes/tok  {bpt / GB:.3f} GB of weights (as held by MlxOps)")
    if bw:
        bound = bw * GB / bpt
        print(f"bound      {bound:.1f} tok/s at {bw:g} GB/s  ->  {100 * tps / bound:.1f} % of the bandwidth bound")
    else:
        print("bound      unknown bandwidth: pass --bandwidth GB/s (chips known: "
              + ", ".join(CHIP_BANDWIDTH_GBS) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
