"""The audit log: one JSON line per request decision, rotated by size.

Message text is left out unless the request's policy asks for it (``audit_text``), and then capped:
an audit trail of a guardrail must not become a second copy of every conversation by default."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import IO, Any


class AuditLog:
    def __init__(self, path: str | Path, *, max_bytes: int = 100 * 1024 * 1024, backups: int = 5) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # written from the event loop, but cheap to make safe everywhere
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        self._size = self.path.stat().st_size

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        size = len(line.encode())
        with self._lock:
            if self._size and self._size + size > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._file.flush()
            self._size += size

    def _rotate(self) -> None:
        self._file.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._file.close()


def capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more characters]"
