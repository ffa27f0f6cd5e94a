"""`dsv4 chat`: the interactive REPL, and the streaming turn loop shared with `dsv4 run`.

Owns terminal policy only: the token transcript of runtime §2.3 (built from tokenizer/chat pieces), one live
engine session synced to it (only the suffix the session lacks is prefilled), Ctrl+C handling, slash commands,
streamed display (reasoning dimmed, separated from the answer) and the per-turn stats line. It never touches
tensors: logits arrive as numpy arrays and go straight to the sampler.
"""
from __future__ import annotations

import enum
import json
import re
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .. import settings
from ..engine import GenerationStats
from ..errors import DsvError, SnapshotError

PROMPT = "dsv4> "
# Prefill is fed to the session in slices of this many tokens so that progress can be shown and Ctrl+C
# honoured between slices; the engine chunks further as it likes, so the value only trades UI latency.
PREFILL_UI_CHUNK = 256
PROGRESS_MIN_TOKENS = 512  # show a prefill progress line only for inputs at least this long
MIN_CTX = 64
SESSION_META_VERSION = 1
SESSION_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HISTORY_FILE = "chat_history"
SESSIONS_DIR = "sessions"
REASONING_STYLE = "grey50"
ANSWER_RULE = "── answer ──"


class Finish(enum.Enum):
    EOS = "eos"
    LENGTH = "length"  # -n exhausted
    CTX = "ctx"  # context full
    INTERRUPT = "interrupted"


# --------------------------------------------------------------------------------------------------
# Ctrl+C: a flag checked between prefill slices and between tokens, so the session is never cut mid-op.


class StopFlag:
    def __init__(self):
        self.set = False


@contextmanager
def interruptible(stop: StopFlag):
    """SIGINT sets `stop.set`; a second SIGINT while stopping raises KeyboardInterrupt (hard stop)."""

    def handler(signum, frame):
        if stop.set:
            raise KeyboardInterrupt
        stop.set = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (embedding): no handler, Ctrl+C behaves as Python's default
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------------
# Stats


@dataclass
class TurnStats(GenerationStats):
    """The engine's generation stats (prompt_tokens = tokens actually prefilled this turn, i.e. the suffix
    the session lacked) plus what the REPL shows about a turn."""

    ttft_s: float = 0.0  # from turn start to the first generated token
    ctx_used: int = 0
    ctx: int = 0
    finish: str = ""
    mode: str = ""
    reused: int = 0  # prompt tokens restored from the disk prefix cache instead of prefilled

    def line(self) -> str:
        head = f"[{self.mode}] " if self.mode else ""
        tail = f" · {self.finish}" if self.finish in (Finish.INTERRUPT.value, Finish.CTX.value) else ""
        if self.reused:
            tail += f" · {self.reused} tok reused from disk"
        return (
            f"{head}prompt {self.prompt_tokens} tok, {self.prefill_tps:.1f} t/s · "
            f"gen {self.gen_tokens} tok, {self.gen_tps:.1f} t/s · ctx {self.ctx_used}/{self.ctx}{tail}"
        )


# --------------------------------------------------------------------------------------------------
# The turn loop (shared with `dsv4 run`)


def prefill(session, ids, stop: StopFlag | None = None, progress=None, mark: int | None = None, on_mark=None):
    """Feed `ids` to the session; returns the last logits, or None if stopped between slices.
    `on_mark()` runs when the session holds exactly the first `mark` of `ids` (the prefix cache's capture)."""
    logits = None
    total = len(ids)
    cuts = set(range(0, total, PREFILL_UI_CHUNK))
    if mark is not None and 0 < mark < total:
        cuts.add(mark)
    starts = sorted(cuts)
    for i, start in enumerate(starts):
        if stop is not None and stop.set:
            return None
        if start == mark and on_mark is not None:
            on_mark()
        end = starts[i + 1] if i + 1 < len(starts) else total
        logits = session.prefill(list(ids[start:end]))
        if progress is not None:
            progress(end, total)
    return logits


