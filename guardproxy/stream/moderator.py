"""One output of a response (a chat choice, a Responses or Messages answer), moderated: its text in, guard
feeds out; verdicts in, what the client may see out.

It knows no wire format. The upstream side takes text by field (``REASONING``, ``CONTENT``, a tool
call's arguments), *markers* (any other event or delta of the output, handed back in order with the
text around it: a role delta, a tool call's header, a Responses ``content_part.added``), the end of a
tool call, and the finish (with the upstream's ending payload). The client side gives ``Out`` items
in upstream order: released text, markers, the finish, or the cut. No I/O here: the proxy feeds the
``GuardFeed``s to the engine in order and hands the verdicts back with ``judged``; ``drain`` then
gives what the client may see.
Invariants:
- nothing is released before every token covering it is judged and ``holdback_tokens`` more are judged
  after it (at the end of the answer everything judged is released); text the guard does not read
  (newlines the template strips, think tags) goes out with the next judged token fed after it;
- under debounce (the authors' pair rule) a token whose own tier is not Safe waits for the next verdict,
  which may make a pair that covers it; a Safe token is not delayed;
- after the first token the policy cuts on, nothing more of the answer is released, not one character
  of that token's text included, and no marker after it; the cut (with the policy's notice) ends it;
- text of tokens to redact is replaced by the policy's mask (adjacent tokens share one mask);
- a tool call is released whole: its markers (header, done events) and its arguments wait until the
  call is complete (the upstream ended it, or what came next did) and every token of its arguments is
  judged final and releasable, then go out together in order; a cut before that drops the call and
  everything after it (clients act on a call, so a partial one must never reach them). Text before
  the call is released as usual.

With ``speculate`` (a streamed answer, policy ``early_release``, and ``holdback_tokens`` 0: a holdback
waits for later tokens anyway), the held last word is judged tentatively (see ``guardview``) and its
text released as soon as its tentative verdict asks for no more than ``flag``; decisions (cut, redact,
the flag recorded) come only from final tokens, exactly as without speculation. So every released
character was judged before release, as the text stood; when a word then grows (" bo" + "mb") and
the grown token is cut, the part released before stays released and the cut holds back the rest.
That is the guard's own streaming use (each token judged as the model emits it); ``early_release:
false`` holds every word until the next text shows it is complete.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Action, Decision, Policy, ResponseJudge
from guardproxy.stream.guardview import CONTENT, REASONING, AssistantView, GuardFeed, Span, tool_field

CONTENT_FILTER = "content_filter"


@dataclass
class _Field:
    """Text of one field as received, how far it is released, and where redactions fall."""

    text: str = ""
    released: int = 0
    redact: list[tuple[int, int]] = field(default_factory=list)
    masking: bool = False  # the text released last ended inside a redaction (a later chunk goes on with it)
    arrivals: list[tuple[int, float]] = field(default_factory=list)  # (end offset of a delta, when it came)

    def arrived(self, offset: int) -> float | None:
        """When the text at ``offset`` came from upstream (earlier marks are dropped as released)."""
        while self.arrivals and self.arrivals[0][0] <= offset:
            self.arrivals.pop(0)
        return self.arrivals[0][1] if self.arrivals else None


@dataclass
class _Rider:
    """Client text the guard does not read, released with the judged token at global ``index``
    (final, pending and tentative tokens counted in feed order)."""

    index: int
    span: Span


@dataclass
class _Tentative:
    """A tentative token fed to the guard, and its verdict once back."""

    span: Span
    verdict: Verdict | None = None


@dataclass
class _Item:
    """The output queue: text of a field up to ``end``, a marker, or the finish, released in order."""

    field: str | None
    end: int = 0
    marker: Any = None
    finish: bool = False
    reason: str | None = None
    call: int | None = None  # part of tool call ``call``: released with the whole call, or never
    truncated: bool = False  # the finish of an upstream that stopped before its end


@dataclass(frozen=True, slots=True)
class Out:
    """What the client may see next, in upstream order: ``text`` of a field (masks applied), a
    ``marker`` handed in earlier, the ``finish`` (the upstream's reason and ending payload), or the
    ``cut`` (``text`` is the policy's notice). ``arrived``: when the oldest text in it came from
    upstream (the caller's clock)."""

    kind: Literal["text", "marker", "finish", "cut"]
    field: str | None = None
    text: str = ""
    payload: Any = None
    reason: str | None = None
    arrived: float | None = None
    truncated: bool = False  # a finish: the upstream stopped before its end (no reason, no last event)


class ChoiceModerator:
    def __init__(
        self,
        template: ChatTemplate,
        policy: Policy,
        *,
        speculate: bool = False,
        record: bool = False,
    ) -> None:
        self.policy = policy
        self.speculate = speculate and policy.early_release and policy.holdback_tokens == 0
        self.view = AssistantView(
            template, speculate=self.speculate, think_in_content=policy.think_in_content
        )
        self.judge = ResponseJudge(policy, record=record)  # record: keep each verdict (a live view)
        self.fields: dict[str, _Field] = {}
        self.queue: list[_Item] = []
        # Judged tokens in order: the client text each covers (None: markup, <|im_end|>), its decision.
        self.tokens: list[tuple[Span | None, Decision | None]] = []
        self.pending_spans: deque[Span | None] = deque()  # submitted for judging, verdicts not back yet
        self.tentative: list[_Tentative] = []  # fed after every pending span (see ``speculate``)
        self.riders: list[_Rider] = []  # unread client text, by the judged token it waits for
        self.cut_at: Decision | None = None
        self.finished = False
        self.closed = False  # the client has its final item
        self._now = 0.0
        self._scan = 0  # tokens before this index are entirely released: boundaries need not see them
        self.unguarded = False
        self._ended: set[int] = set()  # tool calls the upstream said are complete
        self._partial: set[int] = set()  # a tool call the upstream stopped in the middle of

    # -- upstream side ---------------------------------------------------------------------------------

    def start(self) -> list[GuardFeed]:
        return self._track(self.view.header())

    def text(self, name: str, text: str, now: float = 0.0) -> list[GuardFeed]:
        """Text of ``REASONING``, ``CONTENT`` or another field (read where it arrives); ``now`` is the
        caller's clock when it arrived, handed back on the released text."""
        if not text:
            return []  # empty deltas (vLLM opens with content "") change nothing
        self._now = now
        self._text(name, text)
        if name == REASONING:
            return self._track(self.view.reasoning(text))
        if name == CONTENT:
            return self._track(self.view.content(text))
        return self._track(self.view.other(name, text))

    def tool_call(self, call: int, name: str | None, arguments: str, now: float = 0.0) -> list[GuardFeed]:
        """Arguments of tool call ``call`` (its ``name`` as known when it starts)."""
        self._now = now
        self._text(tool_field(call), arguments, call)
        return self._track(self.view.tool_call(call, name, arguments))

    def marker(self, payload: Any, call: int | None = None) -> None:
        """Anything else of this output, handed back by ``drain`` in order with the text around it;
        with ``call``, part of that tool call (its header, its done events), held with it."""
        self.queue.append(_Item(None, marker=payload, call=call))

    def end_call(self, call: int) -> list[GuardFeed]:
        """The upstream ended tool call ``call``: its arguments are complete."""
        self._ended.add(call)
        return self._track(self.view.end_tool_call(call))

    def finish(self, reason: str | None, payload: Any = None, truncated: bool = False) -> list[GuardFeed]:
        """The upstream ended this output: the held text is fed, then the closing token; the finish
        (``reason``, the upstream's ending ``payload``) is queued last. ``truncated``: the upstream
        stopped before its end, so a tool call it was still streaming is incomplete: never released."""
        if self.finished:
            return []
        self.finished = True
        partial = self.view.open_call
        if truncated and partial is not None and partial not in self._ended:
            self._partial.add(partial)
        self.queue.append(_Item(None, finish=True, reason=reason, marker=payload, truncated=truncated))
        return self._track(self.view.finish())

    def _text(self, name: str, text: str, call: int | None = None) -> None:
        f = self.fields.setdefault(name, _Field())
        f.text += text
        f.arrivals.append((len(f.text), self._now))
        if self.queue and self.queue[-1].field == name:
            self.queue[-1].end = len(f.text)
        else:
            self.queue.append(_Item(name, end=len(f.text), call=call))

    def _fed(self) -> int:
        """Judged tokens fed so far, final and tentative."""
        return len(self.tokens) + len(self.pending_spans) + len(self.tentative)

    def _track(self, feeds: list[GuardFeed]) -> list[GuardFeed]:
        for f in feeds:
            if f.confirm or f.retract:
                self._revise(f.confirm, f.retract)
            for span in f.unread:
                self.riders.append(_Rider(self._fed(), span))
            if f.spans is None:
                continue
            if f.tentative:
                self.tentative += [_Tentative(span) for span in f.spans if span is not None]
            else:
                self.pending_spans.extend(f.spans)
        return feeds

    def _revise(self, confirm: int, retract: int) -> None:
        """The first ``confirm`` tentative tokens are final, the last ``retract`` are gone. Confirmed
        tokens join the final ones in feed order: a verdict already back is decided on now."""
        if self.unguarded:
            return
        if confirm + retract > len(self.tentative):
            raise RuntimeError("guard view revised more tentative tokens than it fed")
        if retract:
            del self.tentative[len(self.tentative) - retract :]
            # Unread text waiting for a token taken back waits for whatever is fed in its place.
            fed = self._fed()
            for r in reversed(self.riders):
                if r.index <= fed:
                    break
                r.index = fed
        confirmed, self.tentative = self.tentative[:confirm], self.tentative[confirm:]
        for t in confirmed:
            if t.verdict is None:
                self.pending_spans.append(t.span)
            elif self.pending_spans:
                raise RuntimeError("a tentative verdict came back before an earlier token's")
            else:
                self._decide(t.span, t.verdict)

    # -- guard side ------------------------------------------------------------------------------------

    def unguard(self) -> None:
        """The guard failed and the policy fails open: what arrives is released unjudged (a cut
        already decided still stands)."""
        self.unguarded = True
        self.pending_spans.clear()
        self.tentative.clear()

    def judged(self, verdicts: list[Verdict]) -> None:
        """Verdicts for the next judged tokens, in the order their feeds were made (the caller hands
        over every verdict that is back before it passes the next delta in: a revision must not
        race a verdict of a token it takes back)."""
        if self.unguarded:
            return
        for v in verdicts:
            if self.pending_spans:
                self._decide(self.pending_spans.popleft(), v)
                continue
            waiting = next((t for t in self.tentative if t.verdict is None), None)
            if waiting is None:
                raise RuntimeError("a guard verdict for no token fed")
            waiting.verdict = v

    def _decide(self, span: Span | None, v: Verdict) -> None:
        """The policy's decision on the next final token."""
        self.tokens.append((span, None))
        for d in self.judge.judge(v):
            prev_span, prev = self.tokens[d.index]
            if prev is None or d.action > prev.action:
                self.tokens[d.index] = (prev_span, d)
            if d.action == Action.CUT and (self.cut_at is None or d.index < self.cut_at.index):
                self.cut_at = d
            if d.action == Action.REDACT and prev_span is not None:
                f = self.fields[prev_span.field]
                f.redact.append((prev_span.start, prev_span.end))

    @property
    def decided(self) -> Decision | None:
        """The decision that names this answer's outcome: the cut, else a redaction, else the first flag."""
        return self.judge.strongest

    # -- client side -----------------------------------------------------------------------------------

    def _boundaries(self) -> dict[str, int]:
        """How far each field may be released: covered by judged tokens past the holdback, before a cut.

        Once a cut is decided every token before it is final (nothing more is judged, debounce can
        revise nothing), so the holdback no longer applies to them."""
        if self.cut_at is None and self.unguarded:
            return {name: len(f.text) for name, f in self.fields.items()}
        if self.cut_at is not None:
            releasable = self.cut_at.index
        elif self.finished and not self.pending_spans:
            releasable = len(self.tokens)
        else:
            # A token debounce may still pair with the next one waits for that verdict.
            wait = max(self.policy.holdback_tokens, 1 if self.judge.awaiting else 0)
            releasable = max(0, len(self.tokens) - wait)
        if self.riders:
            self.riders = [r for r in self.riders if not self._released(r.span)]
        while self._scan < len(self.tokens):
            span = self.tokens[self._scan][0]
            if span is not None and not self._released(span):
                break
            if self.riders and self.riders[0].index <= self._scan:
                break  # unread text waiting for this token is not out yet
            self._scan += 1
        # Only fields with text still unreleased can be held back; once each is blocked, nothing
        # later in the order can change a bound (the pending backlog can be long under load).
        unreleased = {name for name, f in self.fields.items() if f.released < len(f.text)}
        bound: dict[str, int] = {}
        blocked: set[str] = set()
        for span, ok in self._entries(releasable):
            if unreleased <= blocked:
                break
            if span.field in blocked:
                continue
            if ok:
                bound[span.field] = max(bound.get(span.field, 0), span.end)
            else:
                # Stop at the first token not releasable; a character it shares with the token
                # before (byte-level BPE splits characters) waits for it too.
                bound[span.field] = min(bound.get(span.field, span.start), span.start)
                blocked.add(span.field)
        return bound

    def _released(self, span: Span) -> bool:
        return span.end <= self.fields[span.field].released

    def _entries(self, releasable: int) -> Iterator[tuple[Span, bool]]:
        """Every span not yet known released, in feed order, with whether it may be released now;
        unread text comes just before the judged token it waits for, and shares its fate."""
        riders, r = self.riders, 0

        def with_riders(index: int, span: Span | None, ok: bool) -> Iterator[tuple[Span, bool]]:
            nonlocal r
            while r < len(riders) and riders[r].index <= index:
                yield riders[r].span, ok
                r += 1
            if span is not None:
                yield span, ok

        for i in range(self._scan, len(self.tokens)):
            yield from with_riders(i, self.tokens[i][0], i < releasable)
        index = len(self.tokens)
        for pending in self.pending_spans:
            yield from with_riders(index, pending, False)
            index += 1
        # Tentative text goes once everything before it is out and its own verdict passes alone
        # (under debounce: is Safe, since a non-Safe one may start a pair).
        early = self.cut_at is None and not self.pending_spans and releasable == len(self.tokens)
        for t in self.tentative:
            early = early and t.verdict is not None and self._passes_alone(t.verdict)
            yield from with_riders(index, t.span, early)
            index += 1
        while r < len(riders):  # waiting for a token not fed yet
            yield riders[r].span, False
            r += 1

    def _passes_alone(self, v: Verdict) -> bool:
        if self.policy.debounce:  # a non-Safe token may start a pair: it waits if that pair can withhold
            return not self.policy.withholds(self.policy.tier(v))
        return self.policy.action(v) <= Action.FLAG

    def drain(self) -> list[Out]:
        """What the client may now see, in upstream order; after a cut, the cut and nothing more."""
        if self.closed:
            return []
        bound = self._boundaries()
        out: list[Out] = []
        while self.queue:
            item = self.queue[0]
            if item.call in self._partial:
                self.queue.pop(0)  # the upstream stopped inside this call: none of it goes out
                continue
            if item.call is not None and not self._call_ready(item.call, bound):
                break  # a tool call goes out whole, or not at all
            if item.field is None:
                if item.finish:
                    if self.cut_at is not None:
                        break  # the cut's own ending replaces the upstream's
                    out.append(
                        Out("finish", payload=item.marker, reason=item.reason, truncated=item.truncated)
                    )
                    self.closed = True
                else:
                    out.append(Out("marker", payload=item.marker))
                self.queue.pop(0)
                if self.closed:
                    break
                continue
            f = self.fields[item.field]
            upto = min(item.end, bound.get(item.field, f.released))
            if upto > f.released:
                text = self._render(f, f.released, upto)
                arrived = f.arrived(f.released)
                f.released = upto
                out.append(Out("text", field=item.field, text=text, arrived=arrived))
            if f.released < item.end:
                break
            self.queue.pop(0)
        if self.cut_at is not None:
            # Everything before the cut token is out; nothing after it ever will be.
            out.append(Out("cut", text=self.policy.notice))
            self.closed = True
        return out

    def _call_ready(self, call: int, bound: dict[str, int]) -> bool:
        """Tool call ``call`` is complete and all of its arguments may be released."""
        name = tool_field(call)
        f = self.fields.get(name)
        if f is None or not f.text:  # no arguments to judge: complete once ended
            return call in self._ended or call in self.view.closed_calls or self.finished
        return call in self.view.closed_calls and bound.get(name, f.released) >= len(f.text)

    def end(self) -> Out:
        """Close this output now (another output was cut: one connection carries them all)."""
        self.closed = True
        return Out("cut")

    def released_whole(self, name: str) -> bool:
        """Every character of field ``name`` was released (a field never seen has none to hold)."""
        f = self.fields.get(name)
        return f is None or f.released >= len(f.text)

    def shown(self, name: str, start: int, end: int) -> str:
        """What the client got of ``field[start:end]``, masks applied (for answers sent whole)."""
        f = self.fields.get(name)
        if f is None:
            return ""
        end = min(end, f.released)
        if end <= start:
            return ""
        masking, f.masking = f.masking, False
        try:
            return self._render(f, start, end)
        finally:
            f.masking = masking

    def _render(self, f: _Field, start: int, end: int) -> str:
        """``f.text[start:end]`` with each run of redacted characters replaced by one mask (a run that
        goes on from the chunk released before gets no second mask)."""
        runs: list[list[int]] = []
        for a, b in sorted(f.redact):
            a, b = max(a, start), min(b, end)
            if a >= b:
                continue
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], b)
            else:
                runs.append([a, b])
        out, pos = [], start
        for a, b in runs:
            out += [f.text[pos:a], "" if a == start and f.masking else self.policy.mask]
            pos = b
        out.append(f.text[pos:end])
        f.masking = bool(runs) and runs[-1][1] == end
        return "".join(out)


class Answer:
    """What a wire reads of one output once it was moderated (an answer sent whole, what is kept for a
    later turn): the text the upstream sent, what the client got of it, whether it was cut. A view of
    the moderator: reading it changes nothing."""

    def __init__(self, moderator: ChoiceModerator | None) -> None:
        self._m = moderator  # None: an output that never came

    @property
    def came(self) -> bool:
        """The upstream sent this output."""
        return self._m is not None

    @property
    def cut(self) -> bool:
        return self._m is not None and self._m.cut_at is not None

    def sent(self, field: str) -> str:
        """Everything the upstream sent of ``field`` ('' for a field it never sent)."""
        f = self._m.fields.get(field) if self._m is not None else None
        return f.text if f is not None else ""

    def has(self, field: str) -> bool:
        return self._m is not None and field in self._m.fields

    def shown(self, field: str, start: int, end: int) -> str:
        """What the client got of ``field[start:end]``, masks applied."""
        return self._m.shown(field, start, end) if self._m is not None else ""

    def whole(self, field: str, start: int, end: int) -> bool:
        """The client got ``field[start:end]`` exactly as sent: none of it held back, cut or masked."""
        return self.has(field) and self.shown(field, start, end) == self.sent(field)[start:end]

    def released_whole(self, field: str) -> bool:
        """Every character of ``field`` was released (a field never sent has none to hold)."""
        return self._m is None or self._m.released_whole(field)
