"""The Responses API's WebSocket mode (``GET /v1/responses`` upgraded): frames in, the same guarded events
out as over HTTP, several responses on one connection, errors as frames. The client is the real
``websockets`` library (what the OpenAI Agents SDK's ``OpenAIResponsesWSModel`` uses; that model and
Codex's built-in provider are run in ``test_agent_clients.py``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from .agent_upstream import AgentUpstream, Call, Turn
from .conftest import proxy_settings
from .harness import Loopback, start_proxy, wait_idle

TERMINAL = ("response.completed", "response.incomplete", "response.failed", "error")


@pytest.fixture(scope="module")
def upstream(loopback: Loopback) -> tuple[AgentUpstream, str]:
    up = AgentUpstream()
    return up, f"http://127.0.0.1:{loopback.serve(up.app())}/v1"


@pytest.fixture(scope="module")
def proxy(loopback: Loopback, upstream: tuple[AgentUpstream, str], trigger_checkpoint: Path) -> str:
    return start_proxy(loopback, proxy_settings(upstream[1], trigger_checkpoint, notice=" [cut]"))


async def exchange(proxy: str, frames: list[str | dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each frame sent in turn on ONE connection, and the events it got back up to a terminal one."""
    out = []
    async with websockets.connect(proxy.replace("http://", "ws://") + "/responses") as ws:
        for frame in frames:
            await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
            events = []
            while not events or events[-1]["type"] not in TERMINAL:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            out.append(events)
    return out


def create(text: str, **more: Any) -> dict[str, Any]:
    return {"type": "response.create", "model": "m", "input": text, **more}


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_responses_on_one_connection_are_guarded_like_http(
    upstream: tuple[AgentUpstream, str], proxy: str
) -> None:
    agents, _ = upstream
    agents.script("responses", Turn(text=["Hello", " there."]), Turn(text=["How to build a", " bomb: no."]))
    first, second = asyncio.run(exchange(proxy, [create("hi"), create("and then?")]))
    assert text_of(first) == "Hello there." and first[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in first] == list(range(len(first)))
    # The second answer is cut as over HTTP: released text, the notice, response.incomplete.
    assert text_of(second) == "How to build a [cut]" and "bomb" not in json.dumps(second)
    assert second[-1]["type"] == "response.incomplete"
    assert second[-1]["response"]["incomplete_details"]["reason"] == "content_filter"
    # Each frame reached the upstream as a streamed HTTP request, without the frame's type.
    bodies = [s.body for s in agents.requests("/v1/responses")]
    assert [b["input"] for b in bodies] == ["hi", "and then?"]
    assert all(b["stream"] is True and "type" not in b for b in bodies)
    wait_idle(proxy)


def test_errors_are_frames_and_the_connection_goes_on(
    upstream: tuple[AgentUpstream, str], proxy: str
) -> None:
    agents, _ = upstream
    agents.script("responses", Turn(text=["fine"]))
    blocked, bad_json, wrong_type, ok = asyncio.run(
        exchange(
            proxy, [create("How do I build a bomb?"), "{not json", {"type": "session.update"}, create("hi")]
        )
    )
    assert blocked == [
        {
            "type": "error",
            "status": 400,
            "error": {
                "message": "The prompt was blocked by the content policy (Unsafe: Violent).",
                "type": "invalid_request_error",
                "param": "input",
                "code": "content_filter",
            },
        }
    ]
    assert bad_json[0]["status"] == 400 and "not valid JSON" in bad_json[0]["error"]["message"]
    assert wrong_type[0]["status"] == 400 and wrong_type[0]["error"]["param"] == "type"
    assert text_of(ok) == "fine" and ok[-1]["type"] == "response.completed"
    # The bad frames never reached the upstream (the blocked prompt did, cancelled: prompt_check parallel).
    assert [s.body["input"] for s in agents.requests("/v1/responses")][-1:] == ["hi"]
    assert len(agents.requests("/v1/responses")) <= 2


def test_a_tool_call_over_the_websocket_is_released_whole(
    upstream: tuple[AgentUpstream, str], proxy: str
) -> None:
    agents, _ = upstream
    agents.script("responses", Turn(calls=[Call("lookup", ['{"query"', ': "weather"}'])]))
    [events] = asyncio.run(exchange(proxy, [create("weather?")]))
    kinds = [e["type"] for e in events]
    added = kinds.index("response.output_item.added")
    done = kinds.index("response.function_call_arguments.done")
    # Held until complete and judged, then out together, in order: added, deltas, done, item done.
    assert set(kinds[added + 1 : done]) == {"response.function_call_arguments.delta"}
    assert "".join(e["delta"] for e in events[added + 1 : done]) == '{"query": "weather"}'
    assert kinds[done + 1] == "response.output_item.done"
    assert events[-1]["response"]["output"][0]["arguments"] == '{"query": "weather"}'
