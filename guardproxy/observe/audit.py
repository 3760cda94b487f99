"""The audit log: one JSON line per request decision, rotated by size.

Message text is left out unless the request's policy asks for it (``audit_text``), and then capped:
an audit trail of a guardrail must not become a second copy of every conversation by default.

Several proxy workers append to the same file: each line is written under an exclusive ``flock`` of
``<path>.lock`` (a file that rotation never moves), one ``write`` of the whole line, and whichever
process finds the file too big rotates it under that lock; the others notice the file was replaced
(its inode changed) and reopen it before their next line."""

from __future__ import annotations

import fcntl
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
        self._lockfile = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._file: IO[bytes] = self.path.open("ab")

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX)
            try:
                self._reopen_if_rotated()
                size = os.fstat(self._file.fileno()).st_size
                if size and size + len(line) > self.max_bytes:
                    self._rotate()
                self._file.write(line)
                self._file.flush()
            finally:
                fcntl.flock(self._lockfile, fcntl.LOCK_UN)

    def _reopen_if_rotated(self) -> None:
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(self._file.fileno()).st_ino:
            self._file.close()
            self._file = self.path.open("ab")

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
        self._file = self.path.open("ab")

    def close(self) -> None:
        with self._lock:
            self._file.close()
            os.close(self._lockfile)


def capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more characters]"
