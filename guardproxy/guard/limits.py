"""The guard engine's limits (``guard.engine`` in the configuration): one frozen value, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from guardproxy.guard.pages import PAGE_SIZE


@dataclass(frozen=True)
class EngineLimits:
    max_streams: int = 256
    max_cached_tokens: int = 65536
    max_batch_tokens: int = 2048
    max_batch_streams: int = 64
    prefill_chunk: int = 512
    max_positions: int = 8192
    response_reserve: int = 512
    anchor_tokens: int = 2048
    window_tokens: int = 2048
    max_queue: int = 1024
    queue_timeout_s: float = 30.0
    memory_wait_s: float = 10.0  # a stream that waits longer than this for KV memory fails
    prefix_cache: bool = True  # streams share the KV pages of a common prompt prefix
    prefix_cache_tokens: int = 65536  # positions of cached pages kept while no stream uses them

    def __post_init__(self) -> None:
        for name in (
            "max_streams",
            "max_batch_tokens",
            "max_batch_streams",
            "prefill_chunk",
            "response_reserve",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be >= 1")
        if self.max_queue < 0:
            raise ValueError("engine.max_queue must be >= 0")
        if self.anchor_tokens + self.response_reserve > self.max_positions // 2:
            raise ValueError("engine.anchor_tokens + engine.response_reserve must be <= max_positions / 2")
        if self.max_cached_tokens < self.response_reserve * 2:
            raise ValueError("engine.max_cached_tokens must hold at least two response reserves")

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.max_positions, self.max_cached_tokens) - self.response_reserve


def round_up(n: int, to: int = PAGE_SIZE) -> int:
    """Reservations are whole pages."""
    return -(-n // to) * to
