"""Logging: text or JSON lines, the request id on every record, secrets scrubbed.

guardproxy never logs headers or bodies; the scrubbing filter is a second line of defence for a
message that quotes an exception carrying a key."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from typing import IO

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_SECRETS = re.compile(
    r"(?i)(bearer\s+)[^\s\"',;]+"  # an Authorization value
    r"|\b(sk-[A-Za-z0-9_\-]{6,})"  # OpenAI-style keys anywhere
    r"|((?:api[_-]?key|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"  # key=value, "api_key": "..."
)


def scrub(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group(1):
            return m.group(1) + "[redacted]"
        if m.group(2):
            return "[redacted]"
        return m.group(3) + "[redacted]"

    return _SECRETS.sub(repl, text)


class _Context(logging.Filter):
    """Adds the request id, and which process of several wrote the line (``worker 1``, ``engine``;
    empty with one). Records are shared by every handler: nothing else is changed here."""

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.name_ = role or ""
        self.tag = f"{role} pid {os.getpid()} " if role else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.role = self.tag
        record.role_name = self.name_
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(role)s[%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {
            "time": f"{created}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
            "request_id": getattr(record, "request_id", "-"),
        }
        role = getattr(record, "role_name", "")
        if role:
            out["process"] = role
            out["pid"] = record.process
        if record.exc_info:
            out["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def configure(
    fmt: str = "text", level: str = "info", stream: IO[str] | None = None, role: str | None = None
) -> None:
    """Root logging to ``stream`` (standard error by default) in the given format. ``role`` names this
    process on every line when there are several (``worker 0``, ``engine``), with its pid."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_Context(role))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
