"""A prompt's verdict, whatever its length: the main prompt's, or for a conversation longer than the
guard's context (``GuardPrompt.windows``: agent clients send 20-30k tokens of system prompt and tools),
the worst of the main prompt's and every window's, each window judged in a stream of its own,
alongside. The engine's prefix cache keeps a window that repeats (an agent's fixed system prompt and
tools), so it costs no prefill the next time."""

from __future__ import annotations

import asyncio
from typing import Any

from guardproxy.guard.api import Engine, Stream
from guardproxy.guard.template import GuardPrompt, PromptWindow
from guardproxy.guard.verdict import Verdict
from guardproxy.observe.metrics import Metrics
from guardproxy.policy import Action, Policy


async def judge_prompt(
    engine: Engine, main: Stream, prompt: GuardPrompt, policy: Policy, metrics: Metrics | None = None
) -> tuple[Verdict, dict[str, Any] | None]:
    """The verdict of ``prompt`` (``main`` is its stream) and, when it was windowed, what details say of
    the windows (how many, the tokens judged, which one was the worst)."""
    if not prompt.windows:
        return await main.prompt_verdict(), None
    if metrics is not None:
        metrics.prompt_windows.labels("prompt").inc()
        metrics.prompt_windows.labels("window").inc(len(prompt.windows))
    verdicts = await asyncio.gather(
        main.prompt_verdict(), *(_window_verdict(engine, w) for w in prompt.windows)
    )
    worst = max(range(len(verdicts)), key=lambda k: _severity(policy, verdicts[k]))
    report = {
        "windows": len(prompt.windows),
        "judged_tokens": prompt.judged_tokens,
        "worst": "main" if worst == 0 else worst - 1,
    }
    return verdicts[worst], report


async def _window_verdict(engine: Engine, window: PromptWindow) -> Verdict:
    async with await engine.open(window.ids, window.verdict_index) as stream:
        return await stream.prompt_verdict()


def _severity(policy: Policy, v: Verdict) -> tuple[Action, float, float]:
    """How bad a prompt verdict is under ``policy``: its action first, then its probabilities."""
    return policy.action(v, prompt=True), v.p_unsafe, v.p_controversial
