"""The per-choice moderator, driven by hand: verdicts are made from each token's text (sans-IO).

The fake guard judges like the test checkpoints (and like the real model on unsafe text): once a trigger
token appears, the tokens after it keep its tier (``latch``), so a one-token trigger makes a pair for the
authors' debounce rule; ``latch=False`` flags isolated tokens only."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.tokenizer import GuardTokenizer
from guardproxy.guard.verdict import HeadLabels, Verdict
from guardproxy.policy import Action, Policy, TierRule
from guardproxy.stream.guardview import CONTENT, REASONING, GuardFeed, tool_field
from guardproxy.stream.moderator import ChoiceModerator, Out

CONTENT_FILTER = "content_filter"

LABELS = HeadLabels(risk=("Safe", "Unsafe", "Controversial"), category=("Violent", "PII"))
SAFE = Verdict((0.98, 0.01, 0.01), (0.5, 0.5), LABELS)
UNSAFE = Verdict((0.01, 0.98, 0.01), (0.9, 0.1), LABELS)
PII = Verdict((0.01, 0.98, 0.01), (0.1, 0.9), LABELS)
CONTRO = Verdict((0.01, 0.01, 0.98), (0.9, 0.1), LABELS)


class Harness:
    """Plays the proxy: feeds go to a fake guard that judges each token by its text (and, latched, by
    the triggers before it: the judged sequence so far, taken-back tokens excluded)."""

    def __init__(
        self,
        tok: GuardTokenizer,
        template: ChatTemplate,
        policy: Policy,
        speculate: bool = False,
        latch: bool = True,
    ) -> None:
        self.tok = tok
        self.latch = latch
        self.m = ChoiceModerator(template, policy, speculate=speculate)
        self.queue: list[list[int]] = []  # judged feeds not yet answered
        self.judged: list[Verdict] = []  # verdicts given, in feed order (for the latch)
        self.retracted = 0
        self.out: list[Out] = []
        self._names: dict[int, str | None] = {}
        self._submit(self.m.start())

    def own(self, token_id: int) -> Verdict:
        text = self.tok.decode([token_id]).strip().lower()
        if text == "gun":
            return CONTRO
        return UNSAFE if text in ("bomb", "bombs") else PII if text == "passport" else SAFE

    def verdict(self, token_id: int) -> Verdict:
        v = self.own(token_id)
        if self.latch and v is SAFE:
            v = next((w for w in reversed(self.judged) if w is not SAFE), SAFE)
        self.judged.append(v)
        return v

    def _submit(self, feeds: list[GuardFeed]) -> None:
        for f in feeds:
            # As the engine retracts: the newest tokens go; those not yet judged never get a verdict.
            left = f.retract
            self.retracted += left
            unanswered = sum(len(q) for q in self.queue)
            if left > unanswered:  # taken back after their verdicts: the latch forgets them
                del self.judged[len(self.judged) - (left - unanswered) :]
            while left and self.queue:
                last = self.queue[-1]
                k = min(left, len(last))
                del last[len(last) - k :]
                left -= k
                if not last:
                    self.queue.pop()
            if f.spans is not None:
                self.queue.append(list(f.ids))

    def delta(self, d: dict[str, Any]) -> None:
        """A chat-shaped delta, as the chat wire format splits it for the moderator."""
        if d.get("role"):
            self.m.marker({"role": d["role"]})
        if d.get("reasoning_content"):
            self._submit(self.m.text(REASONING, d["reasoning_content"]))
        if d.get("content"):
            self._submit(self.m.text(CONTENT, d["content"]))
        for call in d.get("tool_calls") or []:
            k, fn = call["index"], call.get("function") or {}
            if "name" in fn:
                self._names[k] = fn["name"]
                self.m.marker(
                    {"tool_calls": [{"index": k, "id": call.get("id"), "function": {"name": fn["name"]}}]},
                    call=k,  # as the chat wire marks it: held with its call
                )
            self._submit(self.m.tool_call(k, self._names.get(k), fn.get("arguments") or ""))

    def end_call(self, call: int) -> None:
        """The upstream ended tool call ``call`` (Responses' arguments ``done``, Messages' block stop)."""
        self._submit(self.m.end_call(call))

    def finish(self, reason: str | None = "stop") -> None:
        self._submit(self.m.finish(reason))

    def answer(self, n: int = 1) -> None:
        for _ in range(min(n, len(self.queue))):
            self.m.judged([self.verdict(i) for i in self.queue.pop(0)])
        self.out += self.m.drain()

    def answer_all(self) -> None:
        self.answer(len(self.queue))

    def field(self, name: str) -> str:
        return "".join(o.text for o in self.out if o.kind == "text" and o.field == name)

    def content(self) -> str:
        """The answer's text as the client sees it, the cut's notice included."""
        return "".join(
            o.text for o in self.out if (o.kind == "text" and o.field == CONTENT) or o.kind == "cut"
        )

    @property
    def ending(self) -> str | None:
        """How the answer ended: the upstream's finish reason, or content_filter for a cut."""
        last = self.out[-1] if self.out else None
        if last is None or last.kind not in ("finish", "cut"):
            return None
        return last.reason if last.kind == "finish" else CONTENT_FILTER


