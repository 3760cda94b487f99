"""The attention backends against a full forward (float64, 1e-9), on steps built by hand so every shape
the issue names is in one step: new-token counts 1, 2, 7, 16 and 64 side by side, contexts that end
inside a page and on a page boundary, pages shared from the prefix cache, a copy-on-write into a shared
page. The engine-level parity (any chunking, retractions, slides) runs each backend too
(``test_engine.py``, ``test_prefix_cache.py``)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.guard.attention import ATTENTION_BACKENDS, AttentionShape, pad_groups, pick_attention
from guardproxy.guard.model import Qwen3GuardStream, load_guard_model
from guardproxy.guard.pages import PAGE_SIZE, KVPages, PagePool, page_keys
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.scheduler import NO_OUTPUT, QUERY, RESPONSE, WorkItem

# Backends as the tests run them: every named one, plus ``reference`` with its one-token groups
# gathered (its CUDA default) and ``batched`` with no padding slack (more, smaller calls).
RUNNERS = {
    "reference": dict(attention="reference"),
    "reference-gathered": dict(attention="reference", gather_max=1 << 40),
    "batched": dict(attention="batched"),
    "batched-no-slack": dict(attention="batched", pad_slack=0),
    "auto": dict(attention="auto"),
}


CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: bench/device.sh runs these on a GPU",
)


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA)])
def model64(random_checkpoint: Path, request: pytest.FixtureRequest) -> Qwen3GuardStream:
    """float64 on each device: on a GPU too the backends must agree with a full forward to 1e-9."""
    return load_guard_model(random_checkpoint, device=request.param, dtype=torch.float64)


class Streams:
    """Streams on one page pool and runner, each with the ids it holds (what a full forward reads)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.pool = PagePool(cache_pages=64)
        self.ids: list[list[int]] = []
        self.kvs: list[KVPages] = []

    def open(self, ids: list[int], capacity: int) -> tuple[int, int]:
        """A stream whose prompt is ``ids``, on cached pages where it can: (its index, positions reused)."""
        shared = self.pool.match(page_keys(ids[: len(ids) - 1]))  # the last id is always computed
        kv = self.pool.allocate(capacity, shared)
        start = len(shared) * PAGE_SIZE
        self.runner.execute([WorkItem(0, kv, start, ids[start:], [NO_OUTPUT] * (len(ids) - start))])
        for index, key in enumerate(page_keys(ids)):
            self.pool.register(kv, index, key)
        self.ids.append(list(ids))
        self.kvs.append(kv)
        return len(self.kvs) - 1, start

    def item(self, k: int, new: list[int], kinds: list[int]) -> WorkItem:
        start = len(self.ids[k])
        copies = tuple(self.pool.prepare_write(self.kvs[k], start, start + len(new)))
        self.ids[k] += new
        return WorkItem(k, self.kvs[k], start, new, kinds, copies)


def close(got: list[tuple[float, ...]], want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want.cpu(), atol=1e-9, rtol=0)


def full(model: Qwen3GuardStream, ids: list[int]) -> Any:
    with torch.no_grad():
        return model(torch.tensor([ids], device=next(model.parameters()).device))


@pytest.mark.parametrize("name", RUNNERS)
def test_mixed_step_matches_a_full_forward(model64: Qwen3GuardStream, name: str) -> None:
    rng = random.Random(5)
    s = Streams(ModelRunner(model64, **RUNNERS[name]))
    prefix = [rng.randrange(151643) for _ in range(48)]  # three whole pages, shared below
    opened = []
    # Contexts ending on a page boundary (32, 64) and inside one; one prompt shares all three pages
    # and then rewrites inside its last one (a copy-on-write); one is a prefix of another plus a part.
    for length in (37, 64, 1, 55, 32, 100):
        ids = [*prefix, *(rng.randrange(151643) for _ in range(length))]
        opened.append(s.open(ids, len(ids) + 80))
    assert [start for _, start in opened][1:] == [48] * 5  # every later stream reused the prefix pages
    rewrite, _ = s.open(prefix[:40], 200)  # on the cached pages 0-1, then its own page for 32..
    del s.ids[rewrite][20:]  # taken back to 20: its next tokens go into the shared page 1
    opened.append((rewrite, 20))

    counts = (1, 2, 7, 16, 64, 1, 3)
    items = []
    for (k, _), n in zip(opened, counts, strict=True):
        kinds = [RESPONSE] * n
        if n == 7:
            kinds[3] = QUERY  # a query verdict in the middle of a stream's new tokens
        if n == 16:
            kinds[:5] = [NO_OUTPUT] * 5
        items.append(s.item(k, [rng.randrange(151643) for _ in range(n)], kinds))
    assert len(items[-1].copies) == 1  # copy-on-write: positions 16-19 of the shared page kept
    ends = [item.start + len(item.ids) for item in items]
    assert any(e % PAGE_SIZE == 0 for e in ends) and any(e % PAGE_SIZE for e in ends)
    outputs = s.runner.execute(items)

    for item, out in zip(items, outputs, strict=True):
        ref = full(model64, s.ids[item.sid])
        rows = [item.start + j for j, kind in enumerate(item.kinds) if kind == RESPONSE]
        qrows = [item.start + j for j, kind in enumerate(item.kinds) if kind == QUERY]
        close([r for r, _ in out.response], ref.response.risk[0, rows])
        close([c for _, c in out.response], ref.response.category[0, rows])
        if qrows:
            close([r for r, _ in out.query], ref.query.risk[0, qrows])
            close([c for _, c in out.query], ref.query.category[0, qrows])
        else:
            assert out.query == []


