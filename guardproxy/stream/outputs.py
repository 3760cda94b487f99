"""Every output of one response, moderated together: upstream events in, commands out (sans-IO).

A response has one output (Responses, Messages) or several (chat's ``n`` choices), each with its own
``ChoiceModerator`` and its own guard stream. The request-wide rules live here, not in the I/O layer:
- an output is opened (``Open``: the I/O layer gives it a guard stream) the first time it is seen;
- its feeds go to its stream in order (``Feed``, ``Retract``);
- one connection carries every output, so the first cut ends them all: the cut output ends with its
  cut, the others where their released text stops, and the upstream is closed (``CloseUpstream``);
- a failed guard follows the policy, counted once a request (``CountFailure``): ``fail_closed`` ends
  the response with an error (``Abort``); ``fail_open`` lets that output go on unjudged, marked.

The I/O layer hands verdicts back with ``judged`` in the order of each output's feeds, and before it
passes that output's next event in (a revision must not race a verdict of a token it takes back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Policy
from guardproxy.stream.guardview import GuardFeed
from guardproxy.stream.moderator import Answer, ChoiceModerator, Out

# -- events in -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    """Text of one field (``REASONING``, ``CONTENT``) of output ``output``."""

    output: int
    field: str
    text: str


@dataclass(frozen=True, slots=True)
class ToolArgs:
    """Arguments of tool call ``call`` of an output; ``name`` as known when the call starts."""

    output: int
    call: int
    name: str | None
    text: str


@dataclass(frozen=True, slots=True)
class ToolEnd:
    """The upstream ended tool call ``call`` of an output: its arguments are complete."""

    output: int
    call: int


@dataclass(frozen=True, slots=True)
class Marker:
    """Anything else of an output, for the client in order with its text. A marker carries no model
    text (a wire turns text it finds in one into ``ToolArgs`` of a call of its own); with ``call`` it
    belongs to that tool call and is released with the whole call, or not at all."""

    output: int
    payload: Any
    call: int | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """The upstream ended an output: its reason and ending payload (a wire's terminal event)."""

    output: int
    reason: str | None
    payload: Any = None


Event = Text | ToolArgs | ToolEnd | Marker | Finish


# -- commands out --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Open:
    """Give output ``output`` a guard stream (output 0 continues the prompt's)."""

    output: int


@dataclass(frozen=True, slots=True)
class Feed:
    """Feed ids to output ``output``'s guard stream; ``judged``: a verdict each, handed back in order."""

    output: int
    ids: list[int]
    judged: bool


@dataclass(frozen=True, slots=True)
class Retract:
    output: int
    n: int


@dataclass(frozen=True, slots=True)
class Emit:
    """Something the client may now see of output ``output``."""

    output: int
    out: Out


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """A cut: stop the upstream at once."""


@dataclass(frozen=True, slots=True)
class CountFailure:
    """The first guard failure of this request, under the policy's mode."""

    mode: str


@dataclass(frozen=True, slots=True)
class Abort:
    """The guard failed and the policy fails closed: the response ends with this error."""

    reason: str


Command = Open | Feed | Retract | Emit | CloseUpstream | CountFailure | Abort


class Outputs:
    def __init__(
        self,
        template: ChatTemplate,
        policy: Policy,
        *,
        speculate: bool,
        max_outputs: int = 1,
        record: bool = False,
    ) -> None:
        self.template = template
        self.policy = policy
        self.speculate = speculate
        self.record = record  # keep every token's verdict (shown by the live view)
        self.max_outputs = max_outputs
        self.moderators: dict[int, ChoiceModerator] = {}
        self.failure: str | None = None  # why the guard failed (fail_open: what follows is unjudged)
        self.cut = False
        self._counted = False

    # -- upstream side --------------------------------------------------------------------------------

    def event(self, e: Event, now: float = 0.0) -> list[Command]:
        if not 0 <= e.output < self.max_outputs:
            raise ValueError(f"output index {e.output} out of range")
        out: list[Command] = []
        m = self.moderators.get(e.output)
        if m is None:
            m = self._open(e.output, out)
        if self.cut or m.closed:
            return out  # after a cut nothing more is read into any output
        if isinstance(e, Text):
            feeds = m.text(e.field, e.text, now)
        elif isinstance(e, ToolArgs):
            feeds = m.tool_call(e.call, e.name, e.text, now)
        elif isinstance(e, ToolEnd):
            feeds = m.end_call(e.call)
        elif isinstance(e, Marker):
            m.marker(e.payload, e.call)
            feeds = []
        else:
            feeds = m.finish(e.reason, e.payload)
        return out + self._feeds(e.output, feeds)

    def end(self, truncated: bool = False) -> list[Command]:
        """The upstream is done: every output not finished yet is finished now (no reason given).
        ``truncated``: it stopped before its last event (a tool call it was streaming is dropped)."""
        out: list[Command] = []
        for index, m in sorted(self.moderators.items()):
            if not m.finished and not self.cut:
                out += self._feeds(index, m.finish(None, truncated=truncated))
        return out

    def _open(self, index: int, out: list[Command]) -> ChoiceModerator:
        m = ChoiceModerator(self.template, self.policy, speculate=self.speculate, record=self.record)
        self.moderators[index] = m
        out.append(Open(index))
        feeds = m.start()
        if self.failure is not None:  # the prompt's guard already failed open: nothing is judged
            m.unguard()
        out += self._feeds(index, feeds)
        return m

    def _feeds(self, index: int, feeds: list[GuardFeed]) -> list[Command]:
        if self.moderators[index].unguarded:
            return []
        out: list[Command] = []
        for f in feeds:
            if f.retract:
                out.append(Retract(index, f.retract))
            if f.ids:
                out.append(Feed(index, f.ids, f.spans is not None))
        return out

    # -- guard side -----------------------------------------------------------------------------------

    def judged(self, index: int, verdicts: list[Verdict]) -> None:
        self.moderators[index].judged(verdicts)

    def guard_failed(self, index: int | None, reason: str) -> list[Command]:
        """The guard failed for output ``index`` (None: for the prompt, before any output)."""
        out: list[Command] = []
        if not self._counted:
            self._counted = True
            out.append(CountFailure(self.policy.on_guard_error))
        if self.policy.on_guard_error != "fail_open":
            return [*out, Abort(reason)]
        if self.failure is None:
            self.failure = reason
        if index is not None:
            self.moderators[index].unguard()
        return out

    # -- client side ----------------------------------------------------------------------------------

    def drain(self) -> list[Command]:
        """What every output may release now, outputs in index order; the first cut ends them all."""
        out: list[Command] = []
        was_cut = self.cut
        for index, m in sorted(self.moderators.items()):
            out += [Emit(index, o) for o in m.drain()]
            self.cut = self.cut or m.cut_at is not None
        if self.cut and not was_cut:
            out.append(CloseUpstream())
            for index, m in sorted(self.moderators.items()):
                if not m.closed:
                    out.append(Emit(index, m.end()))
        return out

    def answer(self, index: int) -> Answer:
        """Output ``index`` as moderated, for a wire to read (whole answers, kept turns)."""
        return Answer(self.moderators.get(index))

    @property
    def done(self) -> bool:
        """Every output has had its last item."""
        return bool(self.moderators) and all(m.closed for m in self.moderators.values())

    def details(self) -> dict[str, Any]:
        """Every decision on the answer (the outputs' together, the strongest named at the top)."""
        per = {i: m.judge.details() for i, m in sorted(self.moderators.items())}
        order = {"cut": 3, "redact": 2, "flag": 1}
        response: dict[str, Any] = max(
            per.values(),
            key=lambda d: order.get(d["action"], 0),
            default={"risk": "Safe", "category": None, "action": "allow", "judged_tokens": 0},
        )
        if len(per) > 1:
            response = {**response, "choices": {str(i): d for i, d in per.items()}}
        return response

    def tokens(self) -> dict[str, list[dict[str, Any]]]:
        """Each output's answer as it was judged, token by token (``record`` only): its text, own tier
        and probabilities, and the action the policy took on it."""
        out: dict[str, list[dict[str, Any]]] = {}
        for index, m in sorted(self.moderators.items()):
            verdicts = m.judge.verdicts or []
            rows = []
            for (span, decision), (tier, p_unsafe, p_contro, category) in zip(
                m.tokens, verdicts, strict=False
            ):
                rows.append(
                    {
                        "token": m.fields[span.field].text[span.start : span.end] if span is not None else "",
                        "field": span.field if span is not None else None,
                        "tier": tier,
                        "category": category if tier != "Safe" else None,
                        "p_unsafe": round(p_unsafe, 4),
                        "p_controversial": round(p_contro, 4),
                        "action": str(decision.action) if decision is not None else "allow",
                    }
                )
            out[str(index)] = rows
        return out
