"""The ASCII fast path of the guard tokenizer gives exactly what the tokenizers library gives."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.testing import qwen3_tokenizer_file
from guardproxy.guard.tokenizer import GuardTokenizer

# Every ASCII character, with the pre-tokenizer's edge cases over-represented: contractions in both
# cases, runs of mixed whitespace (the lookahead alternative), digits, punctuation runs, and the
# separators \x1c-\x1f that Python's \s would call whitespace and the tokenizer does not.
ASCII_FRAGMENTS = [
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1f",
    "'s",
    "'S",
    "'ll",
    "'LL",
    "'Re",
    "'",
    "don",
    " world",
    "Hello",
    "42",
    "3.14",
    "!!",
    "...",
    " ?",
    "{",
    '"',
    "x",
    "\x00",
    "\x7f",
    "<|im_end|>",
]
ascii_texts = st.lists(st.sampled_from(ASCII_FRAGMENTS), max_size=40).map("".join) | st.text(
    alphabet=st.characters(max_codepoint=127), max_size=120
)


@pytest.fixture(scope="module")
def general() -> GuardTokenizer:
    return GuardTokenizer.from_file(qwen3_tokenizer_file(), ascii_fast_path=False)


@settings(max_examples=500, deadline=None)
@given(text=ascii_texts)
def test_fast_path_equals_the_library(tokenizer: GuardTokenizer, general: GuardTokenizer, text: str) -> None:
    assert tokenizer.fast_path and not general.fast_path
    assert tokenizer.encode_pieces(text) == general.encode_pieces(text)
    assert tokenizer.pretoken_starts(text) == general.pretoken_starts(text)
    # and twice: the second answer comes from the piece cache
    assert tokenizer.encode_pieces(text) == general.encode_pieces(text)


def test_non_ascii_text_takes_the_general_path(tokenizer: GuardTokenizer, general: GuardTokenizer) -> None:
    for text in ["naïve café", "日本語 text", "e\u0301", " \u00a0 x"]:
        assert tokenizer.encode_pieces(text) == general.encode_pieces(text)
        assert tokenizer.pretoken_starts(text) == general.pretoken_starts(text)


def test_fast_path_only_for_the_qwen_pipeline() -> None:
    spec = json.loads(qwen3_tokenizer_file().read_text(encoding="utf-8"))
    assert GuardTokenizer(json.dumps(spec)).fast_path
    # A different split regex (here: no contractions) must never be served by the Qwen regex.
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"
    other = GuardTokenizer(json.dumps(spec))
    assert not other.fast_path
    assert [i for i, _, _ in other.encode_pieces("don't")] == other.encode_text("don't")
