"""`--ds4-exact` on `dsv4 run`: the engine is built in the ds4-exact mode (activations rounded like ds4,
TorchOps(act_quant=True)), and its prompt prefixes live apart from the float mode's in the disk prefix
cache (another rounding, another state)."""
from __future__ import annotations

import json
import re

from dsv4.cli import main

PROMPT = " ".join(["the sea at night and the light far away"] * 12)  # > 64 tokens: the prefix is stored
REUSED = re.compile(r"(\d+) tok reused from disk")


def _dump_step0(path) -> dict[int, float]:
    doc = json.loads(path.read_text())
    return {a["token"]["id"]: a["logit"] for a in doc["steps"][0]["top_logprobs"]}


def _run(model, tmp_path, name, *extra):
    dump = tmp_path / f"{name}.json"
    rc = main(["run", "-m", str(model), "-p", PROMPT, "--raw", "-n", "1", "-c", "4096", "--backend", "torch",
               "--kv-dir", str(tmp_path / "kv"), "--dump-logprobs", str(dump), *extra])
    assert rc in (0, None)
    return _dump_step0(dump)


def test_ds4_exact_reaches_the_engine(tiny_q2_path, tmp_path, monkeypatch):
    """The flag builds the engine in the ds4-exact mode (the mode's numerics are tested op by op against
    TorchOps(act_quant=True) in tests/kernels); without it the engine keeps float activations."""
    import dsv4

    engines = []
    orig = dsv4.load
    monkeypatch.setattr(dsv4, "load", lambda *a, **kw: engines.append(orig(*a, **kw)) or engines[-1])
    _run(tiny_q2_path, tmp_path, "exact", "--ds4-exact", "--no-kv-cache")
    _run(tiny_q2_path, tmp_path, "float", "--no-kv-cache")
    assert [e.ops.act_quant for e in engines] == [True, False]


def test_ds4_exact_prefixes_are_kept_apart(tiny_q2_path, tmp_path, capsys):
    """A prompt prefix stored by a ds4-exact run is reused by the next ds4-exact run, never by a float run."""
    _run(tiny_q2_path, tmp_path, "exact", "--ds4-exact")
    assert not REUSED.search(capsys.readouterr().err)
    _run(tiny_q2_path, tmp_path, "float")
    err = capsys.readouterr().err
    assert not REUSED.search(err), err
    _run(tiny_q2_path, tmp_path, "exact2", "--ds4-exact")
    err = capsys.readouterr().err
    assert REUSED.search(err), err
