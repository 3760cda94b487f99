"""Upstream faults and client hang-ups on the Responses and Messages routes: the stream ends with the
API's own error event (never a 500, never the fault's bytes), what came before was judged text of the
answer, and every guard stream and upstream request is returned."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, start_proxy, until, wait_idle

BENIGN = ["The", " weather", " in", " Paris", " is", " mild", "."]
BODY = {
    "responses": {"model": "m", "input": "hi", "stream": True},
    "messages": {
        "model": "m",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    },
}


@pytest.fixture(scope="module")
def fault_proxy(loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path) -> str:
    settings = proxy_settings(upstream[1], trigger_checkpoint)
    # A short read timeout so a stalled upstream ends the test quickly.
    return start_proxy(loopback, replace(settings, upstream=replace(settings.upstream, read_timeout_s=0.5)))


def events(proxy: str, api: str) -> list[tuple[str, dict[str, Any]]]:
    req = urllib.request.Request(
        f"{proxy}/{api}", data=json.dumps(BODY[api]).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        text = r.read().decode()
    out, name = [], ""
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


def released(evs: list[tuple[str, dict[str, Any]]]) -> str:
    text = ""
    for _, e in evs:
        if e.get("type") == "response.output_text.delta":
            text += e["delta"]
        elif e.get("type") == "content_block_delta" and e["delta"].get("type") == "text_delta":
            text += e["delta"]["text"]
    return text


@pytest.mark.parametrize("api", ["responses", "messages"])
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("bad-json", "not JSON"),
        ("bad-utf8", "invalid UTF-8"),
        ("error-event", "model crashed"),
        ("reset", "upstream stream failed"),
        ("stall", "upstream stream failed"),
    ],
)
def test_upstream_faults_mid_stream_end_with_the_apis_error_event(
    fault_proxy: str, fake: FakeUpstream, api: str, fault: str, message: str
) -> None:
    fake.script = Script(pieces=[BENIGN], fault=fault, fault_after=4)
    evs = events(fault_proxy, api)
    name, last = evs[-1]
    assert name == "error" and last["type"] == "error"
    if api == "responses":
        assert message in last["message"] and set(last) == {
            "type",
            "code",
            "message",
            "param",
            "sequence_number",
        }
        numbers = [e["sequence_number"] for _, e in evs]
        assert numbers == sorted(set(numbers))
    else:
        assert message in last["error"]["message"] and set(last["error"]) == {"type", "message"}
    assert "".join(BENIGN).startswith(released(evs))
    wait_idle(fault_proxy)


@pytest.mark.parametrize("api", ["responses", "messages"])
async def test_client_disconnect_cancels_the_upstream_and_frees_the_guard(
    proxy: str, fake: FakeUpstream, api: str
) -> None:
    fake.script = Script(pieces=[[" word"] * 400], delay=0.01)  # a 4 s answer
    closed = fake.closed_early
    async with aiohttp.ClientSession() as s, s.post(f"{proxy}/{api}", json=BODY[api]) as r:
        assert r.status == 200
        got = b""
        while b"word" not in got:  # read until the answer is flowing, then hang up
            got += await r.content.readany()
    await asyncio.to_thread(
        until, lambda: fake.closed_early != closed, 10, "the upstream request was not cancelled"
    )
    await asyncio.to_thread(wait_idle, proxy)


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_a_cut_closes_the_upstream_at_once(proxy: str, fake: FakeUpstream, api: str) -> None:
    fake.script = Script(pieces=[["Take", " a", " bomb", " now"] + [" word"] * 300], delay=0.005)
    closed = fake.closed_early
    evs = events(proxy, api)
    assert released(evs) == "Take a [cut]"
    assert evs[-1][0] in ("response.incomplete", "message_stop")
    # The upstream was still sending: it sees the connection go.
    until(lambda: fake.closed_early != closed, 10, "the upstream was not closed")
    wait_idle(proxy)


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_an_upstream_that_stops_without_its_last_event(
    fault_proxy: str, fake: FakeUpstream, api: str
) -> None:
    # The stream ends cleanly but early (no response.completed / message_stop): an error event, not a
    # success the client would take for a whole answer.
    fake.script = Script(pieces=[BENIGN], fault="truncate", fault_after=6)
    evs = events(fault_proxy, api)
    assert evs[-1][0] == "error" and "before" in json.dumps(evs[-1][1])
    wait_idle(fault_proxy)


# -- faults inside a tool call: the call never reaches the client in part --------------------------------

PATCH = ["*** Begin Patch\n", "*** Update File: notes.md\n", "-teh plan\n", "+the plan\n", "*** End Patch"]
# Where the fault falls: after the first pieces of the call's input (events counted from the stream's
# start: Responses' message item takes 12 events before the call's, Messages' text block 11).
INSIDE_CALL = {"responses": 17, "messages": 14}


def call_events(evs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Every event of a tool call the client got (Responses function/custom calls, Messages tool_use)."""
    names = []
    for name, e in evs:
        item = e.get("item") or e.get("content_block") or {}
        delta = e.get("delta") if isinstance(e.get("delta"), dict) else {}
        if (
            "custom_tool_call" in name
            or "function_call" in name
            or item.get("type") in ("custom_tool_call", "function_call", "tool_use")
            or delta.get("type") == "input_json_delta"
        ):
            names.append(name)
    return names


