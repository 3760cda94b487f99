"""What the guard reads of one streamed assistant message, token by token.

The guard must read the answer as the chat template renders a finished assistant turn:

    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}[\\n<tool_call>\\n{"name": "N",
    "arguments": ARGS}\\n</tool_call>]...

(with no reasoning the think block is empty). ``AssistantView`` builds that token stream as deltas
arrive: markup goes out as context ids, and each text run (the reasoning, the content, each tool call)
goes through its own exact ``Retokenizer`` together with the template text around it ("\\n\\n" before the
content, the JSON around tool arguments), so the ids equal the template's for any chunking. Every
token that covers client text is to be judged and carries the span of that text; tokens made only of
template text are context.

Speculation (``speculate=True``): exact re-tokenization holds the last word of a run until more text
shows where it ends, which would delay every word by one upstream chunk. So the held client text is
also fed as it stands, as *tentative* tokens: the guard judges them (its verdict on a token depends only
on what precedes it, so it is the verdict that text would get if the answer ended there). When the next
text arrives, the tentative tokens that the exact encoding keeps are *confirmed* (their verdicts stand,
nothing is re-run) and the rest are *retracted* (the engine rolls them back) before the new tokens go
in. A run of ordinary words confirms every tentative token; " hello" + "s" retracts one.
"""

from __future__ import annotations

from dataclasses import dataclass

from guardproxy.guard.template import ChatTemplate
from guardproxy.stream.retokenize import Piece, Retokenizer

REASONING = "reasoning"
CONTENT = "content"


def tool_field(index: int) -> str:
    return f"tool_calls[{index}].arguments"


@dataclass(frozen=True, slots=True)
class Span:
    """Client text ``field[start:end]`` (characters of that field's streamed text)."""

    field: str
    start: int
    end: int


# Held text longer than this is not fed tentatively (a long unbroken string waits to be complete).
SPECULATE_MAX_CHARS = 64


@dataclass(frozen=True, slots=True)
class GuardFeed:
    """Ids to feed the guard, in order. Judged feeds carry one span per id.

    Before its ids, a feed may revise the tentative tokens fed so far (oldest first): the first
    ``confirm`` of them are final, the last ``retract`` are taken back."""

    ids: list[int]
    spans: list[Span] | None  # None: context (markup, template text), not judged
    tentative: bool = False
    confirm: int = 0
    retract: int = 0


class _Run:
    """One text run between two markup tokens: template prefix, client text of one field, suffix."""

    def __init__(
        self, template: ChatTemplate, field: str | None, prefix: str, speculate: bool = False
    ) -> None:
        self.field = field
        self.prefix = len(prefix)
        self.client = 0  # client characters pushed so far
        self.retok = Retokenizer(template.tok)
        self.speculate = speculate and field is not None
        self._pending = self.retok.push(prefix)
        self._spec: list[Piece] = []  # tentative pieces the guard has been fed

    def push(self, text: str) -> list[GuardFeed]:
        self.client += len(text)
        final = self.retok.push(text)
        return self._feeds(final, self._tentative())

    def close(self, suffix: str = "") -> list[GuardFeed]:
        return self._feeds(self.retok.push(suffix) + self.retok.flush(), [])

    def _tentative(self) -> list[Piece]:
        if not self.speculate:
            return []
        pieces = self.retok.peek(SPECULATE_MAX_CHARS)
        # Only client text is released early: a held tail that is partly bare template text waits.
        lo, hi = self.prefix, self.prefix + self.client
        if any(max(p.start, lo) >= min(p.end, hi) for p in pieces):
            return []
        return pieces

    def _feeds(self, final: list[Piece], tentative: list[Piece]) -> list[GuardFeed]:
        pieces = self._pending + final
        self._pending = []
        spec, new = self._spec, pieces + tentative
        keep = 0  # tentative pieces fed before that the exact encoding still has, in place
        while keep < min(len(spec), len(new)) and spec[keep] == new[keep]:
            keep += 1
        self._spec = new[len(pieces) :]
        feeds: list[GuardFeed] = []
        if spec:
            feeds.append(GuardFeed([], None, confirm=min(keep, len(pieces)), retract=len(spec) - keep))
        feeds += self._group(pieces[min(keep, len(pieces)) :], tentative=False)
        feeds += self._group(new[max(keep, len(pieces)) :], tentative=True)
        return feeds

    def _group(self, pieces: list[Piece], tentative: bool) -> list[GuardFeed]:
        feeds: list[GuardFeed] = []
        lo, hi = self.prefix, self.prefix + self.client
        for p in pieces:
            start, end = max(p.start, lo), min(p.end, hi)
            if self.field is not None and start < end:
                span = Span(self.field, start - lo, end - lo)
                if feeds and feeds[-1].spans is not None:
                    feeds[-1].ids.append(p.id)
                    feeds[-1].spans.append(span)
                else:
                    feeds.append(GuardFeed([p.id], [span], tentative=tentative))
            elif feeds and feeds[-1].spans is None:
                feeds[-1].ids.append(p.id)
            else:
                feeds.append(GuardFeed([p.id], None))
        return feeds


