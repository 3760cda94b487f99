"""The SSE decoder: any split of a stream decodes to the same events; malformed input is an error."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.stream.sse import DONE, SSEDecoder, SSEError, SSEEvent, encode_event

from .shapes import llamacpp_stream, openai_stream, render, vllm_reasoning_stream

PIECES = ["Hello", ", wörld", " — 日本語", " 👩‍👩‍👧", " e\u0301", "\n\nNew", " line"]
STREAMS = {
    f"{name}-{style}": render(chunks, style)
    for name, chunks in [
        ("openai", openai_stream(PIECES)),
        ("llamacpp", llamacpp_stream(PIECES)),
        ("vllm", vllm_reasoning_stream(["Let me", " think"], PIECES)),
    ]
    for style in ("lf", "crlf", "keepalive", "multiline")
}


def decode_in(chunks: list[bytes]) -> list[SSEEvent]:
    dec = SSEDecoder()
    events: list[SSEEvent] = []
    for c in chunks:
        events += dec.feed(c)
    return events + dec.flush()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# Bytes captured from a real llama.cpp server (xllamacpp, SmolLM2-135M), only its local model path
# shortened: Cyrillic and emoji in the text, a usage chunk, [DONE].
CAPTURED = (Path(__file__).parent / "captures" / "llamacpp-chat-stream.sse").read_bytes()


@given(st.lists(st.integers(0, len(CAPTURED)), max_size=60))
def test_any_split_of_a_real_capture(cuts: list[int]) -> None:
    events = decode_in(split(CAPTURED, cuts))
    assert events == decode_in([CAPTURED])
    payloads = [json.loads(e.data) for e in events[:-1]]
    text = "".join((c["delta"].get("content") or "") for p in payloads for c in p["choices"])
    assert "Привет👋" in text and events[-1].data == "[DONE]"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_whole_streams_decode_to_the_chunks(name: str) -> None:
    events = decode_in([STREAMS[name]])
    assert events[-1].data == "[DONE]"
    payloads = [json.loads(e.data) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    text = "".join((c["delta"].get("content") or "") for p in payloads for c in p["choices"])
    assert text == "".join(PIECES)


@given(st.sampled_from(sorted(STREAMS)), st.lists(st.integers(0, 4000), max_size=40))
def test_any_split_gives_the_same_events(name: str, cuts: list[int]) -> None:
    data = STREAMS[name]
    cuts = [c % (len(data) + 1) for c in cuts]
    assert decode_in(split(data, cuts)) == decode_in([data])


def test_byte_by_byte_with_crlf_split_between_reads() -> None:
    data = STREAMS["openai-crlf"]
    assert decode_in([data[i : i + 1] for i in range(len(data))]) == decode_in([data])


def test_fields_comments_ids_and_multiline_data() -> None:
    raw = b"\xef\xbb\xbf: hello\nevent: error\nid: 7\nretry: 1500\ndata: line one\ndata:line two\ndata\n\n"
    dec = SSEDecoder()
    (event,) = dec.feed(raw)
    assert event == SSEEvent(data="line one\nline two\n", event="error", id="7", retry=1500)
    assert dec.comments == 1
    # A blank line with no data dispatches nothing; CR alone ends lines too.
    assert dec.feed(b"event: x\n\n") == []
    # The last event id persists across events, as the spec says.
    assert dec.feed(b"data: a\r\rdata: b\r\n\r\n") == [SSEEvent("a", id="7"), SSEEvent("b", id="7")]


def test_last_event_without_blank_line_is_delivered_on_flush() -> None:
    dec = SSEDecoder()
    assert dec.feed(b'data: {"x": 1}\n\ndata: [DONE]') == [SSEEvent('{"x": 1}')]
    assert dec.flush() == [SSEEvent("[DONE]")]


def test_invalid_utf8_is_an_error() -> None:
    with pytest.raises(SSEError, match="invalid UTF-8"):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")
    dec = SSEDecoder()
    dec.feed(b"data: \xe6\x97")  # a character cut short by the end of the stream
    with pytest.raises(SSEError, match="inside a UTF-8 character"):
        dec.flush()


def test_oversized_lines_and_events_are_errors() -> None:
    with pytest.raises(SSEError, match="line exceeds"):
        SSEDecoder(max_event_bytes=100).feed(b"data: " + b"x" * 200)
    dec = SSEDecoder(max_event_bytes=100)
    with pytest.raises(SSEError, match="event exceeds"):
        for _ in range(10):
            dec.feed(b"data: " + b"y" * 20 + b"\n")


@given(st.text(max_size=200), st.sampled_from([None, "error", "message"]))
def test_encoder_round_trips(data: str, event: str | None) -> None:
    (decoded,) = decode_in([encode_event(data, event)])
    assert decoded.data == data.replace("\r\n", "\n").replace("\r", "\n")
    assert decoded.event == (event or "message")


def test_done_marker() -> None:
    assert decode_in([DONE]) == [SSEEvent("[DONE]")]
