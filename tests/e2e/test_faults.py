"""Upstream faults and client disconnects: the client gets an OpenAI-shaped error (in-band once the
stream started), nothing unjudged leaks, and every guard stream is returned."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from pathlib import Path

import aiohttp
import openai
import pytest

from guardproxy.guard.limits import EngineLimits

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, sse_events, start_proxy, until, wait_idle

BENIGN = ["The", " weather", " in", " Paris", " is", " mild", "."]


@pytest.fixture(scope="module")
def fault_proxy(loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path) -> str:
    settings = proxy_settings(upstream[1], trigger_checkpoint)
    # A short read timeout so a stalled upstream ends the test quickly.
    return start_proxy(loopback, replace(settings, upstream=replace(settings.upstream, read_timeout_s=0.5)))


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
def test_upstream_faults_mid_stream_end_with_an_error_event(
    fault_proxy: str, fake: FakeUpstream, fault: str, message: str
) -> None:
    fake.script = Script(pieces=[BENIGN], fault=fault, fault_after=3)
    events = sse_events(fault_proxy)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    # Whatever came before was judged text of the answer, never the fault's bytes.
    released = "".join(c["delta"].get("content") or "" for e in events[:-2] for c in e.get("choices", []))
    assert "".join(BENIGN).startswith(released)
    wait_idle(fault_proxy)


def test_lines_without_a_field_are_ignored_as_the_spec_says(fault_proxy: str, fake: FakeUpstream) -> None:
    fake.script = Script(pieces=[BENIGN], fault="not-sse", fault_after=3)
    events = sse_events(fault_proxy)
    text = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e.get("choices", []))
    assert text == "".join(BENIGN) and events[-1] == "[DONE]"


async def test_client_disconnect_cancels_the_upstream_and_frees_the_guard(
    proxy: str, fake: FakeUpstream
) -> None:
    fake.script = Script(pieces=[[" word"] * 400], delay=0.01)  # a 4 s answer
    closed = fake.closed_early
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(proxy + "/chat/completions", json=body) as r:
        assert r.status == 200
        got = b""
        while b"word" not in got:  # read until the answer is flowing, then hang up
            got += await r.content.readany()
    await asyncio.to_thread(
        until, lambda: fake.closed_early != closed, 10, "the upstream request was not cancelled"
    )
    await asyncio.to_thread(wait_idle, proxy)


def test_oversized_bodies_get_413(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    settings = proxy_settings(upstream[1], trigger_checkpoint)
    small = start_proxy(loopback, replace(settings, server=replace(settings.server, max_body_bytes=4096)))
    with (
        pytest.raises(openai.APIStatusError) as err,
        openai.OpenAI(base_url=small, api_key="k", max_retries=0) as c,
    ):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 10_000}])
    assert err.value.status_code == 413 and "too large" in err.value.message


async def test_client_disconnect_before_the_first_byte(proxy: str, fake: FakeUpstream) -> None:
    closed = fake.closed_early
    script = json.dumps({"pieces": [["late"]], "first_delay": 5.0})
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):  # hang up while the upstream has not answered yet
                await s.post(proxy + "/chat/completions", json=body, headers={"x-fake-script": script})
    await asyncio.to_thread(
        until, lambda: fake.closed_early != closed, 10, "the upstream request was not cancelled"
    )
    await asyncio.to_thread(wait_idle, proxy)


async def test_client_disconnect_while_queued_for_the_guard(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    one = EngineLimits(
        max_streams=1, max_queue=4, queue_timeout_s=30, response_reserve=256, anchor_tokens=256
    )
    proxy = start_proxy(loopback, proxy_settings(upstream[1], trigger_checkpoint, engine=one))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    slow = json.dumps({"pieces": [[" word"] * 100], "delay": 0.01})
    async with aiohttp.ClientSession() as s:
        holder = asyncio.create_task(
            s.post(proxy + "/chat/completions", json=body, headers={"x-fake-script": slow})
        )
        await asyncio.sleep(0.3)  # the only guard stream is taken
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):  # queued behind it; hang up
                await s.post(proxy + "/chat/completions", json=body)
        r = await holder
        await r.read()
        r.release()
        async with s.get(proxy.removesuffix("/v1") + "/readyz") as ready:
            assert (await ready.json())["engine"]["queued"] == 0
        fine = json.dumps({"pieces": [["ok"]]})
        async with s.post(
            proxy + "/chat/completions", json={**body, "stream": False}, headers={"x-fake-script": fine}
        ) as r2:
            assert r2.status == 200 and (await r2.json())["choices"][0]["message"]["content"] == "ok"
