"""End-to-end decode speed of one model file on several backends in one run (eager, no CUDA graphs).

Loads the file with `dsv4.load(path, backend=...)`, prefills a short prompt, runs warm-up decode steps,
then times N decode steps (each returns logits to the host, so every step is synchronized). Prints and
writes tokens/s and the % of the bandwidth bound: bytes read per token (dsv4.inspect, short context)
over the streaming-read bandwidth measured in the same run. A backend name may end in `+exact`: the
ds4-exact mode (`act_quant=True`: activations rounded to Q8_0 / Q8_K as ds4 does). With --profile DIR,
a few more decode steps per backend run under cProfile and torch.profiler (where eager decode spends host
time: Python functions, torch ops, kernel launches per step), written to DIR/profile_<backend>.txt. Usage:
    python tools/bench_e2e.py MODEL.gguf --backends triton,torch --steps 32 --out e2e.md [--profile DIR]
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

EXACT = "exact"  # backend suffix: the ds4-exact mode (act_quant=True: ds4's Q8_0/Q8_K activation rounding)
PROMPT = [0, 1201, 7, 64, 93, 18, 2200, 5, 311, 46, 12, 9, 4000, 77, 8, 3]


PROFILE_STEPS = 4
PROFILE_ROWS = 45


def profile_steps(s, tok: int, steps: int, out: Path) -> None:
    """Decode `steps` more tokens under cProfile, then as many under torch.profiler; write both summaries."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    pr = cProfile.Profile()
    t0 = time.time()
    pr.enable()
    for _ in range(steps):
        tok = int(s.decode(tok).argmax())
    pr.disable()
    el = time.time() - t0
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    buf.write(f"# {steps} decode steps under cProfile: {1e3 * el / steps:.1f} ms per step\n\n## by own time\n")
    st.sort_stats("tottime").print_stats(PROFILE_ROWS)
    buf.write("\n## by cumulative time\n")
    st.sort_stats("cumulative").print_stats(PROFILE_ROWS)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            tok = int(s.decode(tok).argmax())
    ev = prof.key_averages()
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                   "cudaLaunchKernelExC"))
    buf.write(f"\n# torch.profiler over {steps} steps: {launches / steps:.0f} kernel launches per step\n")
    buf.write(ev.table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS))
    out.write_text(buf.getvalue())


def decode_speed(path: str, backend: str, steps: int, warmup: int, time_limit: float,
                 profile_dir: Path | None = None) -> dict:
    import dsv4

    name, _, mode = backend.partition("+")
    if mode not in ("", EXACT):
        raise ValueError(f"unknown backend mode {mode!r} in {backend!r} (known: +{EXACT})")
    t0 = time.time()
    eng = dsv4.load(path, backend=name, device="cuda", **({"act_quant": True} if mode == EXACT else {}))
    load_s = time.time() - t0
    extra = 2 * PROFILE_STEPS if profile_dir is not None else 0  # profile_steps decodes twice PROFILE_STEPS more
    s = eng.new_session(ctx=max(1024, len(PROMPT) + steps + warmup + extra + 8))
    t1 = time.time()
    logits = s.prefill(PROMPT)
    prefill_s = time.time() - t1
    tok = int(logits.argmax())
    for _ in range(warmup):
        tok = int(s.decode(tok).argmax())
    torch.cuda.synchronize()
    t2 = time.time()
    done = 0
    while done < steps and time.time() - t2 < time_limit:
        tok = int(s.decode(tok).argmax())  # greedy; the host read of the logits syncs every step
        done += 1
    torch.cuda.synchronize()
    el = time.time() - t2
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        profile_steps(s, tok, PROFILE_STEPS, profile_dir / f"profile_{backend.replace('+', '_')}.txt")
    return {"backend": backend, "load_s": load_s, "prefill_s": prefill_s, "steps": done, "tok_s": done / el}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=90.0, help="seconds of timed decoding per backend at most")
    ap.add_argument("--out", default=None, help="markdown file to write")
    ap.add_argument("--profile", default=None, help="directory for per-backend host profiles of a few more steps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_e2e: no CUDA/ROCm device", file=sys.stderr)
        return 2
    from bench_kernels import read_bandwidth

    from dsv4.inspect import report

    rep = report(args.model)
    bpt = rep["bytes_per_token_short_context"]
    bw = read_bandwidth(torch.device("cuda"))
    bound = bw * 1e9 / bpt
    lines = [f"# End-to-end decode ({torch.cuda.get_device_name()}, "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC})", "",
             f"model {args.model}: {rep['n_layer']} layers, recipe {rep['recipe']}, "
             f"{bpt / 1e9:.3f} GB read per token (short context); read bandwidth {bw:.0f} GB/s -> "
             f"bound {bound:.0f} tok/s", "",
             "| backend | decode tok/s | % of bound | steps | prefill s (16 tok, incl. compile) | load s | status |",
             "|---|---|---|---|---|---|---|"]
    rc = 0
    for be in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            r = decode_speed(args.model, be, args.steps, args.warmup, args.time_limit,
                             Path(args.profile) if args.profile else None)
            line = (f"| {be} | {r['tok_s']:.2f} | {100 * r['tok_s'] / bound:.2f} | {r['steps']} | "
                    f"{r['prefill_s']:.1f} | {r['load_s']:.1f} | ok |")
        except Exception as e:  # noqa: BLE001 - keep going with the next backend, record the failure
            traceback.print_exc()
            line = f"| {be} | | | | | | FAIL {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''} |"
            rc = 1
        print(line, flush=True)
        lines.append(line)
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
