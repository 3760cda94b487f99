"""The guard engine built from the settings, in this process: what a single ``serve`` process runs
(``local_engine``, with the chat template it renders prompts with), and what the engine process of
several proxy workers runs (``shared_engine``: no template, the workers render). Imports torch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from guardproxy.config import Settings
from guardproxy.guard.checkpoint import load_template, resolve_checkpoint
from guardproxy.guard.engine import GuardEngine, StepExecutor, max_pages
from guardproxy.guard.loading import load_model
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.worker import GuardWorker

OnStep = Callable[[int, int, float], None]


async def local_engine(settings: Settings, on_step: OnStep | None = None) -> tuple[GuardEngine, ChatTemplate]:
    g = settings.guard
    loop = asyncio.get_running_loop()
    path, template = await loop.run_in_executor(None, lambda: load_template(g.model, revision=g.revision))
    return await _engine(settings, path, on_step), template


async def shared_engine(
    settings: Settings, on_step: OnStep | None = None, on_batch: Callable[[Sequence[int]], None] | None = None
) -> GuardEngine:
    g = settings.guard
    path = await asyncio.get_running_loop().run_in_executor(None, resolve_checkpoint, g.model, g.revision)
    return await _engine(settings, path, on_step, on_batch)


async def _engine(
    settings: Settings,
    path: Path,
    on_step: OnStep | None,
    on_batch: Callable[[Sequence[int]], None] | None = None,
) -> GuardEngine:
    """The model runs in the guard's own process (``guard.process``, the default) or here. Loading
    weights takes seconds to minutes: off the event loop."""
    g = settings.guard
    limits = g.engine

    def load() -> StepExecutor:
        if g.process:  # the weights load only in the guard's own process
            return GuardWorker(
                path, device=g.device, dtype=g.dtype, threads=g.threads, max_pages=max_pages(limits)
            )
        return ModelRunner(load_model(path, device=g.device, dtype=g.dtype), max_pages=max_pages(limits))

    executor = await asyncio.get_running_loop().run_in_executor(None, load)
    limits = replace(limits, max_positions=min(limits.max_positions, executor.max_positions))
    return GuardEngine(executor, limits, threads=g.threads, on_step=on_step, on_batch=on_batch)
