"""Executes a scheduler plan: one packed forward over the new tokens of every stream in the step.

The linear layers (projections, MLP: nearly all the FLOPs) run once over all the step's tokens packed
into one [T, hidden] matrix. The KV cache is paged: one pool of fixed-size pages per layer, a stream
owns a list of pages (``pages.py``; pages of a common prefix are shared between streams), so growing a
stream copies nothing and every new key/value of a step is written with one indexed copy; a page a
stream must write into while it is shared or cached is first copied to a page of its own (the step's
``copies``). Attention never mixes streams. A stream whose pages form one run is read in
place; otherwise its pages are gathered. One-token streams (the steady state of streaming) can be
batched instead: those of similar length share one attention call a layer over their gathered pages,
shorter ones masked, which makes the number of calls independent of the number of streams (the
default on CUDA; see ``_GATHER_MAX``). Runs in the engine's worker thread; nothing here touches asyncio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import rotate_half

from guardproxy.guard.model import Qwen3GuardStream
from guardproxy.guard.pages import PAGE_SIZE, KVPages
from guardproxy.guard.scheduler import QUERY, RESPONSE, ItemOutput, RawProbs, WorkItem
from guardproxy.guard.verdict import GuardLabels

# One-token streams are batched while the padded attention (longest x count) stays within twice their
# real total plus this many positions: batching two streams of 100 and 4000 tokens would do 39x the
# shorter one's work for it, while two of 100 and 120 cost less together than apart.
_PAD_SLACK = 256

# Batched attention gathers a group's pages into one tensor. On CPU that costs about what it saves
# (bench/step.py: per-stream / batched about 0.85-1.12 for the tiny guard at 16-64 streams) and for large
# caches it is a loss (bench/step.py, 0.6B shape, 8 streams: per-stream / batched 0.80), so streams
# attend alone, in place. On CUDA each call is a kernel launch a layer a stream: batched, unlimited
# (not measured here: no GPU lent yet; ``python bench/step.py --device cuda`` is the check).
_GATHER_MAX = {"cpu": 0}


@dataclass(frozen=True)
class _Attend:
    """One attention call of a step, the same in every layer: queries ``row..row+n`` of the packed
    step; keys ``0..keys`` of ``streams`` streams, read in place from slot ``first`` (one stream, one
    run of pages) or gathered by ``table`` (pages, streams x pages); ``mask`` hides padding or the
    future (None: every key is visible)."""

    row: int
    n: int
    streams: int
    keys: int
    first: int
    table: torch.Tensor | None
    mask: torch.Tensor | None


def decode_groups(lengths: Sequence[int], slack: int = _PAD_SLACK) -> list[list[int]]:
    """Indices of one-token items grouped for batched attention, longest first: a group's padded size
    (its longest x its count) stays within twice its real size plus ``slack``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= 2 * (total + lengths[i]) + slack:
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


def _rows(t: torch.Tensor) -> list[tuple[float, ...]]:
    return [tuple(r) for r in t.tolist()]


