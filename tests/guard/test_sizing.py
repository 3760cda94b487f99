"""GPU sizing (``guard.kv_memory_fraction``): the arithmetic alone (the runner measures free memory and
allocates only on a GPU, which bench/device.sh exercises), and that on a CPU nothing changes."""

from __future__ import annotations

import pytest

from guardproxy.config import ConfigError, load_settings
from guardproxy.guard.engine import max_pages
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.model import Qwen3GuardStream
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.sizing import GPU_BATCH_TOKENS, device_limits, pool_pages

GIB = 1 << 30
POSITION_06B_BF16 = 2 * 28 * 8 * 128 * 2  # K and V, 28 layers, 8 KV heads of 128, 2 bytes: 112 KiB


def test_the_pool_is_a_share_of_free_memory_in_whole_pages() -> None:
    assert POSITION_06B_BF16 == 112 * 1024
    pages = pool_pages(60 * GIB, 0.25, POSITION_06B_BF16)
    assert pages == 15 * GIB // (POSITION_06B_BF16 * 16) == 8777
    assert pool_pages(60 * GIB, 1.0, POSITION_06B_BF16) == 35108  # 35108.57: rounded down, never up
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="kv_memory_fraction must be in"):
            pool_pages(GIB, bad, POSITION_06B_BF16)


def test_limits_follow_the_pool_and_a_step_takes_every_live_stream() -> None:
    limits = EngineLimits()  # CPU-sized: 64 streams and 2048 tokens a step, 65536 cached positions
    sized = device_limits(limits, 8777)
    assert sized.max_cached_tokens == (8777 - limits.max_streams) * 16
    assert max_pages(sized) == 8777  # the engine's page ids never pass what the pool took
    assert sized.max_batch_streams == limits.max_streams == 256
    assert sized.max_batch_tokens == GPU_BATCH_TOKENS
    assert (sized.max_streams, sized.response_reserve, sized.prefill_chunk) == (256, 512, 512)
    with pytest.raises(ValueError, match="hold too little for 256 streams"):
        device_limits(limits, 256 + 63)  # 63 pages: less than two response reserves


def test_on_a_cpu_the_fraction_changes_nothing(random_model: Qwen3GuardStream) -> None:
    runner = ModelRunner(random_model, max_pages=40, kv_memory_fraction=0.5)
    assert runner.kv_pages is None and runner.pool_positions == 0 and runner.max_pages == 40
    assert runner.position_bytes == 2 * 2 * 2 * 16 * 4  # tiny: 2 layers, 2 KV heads of 16, fp32


def test_the_configuration_checks_the_fraction() -> None:
    assert load_settings({"guard": {"kv_memory_fraction": 0.3}}).guard.kv_memory_fraction == 0.3
    assert load_settings({}).guard.kv_memory_fraction is None
    with pytest.raises(ConfigError, match=r"kv_memory_fraction must be in \(0, 1\]"):
        load_settings({"guard": {"kv_memory_fraction": 2}})
