from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from guardproxy.cli import main
from guardproxy.config import GuardSettings, Settings, UpstreamSettings
from guardproxy.guard.limits import EngineLimits

from ..conftest import TRIGGER_CATEGORY, TRIGGER_CONTROVERSIAL, TRIGGER_UNSAFE
from .harness import FakeUpstream, Loopback, Script, start_proxy


@pytest.fixture(scope="session")
def loopback() -> Iterator[Loopback]:
    lb = Loopback()
    yield lb
    lb.close()


@pytest.fixture(scope="session")
def upstream(loopback: Loopback) -> tuple[FakeUpstream, str]:
    fake = FakeUpstream()
    port = loopback.serve(fake.app())
    return fake, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def fake(upstream: tuple[FakeUpstream, str]) -> Iterator[FakeUpstream]:
    upstream[0].script = Script()
    upstream[0].requests.clear()
    upstream[0].headers.clear()
    upstream[0].gate, upstream[0].gate_timeouts = None, 0
    yield upstream[0]


def proxy_settings(
    upstream_url: str, guard: Path, engine: EngineLimits | None = None, **policy: object
) -> Settings:
    base = Settings(
        upstream=UpstreamSettings(base_url=upstream_url, retries=1),
        guard=GuardSettings(
            model=str(guard),
            device="cpu",
            # In-process model: these tests start many apps in this process and some reach into the
            # engine's runner; the guard's own process is tested by test_serve_cli and the engine tests.
            process=False,
            engine=engine or EngineLimits(max_batch_tokens=512, response_reserve=256, anchor_tokens=512),
        ),
    )
    return replace(base, policy=replace(base.policy, **policy)) if policy else base


@pytest.fixture(scope="session")
def proxy(loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path) -> str:
    """guardproxy with the trigger checkpoint as its guard, in front of the fake upstream."""
    return start_proxy(loopback, proxy_settings(upstream[1], trigger_checkpoint, notice=" [cut]"))


@pytest.fixture(scope="session")
def graded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trigger words at graded probabilities (``--strength 0.1``): " gun" Controversial at about 0.96,
    " bomb" Unsafe at about 0.55 (Controversial 0.42): thresholds have something to move over."""
    out = tmp_path_factory.mktemp("graded-guard")
    args = [
        "make-test-model",
        str(out),
        "--unsafe",
        *TRIGGER_UNSAFE,
        "--controversial",
        *TRIGGER_CONTROVERSIAL,
    ]
    assert main([*args, "--category", TRIGGER_CATEGORY, "--strength", "0.1"]) == 0  # as a user writes one
    return out
