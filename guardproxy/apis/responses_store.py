"""Turns of Responses API answers that passed through this proxy, for a later request that continues one
with ``previous_response_id``: the upstream keeps the conversation, so the guard must be told what it
holds. Each response keeps only what it added (its input turns and its answer) and a link to the
response it continued, so a long chain costs its text once, not once a turn. Bounded by count and age
(``server.response_store_*``); in memory, one per process: with several proxy workers each answer is
handed to the others too (``shared``), so a turn continues whichever worker takes it. A chain with an
evicted link is unknown (the policy's ``unknown_previous_response`` decides)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# What a put shares with the other workers: (response id, its turns, its parent, when it was made).
Shared = tuple[str, list[dict[str, Any]], str | None, float]


@dataclass(frozen=True)
class _Entry:
    stamp: float
    parent: str | None  # the response this one continued (None: the chain starts here)
    turns: list[dict[str, Any]]  # what this response added: its input turns and its answer


class ResponseStore:
    def __init__(
        self, max_entries: int, max_age_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        # Called with what each put stores and when, for the other proxy workers (they ``receive`` it).
        self.shared: Callable[[Shared], Any] | None = None

    def put(self, response_id: str, turns: list[dict[str, Any]], parent: str | None = None) -> None:
        """What ``response_id`` added (chat-shaped messages, no system instructions), after ``parent``."""
        entry = (response_id, turns, parent, self._clock())
        self.receive(entry)
        if self.shared is not None and self.max_entries > 0:
            self.shared(entry)

    def receive(self, entry: Shared) -> None:
        """A put made here or by another proxy worker, aged from when it was made (the workers share
        the machine's monotonic clock), even when it reaches a worker that connected later."""
        response_id, turns, parent, stamp = entry
        if self.max_entries <= 0:
            return
        self._items[response_id] = _Entry(stamp, parent, turns)
        self._items.move_to_end(response_id)
        self._evict()

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        """The whole conversation as of ``response_id``, or None if it (or a link of its chain) is gone."""
        self._evict()
        chain: list[list[dict[str, Any]]] = []
        seen: set[str] = set()
        rid: str | None = response_id
        while rid is not None:
            entry = self._items.get(rid)
            if entry is None or rid in seen:
                return None
            seen.add(rid)
            chain.append(entry.turns)
            rid = entry.parent
        return [turn for turns in reversed(chain) for turn in turns]

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        limit = self._clock() - self.max_age_s
        while self._items:
            key, entry = next(iter(self._items.items()))
            if len(self._items) <= self.max_entries and entry.stamp >= limit:
                break
            del self._items[key]
