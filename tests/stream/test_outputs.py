"""The request core (``Outputs``), sans-IO: upstream events in, commands out, in the style of mitmproxy's
layer tests. A fake guard stands in for the engine: it judges each fed token by its text (a trigger
word and every token after it Unsafe, as the test checkpoints and the real model do)."""

from __future__ import annotations

from typing import Any

from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.tokenizer import GuardTokenizer
from guardproxy.guard.verdict import HeadLabels, Verdict
from guardproxy.policy import Policy
from guardproxy.stream.guardview import CONTENT, REASONING, tool_field
from guardproxy.stream.outputs import (
    Abort,
    CloseUpstream,
    Command,
    CountFailure,
    Emit,
    Feed,
    Finish,
    Marker,
    Open,
    Outputs,
    Retract,
    Text,
    ToolArgs,
    ToolEnd,
)

LABELS = HeadLabels(risk=("Safe", "Unsafe", "Controversial"), category=("Violent",))
SAFE = Verdict((0.98, 0.01, 0.01), (1.0,), LABELS)
UNSAFE = Verdict((0.01, 0.98, 0.01), (1.0,), LABELS)


class Guard:
    """Carries out Feed/Retract as an engine would, one stream per output, and answers on demand."""

    def __init__(self, tok: GuardTokenizer) -> None:
        self.tok = tok
        self.queues: dict[int, list[list[int]]] = {}
        self.latched: dict[int, bool] = {}
        self.opened: list[int] = []

    def run(self, commands: list[Command]) -> list[Command]:
        """Apply what the guard must do; return the rest (for the I/O layer)."""
        rest = []
        for c in commands:
            if isinstance(c, Open):
                self.opened.append(c.output)
                self.queues[c.output] = []
            elif isinstance(c, Feed):
                if c.judged:
                    self.queues[c.output].append(list(c.ids))
            elif isinstance(c, Retract):
                left = c.n
                q = self.queues[c.output]
                while left and q:
                    k = min(left, len(q[-1]))
                    del q[-1][len(q[-1]) - k :]
                    left -= k
                    if not q[-1]:
                        q.pop()
            else:
                rest.append(c)
        return rest

    def answer(self, core: Outputs) -> None:
        for index, q in self.queues.items():
            while q:
                ids = q.pop(0)
                verdicts = []
                for i in ids:
                    if self.tok.decode([i]).strip() == "bomb":
                        self.latched[index] = True
                    verdicts.append(UNSAFE if self.latched.get(index) else SAFE)
                core.judged(index, verdicts)


def text_of(commands: list[Command], index: int) -> str:
    return "".join(
        c.out.text for c in commands if isinstance(c, Emit) and c.output == index and c.out.kind == "text"
    )


def drive(core: Outputs, guard: Guard, events: list[Any]) -> list[Command]:
    """Every event in, the guard answering after each: everything the I/O layer would have to do."""
    out: list[Command] = []
    for e in events:
        out += guard.run(core.event(e))
        guard.answer(core)
        out += guard.run(core.drain())
    out += guard.run(core.end())
    guard.answer(core)
    out += guard.run(core.drain())
    return out