def generate(session, logits, sampler, max_tokens: int, eos_id: int, stop: StopFlag | None, on_token):
    """Sample up to `max_tokens`; `on_token(id)` is called as each arrives. The last sampled token is not
    fed to the session (the next turn's sync does it), so an exhausted or stopped turn costs no extra step.
    Returns (generated ids, Finish)."""
    out: list[int] = []
    while True:
        if stop is not None and stop.set:
            return out, Finish.INTERRUPT
        if len(out) >= max_tokens:
            return out, Finish.LENGTH
        tok = int(sampler.sample(logits))
        out.append(tok)
        on_token(tok)
        if tok == eos_id:
            return out, Finish.EOS
        if len(out) >= max_tokens or (stop is not None and stop.set):
            continue  # loop head reports why
        logits = session.decode(tok)


# --------------------------------------------------------------------------------------------------
# Transcript: runtime §2.3, kept as segments so /system and /think-max can rebuild the header.


@dataclass
class Turn:
    user: str
    ids: list[int] = field(default_factory=list)  # opener + user + assistant opener + generated (+ EOS)
    reasoning: str = ""
    answer: str = ""
    mode: str = ""


class Transcript:
    """BOS, [Think-Max prefix], [system], then turns. Every generated token stays (reasoning included)."""

    def __init__(self, tok, render, system: str, think):
        self.tok = tok
        self.render = render  # the ChatPieces adapter
        self.system = system
        self.think = think
        self.turns: list[Turn] = []
        self.header: list[int] = render.header(system, think)

    @property
    def ids(self) -> list[int]:
        out = list(self.header)
        for t in self.turns:
            out.extend(t.ids)
        return out

    def __len__(self) -> int:
        return len(self.header) + sum(len(t.ids) for t in self.turns)

    def rebuild_header(self):
        self.header = self.render.header(self.system, self.think)

    def begin_turn(self, text: str) -> Turn:
        t = Turn(user=text, ids=self.render.user_turn(text, self.think), mode=self.render.mode_name(self.think))
        self.turns.append(t)
        return t

    def rollback(self):
        self.turns.pop()


# --------------------------------------------------------------------------------------------------
# Streaming display: reasoning dimmed, a rule, then the answer


class StreamView:
    def __init__(self, console: Console, detok, think_end_id: int, eos_id: int, thinking: bool, rule: bool = True):
        self.c = console
        self.rule = rule
        self.detok = detok
        self.think_end_id = think_end_id
        self.eos_id = eos_id
        self.in_reasoning = thinking
        self.reasoning: list[str] = []
        self.answer: list[str] = []
        self.started = False

    def token(self, tok: int):
        if tok == self.eos_id:
            return
        if tok == self.think_end_id and self.in_reasoning:
            self.in_reasoning = False
            self.c.print()  # ds4 forces a newline after </think>
            if self.rule:
                self.c.print(ANSWER_RULE, style=REASONING_STYLE, markup=False, highlight=False)
            return
        piece = self.detok.push(tok)
        if not piece:
            return
        if self.in_reasoning:
            self.reasoning.append(piece)
            self.c.print(piece, style=REASONING_STYLE, end="", markup=False, highlight=False, soft_wrap=True)
        else:
            self.answer.append(piece)
            self.c.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

    def finish(self):
        tail = self.detok.flush()
        if tail:
            (self.reasoning if self.in_reasoning else self.answer).append(tail)
            self.c.print(tail, end="", markup=False, highlight=False, soft_wrap=True)
        self.c.print()


class PrefillProgress:
    """An in-place `prefill i/N (p%)` line on a terminal, for long inputs only."""

    def __init__(self, console: Console, total: int):
        self.c = console
        self.active = console.is_terminal and total >= PROGRESS_MIN_TOKENS

    def __call__(self, done: int, total: int):
        if self.active:
            self.c.file.write(f"\rprefill {done}/{total} ({100 * done // total}%)")
            self.c.file.flush()

    def clear(self):
        if self.active:
            self.c.file.write("\r\x1b[K")
            self.c.file.flush()


# --------------------------------------------------------------------------------------------------
# Controller: one live session synced to the transcript


@dataclass
class ChatOptions:
    ctx: int
    max_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int | None
    system: str
    think: object  # chat.ThinkMode


