"""Server-sent events, incrementally: bytes in (any split), events out; and the encoder.

Follows the WHATWG event-stream rules: UTF-8 (a leading BOM dropped), lines ended by CRLF, LF or CR,
``:`` comments, ``field: value`` with one optional space, multi-line ``data``, dispatch on a blank line.
State carries across reads: a UTF-8 character or a CRLF split between two network reads decodes as if
it had arrived whole. Invalid UTF-8 and oversized lines raise ``SSEError``; nothing is dropped silently.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


class SSEError(ValueError):
    """The upstream's event stream is malformed (bad UTF-8, a line or event over the size limit)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024


class SSEDecoder:
    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._max = max_event_bytes
        self._line = ""  # the unfinished line
        self._skip_lf = False  # the last read ended with CR: an LF starting the next one is its pair
        self._started = False  # the BOM check is done
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self.comments = 0  # keep-alives and other comments seen

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        try:
            text = self._utf8.decode(chunk)
        except UnicodeDecodeError as exc:
            raise SSEError(f"upstream sent invalid UTF-8 in its event stream: {exc.reason}") from None
        return self._feed_text(text)

    def flush(self) -> list[SSEEvent]:
        """End of stream: a last line or event without its terminating blank line is still delivered
        (real servers sometimes close right after ``data: [DONE]``)."""
        try:
            text = self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            raise SSEError("upstream event stream ended inside a UTF-8 character") from None
        events = self._feed_text(text)
        if self._line:
            self._process_line(self._line)
            self._line = ""
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _feed_text(self, text: str) -> list[SSEEvent]:
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        events: list[SSEEvent] = []
        pos = 0
        if self._skip_lf and text:
            if text[0] == "\n":
                pos = 1
            self._skip_lf = False
        n = len(text)
        while pos < n:
            # Find the next line end: CR, LF or CRLF.
            cr = text.find("\r", pos)
            lf = text.find("\n", pos)
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                self._line += text[pos:]
                break
            end = min(ends)
            line = self._line + text[pos:end]
            self._line = ""
            if text[end] == "\r":
                if end + 1 < n:
                    pos = end + 2 if text[end + 1] == "\n" else end + 1
                else:
                    pos = end + 1
                    self._skip_lf = True
            else:
                pos = end + 1
            if line == "":
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            else:
                self._process_line(line)
        if len(self._line) > self._max:
            raise SSEError(f"upstream event stream line exceeds {self._max} characters")
        return events

    def _process_line(self, line: str) -> None:
        if line.startswith(":"):
            self.comments += 1
            return
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self._max:
                raise SSEError(f"upstream event exceeds {self._max} bytes")
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self._id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # Other fields are ignored, as the spec says.

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event, self._retry = "", None
            return None
        event = SSEEvent(
            data="\n".join(self._data), event=self._event or "message", id=self._id, retry=self._retry
        )
        self._data, self._data_size, self._event, self._retry = [], 0, "", None
        return event


def encode_event(data: str, event: str | None = None) -> bytes:
    """One event; multi-line data becomes several ``data:`` lines (LF, CR and CRLF all split)."""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    head = f"event: {event}\n" if event else ""
    return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


DONE = b"data: [DONE]\n\n"
