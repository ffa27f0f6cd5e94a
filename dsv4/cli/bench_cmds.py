"""`dsv4 bench`: the ds4-bench protocol (runtime.md §6) on any model file and backend.

Context frontiers from --ctx-start to --ctx-max (linear --step-incr or geometric --step-mul); at each
frontier the session is extended by the new interval only (timed prefill), snapshotted, then
--gen-tokens greedy tokens are generated with EOS excluded (timed) and the snapshot restored.
CSV: ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes (+ peak RSS on stderr).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import typer

from .app import app

CSV_HEADER = "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes"
EOS_ID = 1


def frontiers(start: int, stop: int, incr: int, mul: float) -> list[int]:
    out, cur = [], start
    while cur <= stop:
        out.append(cur)
        cur = math.ceil(cur * mul) if mul > 1 else cur + incr
    return out


def peak_rss_mib() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


@app.command("bench")
def bench(
    model: Path = typer.Option(..., "-m", "--model", help="Model GGUF."),
    backend: str = typer.Option("auto", "--backend", help="auto, torch, triton or mlx."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Raw text; random ids when omitted."),
    ctx_start: int = typer.Option(2048, "--ctx-start"),
    ctx_max: int = typer.Option(32768, "--ctx-max"),
    step_incr: int = typer.Option(2048, "--step-incr"),
    step_mul: float = typer.Option(1.0, "--step-mul"),
    gen_tokens: int = typer.Option(128, "--gen-tokens"),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch default)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write the CSV here instead of stdout."),
) -> None:
    """Prefill and generation speed at growing context frontiers (ds4-bench CSV)."""
    import os
    import tempfile
    import time

    import numpy as np

    import dsv4

    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = dsv4.load(model, backend=backend)
    points = frontiers(ctx_start, ctx_max, step_incr, step_mul)
    if prompt_file is not None:
        ids = engine.tokenizer.encode(prompt_file.read_text(encoding="utf-8"))
        if len(ids) < ctx_max:
            raise typer.BadParameter(f"prompt has {len(ids)} tokens, fewer than --ctx-max {ctx_max}")
    else:
        ids = np.random.default_rng(0).integers(2, engine.config.n_vocab, ctx_max).tolist()
    session = engine.new_session(ctx=ctx_max + gen_tokens + 1, prefill_chunk=prefill_chunk)
    lines = [CSV_HEADER]
    print(f"dsv4 bench: backend={engine.backend} frontiers={points}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        snap = os.path.join(tmp, "bench.snap")
        for ctx in points:
            new = ids[session.n_past:ctx]
            t0 = time.perf_counter()
            session.prefill(new)
            pre_s = time.perf_counter() - t0
            kv_bytes = session.save(snap)
            t1 = time.perf_counter()
            logits = session.last_logits
            for _ in range(gen_tokens):
                masked = logits.copy()
                masked[EOS_ID] = -np.inf
                logits = session.decode(int(np.argmax(masked)))
            gen_s = time.perf_counter() - t1
            session = engine.load_session(snap)
            line = f"{ctx},{len(new)},{len(new) / pre_s:.2f},{gen_tokens},{gen_tokens / gen_s:.2f},{kv_bytes}"
            lines.append(line)
            print(line, file=sys.stderr)
    text = "\n".join(lines) + "\n"
    if csv:
        csv.write_text(text)
    else:
        sys.stdout.write(text)
    print(f"dsv4 bench: peak RSS {peak_rss_mib():.0f} MiB", file=sys.stderr)
