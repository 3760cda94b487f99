"""Conversation -> guard token ids, following the Qwen3 chat template (thinking off), built structurally.

Each turn is a list of segments: markup ids (``<|im_start|>``, ``<think>``...) and text. Adjacent text is
joined and encoded as plain text, exactly as the tokenizer's own template would encode the text between
two markup tokens, so ordinary conversations get the same ids as ``apply_chat_template``. Unlike the
Jinja template, a message containing the string ``<|im_end|>`` stays ordinary characters.

Tool definitions (the request's ``tools``) go into the system turn, as the template renders them: the
system prompt, then the ``# Tools`` block with one JSON line per tool.

Where the verdicts are read: the prompt verdict is the query heads at the ``<|im_end|>`` closing the last
user-side turn (a user message, or a group of tool results, which the template renders as a user turn).
The answer is laid out and judged by ``stream.guardview.AssistantView``.

Context overflow (the guard has ``max_position_embeddings`` positions, 8192 for the released models):
``render_prompt(max_tokens=N)`` makes a main prompt that fits by dropping whole turns from the oldest on
(system included); the last user-side turn and the turns after it are never dropped. If they alone do
not fit, the last user-side turn keeps its header and the END of its content (the newest text), cut at a
token. Nothing is left unjudged: what the main prompt leaves out goes into ``windows``, each at most N
ids, in order: the dropped turns packed greedily, whole, into windows (each turn's ids exactly as in the
full rendering, so the same leading turns always give the same first window: the engine's prefix cache
reuses it), a turn longer than N split into pieces framed as a turn of its own (its opening, a slice of
its body, ``<|im_end|>\n``), then the cut-off head of the last user-side turn, framed the same way. The
caller judges the main prompt and every window and applies the worst verdict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardproxy.guard.tokenizer import (
    IM_END,
    IM_START,
    THINK,
    THINK_END,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_RESPONSE,
    TOOL_RESPONSE_END,
    GuardTokenizer,
)

Segment = str | int  # text, or a markup id


class ConversationError(ValueError):
    """The messages cannot be rendered; the message names the offending field (``messages[2].content``),
    ``param`` the request's top-level parameter it is in."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


# The template's words around tool definitions (Qwen3's chat template, thinking or not).
_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
)
_TOOLS_CALL = "For each function call, return a json object with function name and arguments within "

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TOOL_ROLES = {"tool", "function"}


