"""Turns of Responses API answers that passed through this proxy, for a later request that continues one
with ``previous_response_id``: the upstream keeps the conversation, so the guard must be told what it
holds. Bounded by count and by age (the configuration's ``server.response_store_*``); in memory, one per
process."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class ResponseStore:
    def __init__(
        self, max_entries: int, max_age_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()

    def put(self, response_id: str, turns: list[dict[str, Any]]) -> None:
        """The whole conversation as of this response (chat-shaped messages, no system instructions)."""
        if self.max_entries <= 0:
            return
        self._items[response_id] = (self._clock(), turns)
        self._items.move_to_end(response_id)
        self._evict()

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        self._evict()
        item = self._items.get(response_id)
        return None if item is None else list(item[1])

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        limit = self._clock() - self.max_age_s
        while self._items:
            key, (stamp, _) = next(iter(self._items.items()))
            if len(self._items) <= self.max_entries and stamp >= limit:
                break
            del self._items[key]
