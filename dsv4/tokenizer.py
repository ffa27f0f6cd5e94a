"""DeepSeek V4 tokenizer built from the GGUF's own vocabulary (runtime.md §1).

Owns: turning `tokenizer.ggml.tokens`/`merges` into a `tokenizers` BPE with the official V4 pre-tokenizer
(three isolated regex splits + byte-level mapping), the protocol special ids (found by string), the two entry
points (plain text: specials stay literal; rendered prompts: added tokens become control ids), byte-exact
decoding and a streaming UTF-8-safe detokenizer. Must not know chat templates or tensors.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError

# Official V4 pre-tokenizer (tokenizer.json, runtime §1.4), applied in order with behavior=Isolated.
DIGITS_SPLIT = r"\p{N}{1,3}"
CJK_KANA_SPLIT = "[一-龥\u3040-ゟ゠-ヿ]+"
# CR/LF are literal characters in the official pattern, hence the non-raw pieces.
MAIN_SPLIT = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
    "|[^\r\n" r"\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+" "[\r\n]*"
    r"|\s*" "[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = (DIGITS_SPLIT, CJK_KANA_SPLIT, MAIN_SPLIT)

# The seven protocol strings ds4 requires (runtime §1.1-1.2), by attribute name.
BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
USER_TEXT = "<｜User｜>"
ASSISTANT_TEXT = "<｜Assistant｜>"
THINK_OPEN_TEXT = "<think>"
THINK_CLOSE_TEXT = "</think>"
DSML_TEXT = "｜DSML｜"
REQUIRED_SPECIALS = {
    "bos": BOS_TEXT,
    "eos": EOS_TEXT,
    "user": USER_TEXT,
    "assistant": ASSISTANT_TEXT,
    "think_open": THINK_OPEN_TEXT,
    "think_close": THINK_CLOSE_TEXT,
    "dsml": DSML_TEXT,
}

# llama.cpp token types stored in `tokenizer.ggml.token_type`.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
ADDED_TOKEN_TYPES = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)

# Long texts are cut into chunks encoded in parallel (encode_batch). A cut right after LF followed by a
# printable ASCII char is exact: no pre-tokenizer regex match contains LF followed by non-whitespace,
# and BPE never crosses a pre-token boundary.
CHUNK_CHARS = 1 << 15
_SAFE_CUT = re.compile(r"\n(?=[\x21-\x7e])")

KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_TYPES = "tokenizer.ggml.token_type"
KEY_MODEL = "tokenizer.ggml.model"
EXPECTED_MODEL = "gpt2"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet (runtime §1.3): printable bytes map to themselves, the rest to U+0100...."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


class StreamDecoder:
    """Streaming detokenizer: `push(id)` returns the text completed by that token, never half a UTF-8
    sequence (an incomplete tail is held back; bytes that can never be valid become U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """Text still held back at the end of the stream (a truncated sequence becomes U+FFFD)."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    merges: list[tuple[str, str]]
    added: frozenset[int]


class Tokenizer:
    """BPE tokenizer of a DSV4 GGUF. Attributes: `n_vocab` and the special ids `bos`, `eos`, `user`,
    `assistant`, `think_open`, `think_close`, `dsml`."""

    def __init__(self, vocab: _Vocab, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        self._tokens = vocab.tokens
        self.n_vocab = len(vocab.tokens)
        ids: dict[str, int] = {}
        for i, s in enumerate(vocab.tokens):
            ids.setdefault(s, i)
        self._ids = ids
        for attr, text in REQUIRED_SPECIALS.items():
            if text not in ids:
                raise ModelFileError(
                    f"tokenizer vocabulary lacks the required token {text!r} ({attr}); "
                    "this is not a DeepSeek V4 GGUF or its tokenizer metadata is damaged"
                )
            setattr(self, attr, ids[text])
        # Metadata ids, when given, must agree with the string lookup (ds4 ignores them; we only check).
        for name, given, found in (("bos", bos_id, self.bos), ("eos", eos_id, self.eos)):
            if given is not None and given != found:
                raise ModelFileError(
                    f"tokenizer {name}_token_id is {given} but {REQUIRED_SPECIALS[name]!r} is token {found}"
                )
        bpe = models.BPE(vocab=ids, merges=vocab.merges, fuse_unk=False, byte_fallback=False)
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        hf.decoder = decoders.ByteLevel()
        self._hf = hf
        # Rendered prompts: every added token (control/user-defined) is matched literally, leftmost-longest,
        # as HF does with the official tokenizer.json; the 7 protocol strings are always among them.
        added = set(vocab.added) | {getattr(self, a) for a in REQUIRED_SPECIALS}
        self._added_ids = frozenset(added)
        texts = sorted({vocab.tokens[i] for i in added}, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in texts))
        self._bytes_cache: dict[int, bytes] = {}

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_vocab(
        cls,
        tokens: list[str],
        merges: list[str],
        token_types: list[int] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> Tokenizer:
        """Build from the raw GGUF arrays: merges are `"LEFT RIGHT"` strings, rank = index. Without
        token types only the 7 protocol strings are treated as added tokens."""
        pairs = []
        for rank, m in enumerate(merges):
            parts = m.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ModelFileError(f"{KEY_MERGES}[{rank}] = {m!r} is not of the form 'LEFT RIGHT'")
            pairs.append((parts[0], parts[1]))
        if token_types is not None and len(token_types) != len(tokens):
            raise ModelFileError(
                f"{KEY_TYPES} has {len(token_types)} entries but {KEY_TOKENS} has {len(tokens)}"
            )
        added = frozenset(
            i for i, t in enumerate(token_types or ()) if int(t) in ADDED_TOKEN_TYPES
        )
        return cls(_Vocab(list(tokens), pairs, added), bos_id, eos_id)

    @classmethod
    def from_gguf(cls, reader_or_path) -> Tokenizer:
        """Build from a `gguf.GGUFReader` or a GGUF path (only the tokenizer metadata is read)."""
        import gguf

        if isinstance(reader_or_path, (str, Path)):
            path = Path(reader_or_path)
            if not path.is_file():
                raise ModelFileError(f"model file {path} does not exist")
            try:
                reader = gguf.GGUFReader(path)
            except Exception as e:  # gguf raises ValueError/struct errors on garbage
                raise ModelFileError(f"{path} is not a readable GGUF file: {e}") from None
        else:
            reader = reader_or_path

        def get(key: str, required: bool):
            field = reader.fields.get(key)
            if field is None:
                if required:
                    raise ModelFileError(f"GGUF lacks tokenizer key {key}; cannot build the tokenizer")
                return None
            return field.contents()

        model = get(KEY_MODEL, False)
        if model is not None and model != EXPECTED_MODEL:
            raise ModelFileError(f"{KEY_MODEL} is {model!r}, expected {EXPECTED_MODEL!r} (byte-level BPE)")
        tokens = get(KEY_TOKENS, True)
        merges = get(KEY_MERGES, True)
        if not tokens or not isinstance(tokens[0], str):
            raise ModelFileError(f"{KEY_TOKENS} must be a non-empty array of strings")
        if not merges or not isinstance(merges[0], str):
            raise ModelFileError(f"{KEY_MERGES} must be a non-empty array of strings")
        types = get(KEY_TYPES, False)
        bos = get("tokenizer.ggml.bos_token_id", False)
        eos = get("tokenizer.ggml.eos_token_id", False)
        return cls.from_vocab(tokens, merges, types, bos, eos)

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Plain text (what users type): special-token strings are ordinary text."""
        return self._encode_plain([text])[0] if text else []

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered prompt: added-token strings (BOS, role markers, think tags, ｜DSML｜, ...) become
        their control ids; the text between them is encoded as plain text."""
        parts: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                parts.append(text[pos : m.start()])
            parts.append(self._ids[m.group()])
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        encoded = iter(self._encode_plain([p for p in parts if isinstance(p, str)]))
        ids: list[int] = []
        for p in parts:
            if isinstance(p, str):
                ids.extend(next(encoded))
            else:
                ids.append(p)
        return ids

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Encode independent texts in one parallel batch, long ones cut at exact chunk boundaries."""
        chunks: list[str] = []
        owner: list[int] = []
        for k, text in enumerate(texts):
            pos = 0
            while len(text) - pos > CHUNK_CHARS:
                m = _SAFE_CUT.search(text, pos + CHUNK_CHARS)
                if m is None:
                    break
                chunks.append(text[pos : m.end()])
                owner.append(k)
                pos = m.end()
            chunks.append(text[pos:])
            owner.append(k)
        out: list[list[int]] = [[] for _ in texts]
        if chunks:
            for k, enc in zip(owner, self._hf.encode_batch(chunks, add_special_tokens=False)):
                out[k].extend(enc.ids)
        return out

    # ---- decoding -----------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token: added tokens verbatim, others through the inverse byte map (a token
        with characters outside the map is emitted verbatim, as HF's ByteLevel decoder does)."""
        b = self._bytes_cache.get(token_id)
        if b is None:
            if not 0 <= token_id < self.n_vocab:
                raise ValueError(f"token id {token_id} out of range 0..{self.n_vocab - 1}")
            s = self._tokens[token_id]
            if token_id in self._added_ids or any(c not in UNICODE_TO_BYTE for c in s):
                b = s.encode("utf-8")
            else:
                b = bytes(UNICODE_TO_BYTE[c] for c in s)
            self._bytes_cache[token_id] = b
        return b

    def token_text(self, token_id: int) -> str:
        """The raw vocabulary string (byte-level form, e.g. 'Ġint'), as `--dump-tokens` prints it."""
        return self._tokens[token_id]

    def token_id(self, text: str) -> int | None:
        """Id of an exact vocabulary string, or None."""
        return self._ids.get(text)

    def is_added(self, token_id: int) -> bool:
        """True for control/user-defined tokens (BOS, role markers, think tags, ...)."""
        return token_id in self._added_ids

    def decode(self, ids) -> str:
        """Text of a token sequence; byte-exact for complete sequences (decode(encode(x)) == x)."""
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)
