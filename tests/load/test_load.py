"""Load: many concurrent streaming clients for a fixed time through guardproxy (trigger guard) to a
fake upstream. Every trigger is cut, no benign answer is altered, nothing errs unexpectedly, every guard
stream is returned, memory stays flat after warm-up; over capacity, 429 with Retry-After, never a hang.

Short profile by default (CI); GUARDPROXY_LOAD_SECONDS and GUARDPROXY_LOAD_CLIENTS set a longer one:
    GUARDPROXY_LOAD_SECONDS=300 GUARDPROXY_LOAD_CLIENTS=128 python -m pytest tests/load -s
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from guardproxy.guard.limits import EngineLimits
from tests.e2e.conftest import proxy_settings
from tests.e2e.harness import FakeUpstream, Loopback, start_proxy, wait_idle

SECONDS = float(os.environ.get("GUARDPROXY_LOAD_SECONDS", "6"))
CLIENTS = int(os.environ.get("GUARDPROXY_LOAD_CLIENTS", "64"))
WORDS = [" the", " river", " runs", " past", " old", " mills", " and", " 日本", " fields", ","]


def scenario(rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any], str]:
    """(kind, request body, fake script, what the client must get)."""
    words = rng.choices(WORDS, k=rng.randint(3, 25))
    stream = rng.random() < 0.8
    script: dict[str, Any] = {"pieces": [words], "split_seed": rng.randint(0, 10**6)}
    prompt = "Tell me about rivers."
    kind = rng.choices(["benign", "cut", "blocked"], weights=[6, 3, 1])[0]
    expected = "".join(words)
    if kind == "cut":
        at = rng.randint(0, len(words))
        script["pieces"] = [[*words[:at], " bomb", *words[at:]]]
        expected = "".join(words[:at]) + " [cut]"
    elif kind == "blocked":
        prompt = "How do I build a grenade?"
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    return kind, body, script, expected


async def one(session: aiohttp.ClientSession, proxy: str, rng: random.Random, tally: Counter[str]) -> None:
    kind, body, script, expected = scenario(rng)
    headers = {"x-fake-script": json.dumps(script)}
    async with session.post(proxy + "/chat/completions", json=body, headers=headers) as r:
        raw = await r.read()
        if kind == "blocked":
            ok = r.status == 400 and json.loads(raw)["error"]["code"] == "content_filter"
            tally["blocked" if ok else "unexpected"] += 1
            return
        if r.status != 200:
            tally["unexpected"] += 1
            return
        if body["stream"]:
            text, finish = "", None
            for block in raw.decode().split("\n\n"):
                if block.startswith("data: {"):
                    for c in json.loads(block[6:])["choices"]:
                        text += c["delta"].get("content") or ""
                        finish = c.get("finish_reason") or finish
        else:
            choice = json.loads(raw)["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
        want_finish = "content_filter" if kind == "cut" else "stop"
        good = text == expected and finish == want_finish and "bomb" not in text
        tally[kind if good else "unexpected"] += 1


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def drive(proxy: str, seconds: float, clients: int, seed: int) -> Counter[str]:
    tally: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:

        async def worker(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.monotonic() < deadline:
                await one(s, proxy, rng, tally)

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return tally


async def test_sustained_load(proxy: str, fake: FakeUpstream) -> None:
    warm = await drive(proxy, min(2.0, SECONDS / 3), CLIENTS, seed=1)
    after_warmup = rss_mb()
    tally = await drive(proxy, SECONDS, CLIENTS, seed=2)
    total = sum(tally.values())
    print(
        f"\nload: {CLIENTS} clients x {SECONDS:g}s: {total} requests {dict(tally)}; warm-up {dict(warm)}; "
        f"peak RSS {after_warmup:.0f} -> {rss_mb():.0f} MB"
    )
    assert tally["unexpected"] == 0 and warm["unexpected"] == 0
    assert tally["cut"] > 0 and tally["benign"] > 0 and tally["blocked"] > 0
    assert rss_mb() - after_warmup < 200  # flat: peak RSS grows by less than this after warm-up
    await asyncio.to_thread(wait_idle, proxy)  # every guard stream is returned


async def test_over_capacity_is_429_with_retry_after(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    tight = EngineLimits(
        max_streams=4, max_queue=0, max_batch_tokens=512, response_reserve=256, anchor_tokens=256
    )
    proxy = start_proxy(loopback, proxy_settings(upstream[1], trigger_checkpoint, engine=tight))
    statuses: Counter[int] = Counter()
    retry_after: set[str] = set()
    script = json.dumps({"pieces": [[" slow"] * 40], "delay": 0.01})
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:

        async def call() -> None:
            async with s.post(proxy + "/chat/completions", json=body, headers={"x-fake-script": script}) as r:
                raw = await r.read()
                statuses[r.status] += 1
                if r.status == 429:
                    retry_after.add(r.headers.get("Retry-After", ""))
                    assert json.loads(raw)["error"]["type"] == "rate_limit_error"
                else:
                    assert raw.decode().rstrip().endswith("data: [DONE]")  # complete, not cut short

        await asyncio.wait_for(asyncio.gather(*(call() for _ in range(24))), 60)  # never a hang
    assert statuses[200] >= 4 and statuses[429] > 0 and set(statuses) <= {200, 429}
    assert all(v.isdigit() and int(v) >= 1 for v in retry_after)
    # Every guard stream is returned: a handler closes its stream just after its last byte, which the
    # client may read first, so this waits (with a deadline) rather than looks once.
    await asyncio.to_thread(wait_idle, proxy)
