"""Attention backends: how the queries of one step read the paged KV cache.

A backend looks at the step's items once (``prepare``: which stream's queries go where, which pages
each reads, the masks) and hands back a ``StepAttention`` that the runner calls in every layer with
that layer's queries and KV pool. Two backends, both exact (float64 parity with a full forward is
pinned by the tests for each):

- ``reference``: each multi-token stream attends alone with its own causal mask; one-token streams
  of similar lengths may share a call (``decode_groups``) up to ``gather_max`` gathered keys, and
  otherwise attend alone, reading their pages in place when these form one run. Kept as the parity
  oracle, and the fastest on a CPU for caches of the 0.6B guard's size, where copying keys costs more
  than a call.
- ``batched``: the whole step in one call a layer. Every stream's pages are gathered into one padded
  [streams, keys] tensor, every stream's queries into [streams, queries] (variable lengths padded,
  causal within a stream's new tokens, GQA by the kernel), one mask for the step; a step whose
  padding would more than double the work is split where it would (a long prefill beside one-token
  streams), so a call never costs more than twice its real work. The number of calls no longer
  grows with the number of streams: on CUDA that is the difference between one kernel launch a
  layer and one a stream a layer.

``auto`` picks per device (``pick_attention``): batched on CUDA, reference on CPU, from
bench/step.py's side-by-side figures (README, "The guard").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from guardproxy.guard.pages import PAGE_SIZE, KVPages
from guardproxy.guard.scheduler import WorkItem

ATTENTION_BACKENDS = ("auto", "batched", "reference")

# One-token streams are batched (``reference``) while the padded attention (longest x count) stays
# within twice their real total plus this many positions: batching two streams of 100 and 4000
# tokens would do 39x the shorter one's work for it, while two of 100 and 120 cost less together
# than apart. ``batched`` uses the same rule in query x key units.
PAD_SLACK = 256

# ``reference`` gathers a group of one-token streams into one tensor. On CPU that costs about what it
# saves for the tiny guard and is a loss for large caches (bench/step.py), so there streams attend
# alone, in place. Elsewhere: unlimited.
_GATHER_MAX = {"cpu": 0}


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    device: torch.device

    @property
    def scaling(self) -> float:
        return float(self.head_dim**-0.5)


class StepAttention(Protocol):
    """One step's attention, the same in every layer. ``order``: the items' indices in the order
    their tokens are packed (a stream's new tokens are consecutive rows)."""

    order: list[int]

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Fill ``out`` [T, heads, d] from the step's queries ``q`` [T, heads, d] and this layer's
        pool [positions, kv_heads, d] (the step's own keys and values already written)."""


class AttentionBackend(Protocol):
    name: str

    def prepare(self, items: Sequence[WorkItem]) -> StepAttention: ...


def _table(kvs: Sequence[KVPages], length: int, device: torch.device) -> torch.Tensor:
    """The pages holding positions ``0..length`` of each stream, flat (streams x pages). A stream
    with fewer pages is padded with its first page: those keys are masked out."""
    n_pages = math.ceil(length / PAGE_SIZE)
    table = [kv.pages[:n_pages] + [kv.pages[0]] * (n_pages - len(kv.pages)) for kv in kvs]
    return torch.tensor(table, device=device).view(-1)


def _gathered(pool: torch.Tensor, table: torch.Tensor, streams: int, keys: int) -> torch.Tensor:
    """Whole pages gathered (few large copies), as [streams, kv_heads, keys, d]. The pool is indexed
    as [pages, page elements]: on CPU that copies about twice as fast as the 4-d view."""
    _, kv_heads, d = pool.shape
    pages = pool.view(-1, PAGE_SIZE * kv_heads * d).index_select(0, table)
    return pages.view(streams, -1, kv_heads, d)[:, :keys].transpose(1, 2)


def pad_groups(sizes: Sequence[tuple[int, int]], slack: int = PAD_SLACK) -> list[list[int]]:
    """Indices of items (queries, keys) grouped for one padded call each, largest first: a group's
    padded work (count x most queries x most keys) stays within twice its real work plus ``slack``."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], -sizes[i][1]))
    groups: list[list[int]] = []
    real = most_q = most_k = 0
    for i in order:
        n, keys = sizes[i]
        if groups:
            q, k = max(most_q, n), max(most_k, keys)
            if (len(groups[-1]) + 1) * q * k <= 2 * (real + n * keys) + slack:
                groups[-1].append(i)
                real, most_q, most_k = real + n * keys, q, k
                continue
        groups.append([i])
        real, most_q, most_k = n * keys, n, keys
    return groups


def decode_groups(lengths: Sequence[int], slack: int = PAD_SLACK) -> list[list[int]]:
    """Indices of one-token items grouped for a shared call, longest first (``pad_groups`` with one
    query each)."""
    return pad_groups([(1, n) for n in lengths], slack)


def _sdpa(
    shape: AttentionShape, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Queries [B, heads, n, d] over keys and values [B, kv_heads, L, d]; ``mask`` [..., n or 1, L].

    GQA without repeating keys: the query heads that share a KV head are folded into its query
    length ([B, kv_heads, group x n, d]; head ``j * group + r``'s token t is row ``r * n + t``), so
    the kernel reads each key once. On this CPU (0.6B shape, 2 threads) that made one-token attention
    2-3x faster than SDPA's own ``enable_gqa`` and was never slower for 4-token queries."""
    b, heads, n, d = query.shape
    group = heads // shape.kv_heads
    if group > 1:
        query = query.reshape(b, shape.kv_heads, group * n, d)
        if mask is not None and n > 1:
            mask = mask.repeat(*([1] * (mask.dim() - 2)), group, 1)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=shape.scaling)
    return out.reshape(b, heads, n, d)


# -- reference --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One attention call of a ``reference`` step: queries ``row..row+n``; keys ``0..keys`` of
    ``streams`` streams, read in place from slot ``first`` (one stream, one run of pages) or gathered
    by ``table``; ``mask`` hides padding or the future (None: every key is visible)."""

    row: int
    n: int
    streams: int
    keys: int
    first: int
    table: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class _ReferenceStep:
    shape: AttentionShape
    order: list[int]
    calls: list[_Call]

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, out: torch.Tensor
    ) -> None:
        for c in self.calls:
            if c.table is not None:
                kk = _gathered(k_pool, c.table, c.streams, c.keys)
                vv = _gathered(v_pool, c.table, c.streams, c.keys)
            else:  # one stream's run of pages, read in place
                kk = k_pool[c.first : c.first + c.keys][None].transpose(1, 2)
                vv = v_pool[c.first : c.first + c.keys][None].transpose(1, 2)
            rows = q[c.row : c.row + c.n]
            # One query a stream: [streams, heads, 1, d]; else one stream's n queries: [1, heads, n, d].
            if c.n == c.streams:
                out[c.row : c.row + c.n] = _sdpa(self.shape, rows[:, :, None], kk, vv, c.mask)[:, :, 0]
            else:
                result = _sdpa(self.shape, rows.transpose(0, 1)[None], kk, vv, c.mask)
                out[c.row : c.row + c.n] = result[0].transpose(0, 1)


class ReferenceAttention:
    name = "reference"

    def __init__(self, shape: AttentionShape, *, pad_slack: int = PAD_SLACK, gather_max: int | None = None):
        self.shape = shape
        self.pad_slack = pad_slack
        # Largest group gathered, in key elements a layer (0: every stream attends alone; None: the
        # device's default, ``_GATHER_MAX``; no entry there: no limit).
        self.gather_max = gather_max if gather_max is not None else _GATHER_MAX.get(shape.device.type)

    def _own(self, row: int, n: int, kv: KVPages, end: int, mask: torch.Tensor | None) -> _Call:
        if kv.first >= 0:
            return _Call(row, n, 1, end, kv.first * PAGE_SIZE, None, mask)
        return _Call(row, n, 1, end, -1, _table([kv], end, self.shape.device), mask)

    def prepare(self, items: Sequence[WorkItem]) -> StepAttention:
        dev, s = self.shape.device, self.shape
        singles = [i for i, item in enumerate(items) if len(item.ids) == 1]
        groups = [
            [singles[j] for j in g]
            for g in decode_groups([items[i].start + 1 for i in singles], self.pad_slack)
        ]
        order = [i for g in groups for i in g] + [i for i, item in enumerate(items) if len(item.ids) != 1]
        rows = _rows(items, order)
        calls: list[_Call] = []
        for g in groups:
            lengths = [items[i].start + 1 for i in g]
            longest = lengths[0]
            if len(g) == 1 or (
                self.gather_max is not None and len(g) * longest * s.kv_heads * s.head_dim > self.gather_max
            ):
                calls += [
                    self._own(rows[i], 1, items[i].kv, n, None) for i, n in zip(g, lengths, strict=True)
                ]
                continue
            mask = None
            if lengths[-1] != longest:
                keys = torch.arange(longest, device=dev)
                mask = (keys[None, :] < torch.tensor(lengths, device=dev)[:, None])[:, None, None, :]
            table = _table([items[i].kv for i in g], longest, dev)
            calls.append(_Call(rows[g[0]], len(g), len(g), longest, -1, table, mask))
        for i, item in enumerate(items):
            n = len(item.ids)
            if n == 1:
                continue
            end = item.start + n
            keys = torch.arange(end, device=dev)
            queries = torch.arange(item.start, end, device=dev)
            calls.append(self._own(rows[i], n, item.kv, end, keys[None, :] <= queries[:, None]))
        return _ReferenceStep(s, order, calls)


def _rows(items: Sequence[WorkItem], order: Sequence[int]) -> dict[int, int]:
    """The first packed row of each item."""
    rows: dict[int, int] = {}
    row = 0
    for i in order:
        rows[i] = row
        row += len(items[i].ids)
    return rows


# -- batched ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """One padded call of a ``batched`` step: ``streams`` streams, at most ``queries`` new tokens and
    ``keys`` keys each, their queries packed from row ``row`` on (``rows`` of them). ``table``: the
    streams' pages; ``pick``: the padded query slots' rows (None: every stream has ``queries``, the
    packed rows are the padded tensor as they lie); ``keep``: the real slots among the padded ones;
    ``mask``: [streams, 1, queries, keys], causal within the new tokens, padding hidden (None: every
    key visible)."""

    row: int
    rows: int
    streams: int
    queries: int
    keys: int
    table: torch.Tensor
    pick: torch.Tensor | None
    keep: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class _BatchedStep:
    shape: AttentionShape
    order: list[int]
    batches: list[_Batch]

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, out: torch.Tensor
    ) -> None:
        heads, d = self.shape.heads, self.shape.head_dim
        for b in self.batches:
            kk = _gathered(k_pool, b.table, b.streams, b.keys)
            vv = _gathered(v_pool, b.table, b.streams, b.keys)
            rows = q[b.row : b.row + b.rows]
            padded = rows if b.pick is None else rows.index_select(0, b.pick)
            query = padded.view(b.streams, b.queries, heads, d).transpose(1, 2)
            result = _sdpa(self.shape, query, kk, vv, b.mask).transpose(1, 2).reshape(-1, heads, d)
            out[b.row : b.row + b.rows] = result if b.keep is None else result.index_select(0, b.keep)


class BatchedAttention:
    name = "batched"

    def __init__(self, shape: AttentionShape, *, pad_slack: int = PAD_SLACK) -> None:
        self.shape = shape
        self.pad_slack = pad_slack

    def prepare(self, items: Sequence[WorkItem]) -> StepAttention:
        groups = pad_groups([(len(item.ids), item.start + len(item.ids)) for item in items], self.pad_slack)
        order = [i for g in groups for i in g]
        rows = _rows(items, order)
        batches = [self._batch([items[i] for i in g], rows[g[0]]) for g in groups]
        return _BatchedStep(self.shape, order, batches)

    def _batch(self, items: Sequence[WorkItem], row: int) -> _Batch:
        dev = self.shape.device
        counts = [len(item.ids) for item in items]
        spans = [(item.start, len(item.ids)) for item in items]
        queries = max(counts)
        keys = max(s + n for s, n in spans)
        pick = keep = None
        if any(n != queries for n in counts):
            # Padded slot t of a stream reads its row min(t, n - 1): a real query, its output dropped.
            first = [sum(counts[:j]) for j in range(len(counts))]  # within the batch's rows
            slots = [f + min(t, n - 1) for f, n in zip(first, counts, strict=True) for t in range(queries)]
            pick = torch.tensor(slots, device=dev)
            keep = torch.tensor([j * queries + t for j, n in enumerate(counts) for t in range(n)], device=dev)
        mask = None
        if queries > 1 or any(s + n != keys for s, n in spans):
            # Query t of a stream sees keys 0..start+t (its own new tokens causally), never past its end.
            last = torch.tensor(
                [[min(s + t, s + n - 1) for t in range(queries)] for s, n in spans], device=dev
            )
            mask = (torch.arange(keys, device=dev)[None, None, :] <= last[..., None])[:, None]
        return _Batch(
            row=row,
            rows=sum(counts),
            streams=len(items),
            queries=queries,
            keys=keys,
            table=_table([item.kv for item in items], keys, dev),
            pick=pick,
            keep=keep,
            mask=mask,
        )


def pick_attention(
    name: str, shape: AttentionShape, *, pad_slack: int = PAD_SLACK, gather_max: int | None = None
) -> AttentionBackend:
    """The backend ``name`` (``ATTENTION_BACKENDS``); ``auto``: the measured best for the device."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "auto":
        name = "batched" if shape.device.type == "cuda" else "reference"
    make: dict[str, Callable[[], AttentionBackend]] = {
        "batched": lambda: BatchedAttention(shape, pad_slack=pad_slack),
        "reference": lambda: ReferenceAttention(shape, pad_slack=pad_slack, gather_max=gather_max),
    }
    return make[name]()