def stream(h: Harness, pieces: list[str], answer_every: int = 1) -> None:
    h.delta({"role": "assistant", "content": None})
    for i, p in enumerate(pieces):
        h.delta({"content": p})
        if i % answer_every == 0:
            h.answer()
    h.finish("stop")
    h.answer_all()


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


texts = st.lists(
    st.sampled_from(["The", " cake", " is", " a", " lie", ".", "\n", " 日本", " bomb", "s", " ok"]),
    min_size=1,
    max_size=20,
).map("".join)


@settings(max_examples=80, deadline=None)
@given(
    text=texts.filter(lambda t: "bomb" not in t),
    cuts=st.lists(st.integers(0, 200), max_size=10),
    holdback=st.integers(0, 3),
    every=st.integers(1, 3),
    speculate=st.booleans(),
)
def test_benign_text_passes_unchanged(
    tokenizer: GuardTokenizer,
    template: ChatTemplate,
    text: str,
    cuts: list[int],
    holdback: int,
    every: int,
    speculate: bool,
) -> None:
    h = Harness(tokenizer, template, Policy(holdback_tokens=holdback), speculate)
    stream(h, split(text, cuts), every)
    assert h.content() == text
    assert h.out[0] == Out("marker", payload={"role": "assistant"}) and h.ending == "stop"
    assert all(o.kind in ("text", "marker") for o in h.out[:-1])


@settings(max_examples=80, deadline=None)
@given(
    text=texts,
    cuts=st.lists(st.integers(0, 200), max_size=10),
    holdback=st.integers(0, 3),
    speculate=st.booleans(),
    debounce=st.booleans(),
)
def test_cut_releases_nothing_of_the_cut_token_or_after(
    tokenizer: GuardTokenizer,
    template: ChatTemplate,
    text: str,
    cuts: list[int],
    holdback: int,
    speculate: bool,
    debounce: bool,
) -> None:
    policy = Policy(holdback_tokens=holdback, notice="[cut]", debounce=debounce)
    h = Harness(tokenizer, template, policy, speculate)
    stream(h, split(text, cuts))
    if "bomb" not in text:
        assert h.content() == text
        return
    released = h.content()
    assert released.endswith("[cut]") and h.ending == CONTENT_FILTER
    before = text[: text.index(" bomb")]
    # Newlines opening the answer are not read (the template strips them): they go out with the first
    # judged text after them, so when that is the trigger they never go at all.
    shown = before if before.lstrip("\n") else ""
    if speculate and holdback == 0:
        # A chunk boundary inside " bomb" lets its head (" bo", judged Safe as it stood) out first.
        heads = {shown} | {before + " bomb"[:k] for k in range(1, len(" bomb"))}
        assert released[: -len("[cut]")] in heads
    else:
        assert released[: -len("[cut]")] == shown
    assert sum(o.kind in ("finish", "cut") for o in h.out) == 1
    # Under debounce the cut covers the pair: the trigger and the token after it (latched).
    cut = h.m.cut_at
    assert cut is not None and cut.tier == "Unsafe" and h.m.tokens[cut.index][1] == cut
    if debounce:
        assert h.m.tokens[cut.index + 1][1] is not None and h.m.tokens[cut.index + 1][1].action == Action.CUT


