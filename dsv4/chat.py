"""DeepSeek V4 chat rendering and DSML tool calls (runtime.md §2).

Owns: think modes, the conversation renderer (ds4-server's `render_chat_prompt_text`: tools preamble and
schema lines before the system text, reasoning dropped unless tools are in play, tool results, assistant
DSML tool calls), the single-turn CLI prompt, the REPL token transcript (§2.3), the lenient DSML parser,
the incremental DSML tracker behind forced-greedy sampling (§3), and the think-tag display splitter (§4.4).
Must not know tensors or sampling math.
"""
from __future__ import annotations

import enum
import json
import re
import warnings
from dataclasses import dataclass, field

from .errors import ChatError
from .tokenizer import (
    ASSISTANT_TEXT,
    BOS_TEXT,
    DSML_TEXT,
    EOS_TEXT,
    THINK_CLOSE_TEXT,
    THINK_OPEN_TEXT,
    USER_TEXT,
)

THINK_MAX_MIN_CTX = 393216  # below this context Think-Max silently becomes High (runtime §2.1)

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

DEFAULT_CLI_SYSTEM = "You are a helpful assistant"  # ds4 CLI default: no period

TOOLS_PREAMBLE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user question. You can invoke tools by writing a "
    '"<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    'String parameters should be specified as raw text and set `string="true"`. Preserve characters such as '
    "`>`, `&`, and `&&` exactly; never replace normal string characters with XML or HTML entity escapes. "
    "Only if a string value itself contains the exact closing parameter tag `</｜DSML｜parameter>`, write that "
    "tag as `&lt;/｜DSML｜parameter>` inside the value. For all other types (numbers, booleans, arrays, "
    'objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_EPILOGUE = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls. "
    "Use the exact parameter names from the schemas."
)
SYSTEM_JOIN = "\n\n"

# DSML markup (full form; the parser also accepts the short `DSML｜` and the plain XML forms).
DSML_BLOCK_SEP = "\n\n"
TAG_TOOL_CALLS = "tool_calls"
TAG_INVOKE = "invoke"
TAG_PARAMETER = "parameter"
DSML_PARAM_CLOSE = f"</{DSML_TEXT}{TAG_PARAMETER}>"
DSML_PARAM_CLOSE_ESCAPED = f"&lt;/{DSML_TEXT}{TAG_PARAMETER}>"
DSML_PARAM_CLOSE_JSON_ESCAPED = f"\\u003c/{DSML_TEXT}{TAG_PARAMETER}>"
TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"
TOOL_RESULT_CLOSE_ESCAPED = "&lt;/tool_result>"
DSML_PREFIXES = (DSML_TEXT, "DSML｜", "")  # full, short, plain: parse priority order


class ThinkMode(enum.Enum):
    NONE = "none"
    HIGH = "high"
    MAX = "max"

    @property
    def thinking(self) -> bool:
        return self is not ThinkMode.NONE

    @property
    def opener(self) -> str:
        """What follows `<｜Assistant｜>` when the model is to answer in this mode."""
        return THINK_OPEN_TEXT if self.thinking else THINK_CLOSE_TEXT


class Role(enum.Enum):
    SYSTEM = "system"
    DEVELOPER = "developer"  # folded into the system text, as ds4-server does
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"
    FUNCTION = "function"  # legacy name of a tool result

    @classmethod
    def parse(cls, role) -> Role:
        if isinstance(role, cls):
            return role
        try:
            return cls(role)
        except ValueError:
            known = ", ".join(r.value for r in cls)
            raise ChatError(f"unknown message role {role!r}; expected one of: {known}") from None


SYSTEM_ROLES = (Role.SYSTEM, Role.DEVELOPER)
TOOL_ROLES = (Role.TOOL, Role.FUNCTION)


