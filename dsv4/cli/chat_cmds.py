"""`dsv4 chat` and `dsv4 run`: flags, model resolution, engine loading and the one-shot path.

Holds policy only (runtime §4): which model, which think mode, which sampling knobs, where output goes.
Everything heavy (engine, tokenizer, rich, prompt_toolkit) is imported inside the command functions so that
`dsv4 --help` stays instant. Tensors are never touched: logits go from the session to the sampler.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..chat import DEFAULT_CLI_SYSTEM, THINK_MAX_MIN_CTX, THINK_MAX_PREFIX, ThinkMode, effective_think
from .app import app

DEFAULT_CTX = 32768  # ds4's CLI default (runtime §0)
DEMO_MAX_TOKENS = 128  # the random-weight demo never emits EOS: cap its replies unless -n is given
DEFAULT_LOGPROBS_TOP_K = 20
MAX_LOGPROBS_TOP_K = 128
LOGPROBS_SOURCE = "dsv4"
EXIT_INTERRUPTED = 130


class ChatPieces:
    """Token pieces of the CLI transcript (runtime §2.2-2.3), built from the tokenizer's special ids:
    header = BOS [Max prefix] [system]; a user turn = <User> text <Assistant> (<think> | </think>)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos
        self.think_end_id = tok.think_close

    @staticmethod
    def think_mode(name: str) -> ThinkMode:
        return ThinkMode[name]

    @staticmethod
    def is_max(mode: ThinkMode) -> bool:
        return mode is ThinkMode.MAX

    @staticmethod
    def is_thinking(mode: ThinkMode) -> bool:
        return mode.thinking

    def mode_name(self, mode) -> str:
        return {"NONE": "nothink", "HIGH": "think", "MAX": "think-max"}[mode.name]

    def effective_think(self, mode, ctx: int, err=None):
        """chat.effective_think, with its warning shown as one console line instead of a Python warning."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eff = effective_think(mode, ctx)
        if eff is not mode and err is not None:
            err.print(f"[yellow]thinking mode: think (ctx {ctx} is below the {THINK_MAX_MIN_CTX} think-max needs)[/]")
        return eff

    def header(self, system: str, mode) -> list[int]:
        ids = [self.tok.bos]
        if self.is_max(mode):
            ids += self.tok.encode(THINK_MAX_PREFIX)
        if system:
            ids += self.tok.encode(system)
        return ids

    def user_turn(self, text: str, mode) -> list[int]:
        opener = self.tok.think_open if self.is_thinking(mode) else self.tok.think_close
        return [self.tok.user, *self.tok.encode(text), self.tok.assistant, opener]


class KvPolicy:
    """Where sessions come from: the disk prefix cache (a cold session starts from the longest cached
    prefix of its prompt and only the rest is prefilled) and, with a budget, paged KV rows (dsv4.cache)."""

    @staticmethod
    def parse_budget(kv_budget: Optional[str]) -> Optional[int]:
        """Bytes from --kv-budget (else DSV4_KV_BUDGET); None = no paging. Checked before the model loads."""
        from ..cache.pages import default_budget, parse_size
        from ..errors import DsvError

        try:
            return parse_size(kv_budget) if kv_budget else default_budget()
        except ValueError as e:
            raise DsvError(f"--kv-budget: {e}") from None

    def __init__(self, engine, kv_dir: Optional[Path], budget: Optional[int], use_cache: bool):
        from .. import settings
        from ..cache.pages import default_kv_dir
        from ..errors import DsvError

        self.engine = engine
        self.dir = Path(kv_dir).expanduser() if kv_dir else default_kv_dir()
        self.budget = budget
        self.cache = None
        if use_cache:
            from ..cache.prefix import PrefixCache

            fingerprint = engine.config.fingerprint()
            if getattr(engine.ops, "act_quant", False):  # another activation rounding: its own prefixes
                fingerprint += DS4_EXACT_TAG
            try:
                self.cache = PrefixCache(self.dir, fingerprint,
                                         budget_bytes=int(settings.get("DSV4_KV_DISK_MB")) << 20)
            except OSError as e:
                raise DsvError(f"cannot use KV cache dir {self.dir}: {e.strerror} (--kv-dir DIR or --no-kv-cache)") from None

    def new_session(self, ctx: int, tokens=()):
        """(session, tokens reused from the disk cache)."""
        if self.cache is not None and len(tokens) > 1:
            from ..cache.prefix import session_with_prefix

            session, reused = session_with_prefix(self.engine, list(tokens), self.cache, ctx=ctx)
        else:
            session, reused = self.engine.new_session(ctx=ctx), 0
        if self.budget is not None:
            from ..cache.paged import enable_paging

            enable_paging(session, self.budget, self.dir)
        return session, reused

    def capture(self, session):
        """Snapshot a cold prompt prefix in memory now; the returned callable writes it to disk later (after
        the reply, so the write does not delay the first token). None when there is nothing to store."""
        if self.cache is None or session.n_past < self.cache.min_tokens:
            return None
        from ..cache.snapshot import session_arrays

        tokens = list(session.tokens)
        stored, codecs, meta = session_arrays(session)
        return lambda: self.cache.store_or_warn(tokens, stored, codecs, meta)


# --------------------------------------------------------------------------------------------------
# Shared option handling


def _think_from_flags(think: bool, nothink: bool, think_max: bool) -> str:
    from ..errors import DsvError

    if think + nothink + think_max > 1:
        raise DsvError("choose one of --think, --nothink, --think-max")
    return "NONE" if nothink else "MAX" if think_max else "HIGH"


def _consoles():
    from rich.console import Console

    # soft_wrap: the terminal wraps long lines; rich must not break streamed text or stats lines itself
    out = Console(emoji=False, highlight=False, soft_wrap=True)
    err = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)
    return out, err


def _resolve(model: Optional[str], err):
    from ..resolve import DEMO_BANNER, resolve_model

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("writing the demo model", total=None, visible=False)

        def on_create():
            err.print("[dim]first run: writing the demo model to the cache (a few seconds)...[/]")
            bar.update(task, visible=True)

        def progress(done, total, name):
            bar.update(task, completed=done, total=total)

        resolved = resolve_model(model, on_create=on_create, progress=progress)
    if resolved.is_demo:
        err.print(f"[bold yellow]{DEMO_BANNER}[/]", highlight=False, soft_wrap=True)
        if resolved.created:
            err.print(f"[dim]demo model written to {resolved.path}[/]", highlight=False)
    return resolved


DS4_EXACT_TAG = "+ds4-exact"  # prefix-cache fingerprint suffix of the ds4-exact numerics (--ds4-exact)


def _load_engine(path: Path, backend: Optional[str], err, kernel: Optional[list[str]] = None,
                 check_kernels: bool = False, ds4_exact: bool = False):
    import dsv4

    from .. import settings

    backend = backend or settings.get("DSV4_BACKEND")
    kw = {"kernels": parse_kernel_choices(kernel)} if kernel else {}
    if ds4_exact:
        kw["act_quant"] = True
    with err.status(f"loading {path.name} ({backend})..."):
        engine = dsv4.load(str(path), backend=backend, check=check_kernels or None, **kw)
        return engine, engine.tokenizer


def parse_kernel_choices(items: list[str]) -> dict[str, str]:
    """`--kernel moe=fused_blockdot --kernel qmatmul=gemv` -> {'moe': 'fused_blockdot', ...}."""
    from ..errors import DsvError

    out = {}
    for it in items:
        op, sep, name = it.partition("=")
        if not sep or not op or not name:
            raise DsvError(f"--kernel expects OP=NAME (see `dsv4 kernels`), got {it!r}")
        out[op.strip()] = name.strip()
    return out


def _max_tokens(n: Optional[int], is_demo: bool) -> Optional[int]:
    if n is not None:
        return n
    return DEMO_MAX_TOKENS if is_demo else None


# Option declarations shared by both commands (typer reads the defaults' metadata).
_MODEL = typer.Option(None, "-m", "--model", help="GGUF model file (else DSV4_MODEL, ./ds4flash.gguf, or the demo).")
_BACKEND = typer.Option(None, "--backend", help="auto, torch, triton or mlx (default: DSV4_BACKEND or auto).")
_CTX = typer.Option(DEFAULT_CTX, "-c", "--ctx", min=64, help="Context size in tokens.")
_N = typer.Option(None, "-n", "--tokens", min=1, help="Max generated tokens per reply (default: until EOS or ctx full).")
_TEMP = typer.Option(None, "--temp", min=0.0, max=100.0, help="Temperature (default 1; 0 = greedy).")
_TOP_K = typer.Option(None, "--top-k", min=0, help="Keep the K most likely tokens (0 = off).")
_TOP_P = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
_MIN_P = typer.Option(0.05, "--min-p", min=0.0, max=1.0, help="Drop tokens below min_p x p(top token).")
_SEED = typer.Option(None, "--seed", min=0, help="RNG seed (same seed, same tokens; reseeded every turn).")
_SYSTEM = typer.Option(DEFAULT_CLI_SYSTEM, "--system", "-sys", help='System prompt ("" for none).')
_THINK = typer.Option(False, "--think", help="Reason before answering (the default).")
_NOTHINK = typer.Option(False, "--nothink", help="Answer directly, without reasoning.")
_THINK_MAX = typer.Option(False, "--think-max", help="Maximum reasoning effort (needs --ctx >= 393216).")
_KV_DIR = typer.Option(None, "--kv-dir", help="KV page files and prefix cache (default: DSV4_KV_DIR or <cache>/kv).")
_KV_BUDGET = typer.Option(None, "--kv-budget", help="Resident bytes for paged KV rows, e.g. 2G (default: DSV4_KV_BUDGET, no paging).")
_NO_KV_CACHE = typer.Option(False, "--no-kv-cache", help="Do not reuse or store prompt prefixes on disk.")
_KERNEL = typer.Option(None, "--kernel", help="Kernel variant OP=NAME for the triton backend (repeatable; list: dsv4 kernels).")
_CHECK_KERNELS = typer.Option(False, "--check-kernels", help="Shadow-run the reference for every accelerated op and log errors (slow).")
_DS4_EXACT = typer.Option(False, "--ds4-exact", help="ds4's numerics: activations rounded to Q8_0 / Q8_K before the quantized matmuls, as ds4's CPU path and CUDA decode do.")


@app.command()
def chat(
    model: Optional[str] = _MODEL,
    backend: Optional[str] = _BACKEND,
    ctx: int = _CTX,
    tokens: Optional[int] = _N,
    temp: Optional[float] = _TEMP,
    top_k: Optional[int] = _TOP_K,
    top_p: float = _TOP_P,
    min_p: float = _MIN_P,
    seed: Optional[int] = _SEED,
    system: str = _SYSTEM,
    think: bool = _THINK,
    nothink: bool = _NOTHINK,
    think_max: bool = _THINK_MAX,
    kv_dir: Optional[Path] = _KV_DIR,
    kv_budget: Optional[str] = _KV_BUDGET,
    no_kv_cache: bool = _NO_KV_CACHE,
    kernel: Optional[list[str]] = _KERNEL,
    check_kernels: bool = _CHECK_KERNELS,
    ds4_exact: bool = _DS4_EXACT,
):
    """Talk to the model in an interactive terminal session."""
    from .repl import ChatController, ChatOptions, Repl

    out, err = _consoles()
    mode = _think_from_flags(think, nothink, think_max)
    budget = KvPolicy.parse_budget(kv_budget)
    resolved = _resolve(model, err)
    engine, tok = _load_engine(resolved.path, backend, err, kernel, check_kernels, ds4_exact)
    opts = ChatOptions(
        ctx=ctx,
        max_tokens=_max_tokens(tokens, resolved.is_demo),
        temperature=1.0 if temp is None else temp,
        top_k=top_k or 0,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        system=system,
        think=ThinkMode[mode],
    )
    ctl = ChatController(engine, tok, opts, out, err, KvPolicy(engine, kv_dir, budget, not no_kv_cache))
    cap = f", replies capped at {opts.max_tokens} tokens (-n)" if opts.max_tokens else ""
    out.print(
        f"[bold]dsv4 chat[/] · {resolved.path.name} · backend {engine.backend}"
        f" · ctx {ctx} · {ctl.mode_name()}{cap}",
        highlight=False,
    )
    Repl(ctl, out, err).run()


# --------------------------------------------------------------------------------------------------
# run


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    from ..errors import DsvError

    if (prompt is None) == (prompt_file is None):
        raise DsvError("give exactly one of -p TEXT or --prompt-file FILE")
    if prompt is not None:
        return prompt
    try:
        return sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text(encoding="utf-8")
    except OSError as e:
        raise DsvError(f"cannot read --prompt-file {prompt_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DsvError(f"--prompt-file {prompt_file} is not UTF-8 text") from None


def _prompt_ids(tok, text: str, system: str, mode, ctx: int, err, raw: bool) -> list[int]:
    """--raw: the text as written (added-token strings become control ids); otherwise the ds4 CLI
    template, where a text starting with the BOS string counts as already rendered."""
    from ..chat import prompt_ids

    if raw:
        return tok.encode_rendered(text)
    return prompt_ids(tok, text, ChatPieces(tok).effective_think(mode, ctx, err), system)


def _token_json(tok, tid: int) -> dict:
    b = tok.token_bytes(tid)
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        text = b.decode("latin-1")  # json writes bytes >= 0x80 as \u00XX; `bytes` is authoritative
    return {"id": tid, "text": text, "bytes": list(b)}


@app.command()
def run(
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from FILE ('-' = stdin)."),
    model: Optional[str] = _MODEL,
    backend: Optional[str] = _BACKEND,
    ctx: int = _CTX,
    tokens: Optional[int] = _N,
    temp: Optional[float] = _TEMP,
    top_k: Optional[int] = _TOP_K,
    top_p: float = _TOP_P,
    min_p: float = _MIN_P,
    seed: Optional[int] = _SEED,
    system: str = _SYSTEM,
    think: bool = _THINK,
    nothink: bool = _NOTHINK,
    think_max: bool = _THINK_MAX,
    kv_dir: Optional[Path] = _KV_DIR,
    kv_budget: Optional[str] = _KV_BUDGET,
    no_kv_cache: bool = _NO_KV_CACHE,
    kernel: Optional[list[str]] = _KERNEL,
    check_kernels: bool = _CHECK_KERNELS,
    ds4_exact: bool = _DS4_EXACT,
    dump_tokens: bool = typer.Option(False, "--dump-tokens", help="Print the prompt's token ids as JSON and exit."),
    raw: bool = typer.Option(False, "--raw", help="Tokenize the prompt as written, without the chat template."),
    dump_logprobs: Optional[Path] = typer.Option(
        None, "--dump-logprobs", help="Write each step's top-K alternatives as JSON (greedy unless --temp is given)."
    ),
    logprobs_top_k: Optional[int] = typer.Option(
        None, "--logprobs-top-k", min=1, max=MAX_LOGPROBS_TOP_K, help="Alternatives per step (default: --top-k or 20)."
    ),
):
    """Generate one reply: the answer to stdout, stats to stderr (scriptable)."""
    from ..errors import DsvError
    from ..tokenizer import Tokenizer

    out, err = _consoles()
    mode_name = _think_from_flags(think, nothink, think_max)
    text = _read_prompt(prompt, prompt_file)
    budget = KvPolicy.parse_budget(kv_budget)
    resolved = _resolve(model, err)
    mode = ThinkMode[mode_name]
    if dump_tokens:
        from ..weights import open_gguf

        tok = Tokenizer.from_gguf(open_gguf(str(resolved.path)))  # metadata only: no weights are bound
        ids = _prompt_ids(tok, text, system, mode, ctx, None, raw)
        print(json.dumps(ids))
        for i in ids:
            err.print(f"{i:6d}  {tok.token_text(i)}", markup=False, highlight=False)
        return
    engine, tok = _load_engine(resolved.path, backend, err, kernel, check_kernels, ds4_exact)
    ids = _prompt_ids(tok, text, system, mode, ctx, err, raw)
    if len(ids) >= ctx:
        raise DsvError(f"prompt is {len(ids)} tokens but the context is {ctx}: raise --ctx or shorten the prompt")
    k_alt = logprobs_top_k or top_k or DEFAULT_LOGPROBS_TOP_K
    if dump_logprobs is not None and k_alt > MAX_LOGPROBS_TOP_K:
        raise DsvError(f"--dump-logprobs keeps at most {MAX_LOGPROBS_TOP_K} alternatives per step (got {k_alt})")
    # ds4 dumps logprobs greedily; an explicit --temp samples instead.
    temperature = (0.0 if dump_logprobs is not None else 1.0) if temp is None else temp
    kv = KvPolicy(engine, kv_dir, budget, not no_kv_cache)
    _one_shot(engine, tok, kv, ids, ctx, temperature, top_k or 0, top_p, min_p, seed, _max_tokens(tokens, resolved.is_demo),
              mode, dump_logprobs, k_alt, out, err)


def _one_shot(engine, tok, kv, ids, ctx, temperature, top_k, top_p, min_p, seed, max_tokens, mode, dump_path, k_alt, out, err):
    import time

    from ..sampling import Sampler, SamplingParams, top_logprobs
    from .repl import Finish, PrefillProgress, StopFlag, StreamView, TurnStats, generate, interruptible, prefill

    pieces = ChatPieces(tok)
    session, reused = kv.new_session(ctx, ids)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed))
    room = ctx - len(ids) - 1
    limit = room if max_tokens is None else min(max_tokens, room)
    view = StreamView(out, tok.stream(), tok.think_close, tok.eos, thinking=ids[-1] == tok.think_open,
                      rule=out.is_terminal)
    stats = TurnStats(ctx=ctx, mode=pieces.mode_name(mode))
    steps: list[dict] = []
    last_logits = [None]

    def on_token(t):
        if dump_path is not None:
            alts = top_logprobs(last_logits[0], k_alt)
            steps.append({
                "step": len(steps),
                "selected": _token_json(tok, t),
                "top_logprobs": [{"token": _token_json(tok, i), "logit": lg, "logprob": lp} for i, lg, lp in alts],
            })
        view.token(t)

    class _Tap:
        """Session wrapper that remembers the logits each sampled token was drawn from (for the dump)."""

        def decode(self, t):
            last_logits[0] = session.decode(t)
            return last_logits[0]

    stop = StopFlag()
    progress = PrefillProgress(err, len(ids) - reused)
    store = None
    with interruptible(stop):
        t0 = time.perf_counter()
        captured = []
        # cold: store all but the last prompt token, so that rerunning this prompt prefills one token
        mark = len(ids) - 1 if reused == 0 else None
        logits = prefill(session, ids[reused:], stop, progress, mark, lambda: captured.append(kv.capture(session)))
        progress.clear()
        stats.prefill_s = time.perf_counter() - t0
        stats.prompt_tokens = len(ids) - reused
        stats.reused = reused
        store = captured[0] if captured else None
        gen: list[int] = []
        finish = Finish.INTERRUPT
        if logits is not None:
            last_logits[0] = logits
            t1 = time.perf_counter()
            gen, finish = generate(_Tap(), logits, sampler, limit, tok.eos, stop, on_token)
            stats.gen_s = time.perf_counter() - t1
    view.finish()
    if store is not None:
        store()
    stats.gen_tokens = len(gen)
    stats.ctx_used = len(ids) + len(gen)
    stats.finish = (Finish.CTX if finish is Finish.LENGTH and limit == room else finish).value
    if dump_path is not None:
        doc = {"source": LOGPROBS_SOURCE, "prompt_tokens": len(ids), "ctx": ctx, "top_k": k_alt, "steps": steps}
        dump_path.write_text(json.dumps(doc) + "\n")
    err.print(stats.line(), markup=False, highlight=False, soft_wrap=True)
    if finish is Finish.INTERRUPT:
        sys.exit(EXIT_INTERRUPTED)  # SystemExit passes through click to main() with its code
