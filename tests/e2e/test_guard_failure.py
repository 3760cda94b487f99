"""The guard fails (an exception in the forward, as an out-of-memory would raise): fail_closed releases
nothing unjudged, fail_open passes the answer through marked, and the engine serves the next request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from guardproxy.server.state import SERVICES

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, sse_events, start_proxy_app
from .test_metrics import scrape, value

BENIGN = ["Fine", " words", " only", "."]


class Breaker:
    """A step executor put in front of the engine's own: from the N-th step on it raises, as an
    out-of-memory in the forward would (the model runs in the engine's worker thread)."""

    def __init__(self, app: Any) -> None:
        self.engine = app[SERVICES].engine
        self.inner = self.engine.executor
        self.labels, self.max_positions = self.inner.labels, self.inner.max_positions
        self.after: int | None = None
        self.steps = 0
        self.engine.executor = self

    def execute(self, items: Any) -> Any:
        self.steps += 1
        if self.after is not None and self.steps > self.after:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner.execute(items)

    def close(self) -> None:
        self.inner.close()

    def arm(self, after_steps: int) -> None:
        self.steps, self.after = 0, after_steps

    def disarm(self) -> None:
        self.after = None


@pytest.fixture(params=["fail_closed", "fail_open"])
def broken(
    request: pytest.FixtureRequest,
    loopback: Loopback,
    upstream: tuple[FakeUpstream, str],
    trigger_checkpoint: Path,
) -> Iterator[tuple[str, str, Breaker]]:
    proxy, app = start_proxy_app(
        loopback, proxy_settings(upstream[1], trigger_checkpoint, on_guard_error=request.param)
    )
    breaker = Breaker(app)
    yield request.param, proxy, breaker
    breaker.disarm()


def content(events: list[Any]) -> str:
    return "".join(
        c["delta"].get("content") or "" for e in events if isinstance(e, dict) for c in e.get("choices", [])
    )


@pytest.mark.parametrize("after_steps", [0, 1], ids=["at-the-prompt", "mid-answer"])
def test_guard_failure_follows_the_policy(
    broken: tuple[str, str, Breaker], fake: FakeUpstream, after_steps: int
) -> None:
    mode, proxy, breaker = broken
    fake.script = Script(pieces=[BENIGN], delay=0.01)
    breaker.arm(after_steps)
    if mode == "fail_closed" and after_steps == 0:
        with (
            pytest.raises(openai.InternalServerError) as err,
            openai.OpenAI(base_url=proxy, api_key="k", max_retries=0) as c,
        ):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503 and err.value.code == "guard_error"
    else:
        events = sse_events(proxy)
        assert events[-1] == "[DONE]"
        if mode == "fail_closed":  # the stream had started: an error event, and nothing unjudged before it
            assert "guard" in events[-2]["error"]["message"] and content(events) == ""
        else:  # fail open: the whole answer, marked as unjudged
            assert content(events) == "".join(BENIGN)
            final = next(e for e in events if isinstance(e, dict) and e["choices"][0].get("finish_reason"))
            assert "out of memory" in final["guardproxy"]["guard_error"]
    breaker.disarm()
    failures = value(scrape(proxy), "guardproxy_guard_failures_total", mode=mode)
    assert failures == 1  # one failing request, counted once, under the policy's mode
    fake.script = Script(pieces=[BENIGN])
    assert content(sse_events(proxy)) == "".join(BENIGN)  # the engine serves the next request


def test_a_retraction_the_engine_refuses_is_a_guard_failure(
    broken: tuple[str, str, Breaker], fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # " wor" + "ds" takes the tentative " wor" back; here the engine refuses, as it would if it had
    # lost track of the stream. Never a crash: the policy's guard-failure rule applies.
    from guardproxy.guard.errors import EngineError
    from guardproxy.guard.scheduler import Scheduler

    def refuse(self: Scheduler, sid: int, n: int) -> Any:
        raise EngineError("cannot retract (simulated)")

    mode, proxy, _ = broken
    monkeypatch.setattr(Scheduler, "retract", refuse)
    fake.script = Script(pieces=[["Fine", " wor", "ds", " only", "."]], delay=0.01)
    events = sse_events(proxy)
    assert events[-1] == "[DONE]"
    if mode == "fail_closed":
        # what was judged before the failure may be out ("Fine", " wor" as it stood); nothing after
        assert "guard" in events[-2]["error"]["message"] and content(events) in {"", "Fine", "Fine wor"}
    else:
        assert content(events) == "Fine words only."
        final = next(e for e in events if isinstance(e, dict) and e["choices"][0].get("finish_reason"))
        assert "cannot retract" in final["guardproxy"]["guard_error"]
    monkeypatch.undo()
    fake.script = Script(pieces=[BENIGN])
    assert content(sse_events(proxy)) == "".join(BENIGN)
