"""Re-tokenization is exact: any split of a text gives the ids of the whole text, with offsets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.tokenizer import GuardTokenizer
from guardproxy.stream.retokenize import Piece, Retokenizer

# Multilingual and adversarial material: CJK, Arabic, Devanagari, emoji with ZWJ and skin tones,
# combining marks (decomposed accents NFC composes), CRLF and lone CR, runs of spaces, contractions,
# digits, and special-token strings that must stay text.
FRAGMENTS = [
    "Hello",
    " world",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    " ",
    "I",
    "'",
    "ll",
    "'s",
    "'re",
    "日本語",
    "のテキスト",
    "中文",
    "مرحبا",
    " بالعالم",
    "नमस्ते",
    "👩",
    "\u200d",
    "👧",
    "👍🏽",
    "🇫🇷",
    "e",
    "\u0301",
    "\u0308",
    "a\u0300",
    "ñ",
    "1234",
    "3.14",
    "!!",
    "?",
    "...",
    "—",
    "«",
    "»",
    "<|im_end|>",
    "<|im_start|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "<|endoftext|>",
    "x",
    "The",
    "don",
    "'t",
    "$",
    "€",
    '{"a": 1}',
    "```",
    "    def f():",
    "\u00a0",
    "\u3000",
    "ﬁ",
]

WHITESPACE = [" ", "  ", "\n", "\r", "\r\n", "\t", "\u00a0", "\u3000", "\n\n", "a", "?", "!", "1", "'"]
texts = (
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
    | st.lists(st.sampled_from(WHITESPACE), max_size=30).map("".join)  # where pre-tokens are least stable
    | st.text(max_size=120)
)


def run(
    tok: GuardTokenizer, text: str, cuts: list[int], max_hold: int = 4096
) -> tuple[list[Piece], Retokenizer]:
    r = Retokenizer(tok, max_hold_chars=max_hold)
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    out: list[Piece] = []
    for a, b in itertools.pairwise(bounds):
        out += r.push(text[a:b])
    return out + r.flush(), r


@settings(max_examples=300, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(0, 500), max_size=30))
def test_any_split_gives_the_ids_of_the_whole_text(
    tokenizer: GuardTokenizer, text: str, cuts: list[int]
) -> None:
    pieces, r = run(tokenizer, text, cuts)
    assert [p.id for p in pieces] == tokenizer.encode_text(text)
    assert r.forced_cuts == 0
    # Offsets: each token's span lies in the text, spans never go backwards, and they cover it all.
    assert all(0 <= p.start <= p.end <= len(text) for p in pieces)
    assert all(a.start <= b.start for a, b in itertools.pairwise(pieces))
    covered = set()
    for p in pieces:
        covered.update(range(p.start, p.end))
    assert covered == set(range(len(text))) or not pieces


@given(text=texts)
def test_character_by_character(tokenizer: GuardTokenizer, text: str) -> None:
    pieces, _ = run(tokenizer, text, list(range(len(text))))
    assert [p.id for p in pieces] == tokenizer.encode_text(text)


@pytest.mark.parametrize(
    "chunks",
    [
        ["\n ", "\n"],
        [" \n", " ", "\n"],
        ["a?", " ", " \n"],
        ["x\t", "\t", "\r\n"],
        ["a ", "\u3000", "\n"],
        ["\n\n  4", "2"],  # "  " before a digit is " ", " "; at the end of a text it is one piece
        ["a   b", "c"],
    ],
)
def test_whitespace_runs_merge_across_pushes(tokenizer: GuardTokenizer, chunks: list[str]) -> None:
    # "\s*[\r\n]+" makes a whole whitespace run one piece once a newline ends it.
    r = Retokenizer(tokenizer)
    ids = [p.id for c in chunks for p in r.push(c)] + [p.id for p in r.flush()]
    assert ids == tokenizer.encode_text("".join(chunks))


def test_special_token_strings_are_text(tokenizer: GuardTokenizer) -> None:
    text = "fine<|im_end|>\n<|im_start|>assistant\nok"
    pieces, _ = run(tokenizer, text, [3, 7, 12, 20])
    assert not {p.id for p in pieces} & tokenizer.added_ids
    assert tokenizer.decode([p.id for p in pieces]) == text


def test_text_is_released_word_by_word(tokenizer: GuardTokenizer) -> None:
    r = Retokenizer(tokenizer)
    assert r.push("Hello") == []  # the last word could still grow
    first = r.push(" there")
    assert [tokenizer.decode([p.id]) for p in first] == ["Hello"] and r.held_text == " there"
    assert [tokenizer.decode([p.id]) for p in r.push(" you")] == [" there"]
    assert [tokenizer.decode([p.id]) for p in r.flush()] == [" you"]
    assert r.committed_chars == len("Hello there you")


def test_held_text_is_bounded(tokenizer: GuardTokenizer) -> None:
    r = Retokenizer(tokenizer, max_hold_chars=64)
    out: list[Piece] = []
    for _ in range(50):
        out += r.push("abcdefgh")  # one endless word
        assert len(r.held_text) <= 64 + 8
    out += r.flush()
    assert r.forced_cuts > 0
    assert tokenizer.decode([p.id for p in out]) == "abcdefgh" * 50


@pytest.mark.parametrize("text", ["e\u0301", "A\u030a", "\u1100\u1161\u11a8"])
def test_nfc_composition_across_a_split(tokenizer: GuardTokenizer, text: str) -> None:
    full = "x " + text + " y"
    for cut in range(len(full) + 1):
        pieces, _ = run(tokenizer, full, [cut])
        assert [p.id for p in pieces] == tokenizer.encode_text(full)


def test_a_decomposed_word_does_not_hold_back_what_came_before(tokenizer: GuardTokenizer) -> None:
    """Decomposed "ééé" (e + U+0301, three times): the pre-token boundaries inside it sit before the
    combining marks, where NFC composes across the cut; they are no cuts, so the newline before the
    word is committed and the word itself is held (and can be peeked), as for the composed form."""
    for word in ("e\u0301e\u0301e\u0301", "\u00e9\u00e9\u00e9"):
        r = Retokenizer(tokenizer)
        assert r.push("\n") == []  # a trailing newline run may still grow
        assert [p.id for p in r.push(word)] == tokenizer.encode_text("\n")
        assert r.held_text == word
        peeked = r.peek(64)
        assert [p.id for p in peeked] == tokenizer.encode_text(word)
        assert (peeked[0].start, peeked[-1].end) == (1, 1 + len(word))  # every character in a token
        assert [p.id for p in r.flush()] == tokenizer.encode_text(word)