def _text_of(content: Any, where: str) -> str:
    """OpenAI content (string, null, or a list of parts) flattened to the text the guard reads."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConversationError(f"{where} must be a string, null or a list of content parts")
    texts = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise ConversationError(f"{where}[{i}] must be an object")
        kind = part.get("type")
        if kind == "text" or (kind is None and "text" in part):
            value = part.get("text")
        elif kind == "refusal":
            value = part.get("refusal")
        else:
            # Images, audio, files: nothing the text guard can read.
            continue
        if not isinstance(value, str):
            raise ConversationError(f"{where}[{i}].{kind or 'text'} must be a string")
        texts.append(value)
    # Parts are separate blocks of text; a newline keeps words of adjacent parts from fusing.
    return "\n".join(texts)


def _tool_call_json(call: Any, where: str) -> tuple[str, str]:
    if not isinstance(call, Mapping):
        raise ConversationError(f"{where} must be an object")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping):
        raise ConversationError(f"{where}.function must be an object")
    name = fn.get("name", "")
    args = fn.get("arguments", "")
    if not isinstance(name, str):
        raise ConversationError(f"{where}.function.name must be a string")
    if not isinstance(args, str):
        # The Jinja template's ``tojson``: non-ASCII kept, default separators.
        args = json.dumps(args, ensure_ascii=False)
    return name, args


@dataclass(frozen=True, slots=True)
class _Turn:
    segments: list[Segment]
    user_side: bool  # rendered as a user turn: its <|im_end|> can carry the prompt verdict
    role: str  # the header after <|im_start|>: system, user (tool results too) or assistant


@dataclass(frozen=True, slots=True)
class PromptWindow:
    """Part of a conversation the main prompt left out (see the module's "Context overflow"), judged on
    its own: ``ids`` are whole turns or a piece of one, ending ``<|im_end|>\\n``; ``verdict_index`` is the
    position of that last ``<|im_end|>``, where the guard's query heads are read."""

    ids: list[int]
    verdict_index: int


@dataclass(frozen=True, slots=True)
class GuardPrompt:
    """A conversation rendered for the guard.

    ``ids`` ends with the last turn's ``<|im_end|>\\n``; ``verdict_index`` is the position whose query
    heads give the prompt verdict; ``anchor_start`` is where the last user-side turn begins (what is kept
    if a long response must be re-judged on a window). ``dropped_turns`` whole turns and the first
    ``truncated_tokens`` body ids of the last user-side turn are not in ``ids``: they are in ``windows``
    (empty when the conversation fits), which must be judged too.
    """

    ids: list[int]
    verdict_index: int
    anchor_start: int
    dropped_turns: int = 0
    truncated_tokens: int = 0
    windows: tuple[PromptWindow, ...] = ()

    @property
    def windowed(self) -> bool:
        """Whether the conversation overflowed: ``windows`` hold what ``ids`` left out."""
        return bool(self.windows)

    @property
    def judged_tokens(self) -> int:
        """Ids fed to the guard for the prompt: the main prompt and every window."""
        return len(self.ids) + sum(len(w.ids) for w in self.windows)


class ChatTemplate:
    def __init__(self, tokenizer: GuardTokenizer) -> None:
        self.tok = tokenizer
        t = tokenizer.id
        self.im_start, self.im_end = t(IM_START), t(IM_END)
        self.think, self.think_end = t(THINK), t(THINK_END)
        self.tool_call, self.tool_call_end = t(TOOL_CALL), t(TOOL_CALL_END)
        self.tool_response, self.tool_response_end = t(TOOL_RESPONSE), t(TOOL_RESPONSE_END)
        self._openings: dict[str, list[int]] = {}

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        """Markup ids as they are; each maximal run of text encoded as plain text."""
        ids: list[int] = []
        run: list[str] = []
        for seg in segments:
            if isinstance(seg, str):
                run.append(seg)
                continue
            if run:
                ids += self.tok.encode_text("".join(run))
                run = []
            ids.append(seg)
        if run:
            ids += self.tok.encode_text("".join(run))
        return ids

    # -- turns -------------------------------------------------------------------------------------

    def _tools_turn(self, tools: Any, system: str | None) -> _Turn:
        """The system turn that carries tool definitions (and the system prompt, when there is one)."""
        if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
            raise ConversationError("tools must be a list of tool objects", param="tools")
        listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        head = f"system\n{system}\n\n" if system is not None else "system\n"
        return _Turn(
            [
                self.im_start,
                f"{head}{_TOOLS_INTRO}<tools>{listed}\n</tools>\n\n{_TOOLS_CALL}",
                self.tool_call,
                self.tool_call_end,
                " XML tags:\n",
                self.tool_call,
                '\n{"name": <function-name>, "arguments": <args-json-object>}\n',
                self.tool_call_end,
                self.im_end,
                "\n",
            ],
            False,
            "system",
        )

    def _turns(self, messages: Sequence[Any], tools: Any = None) -> list[_Turn]:
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise ConversationError("messages must be a list of message objects")
        if not messages:
            raise ConversationError("messages must not be empty")
        parsed: list[tuple[str, Mapping[str, Any], str]] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise ConversationError(f"messages[{i}] must be an object")
            role = msg.get("role")
            if role not in _ROLES and role not in _TOOL_ROLES:
                raise ConversationError(
                    f"messages[{i}].role must be one of system, developer, user, assistant, tool;"
                    f" got {role!r}"
                )
            kind = "tool" if role in _TOOL_ROLES else _ROLES[role]
            parsed.append((kind, msg, _text_of(msg.get("content"), f"messages[{i}].content")))

        # The template's notion of the last real query: tool results wrapped by hand do not count.
        last_query = len(parsed) - 1
        for i in range(len(parsed) - 1, -1, -1):
            kind, _, text = parsed[i]
            if kind == "user" and not (
                text.startswith("<tool_response>") and text.endswith("</tool_response>")
            ):
                last_query = i
                break

        turns: list[_Turn] = []
        skip_first_system = False
        if tools:  # an empty list renders no tools block, as the template's `if tools` does
            skip_first_system = parsed[0][0] == "system"
            turns.append(self._tools_turn(tools, parsed[0][2] if skip_first_system else None))
        elif tools is not None and not isinstance(tools, list):
            raise ConversationError("tools must be a list of tool objects", param="tools")
        for i, (kind, msg, text) in enumerate(parsed):
            if i == 0 and skip_first_system:
                continue
            if kind in ("system", "user"):
                turns.append(
                    _Turn([self.im_start, f"{kind}\n{text}", self.im_end, "\n"], kind == "user", kind)
                )
            elif kind == "assistant":
                last = i == len(parsed) - 1
                turns.append(_Turn(self._assistant(msg, text, i, i > last_query, last), False, "assistant"))
            else:  # tool results: consecutive ones share one user turn
                body: list[Segment] = ["\n", self.tool_response, f"\n{text}\n", self.tool_response_end]
                if i > 0 and parsed[i - 1][0] == "tool":
                    prev = turns[-1].segments
                    prev[-2:-2] = body  # before the closing <|im_end|>, "\n"
                else:
                    turns.append(_Turn([self.im_start, "user", *body, self.im_end, "\n"], True, "user"))
        return turns

    def _assistant(
        self, msg: Mapping[str, Any], content: str, i: int, after_query: bool, last: bool
    ) -> list[Segment]:
        reasoning = msg.get("reasoning_content", msg.get("reasoning"))
        if reasoning is not None and not isinstance(reasoning, str):
            raise ConversationError(f"messages[{i}].reasoning_content must be a string")
        if reasoning is None and "</think>" in content:
            head, _, tail = content.partition("</think>")
            reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = tail.lstrip("\n")
        reasoning = reasoning or ""
        segs: list[Segment] = [self.im_start]
        if after_query and (last or reasoning):
            segs += ["assistant\n", self.think, "\n" + reasoning.strip("\n") + "\n", self.think_end]
            segs.append("\n\n" + content.lstrip("\n"))
        else:
            segs.append("assistant\n" + content)
        calls = list(msg.get("tool_calls") or [])
        if msg.get("function_call") is not None:
            calls.append({"function": msg["function_call"]})
        for j, call in enumerate(calls):
            name, args = _tool_call_json(call, f"messages[{i}].tool_calls[{j}]")
            if j > 0 or content:
                segs.append("\n")
            segs += [self.tool_call, f'\n{{"name": "{name}", "arguments": {args}}}\n', self.tool_call_end]
        return [*segs, self.im_end, "\n"]

    # -- prompt --------------------------------------------------------------------------------------

    def _opening(self, role: str) -> list[int]:
        """``<|im_start|>`` and the role header as the template renders them (``user\\n``...)."""
        ids = self._openings.get(role)
        if ids is None:
            ids = self._openings[role] = self.encode([self.im_start, f"{role}\n"])
        return ids

    @staticmethod
    def _body_start(turn: list[int], opening: list[int]) -> int:
        """Where the turn's body begins: after its opening, or after as much of it as the turn's ids share
        (content that starts with a newline fuses with the header's: ``user\\n\\nx`` is user, \\n\\n, x)."""
        k, end = 0, min(len(opening), len(turn) - 2)
        while k < end and turn[k] == opening[k]:
            k += 1
        return k

    def _pieces(
        self, turn: list[int], opening: list[int], start: int, stop: int, max_tokens: int
    ) -> list[PromptWindow]:
        """The body ids ``turn[start:stop]`` as windows framed as turns: the opening, a slice, the closing
        ``<|im_end|>\\n``. The first piece opens with the turn's own ids (``turn[:start]``, a prefix of the
        full rendering). Slices are cut at a token, which may split a character's bytes: the guard reads
        the bytes either side in two windows."""
        room = max_tokens - len(opening) - 2
        if room < 1:
            raise ValueError(f"max_tokens ({max_tokens}) leaves no room for a turn's text")
        close = turn[-2:]
        out = []
        for a in range(start, stop, room):
            ids = [*(turn[:start] if a == start else opening), *turn[a : min(a + room, stop)], *close]
            out.append(PromptWindow(ids, len(ids) - 2))
        return out

    def _windows(
        self, turns: list[_Turn], encoded: list[list[int]], count: int, max_tokens: int
    ) -> list[PromptWindow]:
        """The first ``count`` turns, packed greedily into windows of whole turns (each turn's ids as in
        the full rendering, so windows only ever grow at the end as a conversation does: earlier ones stay
        identical, prefix-cache friendly); a turn longer than ``max_tokens`` is split into pieces."""
        out: list[PromptWindow] = []
        group: list[int] = []
        for k in range(count):
            e = encoded[k]
            if group and len(group) + len(e) > max_tokens:
                out.append(PromptWindow(group, len(group) - 2))
                group = []
            if len(e) <= max_tokens:
                group += e
                continue
            opening = self._opening(turns[k].role)
            out += self._pieces(e, opening, self._body_start(e, opening), len(e) - 2, max_tokens)
        if group:
            out.append(PromptWindow(group, len(group) - 2))
        return out

    def render_prompt(
        self, messages: Sequence[Any], *, tools: Any = None, max_tokens: int | None = None
    ) -> GuardPrompt:
        turns = self._turns(messages, tools)
        verdict_turn = max((k for k, t in enumerate(turns) if t.user_side), default=None)
        if verdict_turn is None:
            raise ConversationError("messages must contain a user or tool message to judge")
        encoded = [self.encode(t.segments) for t in turns]  # once per turn: windows slice these
        first, cut = 0, 0
        windows: list[PromptWindow] = []
        if max_tokens is not None:
            total = sum(len(e) for e in encoded)
            while total > max_tokens and first < verdict_turn:
                total -= len(encoded[first])
                first += 1
            windows = self._windows(turns, encoded, first, max_tokens)
            if total > max_tokens:
                whole = encoded[verdict_turn]
                head = self._opening("user")
                start = self._body_start(whole, head)
                body = whole[start:-2]
                # The main prompt keeps ``head`` + the end of the body: as many body ids go as it exceeds.
                cut = total - max_tokens + len(head) - start
                if cut > len(body):
                    raise ConversationError(
                        f"the messages after the last user turn alone exceed the guard context ({max_tokens})"
                    )
                windows += self._pieces(whole, head, start, start + cut, max_tokens)
                encoded[verdict_turn] = head + body[cut:] + whole[-2:]
        ids: list[int] = []
        anchor = 0
        for k in range(first, len(encoded)):
            if k == verdict_turn:
                anchor = len(ids)
                verdict_index = anchor + len(encoded[k]) - 2  # the <|im_end|> before the final "\n"
            ids += encoded[k]
        assert ids[verdict_index] == self.im_end
        return GuardPrompt(
            ids=ids,
            verdict_index=verdict_index,
            anchor_start=anchor,
            dropped_turns=first,
            truncated_tokens=cut,
            windows=tuple(windows),
        )
