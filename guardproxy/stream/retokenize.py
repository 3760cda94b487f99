r"""Incremental, exact re-tokenization of streamed text into the Qwen3 vocabulary.

An upstream streams text in arbitrary pieces; the guard needs the ids the whole text would get. BPE
never merges across a pre-token boundary, and the Qwen3 pre-tokenizer (a left-to-right regex) decides
each piece from the characters already present, with two exceptions that appended text can change:
the last piece, and any piece inside a trailing run of whitespace (``\s*[\r\n]+`` scans the whole run
for a newline: "\n " then "\n" is ONE piece "\n \n"). So each push re-encodes only the held text,
commits every token before the last piece and before the trailing whitespace run, and holds the rest.
Each cut is checked (the committed ids must be a prefix of the encoding of all held text, which
catches NFC composing across the cut); a cut that fails the check commits nothing yet.

Invariant (tested with Hypothesis): for any split of a text, the ids of all pushes plus ``flush()``
equal ``encode_text(text)``, as long as no single pre-token exceeds ``max_hold_chars`` (a run of
letters with no space that long is forced out in pieces, to bound memory and release latency).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from guardproxy.guard.tokenizer import GuardTokenizer

_CUT_TRIES = 3  # pre-token boundaries tried, from the last, before holding everything


@dataclass(frozen=True, slots=True)
class Piece:
    """One final token and the characters of the stream's text it covers: ``text[start:end]``."""

    id: int
    start: int
    end: int


class Retokenizer:
    def __init__(self, tokenizer: GuardTokenizer, *, max_hold_chars: int = 4096) -> None:
        self._tok = tokenizer
        self._max_hold = max_hold_chars
        self._held = ""  # text received but not yet committed to tokens
        self._base = 0  # characters of the stream committed before ``_held``
        self.forced_cuts = 0

    @property
    def held_text(self) -> str:
        return self._held

    @property
    def committed_chars(self) -> int:
        return self._base

    def push(self, text: str) -> list[Piece]:
        if not text:
            return []
        self._held += text
        starts = self._tok.pretoken_starts(self._held)
        cut = starts[-1] if starts else 0
        trailing_ws = len(self._held.rstrip())  # str.isspace covers Unicode White_Space (regex \s)
        if trailing_ws < len(self._held):
            cut = max((s for s in starts if s <= min(cut, trailing_ws)), default=0)
        # A cut that fails the check may still have a good one a piece or two before it ("  " + "4"
        # at the end of the head is one piece, in the whole text two): commit up to that one, so the
        # held text stays short (and early release does not wait on template text held with it).
        # A boundary before a combining mark is never a cut: NFC may compose the mark with the
        # character before it (decomposed "é" is "e" + U+0301), so the check would fail there and
        # the tries would run out before reaching a boundary that holds.
        held = self._held
        cuts = [c for c in starts if 0 < c <= cut and not unicodedata.combining(held[c])]
        for c in cuts[::-1][:_CUT_TRIES]:
            pieces = self._commit_checked(c)
            if pieces is not None:
                return pieces
        if len(self._held) > self._max_hold:
            return self._force()
        return []

    def peek(self, max_chars: int) -> list[Piece]:
        """The held text's tokens as if the text ended now (nothing is committed). The next push may
        still change them (" hello" + "s"), so they are tentative; longer held text gives none."""
        if not self._held or len(self._held) > max_chars:
            return []
        return self._held_pieces()

    def flush(self) -> list[Piece]:
        """End of the text: everything held becomes tokens."""
        pieces = self._held_pieces()
        self._base += len(self._held)
        self._held = ""
        return pieces

    def _held_pieces(self) -> list[Piece]:
        return self._pieces(self._tok.encode_pieces(self._held), len(self._held))

    def _commit_checked(self, cut: int) -> list[Piece] | None:
        whole = self._tok.encode_pieces(self._held)
        if self._held.isascii():
            # NFC changes nothing in ASCII, and BPE never crosses the pre-token boundary at the cut:
            # the tokens of all held text that end by the cut are the head's. (Encoding the head
            # alone would not do: "  " before "4" is two pieces, at the end of a text it is one.)
            head = [p for p in whole if p[2] <= cut]
            if head and head[-1][2] == cut:
                return self._commit(head, cut)
        head = self._tok.encode_pieces(self._held[:cut])
        if [p[0] for p in whole[: len(head)]] != [p[0] for p in head]:
            return None
        return self._commit(head, cut)

    def _force(self) -> list[Piece]:
        # A pre-token longer than max_hold_chars: cut it (never inside a combining sequence).
        cut = len(self._held) - self._max_hold // 4
        while cut > 0 and unicodedata.combining(self._held[cut]):
            cut -= 1
        self.forced_cuts += 1
        return self._commit(self._tok.encode_pieces(self._held[:cut]), cut)

    def _commit(self, head: list[tuple[int, int, int]], cut: int) -> list[Piece]:
        pieces = self._pieces(head, cut)
        self._held = self._held[cut:]
        self._base += cut
        return pieces

    def _pieces(self, raw: list[tuple[int, int, int]], length: int) -> list[Piece]:
        """Spans made gap-free over ``[0, length)``: NFC can compose two characters into one token
        whose offsets name only the first; every character must belong to a token so that releasing
        and redacting by token covers all the text."""
        b = self._base
        out = []
        for k, (i, s, e) in enumerate(raw):
            start = 0 if k == 0 else s
            end = raw[k + 1][1] if k + 1 < len(raw) else length
            out.append(Piece(i, b + start, b + max(e, end)))
        return out