class ChatController:
    def __init__(self, engine, tok, opts: ChatOptions, console: Console, err: Console, kv=None):
        from .chat_cmds import ChatPieces

        self.engine = engine
        self.opts = opts
        self.c = console
        self.err = err
        self.tok = tok
        self.pieces = ChatPieces(self.tok)
        self.think = self.pieces.effective_think(opts.think, opts.ctx, err)
        self.transcript = Transcript(self.tok, self.pieces, opts.system, self.think)
        self.ctx = opts.ctx
        self.kv = kv  # chat_cmds.KvPolicy: disk prefix reuse and paging for new sessions (None: plain)
        self.session = None  # created at the first turn, so a cold start can reuse a cached prefix
        self.last: TurnStats | None = None
        self.total_prefilled = 0
        self.last_rendered_tail = ""

    # -- state helpers
    @property
    def live_tokens(self) -> list[int]:
        return [] if self.session is None else list(self.session.tokens)

    def session_is_prefix(self) -> bool:
        have = self.live_tokens
        want = self.transcript.ids
        return len(have) <= len(want) and want[: len(have)] == have

    def reset_session(self):
        self.session = None  # the next turn starts a fresh one and prefills the whole transcript

    def _start_session(self, want: list[int]) -> int:
        """A new session for `want`; returns how many of its tokens came from the disk prefix cache."""
        if self.kv is None:
            self.session = self.engine.new_session(ctx=self.ctx)
            return 0
        self.session, reused = self.kv.new_session(self.ctx, want)
        return reused

    def mode_name(self) -> str:
        return self.pieces.mode_name(self.think)

    # -- a turn
    def turn(self, text: str) -> TurnStats | None:
        t0 = time.perf_counter()
        turn = self.transcript.begin_turn(text)
        want = self.transcript.ids
        if len(want) + 1 >= self.ctx:  # room for at least one generated token
            self.transcript.rollback()
            raise DsvError(
                f"prompt too long: {len(want)} tokens with history, context is {self.ctx} "
                f"(use /ctx N to grow it or /clear to start over)"
            )
        if not self.session_is_prefix():
            self.reset_session()  # /ctx, /system, /think-max or an interrupted prefill: full re-prefill
        reused = self._start_session(want) if self.session is None else 0
        cold = len(self.session.tokens) == 0
        suffix = want[len(self.session.tokens) :]
        self.last_rendered_tail = self.tok.decode(turn.ids)
        stats = TurnStats(ctx=self.ctx, mode=self.mode_name(), reused=reused)
        store = None
        from ..sampling import Sampler, SamplingParams

        sampler = Sampler(
            SamplingParams(
                temperature=self.opts.temperature,
                top_k=self.opts.top_k,
                top_p=self.opts.top_p,
                min_p=self.opts.min_p,
                seed=self.opts.seed,
            )
        )
        room = self.ctx - len(want) - 1
        max_tokens = room if self.opts.max_tokens is None else min(self.opts.max_tokens, room)
        view = StreamView(
            self.c, self.tok.stream(), self.pieces.think_end_id, self.pieces.eos_id, self.pieces.is_thinking(self.think)
        )
        stop = StopFlag()
        progress = PrefillProgress(self.err, len(suffix))
        gen: list[int] = []
        finish = Finish.INTERRUPT
        try:
            with interruptible(stop):
                tp = time.perf_counter()
                captured = []
                # A cold start stores all but the last prompt token on disk, so the same opening (a
                # re-run, a long pasted document) later restores it and prefills one token only.
                mark = len(suffix) - 1 if cold and self.kv is not None else None
                logits = prefill(self.session, suffix, stop, progress, mark,
                                 lambda: captured.append(self.kv.capture(self.session)))
                progress.clear()
                stats.prompt_tokens = len(suffix)
                stats.prefill_s = time.perf_counter() - tp
                self.total_prefilled += len(suffix)
                store = captured[0] if captured else None
                if logits is not None and not stop.set:
                    tg = time.perf_counter()
                    first = [True]

                    def on_token(tok):
                        if first[0]:
                            stats.ttft_s = time.perf_counter() - t0
                            first[0] = False
                        gen.append(tok)
                        view.token(tok)

                    _, finish = generate(
                        self.session, logits, sampler, max_tokens, self.pieces.eos_id, stop, on_token
                    )
                    stats.gen_s = time.perf_counter() - tg
        except KeyboardInterrupt:
            # Hard stop (second Ctrl+C) inside an engine call: the session's state is unknown, drop it.
            progress.clear()
            finish = Finish.INTERRUPT
            self.reset_session()
        view.finish()
        if store is not None and self.session is not None:
            store()
        if not gen:
            # Nothing generated (Ctrl+C during prefill): roll the turn back, as ds4 does; the session holds
            # part of the turn so it is no longer a prefix and the next turn re-syncs from scratch.
            self.transcript.rollback()
            if not self.session_is_prefix():
                self.reset_session()
            self.err.print("[yellow]interrupted before any token: turn discarded[/]")
            return None
        if finish is Finish.LENGTH and max_tokens == room:
            finish = Finish.CTX
        turn.ids.extend(gen)
        if gen[-1] != self.pieces.eos_id:
            turn.ids.append(self.pieces.eos_id)  # runtime §2.3 rule 5: EOS closes every reply
        turn.reasoning = "".join(view.reasoning)
        turn.answer = "".join(view.answer)
        stats.gen_tokens = len(gen)
        stats.finish = finish.value
        stats.ctx_used = len(self.transcript)
        self.last = stats
        return stats

    def repair(self):
        """After a Ctrl+C that landed outside the turn loop's handler: drop a turn that has no reply yet and
        a session that no longer matches the transcript, so the next turn starts consistent."""
        turns = self.transcript.turns
        if turns and turns[-1].ids[-1] != self.pieces.eos_id:
            self.transcript.rollback()
        if not self.session_is_prefix():
            self.reset_session()

    # -- commands that change state
    def set_think(self, mode) -> str:
        before_max = self.pieces.is_max(self.think)
        self.think = self.pieces.effective_think(mode, self.ctx, self.err)
        self.transcript.think = self.think
        if before_max != self.pieces.is_max(self.think):
            self.transcript.rebuild_header()  # the Max prefix sits after BOS: the KV is invalid
        return self.mode_name()

    def set_ctx(self, n: int):
        need = len(self.transcript) + 1
        if n < need:
            raise DsvError(f"/ctx {n} is too small: the conversation already holds {need - 1} tokens (/clear first)")
        self.ctx = n
        self.opts.ctx = n
        self.reset_session()
        was_max = self.pieces.is_max(self.think)
        self.think = self.pieces.effective_think(self.think, n, self.err)  # a smaller ctx may end think-max
        self.transcript.think = self.think
        if was_max != self.pieces.is_max(self.think):
            self.transcript.rebuild_header()

    def set_system(self, text: str):
        self.transcript.system = text
        self.opts.system = text
        self.transcript.rebuild_header()

    def clear(self):
        self.transcript = Transcript(self.tok, self.pieces, self.opts.system, self.think)
        self.reset_session()
        self.last = None

    # -- snapshots
    def _paths(self, name: str) -> tuple[Path, Path]:
        if not SESSION_NAME_RE.match(name):
            raise DsvError(f"bad session name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
        d = settings.cache_dir() / SESSIONS_DIR
        return d / f"{name}.kv", d / f"{name}.json"

    def save(self, name: str) -> Path:
        kv, meta = self._paths(name)
        if self.session is None:
            raise DsvError("nothing to save yet: send a message first")
        kv.parent.mkdir(parents=True, exist_ok=True)
        self.session.save(str(kv))
        data = {
            "version": SESSION_META_VERSION,
            "ctx": self.ctx,
            "think": self.think.name,
            "system": self.transcript.system,
            "header": self.transcript.header,
            "turns": [asdict(t) for t in self.transcript.turns],
            "session_tokens": len(self.session.tokens),
        }
        meta.write_text(json.dumps(data))
        return kv

    def load(self, name: str) -> int:
        kv, meta = self._paths(name)
        if not meta.is_file() or not kv.is_file():
            saved = sorted(p.stem for p in meta.parent.glob("*.json")) if meta.parent.is_dir() else []
            hint = f" (saved: {', '.join(saved)})" if saved else " (nothing saved yet: /save NAME)"
            raise DsvError(f"no saved session named {name!r}{hint}")
        try:
            data = json.loads(meta.read_text())
            if data.get("version") != SESSION_META_VERSION:
                raise ValueError("version")
            think = self.pieces.think_mode(data["think"])
            turns = [Turn(**t) for t in data["turns"]]
        except (ValueError, KeyError, TypeError):
            raise SnapshotError(f"session metadata {meta} is corrupt or from another dsv4 version") from None
        ctx = max(int(data["ctx"]), self.ctx)
        session = self.engine.load_session(str(kv), ctx=ctx) if _accepts_ctx(self.engine.load_session) else \
            self.engine.load_session(str(kv))
        transcript = Transcript(self.tok, self.pieces, data["system"], think)
        transcript.header = list(data["header"])
        transcript.turns = turns
        have = list(session.tokens)
        if transcript.ids[: len(have)] != have:
            raise SnapshotError(f"snapshot {kv} does not match its transcript {meta}")
        self.session, self.transcript, self.think = session, transcript, think
        self.ctx = int(getattr(session, "ctx", ctx))
        self.opts.system = data["system"]
        self.last = None
        return len(have)


def _accepts_ctx(fn) -> bool:
    import inspect

    try:
        return "ctx" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# The REPL


HELP = """\
Type a message and press Enter. Esc then Enter (or a paste) inserts a newline.
  /help            this help
  /think           thinking mode (reasoning shown dimmed, then the answer)
  /nothink         answer directly, no reasoning
  /think-max       maximum reasoning effort (needs /ctx >= 393216, else acts as /think)
  /ctx N           set the context size (the conversation is kept and re-read)
  /tokens N        cap each reply at N tokens ("/tokens" alone: no cap)
  /read FILE       send the contents of FILE as your next message
  /system [TEXT]   show or set the system prompt ("/system \\"\\"" clears it)
  /clear           start a new conversation
  /save NAME       save the conversation and its KV state
  /load NAME       restore a saved conversation (no re-prefill)
  /stats           last turn's timings and the session state
  /quit            leave (Ctrl+D works too)
Ctrl+C stops a reply and keeps what was generated."""


class Repl:
    def __init__(self, ctl: ChatController, console: Console, err: Console):
        self.ctl = ctl
        self.c = console
        self.err = err
        self.pending: str | None = None  # a /read file's text, sent as the next message
        self.commands = {
            "/help": self.cmd_help,
            "/think": self.cmd_think,
            "/nothink": self.cmd_nothink,
            "/think-max": self.cmd_think_max,
            "/ctx": self.cmd_ctx,
            "/tokens": self.cmd_tokens,
            "/read": self.cmd_read,
            "/system": self.cmd_system,
            "/clear": self.cmd_clear,
            "/save": self.cmd_save,
            "/load": self.cmd_load,
            "/stats": self.cmd_stats,
            "/quit": self.cmd_quit,
            "/exit": self.cmd_quit,
        }

    # -- input
    def _session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        kb = KeyBindings()

        @kb.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        try:
            path = settings.cache_dir() / HISTORY_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        return PromptSession(history=history, key_bindings=kb, multiline=False, enable_open_in_editor=False)

    def run(self):
        # prompt_toolkit needs a terminal; piped input (`echo hi | dsv4 chat`) is read line by line.
        read = self._session().prompt if sys.stdin.isatty() and sys.stdout.isatty() else input
        self.c.print("[dim]Type /help for commands, Ctrl+D to quit.[/]")
        while True:
            try:
                line = read(PROMPT)
            except KeyboardInterrupt:
                continue  # Ctrl+C at the prompt clears the line, like a shell
            except EOFError:
                self.c.print()
                return
            text = line.strip()
            if not text:
                continue
            try:
                if text.startswith("/"):
                    if self.dispatch(text) is False:
                        return
                else:
                    self.send(text)
                if self.pending is not None:
                    body, self.pending = self.pending, None
                    self.send(body)
            except DsvError as e:
                self.err.print(f"[red]error:[/] {escape(str(e))}")
            except KeyboardInterrupt:
                self.ctl.repair()
                self.err.print("[yellow]interrupted[/]")

    def dispatch(self, text: str):
        name, _, arg = text.partition(" ")
        fn = self.commands.get(name.lower())
        if fn is None:
            close = [c for c in self.commands if c.startswith(name.lower()[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise DsvError(f"unknown command {name}{hint}; /help lists commands")
        return fn(arg.strip())

    def send(self, text: str):
        stats = self.ctl.turn(text)
        if stats is not None:
            self.err.print(stats.line(), style="dim", markup=False, highlight=False, soft_wrap=True)

    # -- commands
    def _no_arg(self, name: str, arg: str):
        if arg:
            raise DsvError(f"{name} takes no arguments")

    def cmd_help(self, arg):
        self.c.print(HELP, markup=False, highlight=False)

    def _set_mode(self, name: str, mode, arg):
        self._no_arg(name, arg)
        label = self.ctl.set_think(mode)
        self.c.print(f"thinking mode: {label}", markup=False)

    def cmd_think(self, arg):
        self._set_mode("/think", self.ctl.pieces.think_mode("HIGH"), arg)

    def cmd_nothink(self, arg):
        self._set_mode("/nothink", self.ctl.pieces.think_mode("NONE"), arg)

    def cmd_think_max(self, arg):
        self._set_mode("/think-max", self.ctl.pieces.think_mode("MAX"), arg)

    def cmd_ctx(self, arg):
        if not arg:
            self.c.print(f"context: {len(self.ctl.transcript)}/{self.ctl.ctx} tokens used", markup=False)
            return
        n = int(arg) if arg.isdigit() else None
        if n is None or n < MIN_CTX:
            raise DsvError(f"usage: /ctx N with N a whole number >= {MIN_CTX}, e.g. /ctx 65536 (got {arg!r})")
        self.ctl.set_ctx(n)
        self.c.print(f"context: {n} tokens (the conversation is re-read on the next turn)", markup=False)

    def cmd_tokens(self, arg):
        if not arg:
            self.ctl.opts.max_tokens = None
            self.c.print("replies are no longer capped (they end at EOS or a full context)", markup=False)
            return
        if not arg.isdigit() or int(arg) < 1:
            raise DsvError(f"usage: /tokens N with N a whole number >= 1 (got {arg!r})")
        self.ctl.opts.max_tokens = int(arg)
        self.c.print(f"replies capped at {int(arg)} tokens", markup=False)

    def cmd_read(self, arg):
        if not arg:
            raise DsvError("usage: /read FILE")
        path = Path(arg).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DsvError(f"/read: no such file: {path}") from None
        except IsADirectoryError:
            raise DsvError(f"/read: {path} is a directory") from None
        except OSError as e:
            raise DsvError(f"/read: cannot read {path}: {e.strerror}") from None
        text = data.decode("utf-8", errors="replace").strip()
        if not text:
            raise DsvError(f"/read: {path} is empty")
        self.c.print(f"read {path} ({len(data)} bytes)", markup=False)
        self.pending = text

    def cmd_system(self, arg):
        if not arg:
            cur = self.ctl.transcript.system
            self.c.print(f"system prompt: {cur!r}" if cur else "system prompt: (none)", markup=False)
            return
        text = "" if arg in ('""', "''") else arg
        self.ctl.set_system(text)
        self.c.print(f"system prompt set to {text!r} (the conversation is re-read on the next turn)", markup=False)

    def cmd_clear(self, arg):
        self._no_arg("/clear", arg)
        self.ctl.clear()
        self.c.print("conversation cleared", markup=False)

    def cmd_save(self, arg):
        if not arg:
            raise DsvError("usage: /save NAME")
        path = self.ctl.save(arg)
        self.c.print(f"saved {arg}: {len(self.ctl.session.tokens)} tokens -> {path}", markup=False)

    def cmd_load(self, arg):
        if not arg:
            raise DsvError("usage: /load NAME")
        n = self.ctl.load(arg)
        turns = self.ctl.transcript.turns
        self.c.print(f"loaded {arg}: {n} tokens, {len(turns)} turns, mode {self.ctl.mode_name()}", markup=False)
        for t in turns[-3:]:
            self.c.print(f"you> {t.user}", markup=False, highlight=False)
            self.c.print(t.answer or t.reasoning, markup=False, highlight=False)

    def cmd_stats(self, arg):
        self._no_arg("/stats", arg)
        ctl = self.ctl
        rows = [
            ("mode", ctl.mode_name()),
            ("context", f"{len(ctl.transcript)}/{ctl.ctx} tokens ({len(ctl.live_tokens)} in the live session)"),
            ("turns", str(len(ctl.transcript.turns))),
            ("prefilled in total", f"{ctl.total_prefilled} tokens"),
            ("system", repr(ctl.transcript.system)),
        ]
        if ctl.last is not None:
            s = ctl.last
            rows += [
                ("last turn", s.line()),
                ("time to first token", f"{s.ttft_s * 1000:.0f} ms"),
                ("last prompt", ctl.last_rendered_tail),
            ]
        for k, v in rows:
            self.c.print(f"{k:>20}: {v}", markup=False, highlight=False)

    def cmd_quit(self, arg):
        return False