@pytest.mark.parametrize("api", ["responses", "messages"])
@pytest.mark.parametrize("fault", ["bad-json", "error-event", "reset", "stall", "truncate"])
def test_a_fault_inside_a_tool_call_releases_none_of_it(
    fault_proxy: str, fake: FakeUpstream, api: str, fault: str
) -> None:
    args = PATCH if api == "responses" else ['{"path": ', '"notes.md", ', '"text": "the plan"', "}"]
    fake.script = Script(
        pieces=[BENIGN], tool_args=args, tool_kind="custom", fault=fault, fault_after=INSIDE_CALL[api]
    )
    evs = events(fault_proxy, api)
    assert evs[-1][0] == "error", evs[-1]
    assert call_events(evs) == []  # the call never ended: nothing of it, not its start
    assert "".join(BENIGN).startswith(released(evs))  # judged text before it, at most
    wait_idle(fault_proxy)


def chat_events(proxy: str, script: dict[str, Any]) -> list[Any]:
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(
        proxy + "/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "x-fake-script": json.dumps(script)},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return [b[6:] for b in text.split("\n\n") if b.startswith("data: ")]


@pytest.mark.parametrize("fault", ["truncate", "reset", "bad-json"])
def test_a_chat_tool_call_cut_short_by_the_upstream_is_not_released(
    fault_proxy: str, fake: FakeUpstream, fault: str
) -> None:
    # role, content, tool call header, then two of four argument pieces: the upstream stops there.
    script = {
        "pieces": [["Calling."]],
        "tool_args": ['{"city": ', '"Par', 'is"', "}"],
        "fault": fault,
        "fault_after": 5,
    }
    data = chat_events(fault_proxy, script)
    chunks = [json.loads(d) for d in data if d != "[DONE]"]
    calls = [c for ch in chunks for c in ch.get("choices") or [] if (c.get("delta") or {}).get("tool_calls")]
    assert calls == []  # an incomplete call ('{"city": "Par') must never look like a call
    finishes = [
        c["finish_reason"] for ch in chunks for c in ch.get("choices") or [] if c.get("finish_reason")
    ]
    assert "tool_calls" not in finishes and "stop" not in finishes  # not presented as a complete answer
    wait_idle(fault_proxy)


@pytest.mark.parametrize("seed", range(6))
def test_random_splits_of_new_event_kinds_never_leak_the_trigger(
    fault_proxy: str, fake: FakeUpstream, seed: int
) -> None:
    """A custom tool call and an unknown event carrying the trigger, written in random network splits
    (with keep-alives, CRLF and multi-line data on some seeds): the stream ends in a cut, never shows
    the trigger, and nothing is left held."""
    unknown = {
        "type": "response.future_widget.delta",
        "item_id": "fw_1",
        "output_index": 2,
        "delta": "a bomb in a widget",
    }
    fake.script = Script(
        pieces=[BENIGN],
        tool_args=["*** Begin Patch\n", "+a", " bomb", "\n*** End Patch"] if seed % 2 else PATCH,
        tool_kind="custom",
        extra_events=[] if seed % 2 else [[unknown["type"], unknown]],
        split_seed=seed,
        keepalive=seed % 3 == 0,
        crlf=seed % 3 == 1,
        multiline=seed % 3 == 2,
    )
    evs = events(fault_proxy, "responses")
    assert "bomb" not in json.dumps(evs)
    assert evs[-1][0] == "response.incomplete"
    assert evs[-1][1]["response"]["incomplete_details"]["reason"] == "content_filter"
    if seed % 2 == 0:  # the call was benign and complete before the widget's event: it went out whole
        inputs = [e["input"] for n, e in evs if n == "response.custom_tool_call_input.done"]
        assert inputs == ["".join(PATCH)]
    numbers = [e["sequence_number"] for _, e in evs]
    assert numbers == sorted(set(numbers))
    wait_idle(fault_proxy)
