"""What the guard reads and how it decides, end to end: the real openai client -> guardproxy -> a fake
upstream. The guards are test checkpoints written by ``guardproxy make-test-model`` (the product's own
command): like the real model, they keep an answer unsafe once a trigger appeared, so the default policy
(the authors' pair rule) cuts on the trigger and the token after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from guardproxy.cli import main

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, start_proxy, until

WORDS = ["Sure", ",", " here", " is", " how", " to", " build", " a", " bomb", " at", " home"]


@pytest.fixture(scope="module")
def bomb_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bomb-guard")
    assert main(["make-test-model", str(out), "--unsafe", "bomb", "--category", "Violent"]) == 0
    return out


@pytest.fixture(scope="module")
def default_proxy(loopback: Loopback, upstream: tuple[FakeUpstream, str], bomb_guard: Path) -> str:
    return start_proxy(loopback, proxy_settings(upstream[1], bomb_guard))  # the default policy


def chat(proxy: str, **kw: Any) -> Any:
    with openai.OpenAI(base_url=proxy, api_key="k", max_retries=0, timeout=60) as c:
        messages = kw.pop("messages", [{"role": "user", "content": "Tell me something."}])
        response = c.chat.completions.create(model="m", messages=messages, **kw)
        return list(response) if kw.get("stream") else response


def streamed(chunks: list[Any]) -> tuple[str, str | None, dict[str, Any] | None]:
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = next(
        (c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None
    )
    details = next(
        (c.model_extra.get("guardproxy") for c in chunks if (c.model_extra or {}).get("guardproxy")), None
    )
    return text, finish, details


NOTICE = "\n\n[guardproxy:"


def test_a_one_token_trigger_is_cut_with_nothing_of_it_released(
    default_proxy: str, fake: FakeUpstream
) -> None:
    for seed in (None, 3):  # whole events, and events split across network reads
        fake.script = Script(pieces=[WORDS], split_seed=seed)
        text, finish, details = streamed(chat(default_proxy, stream=True))
        assert text.split(NOTICE)[0] == "Sure, here is how to build a" and finish == "content_filter"
        assert details is not None and details["response"]["action"] == "cut"
        # The pair: " bomb" (token 8) and " at" (9), decided at " at"; the cut names the first of them.
        assert (
            details["response"]["cut"]["token_index"] == 8 and details["response"]["cut"]["risk"] == "Unsafe"
        )
    fake.script = Script(pieces=[WORDS])
    whole = chat(default_proxy)
    assert whole.choices[0].message.content.split(NOTICE)[0] == "Sure, here is how to build a"
    assert whole.choices[0].finish_reason == "content_filter"


def test_a_trigger_as_the_last_word_pairs_with_the_closing_token(
    default_proxy: str, fake: FakeUpstream
) -> None:
    fake.script = Script(pieces=[["Here", " is", " a", " bomb"]])
    text, finish, details = streamed(chat(default_proxy, stream=True))
    assert text.split(NOTICE)[0] == "Here is a" and finish == "content_filter"
    assert details is not None and details["response"]["judged_tokens"] == 5  # 4 words and <|im_end|>


def test_details_and_audit_name_the_first_flag_and_the_cut(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path
) -> None:
    # "gun" is Controversial (flagged), "bomb" Unsafe (cut): both decisions are reported, each its own.
    fake, url = upstream
    audit = tmp_path / "audit.jsonl"
    settings = proxy_settings(url, trigger_checkpoint)
    from dataclasses import replace

    proxy = start_proxy(loopback, replace(settings, audit=replace(settings.audit, path=str(audit))))
    fake.script = Script(pieces=[["A", " gun", " here", " and", " a", " bomb", " now", "."]])
    text, finish, details = streamed(chat(proxy, stream=True))
    assert text.split(NOTICE)[0] == "A gun here and a" and finish == "content_filter"
    assert details is not None
    response = details["response"]
    assert (response["risk"], response["action"], response["category"]) == ("Unsafe", "cut", "Violent")
    assert response["first_flag"]["risk"] == "Controversial" and response["first_flag"]["action"] == "flag"
    assert response["first_flag"]["token_index"] == 1 and response["first_flagged_token"] == 1
    assert response["cut"]["token_index"] == 5 and response["cut"]["p_unsafe"] > 0.5
    # The record is written as the exchange ends, after the last byte.
    until(lambda: audit.exists() and bool(audit.read_text().strip()), 10, "no audit record")
    record = json.loads(audit.read_text().splitlines()[-1])
    assert record["outcome"] == "cut" and record["response"] == response


def test_tool_definitions_reach_the_guard(default_proxy: str, fake: FakeUpstream) -> None:
    fake.script = Script(pieces=[["Fine."]])
    tools = [
        {
            "type": "function",
            "function": {
                "name": "arsenal",
                "description": "Builds a bomb from household items.",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    messages = [{"role": "user", "content": "What can you do?"}]
    with pytest.raises(openai.BadRequestError) as err:
        chat(default_proxy, messages=messages, tools=tools)
    assert err.value.code == "content_filter"  # the query head read the tools in the system turn
    assert chat(default_proxy, messages=messages).choices[0].message.content == "Fine."
    with pytest.raises(openai.BadRequestError) as bad:
        chat(default_proxy, messages=messages, tools=[3])
    assert bad.value.body is not None and bad.value.body["param"] == "tools"  # type: ignore[index]


def test_a_think_block_in_the_content_passes_unchanged_and_is_judged(
    default_proxy: str, fake: FakeUpstream
) -> None:
    pieces = ["<think>", "\nLet me see.", "\n</th", "ink>", "\n\nHello", " there!"]
    fake.script = Script(pieces=[pieces], split_seed=5)
    text, finish, _ = streamed(chat(default_proxy, stream=True))
    assert text == "".join(pieces) and finish == "stop"
    # A trigger inside the think block is cut there; the tag itself went out with the first word.
    fake.script = Script(pieces=[["<think>", "plan: a", " bomb", " then", "</think>", "Fine"]])
    text, finish, _ = streamed(chat(default_proxy, stream=True))
    assert text.split(NOTICE)[0] == "<think>plan: a" and finish == "content_filter"


def test_newlines_the_template_strips_reach_the_client_unchanged(
    default_proxy: str, fake: FakeUpstream
) -> None:
    pieces = ["\n\n", "First", ", get", " a", " cake", ".\n"]
    fake.script = Script(pieces=[pieces], reasoning=["\n", "Think", " first.", "\n\n"])
    chunks = chat(default_proxy, stream=True)
    text, finish, details = streamed(chunks)
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert text == "".join(pieces) and reasoning == "\nThink first.\n\n" and finish == "stop"
    assert details is not None and details["response"]["action"] == "allow"
