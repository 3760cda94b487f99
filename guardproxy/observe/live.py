"""The live view's feed: the recent decisions (audit records) in a bounded ring, and every new one handed
to whoever is watching (the ``/ui`` page's event stream). In memory, one per process: with several proxy
workers each record is handed to the others too (``shared``), so every worker's page shows them all.
A slow watcher loses records rather than holding the proxy up."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any


class LiveFeed:
    def __init__(self, size: int, watcher_backlog: int = 256) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=size)
        self._watchers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._backlog = watcher_backlog
        self.shared: Callable[[dict[str, Any]], Any] | None = None  # to the other proxy workers

    def publish(self, record: dict[str, Any]) -> None:
        self.receive(record)
        if self.shared is not None:
            self.shared(record)

    def receive(self, record: dict[str, Any]) -> None:
        """A record made here or by another proxy worker."""
        self.records.append(record)
        for q in self._watchers:
            if q.full():  # a watcher that does not keep up misses its oldest records, not the newest
                q.get_nowait()
            q.put_nowait(record)

    def watch(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=self._backlog)
        self._watchers.add(q)
        return q

    def unwatch(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._watchers.discard(q)