@dataclass
class ToolCall:
    """One tool invocation. `arguments` is a dict or JSON text; `raw`, when set, is the exact sampled
    DSML block of the whole assistant turn's tool calls, replayed verbatim (exact replay, §2.6)."""

    name: str
    arguments: dict | str = field(default_factory=dict)
    id: str | None = None
    raw: str | None = None

    @classmethod
    def from_any(cls, c) -> ToolCall:
        """Accept a ToolCall or an OpenAI-style dict ({"function": {"name", "arguments"}, "id"})."""
        if isinstance(c, ToolCall):
            return c
        if not isinstance(c, dict):
            raise ChatError(f"tool call must be a dict or ToolCall, got {type(c).__name__}")
        fn = c.get("function", c)
        if "name" not in fn:
            raise ChatError(f"tool call without a name: {json.dumps(c)[:120]}")
        return cls(name=fn["name"], arguments=fn.get("arguments", {}), id=c.get("id"))


@dataclass
class Message:
    role: Role | str
    content: str | list = ""
    reasoning: str | None = None
    tool_calls: list | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @classmethod
    def from_any(cls, m) -> Message:
        """Accept a Message or an OpenAI-style dict (`reasoning_content` read for assistants)."""
        if isinstance(m, Message):
            return m
        if not isinstance(m, dict) or "role" not in m:
            raise ChatError(f"message must be a Message or a dict with a 'role', got {m!r:.120}")
        return cls(
            role=m["role"],
            content=m.get("content") or "",
            reasoning=m.get("reasoning_content", m.get("reasoning")),
            tool_calls=m.get("tool_calls"),
            tool_call_id=m.get("tool_call_id"),
            name=m.get("name"),
        )

    def text(self) -> str:
        """String content as is; array content: the `text` parts concatenated, other parts skipped."""
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "".join(
                p.get("text", "") for p in self.content if isinstance(p, dict) and p.get("type", "text") == "text"
            )
        raise ChatError(f"message content must be a string or a list of parts, got {type(self.content).__name__}")


def effective_think(think: ThinkMode, ctx: int | None) -> ThinkMode:
    """MAX needs ctx >= 393216; below that it becomes HIGH with a warning. ctx=None: not checked."""
    if think is ThinkMode.MAX and ctx is not None and ctx < THINK_MAX_MIN_CTX:
        warnings.warn(
            f"Think-Max needs a context of at least {THINK_MAX_MIN_CTX} tokens (got {ctx}); using Think-High",
            stacklevel=3,
        )
        return ThinkMode.HIGH
    return think


# ---- rendering ----------------------------------------------------------------------------------