class AssistantView:
    """Deltas of one choice in, guard feeds out (``header()`` first, ``finish()`` last)."""

    def __init__(self, template: ChatTemplate, *, speculate: bool = False) -> None:
        self.t = template
        self.speculate = speculate
        self._run: _Run | None = None
        self._stage = "start"  # start -> reasoning -> content -> tool -> done
        self._tool: int | None = None
        self._content_seen = False

    def header(self) -> list[GuardFeed]:
        """The assistant turn's opening, up to ``<think>``: fed as soon as the stream opens."""
        t = self.t
        return [GuardFeed(t.encode([t.im_start, "assistant\n", t.think]), None)]

    def reasoning(self, text: str) -> list[GuardFeed]:
        if not text:
            return []  # empty deltas (vLLM opens with content "") must not move the stage
        if self._stage == "start":
            self._stage = "reasoning"
            self._run = _Run(self.t, REASONING, "\n", self.speculate)
        if self._stage != "reasoning" or self._run is None or self._run.field != REASONING:
            # Reasoning after the answer began cannot be placed in the template: read it as content.
            return self.content(text)
        return self._run.push(text)

    def content(self, text: str) -> list[GuardFeed]:
        if not text:
            return []
        out = self._to_content()
        if self._stage == "tool":
            out += self._end_tool()
            out.append(GuardFeed(self.t.encode(["\n"]), None))
            self._run = _Run(self.t, CONTENT, "", self.speculate)
            self._stage = "content"
        assert self._run is not None
        self._content_seen = True
        return out + self._run.push(text)

    def tool_call(self, index: int, name: str | None, arguments: str) -> list[GuardFeed]:
        out: list[GuardFeed] = []
        if self._stage != "tool" or index != self._tool:
            out += self._to_content()
            if self._stage == "tool":
                out += self._end_tool()
                out.append(GuardFeed(self.t.encode(["\n"]), None))
            else:
                assert self._run is not None
                out += self._run.close("\n" if self._content_seen else "")
            out.append(GuardFeed([self.t.tool_call], None))
            self._run = _Run(
                self.t, tool_field(index), f'\n{{"name": "{name or ""}", "arguments": ', self.speculate
            )
            self._stage, self._tool = "tool", index
        assert self._run is not None
        return out + self._run.push(arguments)

    def finish(self) -> list[GuardFeed]:
        """End of the message: everything held is fed."""
        # An answer without content still closes its think block, as the template renders it.
        out = self._to_content()
        if self._stage == "tool":
            out += self._end_tool()
        elif self._run is not None:
            out += self._run.close()
        self._stage, self._run = "done", None
        return out

    def _to_content(self) -> list[GuardFeed]:
        """Leave the think block (empty if no reasoning came) and open the content run."""
        if self._stage not in ("start", "reasoning"):
            return []
        out: list[GuardFeed] = []
        if self._stage == "start":
            self._run = _Run(self.t, None, "\n")
        assert self._run is not None
        out += self._run.close("\n")
        out.append(GuardFeed([self.t.think_end], None))
        self._run = _Run(self.t, CONTENT, "\n\n", self.speculate)
        self._stage = "content"
        return out

    def _end_tool(self) -> list[GuardFeed]:
        assert self._run is not None
        out = self._run.close("}\n")
        out.append(GuardFeed([self.t.tool_call_end], None))
        self._run = None
        return out
