"""The Qwen3 tokenizer as the guard needs it: message text is always plain text.

A tokenizer built from ``tokenizer.json`` matches added tokens (``<|im_end|>``, ``<think>``...) inside
any text it encodes. For the guard that would let a user forge the conversation's structure by typing
``<|im_end|>``. So the text encoder here is the same BPE with the added-token table removed, and markup
ids are emitted only by the template, structurally.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer

# Markup the template emits as single ids; names are the token strings of the Qwen3 vocabulary.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK = "<think>"
THINK_END = "</think>"
TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
_MARKUP = (IM_START, IM_END, THINK, THINK_END, TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END)


# The Qwen2/Qwen3 pre-tokenizer: this split regex (Oniguruma, leftmost alternative wins), then byte-level.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
# The same regex restricted to ASCII input, for Python's ``re``: letters A-Za-z, digits 0-9, and
# whitespace spelled out (Unicode White_Space in ASCII is these six; Python's ``\s`` would also take
# \x1c-\x1f, which the tokenizer's does not).
_WS = "\t\n\x0b\x0c\r "
_ASCII_SPLIT = re.compile(
    rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^{_WS}A-Za-z0-9]+[\r\n]*|"
    rf"[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b is written as this character before BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()
_PIECE_CACHE_MAX = 65536


class TokenizerError(RuntimeError):
    pass


_QWEN_SPLIT_STEP = {
    "type": "Split",
    "pattern": {"Regex": QWEN_SPLIT},
    "behavior": "Isolated",
    "invert": False,
}


def _is_qwen_pipeline(spec: dict[str, object]) -> bool:
    """Whether ``tokenizer.json`` is exactly Qwen3's text pipeline (NFC, the split regex, byte-level,
    plain BPE), the only one the ASCII fast path reproduces."""
    pre = spec.get("pre_tokenizer")
    model = spec.get("model")
    if not isinstance(pre, dict) or not isinstance(model, dict):
        return False
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != 2:
        return False
    split, byte_level = steps
    return (
        spec.get("normalizer") in (None, {"type": "NFC"})
        and split == _QWEN_SPLIT_STEP
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("use_regex") is False
        and byte_level.get("add_prefix_space") is False
        and model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("ignore_merges")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
    )


class GuardTokenizer:
    """Plain-text encoding into the Qwen3 vocabulary plus the ids of the chat markup."""

    def __init__(self, tokenizer_json: str, *, ascii_fast_path: bool = True) -> None:
        spec = json.loads(tokenizer_json)
        self._full = Tokenizer.from_str(tokenizer_json)
        added = spec.get("added_tokens") or []
        self.added_ids: frozenset[int] = frozenset(int(t["id"]) for t in added)
        # Same normalizer, pre-tokenizer and BPE merges, without the added-token matcher.
        spec["added_tokens"] = []
        self._plain = Tokenizer.from_str(json.dumps(spec))
        self.markup: dict[str, int] = {}
        for name in _MARKUP:
            tid = self._full.token_to_id(name)
            if tid is None:
                raise TokenizerError(f"tokenizer has no {name} token: not a Qwen3 tokenizer")
            self.markup[name] = tid
        self.vocab_size = self._full.get_vocab_size(with_added_tokens=True)
        # ASCII text skips the Rust round trip (the proxy re-tokenizes every streamed chunk): split by
        # the same regex in Python, BPE each piece once through the model itself, and remember it.
        # Only for the exact Qwen3 pipeline; any other tokenizer.json always goes the general way.
        self.fast_path = ascii_fast_path and _is_qwen_pipeline(spec)
        self._piece_cache: dict[str, tuple[tuple[int, int, int], ...]] = {}

    @classmethod
    def from_file(cls, path: str | Path, *, ascii_fast_path: bool = True) -> GuardTokenizer:
        return cls(Path(path).read_text(encoding="utf-8"), ascii_fast_path=ascii_fast_path)

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> GuardTokenizer:
        file = Path(directory) / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json beside the guard weights")
        return cls.from_file(file)

    def id(self, markup: str) -> int:
        return self.markup[markup]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as ordinary characters: markup strings inside it stay text."""
        if not text:
            return []
        ids: list[int] = self._plain.encode(text, add_special_tokens=False).ids
        return ids

    def encode_pieces(self, text: str) -> list[tuple[int, int, int]]:
        """``(id, start, end)`` per token of ``text`` as plain text; offsets are characters of ``text``
        (a character split over several byte-level tokens is covered by each of them)."""
        if not text:
            return []
        if self.fast_path and text.isascii():
            out: list[tuple[int, int, int]] = []
            for m in _ASCII_SPLIT.finditer(text):
                at = m.start()
                out += [(i, at + s, at + e) for i, s, e in self._piece(m.group())]
            return out
        enc = self._plain.encode(text, add_special_tokens=False)
        return [(i, s, e) for i, (s, e) in zip(enc.ids, enc.offsets, strict=True)]

    def pretoken_starts(self, text: str) -> list[int]:
        """Where the pre-tokenizer starts each piece of ``text`` (BPE never merges across these)."""
        if self.fast_path and text.isascii():
            return [m.start() for m in _ASCII_SPLIT.finditer(text)]
        return [start for _, (start, _end) in self._plain.pre_tokenizer.pre_tokenize_str(text)]

    def _piece(self, piece: str) -> tuple[tuple[int, int, int], ...]:
        """BPE of one ASCII pre-token: one byte per character, so offsets are characters."""
        hit = self._piece_cache.get(piece)
        if hit is None:
            tokens = self._plain.model.tokenize("".join(_BYTE_CHARS[ord(c)] for c in piece))
            # A token's value is its byte-level text: one character per byte, so per ASCII character.
            spans, at = [], 0
            for t in tokens:
                spans.append((t.id, at, at + len(t.value)))
                at += len(t.value)
            hit = tuple(spans)
            if len(self._piece_cache) >= _PIECE_CACHE_MAX:
                self._piece_cache.clear()  # words repeat; a rare full reset keeps memory bounded
            self._piece_cache[piece] = hit
        return hit

    def decode(self, ids: list[int]) -> str:
        text: str = self._full.decode(ids, skip_special_tokens=False)
        return text