def _escape_attr(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _minify(v) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def tool_schema_line(tool) -> str:
    """One schema line: a raw JSON string is copied verbatim; OpenAI {"type":"function","function":F}
    is unwrapped to F; other dicts (Anthropic {name, description, input_schema}) are kept; dicts are
    serialized compactly (ds4 copies the client's bytes, which for compact clients is this)."""
    if isinstance(tool, str):
        return tool
    if not isinstance(tool, dict):
        raise ChatError(f"tool schema must be a dict or JSON text, got {type(tool).__name__}")
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        tool = tool["function"]
    return _minify(tool)


def render_tools(tools: list) -> str:
    """The tools block of the system text: preamble, one schema per line, epilogue (runtime §2.5)."""
    return TOOLS_PREAMBLE + "\n".join(tool_schema_line(t) for t in tools) + TOOLS_EPILOGUE


def _arguments_dict(call: ToolCall) -> dict | str:
    """The call's arguments as a dict, or as raw text when they are valid JSON but not an object."""
    args = call.arguments
    if isinstance(args, dict):
        return args
    if not isinstance(args, str):
        raise ChatError(f"tool call {call.name!r}: arguments must be a JSON object or JSON text")
    try:
        parsed = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError as e:
        raise ChatError(
            f"tool call {call.name!r} has invalid JSON arguments ({e.msg} at char {e.pos}): {args[:80]!r}"
        ) from None
    return parsed if isinstance(parsed, dict) else args


def _render_parameter(name: str, value) -> str:
    if isinstance(value, str):
        body, is_str = value.replace(DSML_PARAM_CLOSE, DSML_PARAM_CLOSE_ESCAPED), "true"
    else:
        body, is_str = _minify(value).replace(DSML_PARAM_CLOSE, DSML_PARAM_CLOSE_JSON_ESCAPED), "false"
    return f'<{DSML_TEXT}{TAG_PARAMETER} name="{_escape_attr(name)}" string="{is_str}">{body}{DSML_PARAM_CLOSE}\n'


def render_tool_calls(calls: list) -> str:
    """Canonical DSML block of an assistant's tool calls, starting with the `\\n\\n` separator (§2.6);
    the exact sampled block is used instead when the calls carry one (`ToolCall.raw`)."""
    calls = [ToolCall.from_any(c) for c in calls]
    if calls and calls[0].raw is not None:
        return calls[0].raw
    out = [f"{DSML_BLOCK_SEP}<{DSML_TEXT}{TAG_TOOL_CALLS}>\n"]
    for call in calls:
        out.append(f'<{DSML_TEXT}{TAG_INVOKE} name="{_escape_attr(call.name)}">\n')
        args = _arguments_dict(call)
        if isinstance(args, str):
            out.append(_render_parameter("arguments", args))
        else:
            out.extend(_render_parameter(k, v) for k, v in args.items())
        out.append(f"</{DSML_TEXT}{TAG_INVOKE}>\n")
    out.append(f"</{DSML_TEXT}{TAG_TOOL_CALLS}>")
    return "".join(out)


def render(
    messages: list,
    think: ThinkMode,
    tools: list | None = None,
    ctx: int | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation to the exact prompt text (pass it to `Tokenizer.encode_rendered`).

    Follows ds4-server (runtime §2.4): system/developer text hoisted to the top after the tools block;
    tool results concatenated in one user turn; earlier reasoning dropped unless tools are in play.
    Special-token strings inside message content are not escaped: like ds4-server and the official
    tokenizer, they become control tokens when encoded. Use `Transcript`/`prompt_ids` to keep typed
    text literal.
    """
    think = effective_think(think, ctx)
    msgs = [Message.from_any(m) for m in messages]
    roles = [Role.parse(m.role) for m in msgs]
    tool_context = bool(tools) or any(
        r in TOOL_ROLES or (r is Role.ASSISTANT and m.tool_calls) for r, m in zip(roles, msgs)
    )
    system_parts = [render_tools(tools)] if tools else []
    system_parts += [m.text() for r, m in zip(roles, msgs) if r in SYSTEM_ROLES and m.text()]
    out = [BOS_TEXT]
    if think is ThinkMode.MAX:
        out.append(THINK_MAX_PREFIX)
    out.append(SYSTEM_JOIN.join(system_parts))

    last_query = max((i for i, r in enumerate(roles) if r is Role.USER or r in TOOL_ROLES), default=-1)
    prev: Role | None = None
    for i, (role, m) in enumerate(zip(roles, msgs)):
        if role in SYSTEM_ROLES:
            continue
        if role is Role.USER:
            out.append(USER_TEXT + m.text())
        elif role in TOOL_ROLES:
            if prev not in TOOL_ROLES:
                out.append(USER_TEXT)
            body = m.text().replace(TOOL_RESULT_CLOSE, TOOL_RESULT_CLOSE_ESCAPED)
            out.append(TOOL_RESULT_OPEN + body + TOOL_RESULT_CLOSE)
        else:  # assistant
            if prev is Role.USER or prev in TOOL_ROLES:
                out.append(ASSISTANT_TEXT)
            if think.thinking and (tool_context or i > last_query):
                out.append(THINK_OPEN_TEXT + (m.reasoning or "") + THINK_CLOSE_TEXT)
            else:
                out.append(THINK_CLOSE_TEXT)
            out.append(m.text())
            if m.tool_calls:
                out.append(render_tool_calls(m.tool_calls))
            out.append(EOS_TEXT)
        prev = Role.TOOL if role in TOOL_ROLES else role
    if add_generation_prompt and (prev is Role.USER or prev is Role.TOOL):
        out.append(ASSISTANT_TEXT + think.opener)
    return "".join(out)


def render_prompt(text: str, think: ThinkMode, system: str = "", ctx: int | None = None) -> str:
    """Single-turn prompt text (`dsv4 run -p`): BOS [Max prefix] [system] <｜User｜>TEXT<｜Assistant｜>opener.
    For token ids that keep typed special strings literal, use `prompt_ids`."""
    think = effective_think(think, ctx)
    prefix = THINK_MAX_PREFIX if think is ThinkMode.MAX else ""
    return f"{BOS_TEXT}{prefix}{system}{USER_TEXT}{text}{ASSISTANT_TEXT}{think.opener}"


def prompt_ids(tok, text: str, think: ThinkMode, system: str = "", ctx: int | None = None) -> list[int]:
    """Token ids of the single-turn prompt as ds4's CLI builds them (§2.2): system and user text are
    plain BPE, so special strings typed by the user stay literal. Text that starts with the BOS string
    is taken as an already rendered prompt (rendered-chat tokenizer; system and think ignored)."""
    if text.startswith(BOS_TEXT):
        return tok.encode_rendered(text)
    t = Transcript(tok, think, system=system, ctx=ctx)
    return t.user(text)


class Transcript:
    """The REPL's token transcript (runtime §2.3): the KV truth, never re-rendered. Starts as BOS, [Max
    prefix], [system]; `user()` appends a turn and the assistant opener and returns the full ids to
    sync the session to; generated tokens are appended verbatim (reasoning kept), then EOS."""

    def __init__(self, tok, think: ThinkMode, system: str = "", ctx: int | None = None):
        self.tok = tok
        self.ctx = ctx
        self.think = effective_think(think, ctx)
        self._system = tok.encode(system) if system else []
        self._max = tok.encode(THINK_MAX_PREFIX)
        self.ids: list[int] = [tok.bos] + (self._max if self.think is ThinkMode.MAX else []) + self._system
        self._turn_start: int | None = None

    def set_think(self, think: ThinkMode) -> bool:
        """Change the mode for future turns. Returns True when the Max prefix was inserted or removed
        (the transcript changed after BOS: the live KV is invalid and must be re-prefilled)."""
        think = effective_think(think, self.ctx)
        had_max, has_max = self.think is ThinkMode.MAX, think is ThinkMode.MAX
        self.think = think
        if had_max == has_max:
            return False
        n = len(self._max)
        if has_max:
            self.ids[1:1] = self._max
        else:
            del self.ids[1 : 1 + n]
        if self._turn_start is not None:
            self._turn_start += n if has_max else -n
        return True

    def user(self, text: str) -> list[int]:
        """Append `<｜User｜>` + plain BPE(text) + `<｜Assistant｜>` + opener; returns the whole transcript."""
        self._turn_start = len(self.ids)
        self.ids += [self.tok.user] + self.tok.encode(text) + [self.tok.assistant]
        self.ids.append(self.tok.think_open if self.think.thinking else self.tok.think_close)
        return list(self.ids)

    def assistant_done(self, generated: list[int]) -> None:
        """Generation ended (EOS, token limit, or Ctrl+C after >= 1 token): keep every generated token,
        then EOS (not doubled if the model's own EOS is already last)."""
        self.ids += list(generated)
        if not generated or generated[-1] != self.tok.eos:
            self.ids.append(self.tok.eos)
        self._turn_start = None

    def assistant_interrupted(self, generated: list[int]) -> bool:
        """Ctrl+C. With >= 1 token: same as done. With none: roll back the user turn and return True
        (the caller must invalidate the session, whose KV holds the rolled-back prompt)."""
        if generated:
            self.assistant_done(generated)
            return False
        if self._turn_start is not None:
            del self.ids[self._turn_start :]
        self._turn_start = None
        return True

    def suffix(self, n_cached: int) -> list[int]:
        """Ids not yet in a session that already holds the first `n_cached` transcript tokens."""
        return self.ids[n_cached:]

    def text(self) -> str:
        return self.tok.decode(self.ids)


# ---- parsing ------------------------------------------------------------------------------------

_ENTITY = re.compile(r"&(amp|lt|gt|quot|apos);")
_ENTITY_CHARS = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
_PREFIX = "(?:｜DSML｜|DSML｜)?"
_OPEN_INVOKE = re.compile(rf"<{_PREFIX}{TAG_INVOKE}\s+name=\"([^\"]*)\"\s*>")
_CLOSE_INVOKE = re.compile(rf"</{_PREFIX}{TAG_INVOKE}>")
_CLOSE_CALLS = re.compile(rf"</{_PREFIX}{TAG_TOOL_CALLS}>")
_OPEN_PARAM = re.compile(rf"<{_PREFIX}{TAG_PARAMETER}\s+name=\"([^\"]*)\"(?:\s+string=\"([^\"]*)\")?\s*>")
_CLOSE_PARAM = re.compile(rf"</{_PREFIX}{TAG_PARAMETER}>")
_WS = " \t\r\n"


def unescape_entities(s: str) -> str:
    return _ENTITY.sub(lambda m: _ENTITY_CHARS[m.group(1)], s)


class _Malformed(Exception):
    pass


@dataclass
class Parsed:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    malformed: bool = False


def _json_args(pairs: list[tuple[str, str]]) -> str:
    """{"k": v, ...} with ", "/": " separators; values are already JSON text (strings escaped,
    non-strings minified), as ds4 and the official decoder build them."""
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {v}" for k, v in pairs) + "}"


def _parse_params(s: str, pos: int, close: re.Pattern) -> tuple[list[tuple[str, str]], int]:
    """Parameters from `pos` until the `close` tag; returns (name, JSON value text) pairs and the
    position after the close tag."""
    pairs = []
    while True:
        while pos < len(s) and s[pos] in _WS:
            pos += 1
        m = close.match(s, pos)
        if m:
            return pairs, m.end()
        m = _OPEN_PARAM.match(s, pos)
        if not m:
            raise _Malformed(f"expected a parameter or close tag at {pos}")
        name, is_str = unescape_entities(m.group(1)), m.group(2)
        body_start = m.end()
        if is_str is None:
            rest = s[body_start:].lstrip(_WS)
            if _OPEN_PARAM.match(rest):  # lenient recovery: nested object of parameters
                nested, pos = _parse_params(s, body_start, _CLOSE_PARAM)
                pairs.append((name, _json_args(nested)))
                continue
            is_str = "true"
        c = _CLOSE_PARAM.search(s, body_start)
        if not c:
            raise _Malformed(f"unterminated parameter {name!r}")
        body = s[body_start : c.start()]
        if is_str == "true":
            value = json.dumps(unescape_entities(body), ensure_ascii=False)
        else:
            try:
                value = _minify(json.loads(body))
            except json.JSONDecodeError:
                raise _Malformed(f"parameter {name!r} is not valid JSON") from None
        pairs.append((name, value))
        pos = c.end()


def _find_block(s: str) -> tuple[int, int] | None:
    """(start of the block including a leading \\n\\n, end of the opening tag), by form priority."""
    for prefix in DSML_PREFIXES:
        tag = f"<{prefix}{TAG_TOOL_CALLS}>"
        for opener in (DSML_BLOCK_SEP + tag, tag):
            i = s.find(opener)
            if i >= 0:
                return i, i + len(opener)
    return None


def parse_completion(text: str, think: ThinkMode | bool = ThinkMode.HIGH) -> Parsed:
    """Split generated text into reasoning, visible content and DSML tool calls (runtime §2.6).

    In thinking modes the text is `reasoning</think>answer` (the `<think>` was in the prompt); with no
    `</think>` it is all unfinished reasoning and holds no tool calls. A truncated or malformed DSML
    block comes back as plain content with `malformed=True`; this never raises.
    """
    thinking = think.thinking if isinstance(think, ThinkMode) else bool(think)
    reasoning, rest = "", text
    if thinking:
        body = text[len(THINK_OPEN_TEXT) :] if text.startswith(THINK_OPEN_TEXT) else text
        cut = body.find(THINK_CLOSE_TEXT)
        if cut < 0:
            return Parsed(body, "", [])
        reasoning, rest = body[:cut], body[cut + len(THINK_CLOSE_TEXT) :]
        last = rest.rfind(THINK_CLOSE_TEXT)  # tool calls are searched only after the last </think>
        if last >= 0:
            head, tail = rest[: last + len(THINK_CLOSE_TEXT)], rest[last + len(THINK_CLOSE_TEXT) :]
        else:
            head, tail = "", rest
    else:
        head, tail = "", rest
    found = _find_block(tail)
    if found is None:
        # DSML markup without a complete block opener: a truncated or garbled tool call.
        stray = any(f"<{p}" in tail for p in DSML_PREFIXES[:2])
        return Parsed(reasoning, rest, [], malformed=stray)
    start, pos = found
    calls = []
    try:
        while True:
            while pos < len(tail) and tail[pos] in _WS:
                pos += 1
            m = _CLOSE_CALLS.match(tail, pos)
            if m:
                end = m.end()
                break
            m = _OPEN_INVOKE.match(tail, pos)
            if not m:
                raise _Malformed(f"expected an invoke at {pos}")
            pairs, pos = _parse_params(tail, m.end(), _CLOSE_INVOKE)
            calls.append(ToolCall(name=unescape_entities(m.group(1)), arguments=_json_args(pairs)))
    except _Malformed:
        return Parsed(reasoning, rest, [], malformed=True)
    raw = tail[start:end]
    for c in calls:
        c.raw = raw
    content = (head + tail[:start]).rstrip()
    return Parsed(reasoning, content, calls)


# ---- incremental DSML tracker (forced-greedy sampling, runtime §3) --------------------------------


class DsmlState(enum.Enum):
    OUTSIDE = "outside"  # normal sampling
    STRUCTURAL = "structural"  # tags, names, between elements: greedy
    STRING_BODY = "string_body"  # string="true" parameter body: normal sampling
    JSON_STRUCTURAL = "json_structural"  # string="false" body outside string literals: greedy
    JSON_STRING = "json_string"  # inside a JSON string literal: normal sampling


_GREEDY_STATES = (DsmlState.STRUCTURAL, DsmlState.JSON_STRUCTURAL)
_PLAIN_OPENER = f"<{TAG_TOOL_CALLS}>"
_DSML_TAG_STARTS = ("<" + DSML_TEXT, "<DSML｜")  # a DSML tag has begun: structural until proven otherwise
_OPENER_MAX_CHARS = 32  # a DSML tag that has not closed by then is not a tool_calls opener
_PARAM_CLOSES = tuple(f"</{p}{TAG_PARAMETER}>" for p in DSML_PREFIXES)
_CALLS_CLOSES = tuple(f"</{p}{TAG_TOOL_CALLS}>" for p in DSML_PREFIXES)
_TAIL_KEEP = 32
PENDING_CLOSE_MIN = 2  # >= 2 chars of a closing parameter tag make the next token structural


class DsmlTracker:
    """Classifies the position after the text fed so far (whole generated text, reasoning included, as
    ds4 does). `greedy` is True where the next token is DSML structure. `completed` turns True when a
    tool_calls block closes (generation should stop there)."""

    def __init__(self):
        self.state = DsmlState.OUTSIDE
        self.completed = False
        self._tail = ""
        self._tag: str | None = None  # text of a tag being read inside the block
        self._opening = False  # reading a DSML tag that may open a block
        self._escape = False

    @property
    def greedy(self) -> bool:
        if self.state is DsmlState.STRING_BODY:
            return self._pending_close() >= PENDING_CLOSE_MIN
        return self.state in _GREEDY_STATES

    def _pending_close(self) -> int:
        best = 0
        for close in _PARAM_CLOSES:
            for n in range(min(len(close) - 1, len(self._tail)), best, -1):
                if self._tail.endswith(close[:n]):
                    best = n
                    break
        return best

    def feed(self, text: str) -> None:
        for ch in text:
            self._tail = (self._tail + ch)[-_TAIL_KEEP:]
            self._step(ch)

    def _step(self, ch: str) -> None:
        st = self.state
        if st is DsmlState.OUTSIDE:
            if self._tail.endswith(_PLAIN_OPENER):
                self.state, self._tag, self.completed = DsmlState.STRUCTURAL, None, False
            elif self._tail.endswith(_DSML_TAG_STARTS):
                self.state, self._tag, self._opening = DsmlState.STRUCTURAL, "<", True
            return
        if st is DsmlState.STRUCTURAL:
            if self._opening:
                self._tag += ch
                if ch == ">" or len(self._tag) > _OPENER_MAX_CHARS:
                    is_opener = ch == ">" and self._tag.endswith(f"{TAG_TOOL_CALLS}>")
                    self._opening, self._tag = False, None
                    if is_opener:
                        self.completed = False
                    else:
                        self.state = DsmlState.OUTSIDE  # DSML text that is not a block opener
            elif self._tag is None:
                if ch == "<":
                    self._tag = "<"
            else:
                self._tag += ch
                if ch == ">":
                    self._end_tag(self._tag)
                    self._tag = None
            return
        if st is DsmlState.STRING_BODY:
            if self._tail.endswith(_PARAM_CLOSES):
                self.state = DsmlState.STRUCTURAL
            return
        if st is DsmlState.JSON_STRING:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self.state = DsmlState.JSON_STRUCTURAL
            return
        # JSON_STRUCTURAL
        if ch == '"':
            self.state = DsmlState.JSON_STRING
        elif self._tail.endswith(_PARAM_CLOSES):
            self.state = DsmlState.STRUCTURAL

    def _end_tag(self, tag: str) -> None:
        if tag.endswith(_CALLS_CLOSES):
            self.state = DsmlState.OUTSIDE
            self.completed = True
            return
        m = _OPEN_PARAM.match(tag)
        if m:
            self.state = DsmlState.JSON_STRUCTURAL if m.group(2) == "false" else DsmlState.STRING_BODY
            self._escape = False


# ---- display (runtime §4.4) ------------------------------------------------------------------------


class Channel(enum.Enum):
    REASONING = "reasoning"
    CONTENT = "content"


class ThinkSplitter:
    """Splits streamed text into reasoning and content for display: in thinking modes the output starts
    as reasoning, `<think>`/`</think>` are removed and a tag split across tokens is held back until it
    is complete. NONE mode passes text through untouched."""

    def __init__(self, think: ThinkMode):
        self.thinking = think.thinking
        self.channel = Channel.REASONING if self.thinking else Channel.CONTENT
        self._held = ""

    def feed(self, text: str) -> list[tuple[Channel, str]]:
        if not self.thinking:
            return [(Channel.CONTENT, text)] if text else []
        s = self._held + text
        self._held = ""
        out: list[tuple[Channel, str]] = []
        while s:
            i = s.find("<")
            if i < 0:
                out.append((self.channel, s))
                break
            if i:
                out.append((self.channel, s[:i]))
                s = s[i:]
            for tag, ch in ((THINK_OPEN_TEXT, Channel.REASONING), (THINK_CLOSE_TEXT, Channel.CONTENT)):
                if s.startswith(tag):
                    self.channel = ch
                    s = s[len(tag) :]
                    break
            else:
                if THINK_OPEN_TEXT.startswith(s) or THINK_CLOSE_TEXT.startswith(s):
                    self._held = s  # maybe the start of a tag: wait for more
                    break
                out.append((self.channel, "<"))
                s = s[1:]
        return [(c, t) for c, t in out if t]

    def flush(self) -> list[tuple[Channel, str]]:
        held, self._held = self._held, ""
        return [(self.channel, held)] if held else []
