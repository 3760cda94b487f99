"""The Qwen3 tokenizer as the guard needs it: message text is always plain text.

A tokenizer built from ``tokenizer.json`` matches added tokens (``<|im_end|>``, ``<think>``...) inside
any text it encodes. For the guard that would let a user forge the conversation's structure by typing
``<|im_end|>``. So the text encoder here is the same BPE with the added-token table removed, and markup
ids are emitted only by the template, structurally.
"""

from __future__ import annotations

import json
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


class TokenizerError(RuntimeError):
    pass


class GuardTokenizer:
    """Plain-text encoding into the Qwen3 vocabulary plus the ids of the chat markup."""

    def __init__(self, tokenizer_json: str) -> None:
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

    @classmethod
    def from_file(cls, path: str | Path) -> GuardTokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))

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
        enc = self._plain.encode(text, add_special_tokens=False)
        return [(i, s, e) for i, (s, e) in zip(enc.ids, enc.offsets, strict=True)]

    def pretoken_starts(self, text: str) -> list[int]:
        """Where the pre-tokenizer starts each piece of ``text`` (BPE never merges across these)."""
        return [start for _, (start, _end) in self._plain.pre_tokenizer.pre_tokenize_str(text)]

    def decode(self, ids: list[int]) -> str:
        text: str = self._full.decode(ids, skip_special_tokens=False)
        return text
