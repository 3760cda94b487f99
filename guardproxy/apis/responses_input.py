"""The OpenAI Responses API's requests, read into the conversation the guard reads (chat messages and
tool definitions, what ``ChatTemplate`` renders), for ``ResponsesWire``.

``input`` as a string or items: messages (``input_text``/``output_text`` parts, refusals), the
assistant's tool calls (``function_call``, ``custom_tool_call``: Codex's ``apply_patch``, its input as
the arguments; a hosted tool's ``*_call``, what it holds of text), their outputs as tool turns,
``reasoning`` with the assistant turn after it; any other item is read for the text it holds (an item
reference holds none). ``tools`` in the chat shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardproxy.apis.wire import carried_text, dumps, joined_text, tool_list
from guardproxy.guard.template import ConversationError

# Tool calls whose input the model writes: item type -> the key of that input.
CALL_ITEMS = {"function_call": "arguments", "custom_tool_call": "input"}
# Input items read by kind (others: ``carried_text``).
_INPUT_READ = frozenset(
    {
        "message",
        "function_call",
        "custom_tool_call",
        "function_call_output",
        "custom_tool_call_output",
        "reasoning",
    }
)


def _parts_text(content: Any, where: str) -> str:
    """Text of a message's content (a string, or parts: input/output text and refusals; images,
    files and audio have no text for the guard)."""
    if content is None:
        return ""
    return joined_text(content, where, "input", "content parts", _part_text)


def _part_text(part: Mapping[str, Any], where: str) -> str | None:
    kind = part.get("type")
    if kind not in ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"):
        return None
    key = "refusal" if kind == "refusal" else "text"
    value = part.get(key)
    if not isinstance(value, str):
        raise ConversationError(f"{where}.{key} must be a string", param="input")
    return value


def input_messages(value: Any) -> list[dict[str, Any]]:
    """A Responses ``input`` as chat messages: what the guard's template renders."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ConversationError("input must be a string or a list of input items", param="input")
    out: list[dict[str, Any]] = []
    reasoning: str | None = None  # a reasoning item goes with the assistant turn after it
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise ConversationError(f"{where} must be an object", param="input")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ConversationError(
                    f"{where}.role must be user, system, developer or assistant", param="input"
                )
            msg: dict[str, Any] = {
                "role": role,
                "content": _parts_text(item.get("content"), f"{where}.content"),
            }
            if role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            out.append(msg)
        elif kind in ("function_call", "custom_tool_call") or (
            kind not in _INPUT_READ and isinstance(kind, str) and kind.endswith("_call")
        ):
            # A call the model made: a function's or a custom tool's (its input), or a hosted tool's
            # (web search, shell, computer...: what it holds of text, read as the arguments).
            if kind in CALL_ITEMS:
                name, args = item.get("name"), item.get(CALL_ITEMS[kind], "")
            else:
                text = carried_text(item)
                name, args = kind, "" if text is None else text if isinstance(text, str) else dumps(text)
            if not isinstance(name, str) or not isinstance(args, str):
                raise ConversationError(f"{where} needs a string name and arguments", param="input")
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            if out and out[-1]["role"] == "assistant" and reasoning is None:
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                msg = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning is not None:
                    msg["reasoning_content"], reasoning = reasoning, None
                out.append(msg)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            content = _parts_text(item.get("output"), f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind == "reasoning":
            texts = [
                _parts_text(item.get("summary"), f"{where}.summary"),
                _parts_text(item.get("content"), f"{where}.content"),
            ]
            reasoning = "\n".join(t for t in texts if t)
        elif kind not in _INPUT_READ:
            # A hosted tool's output, an MCP listing or approval, a kind this proxy does not know:
            # whatever text it holds is read as a tool result (an item reference holds only an id).
            text = carried_text(item)
            if text is not None:
                content = text if isinstance(text, str) else dumps(text)
                out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
    return out


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Responses tools in the chat shape (function tools nested under ``function``); built-in tools
    (web search, file search) as they are."""

    def function(t: Any) -> dict[str, Any] | None:
        if not (isinstance(t, Mapping) and t.get("type") == "function" and "function" not in t):
            return None
        return {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}

    return tool_list(tools, function)
