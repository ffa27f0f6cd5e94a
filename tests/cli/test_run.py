"""`dsv4 run` as a script would call it, on a fresh install: no model anywhere, so the embedded demo model
is written on the first run and reused afterwards; greedy runs are deterministic; --dump-tokens and
--dump-logprobs have the documented shapes; bad model paths fail with one line and exit code 2.

The first run happens once per test session (`prepare_demo_home`, shared with test_chat_pty.py through
the session's temp dir) because generating and loading the model dominates the runtime.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tolerances import assert_close

# Long enough (>= the prefix cache's 64-token minimum with the template) that the first run stores its
# prompt on disk and later runs start from it.
PROMPT = ("Write a short poem about the sea at night: the moon on the water, the sound of the waves on the "
          "rocks, a lighthouse far away, a small boat coming home, and the smell of salt in the cold wind. "
          "Keep it to four lines, and make the last line rhyme with the first one.")
REUSED = re.compile(r"· (\d+) tok reused from disk")
N_TOKENS = 3
DSV4 = [sys.executable, "-c", "import sys; from dsv4.cli import main; sys.exit(main())"]
RUN_TIMEOUT = 300
BAD_INPUT_TIMEOUT = 60
BANNER_WORDS = ("DEMO model", "RANDOM weights", "antirez/deepseek-v4-gguf", "q2", "q4", "DSV4_MODEL")
WRITTEN = "demo model written to"
STRIPPED_ENV = ("DSV4_MODEL", "DSV4_CACHE_DIR", "XDG_CACHE_HOME")


def isolated_env(root: Path) -> dict:
    """HOME and XDG_CACHE_HOME in `root`, no model setting: what a fresh install sees."""
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    env.update(HOME=str(root / "home"), XDG_CACHE_HOME=str(root / "cache"), PYTHONUNBUFFERED="1")
    return env


def dsv4(args, env, cwd, timeout=RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(DSV4 + list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def prepare_demo_home(base: Path) -> dict:
    """Once per session: an empty home, cache and cwd, then the first `dsv4 run` (which writes the demo
    model). Returns the dirs and that first run's result; later callers get the recorded result."""
    root = base / "fresh_install"
    marker = root / "first_run.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    for d in ("home", "cache", "cwd"):
        (root / d).mkdir(parents=True, exist_ok=True)
    env = isolated_env(root)
    t0 = time.perf_counter()
    r = dsv4(["run", "-p", PROMPT, "-n", str(N_TOKENS), "--temp", "0", "--nothink"], env, root / "cwd")
    info = {
        "root": str(root), "cwd": str(root / "cwd"), "cache": str(root / "cache"),
        "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "seconds": time.perf_counter() - t0,
    }
    marker.write_text(json.dumps(info))
    return info


def demo_files(info: dict) -> list[Path]:
    return sorted((Path(info["cache"]) / "dsv4" / "models").glob("*.gguf"))


@pytest.fixture(scope="session")
def first_run(tmp_path_factory) -> dict:
    info = prepare_demo_home(tmp_path_factory.getbasetemp())
    assert info["rc"] == 0, f"first `dsv4 run` failed (rc {info['rc']}):\n{info['stderr'][-2000:]}"
    return info


@pytest.fixture(scope="session")
def demo_tokenizer(first_run):
    from dsv4.tokenizer import Tokenizer
    from dsv4.weights import open_gguf

    return Tokenizer.from_gguf(open_gguf(str(demo_files(first_run)[0])))


def test_first_run_writes_demo_model_and_says_so(first_run):
    files = demo_files(first_run)
    assert len(files) == 1, f"expected one demo model in the user cache, found {files}"
    err = first_run["stderr"]
    for w in BANNER_WORDS:
        assert w in err, f"demo banner lacks {w!r}:\n{err}"
    assert WRITTEN in err, f"first run does not report writing the demo model:\n{err}"
    assert first_run["stdout"].strip(), "first run printed no answer"
    assert f"gen {N_TOKENS} tok" in err, f"stats line missing or wrong on stderr:\n{err}"


LOGPROBS_K = 5


@pytest.fixture(scope="session")
def second_run(first_run, tmp_path_factory) -> dict:
    """The same greedy run again (demo model and cached prompt reused), also dumping its logprobs."""
    model = demo_files(first_run)[0]
    mtime = model.stat().st_mtime_ns
    dump = tmp_path_factory.mktemp("dump") / "lp.json"
    r = dsv4(["run", "-p", PROMPT, "-n", str(N_TOKENS), "--temp", "0", "--nothink", "--dump-logprobs", str(dump),
              "--top-k", str(LOGPROBS_K)], isolated_env(Path(first_run["root"])), first_run["cwd"])
    assert r.returncode == 0, r.stderr[-2000:]
    return {"run": r, "model": model, "mtime_before": mtime, "dump": dump}