class ModelRunner:
    def __init__(
        self,
        model: Qwen3GuardStream,
        *,
        max_pages: int | None = None,
        pad_slack: int = _PAD_SLACK,
        gather_max: int | None = None,
    ) -> None:
        self.model = model
        c = model.config
        self.layers = list(model.model.layers)
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.scaling = self.head_dim**-0.5
        self.pad_slack = pad_slack
        # Largest group gathered for batched attention, in key elements a layer (0: every stream attends
        # alone; None: the device's default, see ``_GATHER_MAX``; no entry: no limit).
        self.gather_max = gather_max if gather_max is not None else _GATHER_MAX.get(p.device.type)
        # The page pool: [layers, pages * PAGE_SIZE, kv_heads, head_dim]. Page ids are handed out on the
        # event loop's thread (allocate/grow/release, ``PagePool``); the tensors are (re)sized only in
        # ``execute``, on the worker thread (or process), so a step never sees them swapped under it.
        self.max_pages = max_pages  # the pool's tensors never grow past this many pages
        self._k = self._pool(0)
        self._v = self._pool(0)

    # -- the engine's StepExecutor --------------------------------------------------------------------

    @property
    def labels(self) -> GuardLabels:
        return self.model.labels

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def close(self) -> None:
        """Nothing to release: the pool goes with the runner."""

    # -- KV memory ------------------------------------------------------------------------------------

    def _pool(self, pages: int) -> torch.Tensor:
        shape = (len(self.layers), pages * PAGE_SIZE, self.n_kv, self.head_dim)
        # Zeros, not empty: batched attention reads (masked) slots never written, and a masked slot
        # holding NaN would still poison the sum (0 * NaN).
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    @property
    def pool_positions(self) -> int:
        return int(self._k.shape[1])

    def _ensure_pool(self, items: Sequence[WorkItem]) -> None:
        need = max((max(item.kv.pages, default=-1) + 1 for item in items), default=0) * PAGE_SIZE
        have = self.pool_positions
        if need <= have:
            return
        # Grow by doubling (amortised copies), never past the cap on pages when there is one.
        size = max(need, 2 * have)
        if self.max_pages is not None:
            size = max(need, min(size, self.max_pages * PAGE_SIZE))
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = self._pool(size // PAGE_SIZE)
            new[:, :have] = old
            setattr(self, name, new)

    def _copy_pages(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: a stream's own copy of a shared or cached page, made before the step writes
        into it (``PagePool.prepare_write``). One indexed copy a pool for all of them, every layer."""
        if not copies:
            return
        offsets = torch.arange(PAGE_SIZE, device=self.device)
        src = (torch.tensor([s for s, _ in copies], device=self.device)[:, None] * PAGE_SIZE + offsets).view(
            -1
        )
        dst = (torch.tensor([d for _, d in copies], device=self.device)[:, None] * PAGE_SIZE + offsets).view(
            -1
        )
        for pool in (self._k, self._v):
            pool.index_copy_(1, dst, pool.index_select(1, src))

    def _table(self, kvs: Sequence[KVPages], length: int) -> torch.Tensor:
        """The pages holding positions ``0..length`` of each stream, flat (streams x pages). A stream
        with fewer pages is padded with its first page: those keys are masked out."""
        n_pages = math.ceil(length / PAGE_SIZE)
        table = [kv.pages[:n_pages] + [kv.pages[0]] * (n_pages - len(kv.pages)) for kv in kvs]
        return torch.tensor(table, device=self.device).view(-1)

    def _own(self, row: int, n: int, kv: KVPages, end: int, mask: torch.Tensor | None) -> _Attend:
        """One stream attending over its own keys ``0..end``: in place when its pages are one run."""
        if kv.first >= 0:
            return _Attend(row, n, 1, end, kv.first * PAGE_SIZE, None, mask)
        return _Attend(row, n, 1, end, -1, self._table([kv], end), mask)

    def _positions(self, kv: KVPages, start: int, end: int) -> list[int]:
        pages = kv.pages
        return [pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(start, end)]

    # -- the step ------------------------------------------------------------------------------------

    def execute(self, items: Sequence[WorkItem]) -> list[ItemOutput]:
        # inference_mode is thread-local: set it here, in the worker thread.
        with torch.inference_mode():
            return self._execute(items)

    def _execute(self, items: Sequence[WorkItem]) -> list[ItemOutput]:
        dev = self.device
        self._ensure_pool(items)
        self._copy_pages([c for item in items for c in item.copies])
        # Pack one-token items first, group by group, so each group's queries are one slice.
        singles = [i for i, item in enumerate(items) if len(item.ids) == 1]
        groups = [
            [singles[j] for j in g]
            for g in decode_groups([items[i].start + 1 for i in singles], self.pad_slack)
        ]
        order = [i for g in groups for i in g] + [i for i, item in enumerate(items) if len(item.ids) != 1]

        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []  # where each new token's key/value goes in the pool
        offsets = [0] * len(items)
        query_rows: list[int] = []
        response_rows: list[int] = []
        for i in order:
            item = items[i]
            offsets[i] = len(ids)
            ids += item.ids
            end = item.start + len(item.ids)
            positions += range(item.start, end)
            slots += self._positions(item.kv, item.start, end)
            for j, kind in enumerate(item.kinds):
                if kind == QUERY:
                    query_rows.append(offsets[i] + j)
                elif kind == RESPONSE:
                    response_rows.append(offsets[i] + j)
        total = len(ids)
        input_ids = torch.tensor(ids, device=dev)
        pos = torch.tensor(positions, device=dev)
        write = torch.tensor(slots, device=dev)
        hidden = self.model.model.embed_tokens(input_ids)
        cos, sin = self.model.model.rotary_emb(hidden, pos[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]: broadcast over heads
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim

        # What each attention call reads, built once per step and shared by all layers.
        calls: list[_Attend] = []
        for g in groups:
            lengths = [items[i].start + 1 for i in g]
            longest = lengths[0]
            if len(g) == 1 or (self.gather_max is not None and len(g) * longest * nkv * hd > self.gather_max):
                calls += [
                    self._own(offsets[i], 1, items[i].kv, n, None) for i, n in zip(g, lengths, strict=True)
                ]
                continue
            mask = None
            if lengths[-1] != longest:
                keys = torch.arange(longest, device=dev)
                mask = (keys[None, :] < torch.tensor(lengths, device=dev)[:, None])[:, None, None, :]
            table = self._table([items[i].kv for i in g], longest)
            calls.append(_Attend(offsets[g[0]], len(g), len(g), longest, -1, table, mask))
        for i, item in enumerate(items):
            n = len(item.ids)
            if n == 1:
                continue
            end = item.start + n
            keys = torch.arange(end, device=dev)
            queries = torch.arange(item.start, end, device=dev)
            calls.append(self._own(offsets[i], n, item.kv, end, keys[None, :] <= queries[:, None]))

        attn_out = torch.empty(total, nh, hd, device=dev, dtype=self.dtype)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_norm(attn.q_proj(x).view(total, nh, hd))
            k = attn.k_norm(attn.k_proj(x).view(total, nkv, hd))
            v = attn.v_proj(x).view(total, nkv, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k_pool, v_pool = self._k[li], self._v[li]
            k_pool.index_copy_(0, write, k)
            v_pool.index_copy_(0, write, v)
            k_pages, v_pages = k_pool.view(-1, PAGE_SIZE, nkv, hd), v_pool.view(-1, PAGE_SIZE, nkv, hd)
            for c in calls:
                if c.table is not None:  # whole pages gathered (few large copies): [streams, kv, L, d]
                    kk = k_pages.index_select(0, c.table).view(c.streams, -1, nkv, hd)[:, : c.keys]
                    vv = v_pages.index_select(0, c.table).view(c.streams, -1, nkv, hd)[:, : c.keys]
                else:  # one stream's run of pages, read in place
                    kk = k_pool[c.first : c.first + c.keys][None]
                    vv = v_pool[c.first : c.first + c.keys][None]
                rows = q[c.row : c.row + c.n]
                # One query a stream: [streams, heads, 1, d]; else one stream's n queries: [1, heads, n, d].
                query = rows[:, :, None] if c.n == c.streams else rows.transpose(0, 1)[None]
                out = F.scaled_dot_product_attention(
                    query,
                    kk.transpose(1, 2),
                    vv.transpose(1, 2),
                    attn_mask=c.mask,
                    scale=self.scaling,
                    enable_gqa=nkv != nh,
                )
                attn_out[c.row : c.row + c.n] = out[:, :, 0] if c.n == c.streams else out[0].transpose(0, 1)
            hidden = hidden + attn.o_proj(attn_out.view(total, nh * hd))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        query_probs: list[RawProbs] = []
        response_probs: list[RawProbs] = []
        if query_rows:
            qp = self.model.query_probs(self.model.model.norm(hidden[query_rows]))
            query_probs = list(zip(_rows(qp.risk), _rows(qp.category), strict=True))
        if response_rows:
            rp = self.model.response_probs(self.model.model.norm(hidden[response_rows]))
            response_probs = list(zip(_rows(rp.risk), _rows(rp.category), strict=True))

        # Hand each item its rows: they were packed in ``order``.
        outputs: list[ItemOutput | None] = [None] * len(items)
        qi = ri = 0
        for i in order:
            kinds = items[i].kinds
            nq = sum(1 for kind in kinds if kind == QUERY)
            nr = sum(1 for kind in kinds if kind == RESPONSE)
            outputs[i] = ItemOutput(query=query_probs[qi : qi + nq], response=response_probs[ri : ri + nr])
            qi += nq
            ri += nr
        return [out for out in outputs if out is not None]
