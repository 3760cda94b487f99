"""What the guard reads of one streamed assistant message, token by token.

The guard must read the answer exactly as the Qwen3 chat template renders the finished assistant turn
(the one the model was trained and evaluated on):

    <|im_start|>assistant\\n<think>\\n{R}\\n</think>\\n\\n{C}[{sep}<tool_call>\\n{"name": "N", "arguments":
    ARGS}\\n</tool_call>]...<|im_end|>

where R is the reasoning with the newlines at both ends stripped, C the content with its leading newlines
stripped, and sep a newline before every tool call but a first one that follows no content. A model
that streams its think block inside the content (``<think>R</think>C``, upstreams without a reasoning
parser) is rendered the same way, R taken from inside the tags. ``AssistantView`` builds that token
stream as deltas arrive, for any chunking: markup goes out as ids, and each text run (the reasoning, the
content, each tool call's JSON) goes through its own exact ``Retokenizer`` together with the template
text around it, so the ids equal the template's.

What is judged: every token from the first one that covers client text to the closing ``<|im_end|>``
(which is always judged), markup and template text included, as the official streaming evaluation
reads every position from the start of the response to the end. Tokens before that are context. Each
judged token carries the span of client text it covers (``None`` for markup and template text).

Client text the guard does not read (the stripped newlines, the ``<think>`` tags of a think block in
the content) is reported as *unread* spans: it goes out with the next judged token fed after it, so no
character leaves before a judged token covers or follows it.

Speculation (``speculate=True``): exact re-tokenization holds the last word of a run until more text
shows where it ends, which would delay every word by one upstream chunk. So the held client text is
also fed as it stands, as *tentative* tokens: the guard judges them (its verdict on a token depends only
on what precedes it, so it is the verdict that text would get if the answer ended there). When the next
text arrives, the tentative tokens that the exact encoding keeps are *confirmed* (their verdicts stand,
nothing is re-run) and the rest are *retracted* (the engine rolls them back) before the new tokens go
in. A run of ordinary words confirms every tentative token; " hello" + "s" retracts one.

Out of template order (reasoning after the answer began, content after a tool call) the template has no
place for the text; it is read in a run of its own where it arrived, judged all the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from guardproxy.guard.template import ChatTemplate
from guardproxy.stream.retokenize import Piece, Retokenizer

REASONING = "reasoning"
CONTENT = "content"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def tool_field(index: int) -> str:
    """The field of tool call ``index``'s arguments (its text is judged as the template lays it out)."""
    return f"tool_calls[{index}].arguments"


def tool_call_of(field: str) -> int | None:
    """The tool call whose arguments ``field`` is, or None for any other field."""
    if not (field.startswith("tool_calls[") and field.endswith("].arguments")):
        return None
    return int(field[len("tool_calls[") : -len("].arguments")])


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
    """Ids to feed the guard, in order. Judged feeds carry one entry per id: the client text that token
    covers, or ``None`` (markup, template text). ``spans is None``: context, not judged.

    Before its ids, a feed may revise the tentative tokens fed so far (oldest first): the first
    ``confirm`` of them are final, the last ``retract`` are taken back. ``unread``: client text the
    guard does not read, released with the next judged token fed after this feed's ids."""

    ids: list[int]
    spans: list[Span | None] | None  # None: context (markup, template text), not judged
    tentative: bool = False
    confirm: int = 0
    retract: int = 0
    unread: tuple[Span, ...] = ()


class _Feeds:
    """Collects a call's feeds in order, grouping runs of the same kind; owns the rule that every
    token after the first one covering client text is judged."""

    def __init__(self) -> None:
        self.out: list[GuardFeed] = []
        self.judging = False

    def take(self) -> list[GuardFeed]:
        out, self.out = self.out, []
        return out

    def revise(self, confirm: int, retract: int) -> None:
        self.out.append(GuardFeed([], None, confirm=confirm, retract=retract))

    def unread(self, span: Span) -> None:
        if span.end > span.start:
            self.out.append(GuardFeed([], None, unread=(span,)))

    def token(
        self, token_id: int, span: Span | None, *, tentative: bool = False, judge: bool = False
    ) -> None:
        judged = span is not None or judge or self.judging
        self.judging = self.judging or judged
        last = self.out[-1] if self.out else None
        plain = last is not None and not (last.confirm or last.retract or last.unread)
        if judged:
            if plain and last is not None and last.spans is not None and last.tentative == tentative:
                last.ids.append(token_id)
                last.spans.append(span)
            else:
                self.out.append(GuardFeed([token_id], [span], tentative=tentative))
        elif plain and last is not None and last.spans is None and last.ids:
            last.ids.append(token_id)
        else:
            self.out.append(GuardFeed([token_id], None))

    def text(self, template: ChatTemplate, text: str) -> None:
        """Template text that is a run of its own (between two markup tokens)."""
        for token_id in template.tok.encode_text(text) if text else []:
            self.token(token_id, None)


