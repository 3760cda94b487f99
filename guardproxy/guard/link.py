"""The link between proxy workers and the guard engine process they share (``server.workers`` > 1).

A Unix socket carries frames: a 4-byte length, then a pickled list of messages (tuples whose first item
names them). Messages are not written one by one: ``send`` queues them and the queue goes out as one
frame once per event-loop iteration, so everything a worker's streams ask in one iteration (every feed
after a burst of upstream chunks) costs one write, and the verdicts of one engine step come back to each
worker in one frame. Pickle is safe here because only processes of the same user reach the socket: it
lives in a directory only its owner can enter, and the engine checks each peer's uid.

Worker -> engine:
    ("open", wsid, prompt_ids, verdict_index, anchor_start)   ("close", wsid)
    ("feed", wsid, fid, ids, judge)   fid is None for context  ("retract", wsid, n)
    ("share", topic, payload)     for every other worker: a live-view record, a Responses API turn
Engine -> worker:
    ("hello", labels, max_prompt_tokens, pid, stats)            the first frame
    ("opened", wsid)  ("open_failed", wsid, error)   ("prompt", wsid, raw)  ("prompt_failed", wsid, error)
    ("verdicts", wsid, fid, [raw, ...])  ("feed_failed", wsid, fid, error)  ("stream_failed", wsid, error)
    ("stats", EngineStats)  ("share", topic, payload)

``wsid``: the worker's own number for a stream; ``raw``: (risk probs, category probs); ``error``: see
``encode_error``.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
from typing import Any

from guardproxy.guard.errors import (
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    GuardFailure,
    PromptTooLong,
    StreamClosed,
)

Message = tuple[Any, ...]
_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30  # a frame this large is a bug, not traffic

_ERRORS: dict[str, type[EngineError]] = {
    "overloaded": EngineOverloaded,
    "unavailable": EngineUnavailable,
    "too_long": PromptTooLong,
    "closed": StreamClosed,
    "failure": GuardFailure,
    "error": EngineError,
}
_KINDS = {cls: kind for kind, cls in _ERRORS.items()}


def encode_error(exc: BaseException) -> tuple[str, str, float]:
    """(kind, message, retry after): exceptions are not pickled, so a retry hint is not lost and nothing
    but the engine's own error types crosses the link."""
    kind = _KINDS.get(type(exc), "error") if isinstance(exc, EngineError) else "error"
    message = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
    return kind, message, float(getattr(exc, "retry_after", 1.0))


def decode_error(error: tuple[str, str, float]) -> EngineError:
    kind, message, retry_after = error
    cls = _ERRORS.get(kind, EngineError)
    if issubclass(cls, EngineOverloaded):
        return cls(message, retry_after=retry_after)
    return cls(message)


class Link:
    """One end of a connection: ``send`` queues, ``recv`` returns the next frame's messages (and raises
    ``asyncio.IncompleteReadError`` or ``ConnectionError`` when the other end is gone)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._outbox: list[Message] = []
        self._scheduled = False
        self.closed = False
        self.frames_sent = 0
        self.messages_sent = 0

    def send(self, message: Message) -> None:
        if self.closed:
            return
        self._outbox.append(message)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._outbox = self._outbox, []
        if self.closed or not batch:
            return
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._writer.writelines((_HEADER.pack(len(data)), data))
        except (ConnectionError, RuntimeError):  # the other end is gone: recv() tells the owner
            self.close()
            return
        self.frames_sent += 1
        self.messages_sent += len(batch)

    async def recv(self) -> list[Message]:
        (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
        if size > MAX_FRAME:
            raise ConnectionError(f"frame of {size} bytes on the guard engine link")
        messages: list[Message] = pickle.loads(await self._reader.readexactly(size))
        return messages

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.clear()
            self._writer.close()


async def parent_exit() -> None:
    """Returns when the process that started this one exits: the engine and the workers of a supervisor
    killed without the chance to stop them stop themselves (a pidfd becomes readable on exit)."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(os.getppid())
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        loop.remove_reader(fd)
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)
