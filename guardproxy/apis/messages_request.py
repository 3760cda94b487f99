"""The Anthropic Messages API's requests, read into the conversation the guard reads (chat messages and
tool definitions, what ``ChatTemplate`` renders), for ``MessagesWire``.

``system`` (a string or text blocks) is the system turn, and so is a ``role: "system"`` entry among the
messages (the ``mid-conversation-system`` beta) where it stands. Blocks: ``text``, ``document`` and
``search_result`` as text; ``tool_use``, ``server_tool_use`` and ``mcp_tool_use`` as the assistant's
tool calls; every ``*tool_result`` as a tool turn, after what came before it; ``thinking`` as the
turn's reasoning; ``image``, ``redacted_thinking`` and ``container_upload`` carry no text; any other
block is read for the text it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardproxy.apis.wire import carried_text, dumps, joined_text, tool_list
from guardproxy.guard.template import ConversationError


def _text_blocks(value: Any, where: str) -> str:
    """The text of content given as a string or as blocks (``block_text`` of each; empty ones left out)."""
    return joined_text(value, where, "messages", "content blocks", lambda b, w: block_text(b, w) or None)


# Blocks with no text the guard can read: pictures, encrypted reasoning, file references.
NO_TEXT_BLOCKS = frozenset({"image", "redacted_thinking", "container_upload"})
# Blocks that are tool calls the model made (its input is the arguments) and their results.
CALL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def block_text(block: Mapping[str, Any], where: str) -> str:
    """What the guard reads of one content block that is not a tool call or its result. ``text``,
    a text ``document`` (its title, context and text), a ``search_result`` (title and text blocks);
    ``image``, ``redacted_thinking`` and ``container_upload`` carry none; a block of any other kind is
    read for whatever text it holds (nothing the API adds goes unread)."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise ConversationError(f"{where}.text must be a string", param="messages")
        return text
    if kind in NO_TEXT_BLOCKS:
        return ""
    if kind == "document":
        source = block.get("source")
        parts = [block.get("title"), block.get("context")]
        if isinstance(source, Mapping) and source.get("type") == "text":
            parts.append(source.get("data"))
        elif isinstance(source, Mapping) and source.get("type") == "content":
            parts.append(_text_blocks(source.get("content") or [], f"{where}.source.content"))
        return "\n".join(p for p in parts if isinstance(p, str) and p)
    if kind == "search_result":
        parts = [block.get("title"), _text_blocks(block.get("content") or [], f"{where}.content")]
        return "\n".join(p for p in parts if isinstance(p, str) and p)
    text = carried_text({k: v for k, v in block.items() if k not in ("cache_control", "citations")})
    return "" if text is None else text if isinstance(text, str) else dumps(text)


def chat_messages(system: Any, messages: Any) -> list[dict[str, Any]]:
    """A Messages request's conversation as chat messages: what the guard's template renders.

    ``role: "system"`` entries among the messages (the ``mid-conversation-system`` beta Claude Code
    sends) are system turns where they stand, as the template renders a system message after the
    first."""
    out: list[dict[str, Any]] = []
    if system is not None:
        text = _text_blocks(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages must be a non-empty list of message objects", param="messages")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ConversationError(f"{where} must be an object", param="messages")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("user", "assistant", "system"):
            raise ConversationError(
                f"{where}.role must be user, assistant or system; got {role!r}", param="messages"
            )
        if role == "system":
            text = _text_blocks(content, f"{where}.content")
            if text:
                out.append({"role": "system", "content": text})
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ConversationError(f"{where}.content must be a string or a list of blocks", param="messages")
        out += _block_turns(role, content, where)
    return out


def _block_turns(role: str, content: list[Any], where: str) -> list[dict[str, Any]]:
    """One message's blocks as chat messages, in their order: its text, reasoning and tool calls as a
    turn of its role, and each tool result as a tool turn after what came before it (a server tool's
    call and its result share the assistant's content). An assistant message gives a turn even when it
    holds no text: the template renders one."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []

    def flush(last: bool) -> None:
        if role == "assistant" and (texts or reasoning or calls or (last and not out)):
            turn: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
            if reasoning:
                turn["reasoning_content"] = "\n".join(reasoning)
            if calls:
                turn["tool_calls"] = list(calls)
            out.append(turn)
        elif role == "user" and texts:
            out.append({"role": "user", "content": "\n".join(texts)})
        texts.clear()
        reasoning.clear()
        calls.clear()

    for k, block in enumerate(content):
        w = f"{where}.content[{k}]"
        if not isinstance(block, Mapping):
            raise ConversationError(f"{w} must be an object", param="messages")
        kind = block.get("type")
        if kind == "thinking":
            if isinstance(block.get("thinking"), str):
                reasoning.append(block["thinking"])
        elif kind in CALL_BLOCKS:
            name = block.get("name")
            if not isinstance(name, str):
                raise ConversationError(f"{w}.name must be a string", param="messages")
            args = dumps(block.get("input") or {})
            calls.append(
                {"id": block.get("id"), "type": "function", "function": {"name": name, "arguments": args}}
            )
        elif isinstance(kind, str) and kind.endswith("tool_result"):
            # A tool's result (the client's tool_result, a server or MCP tool's): a tool turn.
            flush(last=False)
            result = block.get("content")
            if result is None or isinstance(result, str | list):
                text = "" if result is None else _text_blocks(result, f"{w}.content")
            else:
                text = block_text({"type": kind, "content": result}, w)
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        else:
            text = block_text(block, w)
            if text:
                texts.append(text)
    flush(last=True)
    return out


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Anthropic's tools in the chat shape; server tools (web search...) as they are."""

    def function(t: Any) -> dict[str, Any] | None:
        if not (isinstance(t, Mapping) and "input_schema" in t):
            return None
        fn = {"name": t.get("name"), "description": t.get("description"), "parameters": t["input_schema"]}
        return {k: v for k, v in fn.items() if v is not None}

    return tool_list(tools, function)