class _Run:
    """One text run between two markup tokens: template prefix, client text of one field, suffix.

    The client text is ``field[origin:]`` as it is pushed. ``lstrip``/``rstrip``: newlines at its start
    are dropped, newlines at its end are held until more text shows they are not the end, and dropped
    if the run closes there (the template strips them); dropped text is reported unread."""

    def __init__(
        self,
        template: ChatTemplate,
        feeds: _Feeds,
        field: str,
        origin: int,
        prefix: str,
        *,
        speculate: bool = False,
        lstrip: bool = False,
        rstrip: bool = False,
    ) -> None:
        self.field = field
        self.origin = origin  # field offset of the first client character read by this run
        self.prefix = len(prefix)
        self.client = 0  # client characters pushed into the re-tokenizer
        self.first = origin  # field offset of the first of them
        self.consumed = 0  # client characters accounted for: pushed, held or dropped
        self.retok = Retokenizer(template.tok)
        self.speculate = speculate
        self.lstrip, self.rstrip = lstrip, rstrip
        self._held_newlines = ""
        self._feeds = feeds
        self._pending = self.retok.push(prefix)
        self._spec: list[Piece] = []  # tentative pieces the guard has been fed

    @property
    def end(self) -> int:
        """Field offset just after the last client character this run has accounted for."""
        return self.origin + self.consumed

    def push(self, text: str) -> None:
        if self.lstrip and self.client == 0:
            kept = text.lstrip("\n")
            if len(kept) < len(text):
                self._drop(len(text) - len(kept))
                self.first = self.origin + self.consumed  # the client text read starts after them
                text = kept
        if not text:
            return
        if self.rstrip:
            text = self._held_newlines + text
            self.consumed -= len(self._held_newlines)
            body = text.rstrip("\n")
            self._held_newlines = text[len(body) :]
            self.consumed += len(self._held_newlines)
            text = body
            if not text:
                return
        self.consumed += len(text)
        self.client += len(text)
        self._emit(self.retok.push(text), self._tentative())

    def close(self, suffix: str = "") -> None:
        held, self._held_newlines = self._held_newlines, ""
        self.consumed -= len(held)
        self._emit(self.retok.push(suffix) + self.retok.flush(), [])
        if held:
            self._drop(len(held))

    def _drop(self, n: int) -> None:
        start = self.origin + self.consumed
        self.consumed += n
        self._feeds.unread(Span(self.field, start, start + n))

    def _tentative(self) -> list[Piece]:
        if not self.speculate:
            return []
        pieces = self.retok.peek(SPECULATE_MAX_CHARS)
        # Only client text is released early: a held tail that is partly bare template text waits.
        lo, hi = self.prefix, self.prefix + self.client
        if any(max(p.start, lo) >= min(p.end, hi) for p in pieces):
            return []
        return pieces

    def _span(self, p: Piece) -> Span | None:
        lo, hi = self.prefix, self.prefix + self.client
        start, end = max(p.start, lo), min(p.end, hi)
        if start >= end:
            return None
        return Span(self.field, self.first + start - lo, self.first + end - lo)

    def _emit(self, final: list[Piece], tentative: list[Piece]) -> None:
        pieces = self._pending + final
        self._pending = []
        spec, new = self._spec, pieces + tentative
        keep = 0  # tentative pieces fed before that the exact encoding still has, in place
        while keep < min(len(spec), len(new)) and spec[keep] == new[keep]:
            keep += 1
        self._spec = new[len(pieces) :]
        if spec:
            self._feeds.revise(min(keep, len(pieces)), len(spec) - keep)
        for p in pieces[min(keep, len(pieces)) :]:
            self._feeds.token(p.id, self._span(p))
        for p in new[max(keep, len(pieces)) :]:
            span = self._span(p)
            assert span is not None  # _tentative admits only pieces with client text
            self._feeds.token(p.id, span, tentative=True)


