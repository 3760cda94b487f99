"""The guard model in its own process (``GuardWorker``), driven through the real engine: same
verdicts as in-process, and a killed process fails every live stream and is replaced."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from guardproxy.guard.checkpoint import GuardModelError
from guardproxy.guard.engine import GuardEngine
from guardproxy.guard.errors import GuardFailure
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.model import Qwen3GuardStream
from guardproxy.guard.model_process import GuardWorker
from guardproxy.guard.template import ChatTemplate

from ..conftest import scaffold

LIMITS = EngineLimits(max_batch_tokens=96, prefill_chunk=32, response_reserve=64, anchor_tokens=256)


async def judge_all(engine: GuardEngine, template: ChatTemplate, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    # Longer than a few KV pages: the prefix cache holds it after the first time.
    system = {"role": "system", "content": "You answer questions about baking, briefly and kindly. " * 4}
    prompt = template.render_prompt([system, {"role": "user", "content": "how do I bake a cake"}])
    response = [rng.randrange(151643) for _ in range(40)]
    async with await engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start) as stream:
        stream.feed_context(scaffold(template))
        out = [list((await stream.prompt_verdict()).risk_probs)]
        for i in range(0, len(response), 7):  # chunked as the proxy feeds deltas
            out += [list(v.risk_probs) for v in await stream.judge(response[i : i + 7])]
    return out


async def test_worker_process_gives_the_in_process_verdicts(
    random_checkpoint: Path, random_model: Qwen3GuardStream, template: ChatTemplate
) -> None:
    async with GuardEngine(random_model, LIMITS) as local:
        expected = [await judge_all(local, template, seed) for seed in range(3)]
    worker = GuardWorker(random_checkpoint, device="cpu")
    assert worker.labels == random_model.labels
    async with GuardEngine(worker, LIMITS) as remote:
        got = [await judge_all(remote, template, seed) for seed in range(3)]
    assert got == expected  # same code, same machine, same order of operations: bit for bit
    assert worker.pid is None  # stopping the engine ended the process


async def test_a_killed_worker_fails_live_streams_and_a_new_one_takes_over(
    random_checkpoint: Path, template: ChatTemplate
) -> None:
    worker = GuardWorker(random_checkpoint, device="cpu")
    async with GuardEngine(worker, LIMITS) as engine:
        before = await judge_all(engine, template, 0)
        prompt = template.render_prompt([{"role": "user", "content": "hi"}])
        live = await engine.open(prompt.ids, prompt.verdict_index)
        await live.prompt_verdict()
        assert worker.pid is not None
        assert engine.stats().cached_pages >= 4  # judge_all's prompt pages wait in the prefix cache
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(GuardFailure, match="guard process died"):
            await live.judge([1, 2, 3])  # its cache died with the process
        with pytest.raises(GuardFailure):
            await live.judge([4])  # and the stream stays failed
        live.close()
        assert engine.stats().cached_pages == 0  # the prefix cache went with it
        hits = engine.stats().prefix_hit_tokens
        assert await judge_all(engine, template, 0) == before  # a fresh process, the same verdicts
        assert engine.stats().prefix_hit_tokens == hits  # computed again, nothing read from the dead cache
        assert worker.starts == 2


def test_a_checkpoint_the_worker_cannot_load_is_reported(tmp_path: Path) -> None:
    with pytest.raises(GuardModelError, match="could not load the model"):
        GuardWorker(tmp_path, device="cpu")  # an empty directory: no config.json
