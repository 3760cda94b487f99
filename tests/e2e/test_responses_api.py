"""The OpenAI Responses API end to end: the real openai client (sync, async, the stream helper) ->
guardproxy (trigger guard: "bomb"/"grenade" Unsafe, "gun" Controversial) -> a fake upstream replaying
the Responses API's event sequence in random network splits."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from types import MappingProxyType
from typing import Any

import openai
import pytest

from guardproxy.policy import Action, TierRule

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, start_proxy

BENIGN = ["The", " weather", " in", " Paris", " is", " mild", ";", " 日本語", " too", ".", "\n", "Bye", "!"]
TRIGGER = ["Sure", ",", " take", " a", " bomb", " and", " go", "."]
CUT = "Sure, take a [cut]"  # the proxy's notice is " [cut]" (tests/e2e/conftest.py)


def client(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy, api_key="k", max_retries=0, timeout=60)


def stream(proxy: str, **kw: Any) -> list[Any]:
    kw.setdefault("input", "Tell me about the weather.")
    with client(proxy) as c:
        return list(c.responses.create(model="m", stream=True, **kw))


def deltas(events: list[Any], kind: str = "response.output_text.delta") -> str:
    return "".join(e.delta for e in events if e.type == kind)


def raw_events(proxy: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    req = urllib.request.Request(
        proxy + "/responses",
        data=json.dumps({"model": "m", "stream": True, **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_benign_text_passes_unchanged(proxy: str, fake: FakeUpstream, seed: int | None) -> None:
    fake.script = Script(
        pieces=[BENIGN], reasoning=["Think", " first."], tool_args=['{"city": ', '"Paris"}'], split_seed=seed
    )
    events = stream(proxy)
    assert deltas(events) == "".join(BENIGN)
    assert deltas(events, "response.reasoning_summary_text.delta") == "Think first."
    assert deltas(events, "response.function_call_arguments.delta") == '{"city": "Paris"}'
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == "".join(BENIGN)
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers))  # strictly increasing
    assert final.response.model_extra["guardproxy"]["response"]["action"] == "allow"


def test_the_stream_helper_and_the_async_client(proxy: str, fake: FakeUpstream) -> None:
    fake.script = Script(pieces=[BENIGN])
    with client(proxy) as c, c.responses.stream(model="m", input="hi") as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert text == final.output_text == "".join(BENIGN)

    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=proxy, api_key="k", max_retries=0) as ac:
            events = [e async for e in await ac.responses.create(model="m", input="hi", stream=True)]
            whole = await ac.responses.create(model="m", input="hi")
            return deltas(events), whole.output_text

    fake.script = Script(pieces=[BENIGN])
    assert asyncio.run(run()) == ("".join(BENIGN), "".join(BENIGN))


def test_not_streamed(proxy: str, fake: FakeUpstream) -> None:
    fake.script = Script(pieces=[BENIGN], tool_args=['{"city": ', '"Paris"}'])
    with client(proxy) as c:
        r = c.responses.create(model="m", input="hi")
        assert r.status == "completed" and r.output_text == "".join(BENIGN)
        assert r.output[-1].type == "function_call" and r.output[-1].arguments == '{"city": "Paris"}'
        fake.script = Script(pieces=[TRIGGER])
        cut = c.responses.create(model="m", input="hi")
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "content_filter" and cut.output_text == CUT


@pytest.mark.parametrize("seed", [None, 4])
def test_a_trigger_in_the_answer_is_cut_with_nothing_of_it_released(
    proxy: str, fake: FakeUpstream, seed: int | None
) -> None:
    fake.script = Script(pieces=[TRIGGER], split_seed=seed)
    events = stream(proxy)
    assert deltas(events) == CUT
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.status == "incomplete"
    assert final.response.incomplete_details.reason == "content_filter"
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == CUT and final.response.output_text == CUT
    item = next(e for e in events if e.type == "response.output_item.done")
    assert item.item.status == "incomplete"
    assert "bomb" not in json.dumps([e.model_dump() for e in events])
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers))


def test_the_stream_helper_parses_a_cut(proxy: str, fake: FakeUpstream) -> None:
    # The helper reads every event of a cut stream as typed events, ending with response.incomplete.
    # (openai-python 3.57's get_final_response() raises for any stream ending with response.incomplete,
    # OpenAI's own max_output_tokens endings included: openai/openai-python#3538, open.)
    fake.script = Script(pieces=[TRIGGER])
    with client(proxy) as c, c.responses.stream(model="m", input="hi") as s:
        events = list(s)
    assert [e.type for e in events][-1] == "response.incomplete"
    assert deltas(events) == CUT


@pytest.mark.parametrize(
    ("where", "script", "kind"),
    [
        (
            "tool call",
            Script(pieces=[["Calling."]], tool_args=['{"what": "a', " bomb", ' now"}']),
            "response.function_call_arguments.delta",
        ),
        (
            "reasoning",
            Script(pieces=[["Fine."]], reasoning=["Plan: a", " bomb", " here"]),
            "response.reasoning_summary_text.delta",
        ),
    ],
)
def test_a_trigger_outside_the_text_is_cut_too(
    proxy: str, fake: FakeUpstream, where: str, script: Script, kind: str
) -> None:
    fake.script = script
    events = stream(proxy)
    assert events[-1].type == "response.incomplete"
    assert "bomb" not in json.dumps([e.model_dump() for e in events]), where
    assert "bomb" not in deltas(events, kind)


@pytest.mark.parametrize(
    "request_body",
    [
        {"instructions": "Explain any bomb you are asked about.", "input": "Go on."},
        {
            "input": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "About the grenade..."},
                {"role": "user", "content": "more"},
            ]
        },
        {
            "input": [
                {"role": "user", "content": "Look it up."},
                {"type": "function_call", "call_id": "c1", "name": "search", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "grenade specs"},
            ]
        },
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "build a bomb"}]}]},
        {
            "input": "What can you do?",
            "tools": [{"type": "function", "name": "arsenal", "description": "Makes a bomb."}],
        },
    ],
    ids=["instructions", "earlier-turn", "tool-result", "input-text-part", "tools"],
)
def test_prompt_triggers_anywhere_are_blocked(
    proxy: str, fake: FakeUpstream, request_body: dict[str, Any]
) -> None:
    fake.script = Script(pieces=[BENIGN])
    with client(proxy) as c, pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="m", **request_body)
    assert err.value.code == "content_filter" and err.value.status_code == 400
    assert err.value.param == "input"


def test_previous_response_id_chains_are_judged_whole(proxy: str, fake: FakeUpstream) -> None:
    with client(proxy) as c:
        # The first answer ends in a trigger: cut for the client, but the upstream holds all of it.
        fake.script = Script(pieces=[["Fine", " words", " then", " a", " grenade"]])
        first = c.responses.create(model="m", input="Say something.")
        assert first.status == "incomplete"
        fake.script = Script(pieces=[BENIGN])
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model="m", input="And now?", previous_response_id=first.id)
        assert err.value.code == "content_filter"  # the guard read the earlier turn the upstream keeps
        benign = c.responses.create(model="m", input="Hello.")
        second = c.responses.create(model="m", input="And now?", previous_response_id=benign.id)
        assert second.output_text == "".join(BENIGN)
        # A longer chain: the trigger sits two turns back, in an answer the client never saw whole.
        fake.script = Script(pieces=[["More", " words", " and", " a", " grenade"]])
        third = c.responses.create(model="m", input="Go on.", previous_response_id=second.id)
        assert third.status == "incomplete"
        fake.script = Script(pieces=[BENIGN])
        fourth = c.responses.create(model="m", input="Fine.", previous_response_id=second.id)
        assert fourth.output_text == "".join(BENIGN)  # a branch from before the trigger is clean
        with pytest.raises(openai.BadRequestError):
            c.responses.create(model="m", input="Last one.", previous_response_id=third.id)
        # An id guardproxy never saw: the visible turns are judged; the upstream answers for the id.
        with pytest.raises(openai.BadRequestError) as unknown:
            c.responses.create(model="m", input="Hi", previous_response_id="resp_unknown")
        assert "not found" in unknown.value.message


def test_an_unknown_previous_response_can_be_refused(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    fake, url = upstream
    proxy = start_proxy(loopback, proxy_settings(url, trigger_checkpoint, unknown_previous_response="refuse"))
    before = len(fake.seen)
    with client(proxy) as c, pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="m", input="Hi", previous_response_id="resp_elsewhere")
    assert err.value.code == "previous_response_not_found" and err.value.param == "previous_response_id"
    assert fake.seen[before:] == []


def test_background_responses_are_refused(proxy: str, fake: FakeUpstream) -> None:
    before = len(fake.seen)
    with client(proxy) as c, pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="m", input="Hi", background=True)
    assert err.value.param == "background" and fake.seen[before:] == []


def test_redaction_rewrites_deltas_and_done_events(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], isolated_checkpoint: Path
) -> None:
    fake, url = upstream
    rules = TierRule(Action.CUT, MappingProxyType({"Violent": Action.REDACT}))
    proxy = start_proxy(
        loopback, proxy_settings(url, isolated_checkpoint, unsafe=rules, mask="***", debounce=False)
    )
    fake.script = Script(pieces=[["A", " bomb", " and", " a", " grenade", " walk", " in"]], split_seed=2)
    events = raw_events(proxy, {"input": "hi"})
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "A*** and a*** walk in"
    assert next(e for e in events if e["type"] == "response.output_text.done")["text"] == text
    part = next(e for e in events if e["type"] == "response.content_part.done")["part"]
    assert part["text"] == text
    item = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert item["content"][0]["text"] == text
    final = events[-1]
    assert (
        final["type"] == "response.completed" and final["response"]["output"][0]["content"][0]["text"] == text
    )
    assert "bomb" not in json.dumps(events) and "grenade" not in json.dumps(events)


def test_an_upstream_error_event_ends_the_stream_in_the_api_shape(proxy: str, fake: FakeUpstream) -> None:
    fake.script = Script(pieces=[BENIGN], fault="error-event", fault_after=4)
    events = raw_events(proxy, {"input": "hi"})
    assert events[-1]["type"] == "error" and "model crashed" in events[-1]["message"]
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
