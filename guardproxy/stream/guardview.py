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


@dataclass(frozen=True, slots=True)
class GuardFeed:
    """Ids to feed the guard, in order. Judged feeds carry one span per id."""

    ids: list[int]
    spans: list[Span] | None  # None: context (markup, template text), not judged


class _Run:
    """One text run between two markup tokens: template prefix, client text of one field, suffix."""

    def __init__(self, template: ChatTemplate, field: str | None, prefix: str) -> None:
        self.field = field
        self.prefix = len(prefix)
        self.client = 0  # client characters pushed so far
        self.retok = Retokenizer(template.tok)
        self._pending = self.retok.push(prefix)

    def push(self, text: str) -> list[GuardFeed]:
        self.client += len(text)
        return self._feeds(self.retok.push(text))

    def close(self, suffix: str = "") -> list[GuardFeed]:
        return self._feeds(self.retok.push(suffix) + self.retok.flush())

    def _feeds(self, pieces: list[Piece]) -> list[GuardFeed]:
        pieces = self._pending + pieces
        self._pending = []
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
                    feeds.append(GuardFeed([p.id], [span]))
            elif feeds and feeds[-1].spans is None:
                feeds[-1].ids.append(p.id)
            else:
                feeds.append(GuardFeed([p.id], None))
        return feeds


class AssistantView:
    """Deltas of one choice in, guard feeds out (``header()`` first, ``finish()`` last)."""

    def __init__(self, template: ChatTemplate) -> None:
        self.t = template
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
            self._run = _Run(self.t, REASONING, "\n")
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
            self._run = _Run(self.t, CONTENT, "")
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
            self._run = _Run(self.t, tool_field(index), f'\n{{"name": "{name or ""}", "arguments": ')
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
        self._run = _Run(self.t, CONTENT, "\n\n")
        self._stage = "content"
        return out

    def _end_tool(self) -> list[GuardFeed]:
        assert self._run is not None
        out = self._run.close("}\n")
        out.append(GuardFeed([self.t.tool_call_end], None))
        self._run = None
        return out
