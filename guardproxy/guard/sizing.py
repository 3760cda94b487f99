"""Sizing the engine for the device it runs on (``guard.kv_memory_fraction``).

On a GPU the KV pool is taken up front, as a share of the memory left free once the weights are
loaded (beside an LLM server that already holds most of the card, that share of what it left), and
the engine's limits follow from what it holds: ``max_cached_tokens`` is what the pool holds, and a
step may carry every live stream, since a GPU step reads the weights once whatever the number of
streams (64 streams were a CPU-sized budget). Pure arithmetic here, so it is tested without a GPU;
the runner measures the free memory and allocates.
"""

from __future__ import annotations

from dataclasses import replace

from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.pages import PAGE_SIZE

# A step's token budget on a GPU: 64 streams x 4 new tokens with room for prefill chunks beside them.
GPU_BATCH_TOKENS = 8192


def pool_pages(free_bytes: int, fraction: float, position_bytes: int) -> int:
    """Pages of ``PAGE_SIZE`` positions (``position_bytes`` each, every layer's K and V) that fit in
    ``fraction`` of ``free_bytes``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"kv_memory_fraction must be in (0, 1], got {fraction}")
    return int(free_bytes * fraction) // (position_bytes * PAGE_SIZE)


def device_limits(limits: EngineLimits, pages: int) -> EngineLimits:
    """``limits`` for a KV pool of ``pages`` pages taken up front: the positions it holds (less the
    part-empty last page each live stream may have, as ``engine.max_pages`` counts them) and every
    live stream allowed in one step."""
    cached = (pages - limits.max_streams) * PAGE_SIZE
    if cached < 2 * limits.response_reserve:
        raise ValueError(
            f"the KV pool's {pages} pages hold too little for {limits.max_streams} streams: raise "
            "guard.kv_memory_fraction, free device memory, or lower engine.max_streams"
        )
    return replace(
        limits,
        max_cached_tokens=cached,
        max_batch_streams=limits.max_streams,
        max_batch_tokens=max(limits.max_batch_tokens, GPU_BATCH_TOKENS),
    )
