"""A request's own decisions (``Session``), sans-IO: events in, commands out, no server and no engine."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.verdict import HeadLabels, Verdict
from guardproxy.policy import Action, Policy, TierRule
from guardproxy.stream.guardview import CONTENT
from guardproxy.stream.outputs import Abort, CountFailure, Outputs, Text
from guardproxy.stream.session import (
    BlockPrompt,
    CountPrompt,
    Request,
    Session,
    StartUpstream,
    verdict_details,
)

LABELS = HeadLabels(risk=("Safe", "Unsafe", "Controversial"), category=("Violent", "PII"))
SAFE = Verdict((0.98, 0.01, 0.01), (0.5, 0.5), LABELS)
UNSAFE = Verdict((0.01, 0.98, 0.01), (0.9, 0.1), LABELS)
CONTROVERSIAL = Verdict((0.01, 0.01, 0.98), (0.2, 0.8), LABELS)


def session(template: ChatTemplate, streaming: bool = True, **policy: Any) -> Session:
    p = Policy(**policy)
    outputs = Outputs(template, p, speculate=streaming)
    return Session(p, outputs, Request("/v1/chat/completions", "m", streaming))


@pytest.mark.parametrize("check", ["parallel", "before"])
def test_the_upstream_is_asked_once_at_the_start_or_after_a_verdict_that_allows_it(
    template: ChatTemplate, check: str
) -> None:
    s = session(template, prompt_check=check)
    started = s.start()
    judged = s.prompt_judged(SAFE)
    assert judged[0] == CountPrompt("Safe", "", Action.ALLOW)
    assert [*started, *judged].count(StartUpstream()) == 1
    assert (started == [StartUpstream()]) is (check == "parallel")
    assert s.outcome() == "allowed" and s.details()["prompt"]["risk"] == "Safe"


@pytest.mark.parametrize("blocked_prompt", ["error", "refusal"])
def test_a_prompt_whose_action_is_a_cut_is_blocked_by_policy(
    template: ChatTemplate, blocked_prompt: str
) -> None:
    s = session(template, prompt_check="before", blocked_prompt=blocked_prompt)
    assert s.start() == []
    out = s.prompt_judged(UNSAFE)
    assert out == [
        CountPrompt("Unsafe", "Violent", Action.CUT),
        BlockPrompt(
            "The prompt was blocked by the content policy (Unsafe: Violent).",
            as_error=blocked_prompt == "error",
        ),
    ]
    assert StartUpstream() not in out and s.outcome() == "blocked"


def test_a_prompt_the_policy_only_flags_goes_upstream_flagged(template: ChatTemplate) -> None:
    s = session(template, prompt_check="before", controversial=TierRule(Action.FLAG))
    out = s.prompt_judged(CONTROVERSIAL)
    assert out == [CountPrompt("Controversial", "PII", Action.FLAG), StartUpstream()]
    assert s.outcome() == "flagged"


def test_a_prompt_the_guard_could_not_judge_by_on_guard_error(template: ChatTemplate) -> None:
    s = session(template, prompt_check="before", on_guard_error="fail_open")
    assert s.prompt_failed("engine gone") == [CountFailure("fail_open"), StartUpstream()]
    assert s.details()["prompt"] == {"risk": "unjudged", "category": None, "action": "allow"}
    assert s.details()["guard_error"] == "engine gone"
    closed = session(template, prompt_check="parallel", on_guard_error="fail_closed")
    assert closed.start() == [StartUpstream()]
    out = closed.prompt_failed("engine gone")
    assert out == [CountFailure("fail_closed"), Abort("engine gone")]  # asked already: not twice


def test_headers_show_details_only_where_the_policy_does_and_the_answer_is_judged(
    template: ChatTemplate,
) -> None:
    upstream = {"x-ratelimit-remaining-requests": "9"}
    whole = session(template, streaming=False)
    whole.prompt_judged(SAFE)
    h = whole.headers(upstream)
    assert h["x-ratelimit-remaining-requests"] == "9" and h["x-guardproxy-prompt-risk"] == "Safe"
    assert h["x-guardproxy-policy"] == "default" and h["x-guardproxy-action"] == "allow"
    streamed = session(template)
    streamed.prompt_judged(SAFE)
    assert "x-guardproxy-action" not in streamed.headers(upstream)  # sent before the answer is judged
    assert session(template, details=False).headers(upstream) == upstream


def test_outcome_is_the_strongest_decision_and_error_only_where_none_was_made(template: ChatTemplate) -> None:
    s = session(template)
    s.prompt_judged(SAFE)
    s.status = 502
    assert s.outcome() == "error"
    s = session(template, controversial=TierRule(Action.FLAG))
    s.prompt_judged(CONTROVERSIAL)
    s.status = 502
    assert s.outcome() == "flagged"


def test_the_audit_record_has_the_decisions_and_text_only_when_asked(template: ChatTemplate) -> None:
    s = session(template)
    s.prompt_judged(SAFE)
    asked: list[str] = []

    def prompt_text() -> str:
        asked.append("prompt")
        return "hello " * 10

    record = s.audit_record("rid-1", 0.0123, prompt_text, text_chars=8)
    assert record["request_id"] == "rid-1" and record["route"] == "/v1/chat/completions"
    assert record["outcome"] == "allowed" and record["duration_ms"] == 12.3
    assert record["prompt"] == verdict_details(SAFE, Action.ALLOW) and "prompt_text" not in record
    assert asked == []
    s = replace_policy(s, audit_text=True)
    s.outputs.event(Text(0, CONTENT, "Hi there, how are you today?"))
    record = s.audit_record("rid-2", 0.0, prompt_text, text_chars=8)
    assert record["prompt_text"].startswith("hello he") and "more characters" in record["prompt_text"]
    assert set(record["response_text"]) == {"0"} and asked == ["prompt"]


def replace_policy(s: Session, **changes: Any) -> Session:
    policy = replace(s.policy, **changes)
    return Session(policy, Outputs(s.outputs.template, policy, speculate=False), s.request)
