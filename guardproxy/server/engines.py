"""The guard engine a ``serve`` process runs, built from the settings. Imports torch: app.py imports
this only where an engine runs in-process, so a proxy worker of a shared engine never does.

- ``local_engine``: one process serving alone (with the chat template it renders prompts with);
- ``serve_engine``: the main of the engine process that several proxy workers share
  (``server/supervisor.py``): the engine without a template (the workers render), served over the link.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from guardproxy.config import Settings
from guardproxy.guard.checkpoint import load_template, resolve_checkpoint
from guardproxy.guard.engine import GuardEngine, StepExecutor, max_pages, overlap_for
from guardproxy.guard.link import parent_exit
from guardproxy.guard.loading import load_model
from guardproxy.guard.model import default_device
from guardproxy.guard.model_process import GuardWorker
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.service import EngineService
from guardproxy.guard.sizing import device_limits
from guardproxy.guard.template import ChatTemplate
from guardproxy.observe.metrics import Metrics

log = logging.getLogger(__name__)

OnStep = Callable[[int, int, float], None]


async def local_engine(settings: Settings, on_step: OnStep | None = None) -> tuple[GuardEngine, ChatTemplate]:
    g = settings.guard
    loop = asyncio.get_running_loop()
    path, template = await loop.run_in_executor(None, lambda: load_template(g.model, revision=g.revision))
    return await _engine(settings, path, on_step), template


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
                path,
                device=g.device,
                dtype=g.dtype,
                threads=g.threads,
                max_pages=max_pages(limits),
                attention=g.attention,
                quantize=g.quantize,
                kv_memory_fraction=g.kv_memory_fraction,
            )
        model = load_model(path, device=g.device, dtype=g.dtype, quantize=g.quantize)
        return ModelRunner(
            model, max_pages=max_pages(limits), attention=g.attention, kv_memory_fraction=g.kv_memory_fraction
        )

    executor = await asyncio.get_running_loop().run_in_executor(None, load)
    limits = replace(limits, max_positions=min(limits.max_positions, executor.max_positions))
    kv_pages = getattr(executor, "kv_pages", None)
    if kv_pages is not None:  # a GPU's pool, taken up front: the limits follow what it holds
        limits = device_limits(limits, kv_pages)
        log.info(
            "KV pool on the device: %d positions, up to %d streams a step",
            limits.max_cached_tokens,
            limits.max_batch_streams,
        )
    elif g.kv_memory_fraction is not None:
        log.info("guard.kv_memory_fraction applies on a GPU only: engine.max_cached_tokens is used")
    device = torch.device(g.device) if g.device else default_device()
    return GuardEngine(
        executor,
        limits,
        threads=g.threads,
        overlap=overlap_for(g.overlap, device),
        on_step=on_step,
        on_batch=on_batch,
    )


async def serve_engine(settings: Settings, path: str) -> None:
    """Load the guard, serve the proxy workers on the Unix socket ``path`` until SIGTERM (or until the
    supervisor that started this process is gone)."""
    # Ctrl+C is the supervisor's to handle: it stops the workers first, then this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    metrics = Metrics()
    service: EngineService | None = None

    def on_batch(sids: Sequence[int]) -> None:
        if service is not None:
            service.on_batch(sids)

    g = settings.guard
    checkpoint = await loop.run_in_executor(None, resolve_checkpoint, g.model, g.revision)
    engine = await _engine(settings, checkpoint, metrics.observe_step, on_batch)
    # What the workers share is replayed to one that connects later, as much as each of them keeps.
    replay = {
        "live": settings.ui.live_records if settings.ui.enabled else 0,
        "response": settings.server.response_store_entries,
    }
    service = EngineService(engine, path, metrics, replay)
    await engine.start()
    await service.start()
    log.info("guard engine ready: %s, serving proxy workers on %s", g.model, path)
    orphaned = asyncio.ensure_future(parent_exit())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([orphaned, stopped], return_when=asyncio.FIRST_COMPLETED)
        if orphaned.done():
            log.error("the supervisor is gone: stopping the guard engine")
    finally:
        orphaned.cancel()
        stopped.cancel()
        await service.stop()
        await engine.stop()
    log.info("guard engine stopped")