@pytest.mark.parametrize("name", ["batched", "reference"])
def test_one_token_steady_state_and_a_prefill_in_one_step(model64: Qwen3GuardStream, name: str) -> None:
    """Twenty one-token streams of spread lengths beside one long prefill: ``batched`` splits the
    prefill off (padding it with the others would cost 64 x their work) but keeps the twenty together."""
    rng = random.Random(9)
    runner = ModelRunner(model64, attention=name)
    s = Streams(runner)
    for length in range(20, 420, 20):
        s.open([rng.randrange(151643) for _ in range(length)], length + 40)
    long, _ = s.open([rng.randrange(151643) for _ in range(10)], 200)
    items = [s.item(k, [rng.randrange(151643)], [RESPONSE]) for k in range(20)]
    items.append(s.item(long, [rng.randrange(151643) for _ in range(64)], [RESPONSE] * 64))
    step = runner.attention.prepare(items)
    if name == "batched":
        assert [b.streams for b in step.batches] == [1, 20]  # type: ignore[attr-defined]
    outputs = runner.execute(items)
    for item, out in zip(items, outputs, strict=True):
        close([r for r, _ in out.response], full(model64, s.ids[item.sid]).response.risk[0, item.start :])


@given(st.lists(st.tuples(st.integers(1, 80), st.integers(1, 3000)), max_size=40), st.sampled_from([0, 256]))
def test_pad_groups_cover_every_item_once_within_twice_the_work(
    sizes: list[tuple[int, int]], slack: int
) -> None:
    groups = pad_groups(sizes, slack)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        if len(g) > 1:
            most_q = max(sizes[i][0] for i in g)
            most_k = max(sizes[i][1] for i in g)
            assert len(g) * most_q * most_k <= 2 * sum(sizes[i][0] * sizes[i][1] for i in g) + slack


def test_auto_is_reference_on_cpu_and_names_are_checked() -> None:
    cpu = AttentionShape(4, 2, 16, torch.device("cpu"))
    cuda = AttentionShape(4, 2, 16, torch.device("cuda"))  # only its type is read: no GPU needed
    assert pick_attention("auto", cpu).name == "reference"
    assert pick_attention("auto", cuda).name == "batched"
    assert set(ATTENTION_BACKENDS) == {"auto", "batched", "reference"}
    with pytest.raises(ValueError, match="attention must be one of"):
        pick_attention("flash", cpu)


@CUDA
def test_bfloat16_backends_agree_on_a_gpu(random_checkpoint: Path) -> None:
    """The production dtype on a GPU: batched and reference judge the same step alike (bf16 rounding
    differs by summation order, so a tolerance, and the same arg-max tier nearly everywhere)."""
    model = load_guard_model(random_checkpoint, device="cuda", dtype=torch.bfloat16)
    rng = random.Random(11)
    results = {}
    for name in ("reference", "batched"):
        s = Streams(ModelRunner(model, attention=name))
        rng.seed(11)
        for length in range(20, 420, 20):
            s.open([rng.randrange(151643) for _ in range(length)], length + 80)
        items = [
            s.item(k, [rng.randrange(151643) for _ in range(1 + k % 5)], [RESPONSE] * (1 + k % 5))
            for k in range(20)
        ]
        results[name] = torch.tensor([r for out in s.runner.execute(items) for r, _ in out.response])
    ref, got = results["reference"], results["batched"]
    assert (ref - got).abs().max() < 3e-2
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95