def test_second_run_reuses_demo_and_greedy_is_deterministic(first_run, second_run):
    r = second_run["run"]
    assert WRITTEN not in r.stderr, "second run wrote the demo model again"
    assert second_run["model"].stat().st_mtime_ns == second_run["mtime_before"], "the demo model was rewritten"
    assert "DEMO model" in r.stderr, "the demo banner must show on every run that uses the demo"
    assert r.stdout == first_run["stdout"], "--temp 0 gave different text on two runs"
    # the first run stored its prompt in the disk prefix cache: this run prefilled one token only
    assert not REUSED.search(first_run["stderr"]), "the first run cannot have reused anything"
    m = REUSED.search(r.stderr)
    assert m, f"second run did not reuse the cached prompt prefix:\n{r.stderr}"
    assert "prompt 1 tok," in r.stderr


def test_dump_logprobs_shape_and_greedy_top1(first_run, second_run, demo_tokenizer):
    doc = json.loads(second_run["dump"].read_text())
    k = LOGPROBS_K
    ids = _template_ids(demo_tokenizer, PROMPT, think=False)
    assert doc["prompt_tokens"] == len(ids)
    assert doc["top_k"] == k and doc["ctx"] == 32768
    assert [s["step"] for s in doc["steps"]] == list(range(N_TOKENS))
    text = b""
    for s in doc["steps"]:
        sel, alts = s["selected"], s["top_logprobs"]
        assert len(alts) == k
        # greedy: the selected token is the top-1 alternative, with the highest logprob
        assert alts[0]["token"]["id"] == sel["id"], f"step {s['step']}: selected is not top-1"
        lps = [a["logprob"] for a in alts]
        assert lps == sorted(lps, reverse=True) and lps[0] <= 0.0
        raw = bytes(sel["bytes"])
        assert raw == demo_tokenizer.token_bytes(sel["id"])
        try:
            assert sel["text"] == raw.decode("utf-8")
        except UnicodeDecodeError:  # a partial UTF-8 piece: bytes >= 0x80 are written as \u00XX
            assert sel["text"] == raw.decode("latin-1")
        lse = [a["logit"] - a["logprob"] for a in alts]
        assert_close(lse, [lse[0]] * k, "dump_logprobs", "float64", f"step {s['step']} logsumexp")
        text += raw
    # the dump's greedy steps are the tokens `run --temp 0` printed
    assert text.decode("utf-8", errors="replace") + "\n" == first_run["stdout"]


def _template_ids(tok, text: str, think: bool) -> list[int]:
    from dsv4.chat import DEFAULT_CLI_SYSTEM

    opener = tok.think_open if think else tok.think_close
    return [tok.bos, *tok.encode(DEFAULT_CLI_SYSTEM), tok.user, *tok.encode(text), tok.assistant, opener]


def test_dump_tokens_template_and_raw(first_run, demo_tokenizer):
    env, cwd = isolated_env(Path(first_run["root"])), first_run["cwd"]
    r = dsv4(["run", "--dump-tokens", "-p", "Ciao mondo"], env, cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == _template_ids(demo_tokenizer, "Ciao mondo", think=True)
    r = dsv4(["run", "--dump-tokens", "--raw", "-p", "<｜User｜>Ciao mondo"], env, cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == [demo_tokenizer.user, *demo_tokenizer.encode("Ciao mondo")]
    assert "Ġmondo" in r.stderr, "the id/piece table (ds4 style) goes to stderr"


def test_bad_model_paths_fail_in_one_line(tmp_path):
    env = isolated_env(tmp_path)
    missing = tmp_path / "nope.gguf"
    r = dsv4(["run", "-m", str(missing), "-p", "hi"], env, tmp_path, timeout=BAD_INPUT_TIMEOUT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: model file not found: {missing} (from -m; check the -m path)"]
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    r = dsv4(["run", "-m", str(junk), "-p", "hi"], env, tmp_path, timeout=BAD_INPUT_TIMEOUT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a GGUF file" in r.stderr
    r = dsv4(["run", "-p", "hi", "--prompt-file", str(junk)], env, tmp_path, timeout=BAD_INPUT_TIMEOUT)
    assert r.returncode == 2 and "exactly one of -p TEXT or --prompt-file" in r.stderr