def test_outputs_open_on_first_sight_and_release_in_order(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    core, guard = Outputs(template, Policy(), speculate=True, max_outputs=2), Guard(tokenizer)
    out = drive(
        core,
        guard,
        [
            Marker(0, {"role": "assistant"}),
            Text(0, CONTENT, "Hello"),
            Marker(1, {"role": "assistant"}),
            Text(1, CONTENT, "Hi"),
            Text(0, CONTENT, " there"),
            Finish(0, "stop"),
            Finish(1, "stop"),
        ],
    )
    assert guard.opened == [0, 1]
    assert text_of(out, 0) == "Hello there" and text_of(out, 1) == "Hi"
    kinds = [(c.output, c.out.kind) for c in out if isinstance(c, Emit)]
    assert kinds[0] == (0, "marker") and kinds.count((0, "finish")) == 1 and kinds.count((1, "finish")) == 1
    assert not any(isinstance(c, CloseUpstream) for c in out) and core.done


def test_one_cut_ends_every_output_and_closes_the_upstream_once(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    core, guard = Outputs(template, Policy(notice="[cut]"), speculate=False, max_outputs=2), Guard(tokenizer)
    out = drive(
        core,
        guard,
        [
            Text(0, CONTENT, "Fine words"),
            Text(1, CONTENT, "Take a bomb"),
            Text(1, CONTENT, " now"),
            Text(1, CONTENT, " and"),  # " now" is final: with " bomb" a pair, the cut
            Text(0, CONTENT, " more words"),  # after the cut: read by nobody
            Finish(0, "stop"),
        ],
    )
    assert sum(isinstance(c, CloseUpstream) for c in out) == 1
    ends = {c.output: c.out for c in out if isinstance(c, Emit) and c.out.kind in ("cut", "finish")}
    assert ends[1].kind == "cut" and ends[1].text == "[cut]"  # the cut output: its notice
    assert ends[0].kind == "cut" and ends[0].text == ""  # the other: ended where its text stopped
    assert text_of(out, 1) == "Take a" and "more" not in text_of(out, 0)
    assert core.cut and core.done
    assert core.details()["action"] == "cut" and core.details()["choices"]["1"]["action"] == "cut"


def test_a_guard_failure_follows_the_policy(tokenizer: GuardTokenizer, template: ChatTemplate) -> None:
    closed = Outputs(template, Policy(), speculate=False)
    Guard(tokenizer).run(closed.event(Text(0, CONTENT, "Hello")))
    assert closed.guard_failed(0, "out of memory") == [CountFailure("fail_closed"), Abort("out of memory")]
    # Fail open: counted once a request however many outputs fail; what follows is released unjudged.
    core, guard = (
        Outputs(template, Policy(on_guard_error="fail_open"), speculate=False, max_outputs=2),
        Guard(tokenizer),
    )
    guard.run(core.event(Text(0, CONTENT, "Hello")) + core.event(Text(1, CONTENT, "Hi")))
    assert core.guard_failed(0, "oom") == [CountFailure("fail_open")]
    assert core.guard_failed(1, "oom again") == []
    assert core.failure == "oom"
    out = guard.run(core.event(Text(0, CONTENT, " a bomb")))
    assert not any(isinstance(c, Feed) for c in out)  # nothing more is fed for an unjudged output
    released = guard.run(core.drain())
    assert text_of(released, 0) == "Hello a bomb" and text_of(released, 1) == "Hi"


def test_a_prompt_that_failed_open_leaves_every_output_unjudged(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    core, guard = Outputs(template, Policy(on_guard_error="fail_open"), speculate=False), Guard(tokenizer)
    assert core.guard_failed(None, "prompt failed") == [CountFailure("fail_open")]
    out = guard.run(core.event(Text(0, CONTENT, "a bomb")))
    assert guard.opened == [0] and not any(isinstance(c, Feed) for c in out)
    assert text_of(guard.run(core.drain()), 0) == "a bomb"


def test_whole_answers_release_as_one(tokenizer: GuardTokenizer, template: ChatTemplate) -> None:
    """Without speculation the held last word waits for the end; at the end, all of it goes."""
    core, guard = Outputs(template, Policy(), speculate=False), Guard(tokenizer)
    guard.run(core.event(Text(0, CONTENT, "One two")))
    guard.answer(core)
    assert text_of(guard.run(core.drain()), 0) == "One"
    guard.run(core.event(Finish(0, "stop", payload={"done": True})))
    guard.answer(core)
    out = guard.run(core.drain())
    assert text_of(out, 0) == " two" and core.moderators[0].shown(CONTENT, 0, 7) == "One two"
    finish = next(c.out for c in out if isinstance(c, Emit) and c.out.kind == "finish")
    assert finish.reason == "stop" and finish.payload == {"done": True}


# -- tool calls: held, then released whole ----------------------------------------------------------------

ADDED = {"type": "response.output_item.added", "item": {"id": "fc", "type": "function_call"}}
ARGS_DONE = {"type": "response.function_call_arguments.done", "item_id": "fc"}


def call_events(args: list[str]) -> list[Any]:
    """Text, then tool call 0 (its start marker, argument pieces), as a Responses wire reads them; the
    call's end (``ToolEnd`` and its done marker) is left to the test."""
    return [
        Marker(0, {"role": "assistant"}),
        Text(0, CONTENT, "Let me check the weather."),
        Marker(0, ADDED, call=0),
        *(ToolArgs(0, 0, "weather", a) for a in args),
    ]


def emitted(commands: list[Command]) -> list[Any]:
    return [c.out for c in commands if isinstance(c, Emit)]


def of_call(outs: list[Any]) -> list[Any]:
    return [
        o
        for o in outs
        if (o.kind == "marker" and o.payload in (ADDED, ARGS_DONE)) or o.field == tool_field(0)
    ]


def step(core: Outputs, guard: Guard, e: Any) -> list[Command]:
    out = guard.run(core.event(e))
    guard.answer(core)
    return out + guard.run(core.drain())


def test_a_tool_call_goes_out_whole_once_ended_and_judged(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    core, guard = Outputs(template, Policy(), speculate=True), Guard(tokenizer)
    out: list[Command] = []
    for e in call_events(['{"city": ', '"Paris"', "}"]):
        out += step(core, guard, e)
    assert text_of(out, 0) == "Let me check the weather."  # text before the call: released as usual
    assert of_call(emitted(out)) == []  # every argument token so far judged Safe: still held
    # The end: fed (the JSON's close), not yet judged: still nothing of the call.
    feeds = guard.run(core.event(ToolEnd(0, 0)))
    assert feeds == [] and any(guard.queues[0])
    assert of_call(emitted(guard.run(core.drain()))) == []
    guard.answer(core)
    released = emitted(guard.run(core.drain()))
    assert [o.kind for o in released] == ["marker", "text"] and released[0].payload == ADDED
    assert "".join(o.text for o in released if o.kind == "text") == '{"city": "Paris"}'
    # The call's done event is part of it: out at once, since the call is out.
    after = emitted(step(core, guard, Marker(0, ARGS_DONE, call=0)))
    assert [o.payload for o in after] == [ARGS_DONE]
    rest = emitted(step(core, guard, Finish(0, "stop")) + guard.run(core.end()))
    assert rest[-1].kind == "finish" and core.done


def test_a_cut_in_a_tool_calls_arguments_drops_the_whole_call(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    core, guard = Outputs(template, Policy(notice="[cut]"), speculate=True), Guard(tokenizer)
    out = drive(
        core,
        guard,
        [
            *call_events(['{"what": "fine', " words", " then", " a", " bomb", ' here"}']),
            ToolEnd(0, 0),
            Marker(0, ARGS_DONE, call=0),
            Finish(0, "stop"),
        ],
    )
    outs = emitted(out)
    assert of_call(outs) == [] and "bomb" not in str(outs)
    assert text_of(out, 0) == "Let me check the weather."
    assert outs[-1].kind == "cut" and outs[-1].text == "[cut]"
    assert sum(isinstance(c, CloseUpstream) for c in out) == 1 and core.cut


def test_a_failed_open_guard_still_releases_a_tool_call_only_when_it_ends(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    core, guard = Outputs(template, Policy(on_guard_error="fail_open"), speculate=True), Guard(tokenizer)
    events = call_events(['{"q": "a', " bomb", '"}'])
    out = step(core, guard, events[0]) + step(core, guard, events[1])
    assert core.guard_failed(0, "out of memory") == [CountFailure("fail_open")]
    for e in events[2:]:
        out += step(core, guard, e)
    assert text_of(out, 0) == "Let me check the weather."
    assert of_call(emitted(out)) == []  # unjudged from here on, but a call goes out whole or not at all
    ended = emitted(step(core, guard, ToolEnd(0, 0)))
    assert [o.kind for o in ended] == ["marker", "text"] and ended[0].payload == ADDED
    assert ended[1].text == '{"q": "a bomb"}'


def test_an_answer_is_read_as_sent_as_shown_and_as_cut(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    """What a wire reads of a whole answer (``Outputs.answer``): the text sent, what the client got of
    it, whether it went whole, whether it was cut; an output that never came reads empty."""

    def answer(text: str) -> Outputs:
        core = Outputs(template, Policy(), speculate=False)
        drive(core, Guard(tokenizer), [Text(0, CONTENT, text), Finish(0, "stop")])
        return core

    fine = answer("Fine words.").answer(0)
    assert fine.came and not fine.cut and fine.whole(CONTENT, 0, len("Fine words."))
    assert fine.sent(CONTENT) == fine.shown(CONTENT, 0, 99) == "Fine words." and fine.released_whole(CONTENT)
    sent = "Sure, take a bomb and go."
    core = answer(sent)
    cut = core.answer(0)
    assert cut.came and cut.cut and cut.sent(CONTENT) == sent
    shown = cut.shown(CONTENT, 0, len(sent))
    assert "bomb" not in shown and sent.startswith(shown) and not cut.whole(CONTENT, 0, len(sent))
    assert not cut.released_whole(CONTENT) and not cut.has(REASONING)
    never = core.answer(5)
    assert not never.came and not never.cut and never.sent(CONTENT) == never.shown(CONTENT, 0, 9) == ""
    assert never.released_whole(CONTENT) and not never.whole(CONTENT, 0, 0)