@settings(max_examples=60, deadline=None)
@given(
    text=texts.filter(lambda t: "bomb" not in t),
    cuts=st.lists(st.integers(0, 200), max_size=10),
    holdback=st.integers(0, 2),
    speculate=st.booleans(),
)
def test_debounce_adds_no_latency_for_safe_text(
    tokenizer: GuardTokenizer,
    template: ChatTemplate,
    text: str,
    cuts: list[int],
    holdback: int,
    speculate: bool,
) -> None:
    """Safe text goes out at exactly the same moments with and without debounce."""
    runs = []
    for debounce in (True, False):
        h = Harness(tokenizer, template, Policy(holdback_tokens=holdback, debounce=debounce), speculate)
        seen = []
        for piece in split(text, cuts):
            h.delta({"content": piece})
            h.answer()
            seen.append(h.content())
        h.finish()
        h.answer_all()
        runs.append((seen, h.content()))
    assert runs[0] == runs[1]


def test_a_lone_unsafe_token_does_not_fire_under_debounce_and_waits_one_verdict(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    text = "A bomb is a word."
    for debounce in (True, False):
        h = Harness(tokenizer, template, Policy(notice="", debounce=debounce), latch=False)
        h.delta({"content": "A bomb"})
        h.delta({"content": " is"})
        h.answer_all()  # "A", " bomb" judged (" is" held by the re-tokenizer)
        if debounce:
            assert h.content() == "A"  # " bomb" is Unsafe alone so far: it waits for the next verdict
            h.delta({"content": " a word."})
            h.answer_all()  # " is" is Safe: no pair, " bomb" goes
            assert h.content().startswith("A bomb is") and h.m.cut_at is None
        else:
            assert h.m.cut_at is not None and h.content() == "A"
        h.finish()
        h.answer_all()
        assert h.content() == (text if debounce else "A")


def test_a_token_whose_pair_can_only_flag_is_not_held(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    """Under debounce a non-Safe token waits for the next verdict only where its pair may withhold
    text: " gun" is Controversial, and the default policy only flags that tier, so its text goes at its
    own verdict; the flag, decided one token later, is still recorded. Where Controversial may be
    redacted, the same token waits."""
    flag_only = Policy(notice="")
    redacting = Policy(notice="", controversial=TierRule(Action.REDACT))
    for policy, held in ((flag_only, False), (redacting, True)):
        h = Harness(tokenizer, template, policy)
        h.delta({"content": "A gun"})
        h.delta({"content": " rack"})
        h.answer_all()  # "A", " gun" judged (" rack" held by the re-tokenizer)
        assert h.content() == ("A" if held else "A gun")
        h.delta({"content": " here."})
        h.answer_all()  # " rack" is Controversial too (the latch): the pair is decided
        h.finish()
        h.answer_all()
        decided = h.m.decided
        assert decided is not None and decided.tier == "Controversial"
        assert decided.action == (Action.REDACT if held else Action.FLAG)


def test_speculation_holds_an_unsafe_looking_word_and_decides_on_the_final_one(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    h = Harness(tokenizer, template, Policy(notice=""), speculate=True)
    h.delta({"content": "A bo"})
    h.answer_all()
    assert h.content() == "A bo"  # " bo" judged Safe as it stands
    h.delta({"content": "mb"})  # " bo" grows into " bomb": taken back, judged again
    assert h.retracted == 1
    h.answer_all()
    assert h.content() == "A bo"  # the tentative " bomb" is Unsafe: held, not yet a decision
    assert h.m.cut_at is None
    h.delta({"content": " here"})  # " bomb" is final now, " here" tentative: no pair of final tokens yet
    h.answer_all()
    assert h.m.cut_at is None and h.content() == "A bo"
    h.delta({"content": " now"})  # " here" is final and Unsafe (latched): the pair cuts from " bomb"
    h.answer_all()
    assert h.m.cut_at is not None and h.ending == CONTENT_FILTER
    assert h.content() == "A bo"


def test_a_trigger_as_the_last_word_pairs_with_the_closing_token(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    h = Harness(tokenizer, template, Policy(notice=""))
    stream(h, ["Here is a", " bomb"])
    assert h.content() == "Here is a" and h.ending == CONTENT_FILTER
    # The pair is " bomb" and the answer's closing <|im_end|> (judged, latched Unsafe).
    assert h.m.cut_at is not None and h.m.tokens[-1][0] is None and h.m.cut_at.index == len(h.m.tokens) - 2


def test_newlines_the_guard_does_not_read_go_out_with_the_text_after_them(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    h = Harness(tokenizer, template, Policy())
    h.delta({"content": "\n\n"})
    h.answer_all()
    assert h.content() == ""  # not read by the guard: waits for the next judged token
    h.delta({"content": "Hello"})
    h.answer_all()
    h.delta({"content": " there"})
    h.answer_all()
    assert h.content() == "\n\nHello"
    h.finish()
    h.answer_all()
    assert h.content() == "\n\nHello there"
    # Only newlines: they go out with the closing token, at the end.
    only = Harness(tokenizer, template, Policy())
    only.delta({"content": "\n"})
    only.answer_all()
    assert only.content() == ""
    only.finish()
    only.answer_all()
    assert only.content() == "\n" and only.ending == "stop"
    # A cut withholds unread text that waited for the cut token too.
    cut = Harness(tokenizer, template, Policy(notice=""))
    stream(cut, ["\n\n", "\n", " bomb", " now"])
    assert cut.content() == "" and cut.ending == CONTENT_FILTER


def test_speculation_releases_each_word_before_the_next_arrives(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    exact = Harness(tokenizer, template, Policy())
    early = Harness(tokenizer, template, Policy(), speculate=True)
    sent = ""
    for word in ["One", " two", " three", " four"]:
        sent += word
        for h in (exact, early):
            h.delta({"content": word})
            h.answer_all()
        assert early.content() == sent  # judged as it stands: out at once
        # exact: the last word waits for the next text to show it is complete
        assert exact.content() == (sent.rsplit(" ", 1)[0] if " " in sent else "")
    for h in (exact, early):
        h.finish()
        h.answer_all()
        assert h.content() == sent and h.ending == "stop"
    assert early.retracted == 0  # whole words: every tentative token was confirmed, none re-run


def test_speculation_is_off_with_a_holdback_or_early_release_off(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    for policy in (Policy(holdback_tokens=1), Policy(early_release=False)):
        h = Harness(tokenizer, template, policy, speculate=True)
        h.delta({"content": "One two"})
        h.answer_all()
        assert not h.m.speculate and h.content() == ("One" if policy.holdback_tokens == 0 else "")


def test_nothing_is_released_before_it_is_judged_and_held_back(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    h = Harness(tokenizer, template, Policy(holdback_tokens=2))
    h.delta({"role": "assistant"})
    for word in ["One", " two", " three", " four", " five"]:
        h.delta({"content": word})
    assert h.content() == ""  # nothing judged yet
    h.answer(1)
    assert h.content() == ""
    h.answer_all()  # "One two three four" judged ("five" is held by the re-tokenizer): 2 held back
    assert h.content() == "One two"
    h.finish()
    h.answer_all()
    assert h.content() == "One two three four five"


def test_redact_masks_exactly_the_flagged_span(tokenizer: GuardTokenizer, template: ChatTemplate) -> None:
    # Isolated flags, decided token by token: each "passport" alone is masked.
    policy = Policy(unsafe=TierRule(Action.CUT, {"PII": Action.REDACT}), mask="***", debounce=False)  # type: ignore[arg-type]
    h = Harness(tokenizer, template, policy, latch=False)
    stream(h, split("My passport number is on my passport, ok.", [3, 9, 20, 33]))
    assert h.content() == "My*** number is on my***, ok."
    assert h.ending == "stop"


def test_redact_under_debounce_masks_the_pair_and_all_it_latches(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    # Latched (as the real model marks what follows unsafe text): the pair starting at " passport"
    # is redacted, and so is every token after it that keeps the tier; one mask for the run.
    policy = Policy(unsafe=TierRule(Action.CUT, {"PII": Action.REDACT}), mask="***")  # type: ignore[arg-type]
    h = Harness(tokenizer, template, policy)
    stream(h, split("My passport number is 12.", [3, 9, 20]))
    assert h.content() == "My***" and h.ending == "stop"
    d = h.m.judge.details()
    assert d["action"] == "redact" and d["first_redaction"]["token_index"] == 1
    assert d["redacted_tokens"] == len(h.m.tokens) - 1  # every token from " passport" to <|im_end|>
    # A lone PII token does not fire under debounce.
    lone = Harness(tokenizer, template, policy, latch=False)
    stream(lone, ["My passport is here."])
    assert lone.content() == "My passport is here." and lone.m.decided is None


def test_reasoning_and_tool_calls_are_moderated_and_kept_in_order(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    h = Harness(tokenizer, template, Policy())
    h.delta({"role": "assistant", "content": ""})
    h.delta({"reasoning_content": "Think about"})
    h.delta({"reasoning_content": " it."})
    h.delta({"content": "Calling."})
    h.delta(
        {
            "tool_calls": [
                {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
            ]
        }
    )
    h.delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]})
    h.delta({"tool_calls": [{"index": 0, "function": {"arguments": '"cake"}'}}]})
    h.finish("tool_calls")
    h.answer_all()
    kinds = [o.field or o.kind for o in h.out]
    assert kinds[0] == "marker" and kinds[-1] == "finish" and h.ending == "tool_calls"
    assert h.field(REASONING) == "Think about it."
    assert h.field(tool_field(0)) == '{"q": "cake"}'
    header = next(o.payload for o in h.out if o.kind == "marker" and "tool_calls" in o.payload)
    assert header == {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f"}}]}
    assert kinds.index(REASONING) < kinds.index(CONTENT) < kinds.index(tool_field(0))
    assert kinds.index(CONTENT) < kinds.index("marker", 1) < kinds.index(tool_field(0))  # the header in order


@pytest.mark.parametrize("field", ["reasoning_content", "tool_calls"])
def test_unsafe_text_outside_content_is_cut_too(
    tokenizer: GuardTokenizer, template: ChatTemplate, field: str
) -> None:
    h = Harness(tokenizer, template, Policy(notice=""))
    h.delta({"role": "assistant"})
    if field == "reasoning_content":
        h.delta({"reasoning_content": "plan: a bomb then"})
    else:
        h.delta(
            {"tool_calls": [{"index": 0, "id": "x", "function": {"name": "f", "arguments": '{"a": "bomb"}'}}]}
        )
    h.delta({"content": "fine"})
    h.finish()
    h.answer_all()
    assert h.ending == CONTENT_FILTER
    assert "bomb" not in str(h.out) and "fine" not in str(h.out)


# -- tool calls go out whole ------------------------------------------------------------------------------


def _header(k: int, name: str = "f") -> dict[str, Any]:
    return {"tool_calls": [{"index": k, "id": f"c{k}", "function": {"name": name}}]}


def _args(k: int, text: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": k, "function": {"arguments": text}}]}


def _call_items(h: Harness, k: int) -> list[Out]:
    """What the client got of tool call ``k``: its header marker and its argument text."""
    return [
        o
        for o in h.out
        if (o.kind == "marker" and "tool_calls" in o.payload and o.payload["tool_calls"][0]["index"] == k)
        or (o.kind == "text" and o.field == tool_field(k))
    ]


@pytest.mark.parametrize("speculate", [False, True])
def test_a_tool_call_is_held_until_it_ends_and_every_argument_token_is_judged(
    tokenizer: GuardTokenizer, template: ChatTemplate, speculate: bool
) -> None:
    h = Harness(tokenizer, template, Policy(), speculate=speculate)
    h.delta({"role": "assistant"})
    h.delta({"content": "Checking the weather now."})
    h.answer_all()
    h.delta(_header(0))
    h.delta(_args(0, '{"city": '))
    h.answer_all()
    # The content before the call is released as usual (the call closed its run: all of it is final).
    assert h.content() == "Checking the weather now."
    assert _call_items(h, 0) == []
    h.delta(_args(0, '"Paris", "days": 3'))
    h.delta(_args(0, "}"))
    h.answer_all()
    assert _call_items(h, 0) == []  # every token so far judged Safe, but the call has not ended
    h.end_call(0)
    # Ended: the JSON is closed, its last tokens fed ("}}" covering the last "}", "</tool_call>").
    assert _call_items(h, 0) == [] and [len(q) for q in h.queue] == [2]
    h.out += h.m.drain()
    assert h.m.fields[tool_field(0)].released == 0 and _call_items(h, 0) == []
    # The token covering the last "}" judged: every argument token is, and the whole call goes.
    first, rest = h.queue[0][:1], h.queue[0][1:]
    h.m.judged([h.verdict(i) for i in first])
    h.queue[0] = rest
    h.out += h.m.drain()
    got = _call_items(h, 0)
    assert got[0] == Out("marker", payload=_header(0))  # the header first, then the arguments
    assert h.field(tool_field(0)) == '{"city": "Paris", "days": 3}'
    assert all(o.kind == "text" for o in got[1:])
    # In upstream order: content, header, arguments; then the finish.
    h.finish("tool_calls")
    h.answer_all()
    kinds = [o.field or o.kind for o in h.out]
    assert kinds.index(CONTENT) < h.out.index(got[0]) < kinds.index(tool_field(0))
    assert h.ending == "tool_calls"


def test_a_tool_call_closed_by_the_next_call_or_the_finish_goes_out_whole(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    """Chat has no end event for a call: the next call (or the finish) completes it."""
    h = Harness(tokenizer, template, Policy())
    h.delta({"role": "assistant"})
    h.delta(_header(0))
    h.delta(_args(0, '{"a": 1}'))
    h.answer_all()
    assert _call_items(h, 0) == []
    h.delta(_header(1, "g"))
    h.delta(_args(1, '{"b": 2}'))
    h.answer_all()
    assert h.field(tool_field(0)) == '{"a": 1}' and _call_items(h, 1) == []
    h.finish("tool_calls")
    h.answer_all()
    assert h.field(tool_field(1)) == '{"b": 2}' and h.ending == "tool_calls"
    order = [
        o.payload["tool_calls"][0]["index"] if o.kind == "marker" else o.field for o in _call_items(h, 0)
    ]
    order += [
        o.payload["tool_calls"][0]["index"] if o.kind == "marker" else o.field for o in _call_items(h, 1)
    ]
    assert order == [0, tool_field(0), 1, tool_field(1)]


@pytest.mark.parametrize("debounce", [True, False])
@pytest.mark.parametrize("ended", [True, False])
def test_a_cut_inside_a_tool_call_releases_neither_its_header_nor_any_argument(
    tokenizer: GuardTokenizer, template: ChatTemplate, debounce: bool, ended: bool
) -> None:
    h = Harness(tokenizer, template, Policy(notice="[cut]", debounce=debounce))
    h.delta({"role": "assistant"})
    h.delta({"content": "Calling."})
    h.delta(_header(0))
    # The trigger late in the arguments: the tokens before it are Safe and could have gone.
    for piece in ['{"what": "a', " long", " list", " with", " a", " bomb", ' in it"}']:
        h.delta(_args(0, piece))
        h.answer_all()
    if ended:
        h.end_call(0)
    h.delta({"content": " More text."})
    h.finish("tool_calls")
    h.answer_all()
    assert h.ending == CONTENT_FILTER and h.out[-1] == Out("cut", text="[cut]")
    assert _call_items(h, 0) == []  # no header, not one character of the arguments
    assert h.content() == "Calling.[cut]"
    assert sum(o.kind in ("finish", "cut") for o in h.out) == 1
    assert h.m.cut_at is not None and h.m.cut_at.index < len(h.m.tokens)


def test_a_cut_after_a_tool_call_still_releases_the_whole_call(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    h = Harness(tokenizer, template, Policy(notice="[cut]"))
    h.delta({"role": "assistant"})
    h.delta(_header(0))
    h.delta(_args(0, '{"city": "Paris"}'))
    h.end_call(0)
    h.answer_all()
    assert h.field(tool_field(0)) == '{"city": "Paris"}'  # complete and judged: out before what follows
    # Later content (an aside after the call) with the trigger: the cut ends the answer there.
    h.delta({"content": "Now take a bomb"})
    h.delta({"content": " and go."})
    h.finish()
    h.answer_all()
    assert h.ending == CONTENT_FILTER
    got = _call_items(h, 0)
    assert got[0] == Out("marker", payload=_header(0)) and h.field(tool_field(0)) == '{"city": "Paris"}'
    assert "bomb" not in h.content() and h.content().endswith("[cut]")
    # The same when the call is complete but its last verdicts come in with the cut's.
    late = Harness(tokenizer, template, Policy(notice="[cut]"))
    late.delta(_header(0))
    late.delta(_args(0, '{"city": "Paris"}'))
    late.end_call(0)
    late.delta({"content": "Now take a bomb"})
    late.delta({"content": " and go."})
    late.finish()
    late.answer_all()
    assert late.ending == CONTENT_FILTER and late.field(tool_field(0)) == '{"city": "Paris"}'
    assert _call_items(late, 0)[0] == Out("marker", payload=_header(0))


def test_a_second_call_cut_leaves_the_first_whole_and_the_second_unseen(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    h = Harness(tokenizer, template, Policy(notice=""))
    h.delta(_header(0))
    h.delta(_args(0, '{"a": "fine"}'))
    h.end_call(0)
    h.delta(_header(1, "g"))
    h.delta(_args(1, '{"b": "a bomb"}'))
    h.end_call(1)
    h.finish("tool_calls")
    h.answer_all()
    assert h.ending == CONTENT_FILTER
    assert h.field(tool_field(0)) == '{"a": "fine"}' and _call_items(h, 1) == []


def test_an_unguarded_answer_still_holds_a_tool_call_until_it_ends(
    tokenizer: GuardTokenizer, template: ChatTemplate
) -> None:
    """fail_open: what arrives goes out unjudged, but a call still goes out whole, once ended."""
    h = Harness(tokenizer, template, Policy(on_guard_error="fail_open"))
    h.delta({"role": "assistant"})
    h.delta({"content": "Calling"})
    h.m.unguard()
    h.delta(_header(0))
    h.delta(_args(0, '{"q": "a bo'))
    h.out += h.m.drain()
    assert h.content() == "Calling" and _call_items(h, 0) == []
    h.delta(_args(0, 'mb"}'))
    h.out += h.m.drain()
    assert _call_items(h, 0) == []
    h.end_call(0)
    h.out += h.m.drain()
    assert _call_items(h, 0)[0] == Out("marker", payload=_header(0))
    assert h.field(tool_field(0)) == '{"q": "a bomb"}'  # unjudged, as the policy says, and whole
    h.finish("tool_calls")
    h.out += h.m.drain()
    assert h.ending == "tool_calls"
