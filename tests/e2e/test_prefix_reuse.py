"""Prefix caching through the proxy (the real openai client): a chat's next turn reads the earlier turns
from the guard's cache, and n > 1 choices share the prompt instead of computing it once each."""

from __future__ import annotations

from pathlib import Path

import openai

from guardproxy.guard.pages import PAGE_SIZE
from guardproxy.guard.template import ChatTemplate

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, start_proxy, wait_idle
from .test_metrics import scrape, value

SYSTEM = {"role": "system", "content": "You are a careful assistant who answers in short sentences. " * 8}


def counters(proxy: str) -> tuple[float, float]:
    m = scrape(proxy)
    return value(m, "guardproxy_engine_prefill_tokens_total"), value(
        m, "guardproxy_engine_prefix_hit_tokens_total"
    )


def test_the_next_turn_reads_the_earlier_turns_from_the_cache(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, template: ChatTemplate
) -> None:
    fake, url = upstream
    proxy = start_proxy(loopback, proxy_settings(url, trigger_checkpoint))
    turn1 = [SYSTEM, {"role": "user", "content": "What is the weather like in Paris today?"}]
    fake.script = Script(pieces=[["It", " is", " mild", " and", " sunny", "."]])
    with openai.OpenAI(base_url=proxy, api_key="k", max_retries=0) as c:
        answer = c.chat.completions.create(model="m", messages=turn1).choices[0].message.content  # type: ignore[arg-type]
        wait_idle(proxy)
        before = counters(proxy)
        turn2 = [
            *turn1,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And tomorrow?"},
        ]
        c.chat.completions.create(model="m", messages=turn2)  # type: ignore[arg-type]
    prefill, hits = (after - b for after, b in zip(counters(proxy), before, strict=True))
    # Every whole page of the first turn's prompt came from the cache (its answer is rendered without
    # the think block in the next turn, so the answer's own pages do not match).
    first_prompt = template.render_prompt(turn1).ids
    assert hits == len(first_prompt) // PAGE_SIZE * PAGE_SIZE
    second_prompt = template.render_prompt(turn2).ids
    assert (
        prefill < len(second_prompt) - hits + 64
    )  # the rest of the prompt, the answer's context, little more


def test_n_choices_share_the_prompt(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, template: ChatTemplate
) -> None:
    fake, url = upstream
    proxy = start_proxy(loopback, proxy_settings(url, trigger_checkpoint))
    messages = [SYSTEM, {"role": "user", "content": "Name three rivers."}]
    fake.script = Script(pieces=[["Seine", "."], ["Rhine", "."], ["Danube", "."]])
    before = counters(proxy)
    with openai.OpenAI(base_url=proxy, api_key="k", max_retries=0) as c:
        r = c.chat.completions.create(model="m", messages=messages, n=3)  # type: ignore[arg-type]
    assert [ch.message.content for ch in r.choices] == ["Seine.", "Rhine.", "Danube."]
    wait_idle(proxy)
    prefill, hits = (after - b for after, b in zip(counters(proxy), before, strict=True))
    prompt = len(template.render_prompt(messages).ids)
    whole = prompt // PAGE_SIZE * PAGE_SIZE
    assert hits == 2 * whole  # the second and third choices read the prompt's whole pages
    assert prefill < prompt + 3 * 32  # computed once, plus each choice's part page and answer context
