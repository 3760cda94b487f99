"""What the proxy asks of a guard engine, whoever runs it: ``GuardEngine`` in this process, or
``RemoteEngine``, a client of the one engine process that several proxy workers share
(``server.workers`` > 1). Nothing here imports torch: a proxy worker never loads it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from guardproxy.guard.verdict import GuardLabels, Verdict


@dataclass(frozen=True)
class EngineStats:
    active_streams: int
    queued_streams: int
    cached_tokens: int
    reserved_tokens: int
    steps: int
    slides: int  # streams that reached the guard's context and went on on a window
    memory_waits: int  # times a stream had to wait for KV memory to grow
    memory_timeouts: int  # waits that ran out (the stream failed by the policy's on_guard_error)
    prefill_tokens: int  # context positions computed
    prefix_hit_tokens: int  # context positions taken from the prefix cache instead
    cached_pages: int  # pages in the prefix cache (held by streams or waiting for reuse)
    evictions: int  # cached pages given up for room
    last_step_tokens: int
    last_step_s: float


class Stream(Protocol):
    """One conversation's guard state. Response tokens are fed in order; each gets a verdict."""

    @property
    def closed(self) -> bool: ...

    async def prompt_verdict(self) -> Verdict: ...

    def feed(self, ids: Sequence[int]) -> asyncio.Future[list[Verdict]]: ...

    async def judge(self, ids: Sequence[int]) -> list[Verdict]: ...

    def feed_context(self, ids: Sequence[int]) -> None: ...

    def retract(self, n: int) -> None: ...

    def close(self) -> None: ...

    async def __aenter__(self) -> Stream: ...

    async def __aexit__(self, *exc: object) -> None: ...


class Engine(Protocol):
    @property
    def labels(self) -> GuardLabels: ...

    @property
    def max_prompt_tokens(self) -> int: ...

    @property
    def ready(self) -> bool:
        """Streams can be opened now (a shared engine is connected)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def stats(self) -> EngineStats: ...

    async def open(
        self, prompt_ids: Sequence[int], verdict_index: int | None, anchor_start: int = 0
    ) -> Stream: ...