class AssistantView:
    """Deltas of one choice in, guard feeds out (``header()`` first, ``finish()`` last).

    ``think_in_content``: content that opens with ``<think>`` (after whitespace) is read as reasoning up
    to ``</think>``, as the template renders a finished message that carries its think block in the
    content; the content is probed (held) only while it could still be that opening."""

    def __init__(
        self, template: ChatTemplate, *, speculate: bool = False, think_in_content: bool = True
    ) -> None:
        self.t = template
        self.speculate = speculate
        self.think_in_content = think_in_content
        self._feeds = _Feeds()
        self._run: _Run | None = None
        self._stage = "start"  # start -> reasoning -> content -> tool -> done
        self._tool: int | None = None
        self.closed_calls: set[int] = set()  # tool calls whose JSON is complete and fed to the end
        self._received: dict[str, int] = {}  # client characters received per field
        self._split = False  # the content carried a think block: the answer is what follows it
        self._probe = ""  # content held while it may still open a think block
        self._think_tag = ""  # think-in-content: text held while it may be the start of </think>

    def header(self) -> list[GuardFeed]:
        """The assistant turn's opening, up to ``<think>``: fed as soon as the stream opens."""
        t = self.t
        f = self._feeds
        f.token(t.im_start, None)
        f.text(t, "assistant\n")
        f.token(t.think, None)
        return f.take()

    # -- deltas -------------------------------------------------------------------------------------

    def reasoning(self, text: str) -> list[GuardFeed]:
        if not text:
            return []  # empty deltas (vLLM opens with content "") must not move the stage
        origin = self._receive(REASONING, text)
        if self._stage == "start" and not self._probe:
            self._stage = "reasoning"
            self._run = self._reasoning_run(REASONING, origin)
        elif self._stage != "reasoning" or self._run is None or self._run.field != REASONING:
            self._aside(REASONING, origin)
        assert self._run is not None
        self._run.push(text)
        return self._feeds.take()

    def content(self, text: str) -> list[GuardFeed]:
        if not text:
            return []
        origin = self._receive(CONTENT, text)
        if self._stage == "start" and self.think_in_content:
            self._probe += text
            self._resolve_probe(final=False)
        elif self._stage == "reasoning" and self._run is not None and self._run.field == CONTENT:
            self._think_text(text)
        elif self._stage in ("start", "reasoning"):
            self._to_content(origin)
            assert self._run is not None
            self._run.push(text)
        elif self._stage == "content" and self._run is not None and self._run.field == CONTENT:
            self._run.push(text)
        else:
            self._aside(CONTENT, origin)
            assert self._run is not None
            self._run.push(text)
        return self._feeds.take()

    def other(self, field: str, text: str) -> list[GuardFeed]:
        """Text of a field the template has no place for (a chat ``refusal``): read in a run of its
        own where it arrives, judged all the same."""
        if not text:
            return []
        origin = self._receive(field, text)
        if self._stage != "aside" or self._run is None or self._run.field != field:
            self._aside(field, origin)
        assert self._run is not None
        self._run.push(text)
        return self._feeds.take()

    def tool_call(self, index: int, name: str | None, arguments: str) -> list[GuardFeed]:
        field = tool_field(index)
        origin = self._receive(field, arguments)
        if self._stage != "tool" or index != self._tool or self._run is None:
            self._resolve_probe(final=True)
            self._to_content(self._received.get(CONTENT, 0))
            if self._stage == "tool":
                self._end_tool()
                self._feeds.text(self.t, "\n")
            elif self._run is None:
                raise AssertionError("no text run is open outside a tool call")
            elif self._run.field == CONTENT and self._stage == "content":
                self._run.close("\n" if self._content_nonempty() else "")
            else:  # an aside run of another field
                self._run.close("\n")
            self._feeds.token(self.t.tool_call, None)
            prefix = f'\n{{"name": "{name or ""}", "arguments": '
            self._run = _Run(self.t, self._feeds, field, origin, prefix, speculate=self.speculate)
            self._stage, self._tool = "tool", index
        assert self._run is not None
        self._run.push(arguments)
        return self._feeds.take()

    @property
    def open_call(self) -> int | None:
        """The tool call whose JSON is being read (not closed yet), if any."""
        return self._tool if self._stage == "tool" and self._run is not None else None

    def end_tool_call(self, index: int) -> list[GuardFeed]:
        """The upstream says tool call ``index`` is complete: its JSON is closed now (the template's
        ``}\n</tool_call>``), so its last tokens are final and judged without waiting for what comes
        next. The ids are the same as when the next call or the end closes it."""
        if self._stage == "tool" and self._tool == index:
            self._end_tool()
        return self._feeds.take()

    def finish(self) -> list[GuardFeed]:
        """End of the message: everything held is fed, then the closing ``<|im_end|>`` (judged)."""
        if self._stage == "done":
            return []
        self._resolve_probe(final=True)
        # An answer without content still closes its think block, as the template renders it.
        self._to_content(self._received.get(CONTENT, 0))
        if self._stage == "tool":
            self._end_tool()
        elif self._run is not None:
            self._run.close()
        self._stage, self._run = "done", None
        self._feeds.token(self.t.im_end, None, judge=True)
        return self._feeds.take()

    # -- stages -------------------------------------------------------------------------------------

    def _receive(self, field: str, text: str) -> int:
        origin = self._received.get(field, 0)
        self._received[field] = origin + len(text)
        return origin

    def _content_nonempty(self) -> bool:
        """The template's test for a newline before the first tool call: any content at all, or, when
        the content carried a think block, any answer after it but leading newlines."""
        if self._split:
            return self._run is not None and self._run.client > 0
        return self._received.get(CONTENT, 0) > 0

    def _reasoning_run(self, field: str, origin: int) -> _Run:
        return _Run(
            self.t, self._feeds, field, origin, "\n", speculate=self.speculate, lstrip=True, rstrip=True
        )

    def _to_content(self, origin: int) -> None:
        """Leave the think block (empty if no reasoning came) and open the content run at ``origin``."""
        if self._stage not in ("start", "reasoning"):
            return
        if self._think_tag:  # a think block in the content that never closed: what was held is reasoning
            assert self._run is not None
            tag, self._think_tag = self._think_tag, ""
            self._run.push(tag)
        if self._stage == "start":
            self._run = _Run(self.t, self._feeds, REASONING, 0, "\n")
        assert self._run is not None
        self._run.close("\n")
        self._feeds.token(self.t.think_end, None)
        self._run = _Run(self.t, self._feeds, CONTENT, origin, "\n\n", speculate=self.speculate, lstrip=True)
        self._stage = "content"

    def _resolve_probe(self, *, final: bool) -> None:
        """Decide what held content is: the opening of a think block, or the answer itself."""
        if not self._probe:
            return
        text = self._probe
        lead = len(text) - len(text.lstrip())
        rest = text[lead:]
        if rest.startswith(THINK_OPEN):
            self._probe = ""
            self._feeds.unread(Span(CONTENT, 0, lead + len(THINK_OPEN)))
            self._stage = "reasoning"
            self._run = self._reasoning_run(CONTENT, lead + len(THINK_OPEN))
            self._think_text(rest[len(THINK_OPEN) :])
            return
        if not final and THINK_OPEN.startswith(rest):
            return  # may still become "<think>": hold it
        self._probe = ""
        self._to_content(0)
        assert self._run is not None
        self._run.push(text)

    def _think_text(self, text: str) -> None:
        """Content inside a think block: reasoning up to ``</think>``, the answer after it."""
        text = self._think_tag + text
        self._think_tag = ""
        run = self._run
        assert run is not None
        at = text.find(THINK_CLOSE)
        if at < 0:
            # Hold a tail that may be the start of "</think>"; the rest is reasoning.
            hold = next(
                (
                    k
                    for k in range(min(len(THINK_CLOSE) - 1, len(text)), 0, -1)
                    if THINK_CLOSE.startswith(text[-k:])
                ),
                0,
            )
            self._think_tag = text[len(text) - hold :]
            run.push(text[: len(text) - hold])
            return
        run.push(text[:at])
        run.close("\n")
        tag_start = run.end
        self._feeds.unread(Span(CONTENT, tag_start, tag_start + len(THINK_CLOSE)))
        self._feeds.token(self.t.think_end, None)
        origin = tag_start + len(THINK_CLOSE)
        self._run = _Run(self.t, self._feeds, CONTENT, origin, "\n\n", speculate=self.speculate, lstrip=True)
        self._stage = "content"
        self._split = True
        self._run.push(text[at + len(THINK_CLOSE) :])

    def _aside(self, field: str, origin: int) -> None:
        """Text the template cannot place here: end what is open and read it in a run of its own."""
        self._resolve_probe(final=True)
        self._to_content(self._received.get(CONTENT, 0) if field != CONTENT else origin)
        if self._stage == "tool":
            self._end_tool()
        elif self._run is not None:
            self._run.close()
        self._run = _Run(self.t, self._feeds, field, origin, "\n", speculate=self.speculate)
        self._stage = "aside"

    def _end_tool(self) -> None:
        if self._run is None:  # closed already (end_tool_call)
            return
        self._run.close("}\n")
        self._feeds.token(self.t.tool_call_end, None)
        self._run = None
        assert self._tool is not None
        self.closed_calls.add(self._tool)
