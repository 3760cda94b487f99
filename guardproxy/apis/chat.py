"""OpenAI chat completions (``/v1/chat/completions``) and legacy completions (``/v1/completions``).

Streamed answers are ``data:`` chunks of ``choices`` (``n`` of them, each its own output), ended by
``[DONE]``; a chunk with no choices and a ``usage`` goes out last. A cut choice ends with
``finish_reason: "content_filter"`` (after the policy's notice), and so does every other choice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from guardproxy.apis.errors import ProxyError, bad_request, bad_upstream, upstream_event_error
from guardproxy.apis.wire import Conversation, Details, Wire, event_json, parse_json, stripped
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Policy
from guardproxy.stream.guardview import CONTENT, REASONING, tool_call_of, tool_field
from guardproxy.stream.moderator import CONTENT_FILTER, Out
from guardproxy.stream.outputs import Event, Finish, Marker, Outputs, Text, ToolArgs
from guardproxy.stream.sse import DONE, SSEEvent, encode_event

MAX_MESSAGES = 4096  # far beyond the guard's context; refuses pathological requests cheaply
REFUSAL = "refusal"  # the field of a choice's own refusal text
# What a delta (or a whole answer's message) holds that this wire reads; anything else is ``opaque``.
_READ = frozenset({"role", "content", "reasoning_content", "reasoning", "refusal", "tool_calls"})
# Calls standing for opaque fields are numbered from here: far past any upstream tool call index.
_OPAQUE_CALLS = 1 << 20


class ChatWire(Wire):
    route = "/v1/chat/completions"
    chunk_object = "chat.completion.chunk"
    object = "chat.completion"
    id_prefix = "chatcmpl"

    def __init__(self, body: dict[str, Any], policy: Policy, max_choices: int = 8) -> None:
        super().__init__(body, policy)
        n = body.get("n", 1)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_choices:
            raise bad_request(f"n must be an integer from 1 to {max_choices}", param="n")
        self.max_outputs = max_choices
        self._envelope: dict[str, Any] = {
            "id": f"{self.id_prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.model or "",
        }
        self._reasoning_key = "reasoning_content"
        self._tools: dict[tuple[int, int], str | None] = {}  # (choice, call) -> function name
        self._tail: list[dict[str, Any]] = []  # usage chunks (choices: []), sent last
        self._original: dict[str, Any] | None = None  # a whole answer as received
        self._opaque = 0  # opaque calls so far
        self._truncated = False  # the upstream stopped before [DONE] with a choice unfinished
        # A whole answer's fields this wire does not read: (choice, key) -> the call judging its text,
        # or the field with its text emptied (unknown_events: drop).
        self._whole_extra: dict[tuple[int, str], int] = {}
        self._whole_stripped: dict[tuple[int, str], Any] = {}

    def conversation(self) -> Conversation:
        messages = self.body.get("messages")
        if messages is None:
            raise bad_request("messages is required", param="messages")
        if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
            raise bad_request(f"at most {MAX_MESSAGES} messages per request", param="messages")
        tools = self.body.get("tools")
        return Conversation(messages, tools)

    # -- upstream ----------------------------------------------------------------------------------

    def read_event(self, event: SSEEvent) -> list[Event]:
        if event.data.strip() == "[DONE]":
            self.upstream_done = True
            return []
        chunk = parse_json(event.data, "an event")
        if isinstance(chunk.get("error"), dict):
            raise upstream_event_error(chunk["error"])
        choices = chunk.get("choices")
        if not choices and chunk.get("usage") is not None:
            self._tail.append(chunk)
            return []
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None:
                self._envelope[key] = chunk[key]
        out: list[Event] = []
        for c in choices or []:
            if not isinstance(c, Mapping):
                raise bad_upstream("upstream sent a malformed choice")
            index = _index(c)
            out += self._delta(index, self._delta_of(c))
            if c.get("finish_reason"):
                out.append(Finish(index, str(c["finish_reason"])))
        return out

    def _delta_of(self, c: Mapping[str, Any]) -> Mapping[str, Any]:
        delta = c.get("delta") or {}
        if not isinstance(delta, Mapping):
            raise bad_upstream("upstream sent a malformed delta")
        return delta

    def _delta(self, index: int, delta: Mapping[str, Any], whole: bool = False) -> list[Event]:
        out: list[Event] = []
        if delta.get("role") is not None:
            out.append(Marker(index, {"role": delta["role"]}))
        for key in ("reasoning_content", "reasoning"):
            text = delta.get(key)
            if isinstance(text, str) and text:
                self._reasoning_key = key
                out.append(Text(index, REASONING, text))
        text = delta.get("content")
        if isinstance(text, str) and text:
            out.append(Text(index, CONTENT, text))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:  # the model's own refusal: model text, judged
            out.append(Text(index, REFUSAL, refusal))
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, Mapping):
                continue
            k = int(call.get("index", 0))
            fn = call.get("function") or {}
            header = {key: call[key] for key in ("id", "type") if call.get(key) is not None}
            if fn.get("name") is not None:
                header["function"] = {"name": fn["name"]}
                self._tools[(index, k)] = str(fn["name"])
            if header or (index, k) not in self._tools:
                self._tools.setdefault((index, k), None)
                out.append(Marker(index, {"tool_calls": [{"index": k, **header}]}, call=k))
            out.append(ToolArgs(index, k, self._tools[(index, k)], str(fn.get("arguments") or "")))
        for key, value in delta.items():
            if key in _READ or value is None:
                continue
            # A field this wire does not read (audio with its transcript, a legacy function_call...).
            call = _OPAQUE_CALLS + self._opaque
            self._opaque += 1
            events = self.opaque(index, call, key, {key: value})
            if whole and isinstance(events[0], ToolArgs):
                self._whole_extra[(index, key)] = call
            elif whole and (emptied := stripped(events, {key: value})) is not None:
                self._whole_stripped[(index, key)] = emptied[key]
            out += events
        return out

    def _choices(self, raw: bytes) -> list[Mapping[str, Any]]:
        """A whole response's choices, checked; the response kept to be rewritten."""
        body = parse_json(raw, "a response")
        if not isinstance(body.get("choices"), list):
            raise bad_upstream("upstream response has no choices")
        self._original = body
        choices: list[Mapping[str, Any]] = body["choices"]
        if not all(isinstance(c, Mapping) for c in choices):
            raise bad_upstream("upstream sent a malformed choice")
        return choices

    def read_whole(self, raw: bytes) -> list[Event]:
        out: list[Event] = []
        for c in self._choices(raw):
            msg = c.get("message") or {}
            if not isinstance(msg, Mapping):
                raise bad_upstream("upstream sent a malformed message")
            delta = {k: v for k, v in msg.items() if k not in ("role", "tool_calls")}
            delta["tool_calls"] = [{"index": k, **tc} for k, tc in enumerate(msg.get("tool_calls") or [])]
            out += self._delta(_index(c), delta, whole=True)
            out.append(Finish(_index(c), c.get("finish_reason")))
        return out

    # -- client ------------------------------------------------------------------------------------

    def _text_delta(self, field: str, text: str) -> dict[str, Any]:
        if field == CONTENT:
            return {"content": text}
        if field == REASONING:
            return {self._reasoning_key: text}
        if field == REFUSAL:
            return {"refusal": text}
        return {"tool_calls": [{"index": tool_call_of(field), "function": {"arguments": text}}]}

    def _choice(self, index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None, details: Details | None) -> bytes:
        choices = [self._choice(index, delta, finish)]
        chunk: dict[str, Any] = {**self._envelope, "object": self.chunk_object, "choices": choices}
        if details is not None:
            self.annotate(chunk, details)
        return encode_event(event_json(chunk))

    def _render(self, output: int, out: Out, details: Details) -> bytes:
        if out.kind == "text":
            assert out.field is not None
            return self._chunk(output, self._text_delta(out.field, out.text), None, None)
        if out.kind == "marker":
            return self._chunk(output, dict(out.payload), None, None)
        if out.kind == "finish":
            if out.truncated:  # no finish_reason and no [DONE]: the stream ends with an error instead
                self._truncated = True
                return b""
            return self._chunk(output, {}, out.reason or "stop", details)
        delta = {"content": out.text} if out.text else {}
        return self._chunk(output, delta, CONTENT_FILTER, details)

    def tail(self) -> bytes:
        if self._truncated:
            return self.error_event(bad_upstream("upstream ended the stream before its end ([DONE])"))
        return b"".join(encode_event(event_json(chunk)) for chunk in self._tail) + DONE

    def whole(self, outputs: Outputs, details: Details) -> dict[str, Any]:
        assert self._original is not None
        body = dict(self._original)
        body["choices"] = [self._whole_choice(c, outputs) for c in self._original["choices"]]
        self.annotate(body, details)
        return body

    def _whole_choice(self, original: Mapping[str, Any], outputs: Outputs) -> dict[str, Any]:
        index = _index(original)
        m = outputs.answer(index)
        msg = dict(original.get("message") or {})
        finish = original.get("finish_reason")
        for key, name in (("content", CONTENT), ("reasoning_content", REASONING), ("reasoning", REASONING)):
            value = msg.get(key)
            if isinstance(value, str):
                msg[key] = m.shown(name, 0, len(value))
        if isinstance(msg.get("refusal"), str):
            msg["refusal"] = m.shown(REFUSAL, 0, len(msg["refusal"]))
        for key in list(msg):
            call = self._whole_extra.get((index, key))
            if call is not None and not m.released_whole(tool_field(call)):
                del msg[key]  # cut: an opaque field goes whole or not at all
            elif (index, key) in self._whole_stripped:
                msg[key] = self._whole_stripped[(index, key)]  # its text dropped by the policy
        cut = m.cut  # whole answers: each choice is complete, cut or not, on its own
        if cut:
            finish = CONTENT_FILTER
            if self.policy.notice:
                msg["content"] = (msg.get("content") or "") + self.policy.notice
        calls = []
        for k, call in enumerate(msg.get("tool_calls") or []):
            fn = dict(call.get("function") or {})
            args = fn.get("arguments")
            shown = m.shown(tool_field(k), 0, len(args) if isinstance(args, str) else 0)
            if isinstance(args, str) and shown != args and cut:
                break  # a tool call cut in its arguments is no tool call: it and any after it go
            fn["arguments"] = shown if isinstance(args, str) else args
            calls.append({**call, "function": fn})
        if msg.get("tool_calls"):
            msg["tool_calls"] = calls or None
        return {**original, "message": msg, "finish_reason": finish}

    def blocked(self, verdict: Verdict, details: Details) -> list[bytes] | dict[str, Any]:
        text = self.policy.refusal
        if self.streaming:
            return [
                self._chunk(0, {"role": "assistant", "content": ""}, None, None),
                self._chunk(0, {"content": text}, None, None),
                self._chunk(0, {}, CONTENT_FILTER, details),
                DONE,
            ]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": CONTENT_FILTER,
        }
        body: dict[str, Any] = {
            **self._envelope,
            "object": self.object,
            "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        self.annotate(body, details)
        return body

    def error_event(self, exc: ProxyError) -> bytes:
        # The stream has started: the error goes in-band, then [DONE].
        return encode_event(event_json(exc.body())) + DONE


class CompletionWire(ChatWire):
    """Legacy completions: one string prompt, read as a user turn; each choice's ``text`` is its content."""

    route = "/v1/completions"
    chunk_object = "text_completion"
    object = "text_completion"
    id_prefix = "cmpl"
    conversation_param = "prompt"

    def conversation(self) -> Conversation:
        prompt = self.body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            # Batches of prompts and token-id prompts would need one guard verdict each: not supported.
            raise bad_request("prompt must be a string (or a list of one string)", param="prompt")
        return Conversation([{"role": "user", "content": prompt}])

    def prompt_text(self) -> str:
        return str(self.conversation().messages[0]["content"])

    def _delta_of(self, c: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"content": c.get("text") or ""}

    def read_whole(self, raw: bytes) -> list[Event]:
        out: list[Event] = []
        for c in self._choices(raw):
            out += self._delta(_index(c), {"content": c.get("text") or ""})
            out.append(Finish(_index(c), c.get("finish_reason")))
        return out

    def _choice(self, index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}

    def _render(self, output: int, out: Out, details: Details) -> bytes:
        if out.kind == "marker":
            return b""  # a role delta has no place in a completion chunk
        return super()._render(output, out, details)

    def _whole_choice(self, original: Mapping[str, Any], outputs: Outputs) -> dict[str, Any]:
        m = outputs.answer(_index(original))
        text = m.shown(CONTENT, 0, len(original.get("text") or ""))
        finish = original.get("finish_reason")
        if m.cut:
            finish = CONTENT_FILTER
            text += self.policy.notice
        return {**original, "text": text, "finish_reason": finish}

    def blocked(self, verdict: Verdict, details: Details) -> list[bytes] | dict[str, Any]:
        text = self.policy.refusal
        if self.streaming:
            return [
                self._chunk(0, {"content": text}, None, None),
                self._chunk(0, {}, CONTENT_FILTER, details),
                DONE,
            ]
        body: dict[str, Any] = {
            **self._envelope,
            "object": self.object,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": CONTENT_FILTER}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        self.annotate(body, details)
        return body


def _index(c: Mapping[str, Any]) -> int:
    try:
        return int(c.get("index", 0))
    except (TypeError, ValueError):
        raise bad_upstream("upstream sent a choice without a valid index") from None
