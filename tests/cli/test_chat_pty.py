"""`dsv4 chat` driven through a pseudo-terminal, as a person would, asserting on what the screen shows.

One scenario on the embedded demo model (fresh install: no -m, no DSV4_MODEL, empty cwd; the model was
written by the first `dsv4 run` of test_run.py's `prepare_demo_home`, so this is the reuse path): banner,
bad input that must leave the REPL alive, a streamed reply, /nothink and /think changing the rendered
turn, /read, the second turn's prefill counting only the new tokens, /save + /load without re-prefill,
Ctrl+C in mid-generation, /stats and /quit. Steps share one process because loading dominates runtime.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_run import demo_files, isolated_env, prepare_demo_home

pexpect = pytest.importorskip("pexpect")

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[=>]|\r")
STATS = re.compile(r"\[(think|nothink|think-max)\] prompt (\d+) tok, [\d.]+ t/s · gen (\d+) tok, [\d.]+ t/s · "
                   r"ctx (\d+)/(\d+)( · interrupted)?")
CONTEXT = re.compile(r"context: (\d+)/(\d+) tokens \((\d+) in the live session\)")
WAIT = 240  # seconds for one reply on a loaded 2-core machine
N_REPLY = 2


class Screen:
    """What the terminal shows, ANSI-stripped; `wait(regex)` reads until the regex matches after the
    previous match (so every step asserts on new output only)."""

    def __init__(self, child):
        self.child = child
        self.raw = ""
        self.pos = 0

    def wait(self, pattern, timeout=WAIT) -> re.Match:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while True:
            text = ANSI.sub("", self.raw)
            m = rx.search(text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = end - time.monotonic()
            if left <= 0 or not self.child.isalive() and not self._drain():
                raise AssertionError(f"screen never showed {pattern!r}; last output:\n{text[-1500:]}")
            try:
                self.raw += self.child.read_nonblocking(4096, timeout=min(left, 1.0))
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                if not self._drain():
                    raise AssertionError(f"chat exited while waiting for {pattern!r}:\n{text[-1500:]}")

    def _drain(self) -> bool:
        try:
            self.raw += self.child.read_nonblocking(65536, timeout=0)
            return True
        except (pexpect.TIMEOUT, pexpect.EOF):
            return False

    def send(self, line: str):
        self.child.sendline(line)

    def turn(self, line: str) -> re.Match:
        self.send(line)
        return self.wait(STATS.pattern)

    def context(self) -> tuple[int, int]:
        """(transcript tokens, tokens in the live session), from /stats."""
        self.send("/stats")
        m = self.wait(CONTEXT.pattern)
        return int(m.group(1)), int(m.group(3))


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    info = prepare_demo_home(tmp_path_factory.getbasetemp())
    assert info["rc"] == 0, info["stderr"][-2000:]
    env = isolated_env(Path(info["root"]))
    env.update(PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color")
    child = pexpect.spawn(sys.executable, ["-c", "import sys; from dsv4.cli import main; sys.exit(main())", "chat",
                                           "-n", str(N_REPLY), "--ctx", "4096"],
                          env=env, cwd=info["cwd"], encoding="utf-8", dimensions=(50, 220), timeout=WAIT)
    s = Screen(child)
    s.info = info
    yield s
    if child.isalive():
        child.terminate(force=True)


def new_turn_tokens(tok, text: str) -> int:
    return 3 + len(tok.encode(text))  # <｜User｜> text <｜Assistant｜> opener


@pytest.fixture(scope="module")
def tok(screen):
    from dsv4.tokenizer import Tokenizer
    from dsv4.weights import open_gguf

    return Tokenizer.from_gguf(open_gguf(str(demo_files(screen.info)[0])))


def test_chat_session(screen, tok, tmp_path):
    s = screen
    # banner: the demo model, plainly labelled, reused (not written again), then the prompt
    s.wait(r"DEMO model: a tiny DeepSeek V4 with RANDOM weights")
    s.wait(r"antirez/deepseek-v4-gguf")
    s.wait(r"dsv4 chat · demo-tiny-q2.*ctx 4096 · think")
    assert "demo model written" not in ANSI.sub("", s.raw)
    s.wait(r"dsv4>")

    # bad input: one clear line each, the REPL stays alive
    s.send("/ctx abc")
    s.wait(r"error: usage: /ctx N with N a whole number")
    s.send("/frobnicate")
    s.wait(r"error: unknown command /frobnicate")
    s.send(f"/read {tmp_path / 'missing.txt'}")
    s.wait(r"error: /read: no such file")
    s.send("/ctx 64")
    s.wait(r"context: 64 tokens")
    s.send("word " * 80)
    s.wait(r"error: prompt too long: \d+ tokens with history, context is 64")
    s.send("/ctx 4096")
    s.wait(r"context: 4096 tokens")

    # turn 1 (think): streamed answer, then the stats line
    m = s.turn("hello")
    assert m.group(1) == "think" and int(m.group(3)) == N_REPLY and m.group(5) == "4096"
    s.send("/stats")
    s.wait(r"last prompt: <｜User｜>hello<｜Assistant｜><think>\s")

    # /nothink then /read: the next turn opens with </think>, carries the file, and prefills only new tokens
    total, live = s.context()
    s.send("/nothink")
    s.wait(r"thinking mode: nothink")
    note = tmp_path / "note.txt"
    note.write_text("Please summarise this note.\n")
    s.send(f"/read {note}")
    s.wait(r"read .*note\.txt \(28 bytes\)")
    m = s.wait(STATS.pattern)
    assert m.group(1) == "nothink"
    expected = (total - live) + new_turn_tokens(tok, "Please summarise this note.")
    assert int(m.group(2)) == expected, f"turn 2 prefilled {m.group(2)} tokens, expected only the new {expected}"
    s.send("/stats")
    s.wait(r"last prompt: <｜User｜>Please summarise this note\.<｜Assistant｜></think>\s")

    # /save, /clear, /load: the conversation comes back and the next turn prefills only its own tokens
    saved_total, saved_live = s.context()
    s.send("/save s1")
    s.wait(rf"saved s1: {saved_live} tokens")
    s.send("/clear")
    s.wait(r"conversation cleared")
    assert s.context()[1] == 0
    s.send("/load s1")
    s.wait(rf"loaded s1: {saved_live} tokens, 2 turns, mode nothink")
    s.wait(r"you> Please summarise this note\.")
    assert s.context() == (saved_total, saved_live)
    s.send("/think")
    s.wait(r"thinking mode: think")
    m = s.turn("after load")
    assert m.group(1) == "think"
    assert int(m.group(2)) == (saved_total - saved_live) + new_turn_tokens(tok, "after load"), \
        "after /load the history must not be prefilled again"
    s.send("/stats")
    s.wait(r"last prompt: <｜User｜>after load<｜Assistant｜><think>\s")

    # Ctrl+C in mid-generation: text already streamed, the reply stops, the prompt is usable
    s.send("/tokens 400")
    s.wait(r"replies capped at 400 tokens")
    s.send("tell me a long story")
    s.wait(r"tell me a long story\n\s*\S")  # the first streamed text of the reply
    s.child.sendintr()
    m = s.wait(STATS.pattern)
    assert m.group(6) == " · interrupted" and 0 < int(m.group(3)) < 400
    s.send("/tokens 1")
    s.wait(r"replies capped at 1 tokens")
    m = s.turn("still there?")
    assert int(m.group(3)) == 1

    # Esc then Enter inserts a newline instead of sending (checked on /system: no reply is generated)
    s.child.send("/system be brief")
    s.child.send("\x1b\r")
    s.child.send("and kind\r")
    s.wait(r"system prompt set to 'be brief\\nand kind'")

    # /quit exits cleanly
    s.send("/quit")
    s.child.expect(pexpect.EOF, timeout=60)
    s.child.close()
    assert s.child.exitstatus == 0
