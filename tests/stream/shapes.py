"""Chat-completion SSE streams in the shapes real servers send, for decoder and proxy tests."""

from __future__ import annotations

import json
from typing import Any


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "chatcmpl-abc123",
        "object": "chat.completion.chunk",
        "created": 1763800000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    base.update(extra)
    return base


def openai_stream(pieces: list[str]) -> list[dict[str, Any]]:
    out = [_chunk({"role": "assistant", "content": "", "refusal": None}, system_fingerprint="fp_1")]
    out += [_chunk({"content": p}, system_fingerprint="fp_1") for p in pieces]
    out.append(_chunk({}, "stop", system_fingerprint="fp_1"))
    usage = {"prompt_tokens": 9, "completion_tokens": len(pieces), "total_tokens": 9 + len(pieces)}
    out.append({**_chunk({}), "choices": [], "usage": usage})
    return out


def llamacpp_stream(pieces: list[str]) -> list[dict[str, Any]]:
    # llama.cpp's server opens with "content": null in the first delta.
    out = [_chunk({"role": "assistant", "content": None})]
    out += [_chunk({"content": p}) for p in pieces]
    out.append(_chunk({}, "stop"))
    return out


def vllm_reasoning_stream(reasoning: list[str], pieces: list[str]) -> list[dict[str, Any]]:
    out = [_chunk({"role": "assistant", "content": ""})]
    out += [_chunk({"reasoning_content": r}) for r in reasoning]
    out += [_chunk({"content": p}) for p in pieces]
    out.append(_chunk({}, "stop", stop_reason=None))
    return out


def render(chunks: list[dict[str, Any]], style: str = "lf") -> bytes:
    """Serialize as a server would: ``lf`` (OpenAI, vLLM), ``crlf``, ``keepalive`` (comments between
    events, as SGLang/proxies send), ``multiline`` (JSON split over several data lines)."""
    eol = "\r\n" if style == "crlf" else "\n"
    parts: list[str] = []
    if style == "keepalive":
        parts.append(": ping" + eol + eol)
    for c in chunks:
        body = json.dumps(c, ensure_ascii=False)
        if style == "multiline":
            body = json.dumps(c, ensure_ascii=False, indent=1)
        lines = body.split("\n")
        parts.append("".join(f"data: {line}{eol}" for line in lines) + eol)
        if style == "keepalive":
            parts.append(":" + eol + eol)
    parts.append("data: [DONE]" + eol + eol)
    return "".join(parts).encode()
