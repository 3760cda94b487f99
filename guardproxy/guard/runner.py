"""Executes a scheduler plan: one packed forward over the new tokens of every stream in the step.

The linear layers (projections, MLP: nearly all the FLOPs) run once over all the step's tokens packed
into one [T, hidden] matrix. Attention runs per stream, each stream's new queries against its own KV
cache, so no stream ever sees another's context and no prefix is re-run. Runs in the engine's worker
thread; nothing here touches asyncio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import rotate_half

from guardproxy.guard.model import Qwen3GuardStream
from guardproxy.guard.scheduler import QUERY, RESPONSE, ItemOutput, RawProbs, WorkItem


@dataclass(eq=False)
class KVBlock:
    """One stream's cache: ``k``/``v`` are [layers, kv_heads, capacity, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])


def _rows(t: torch.Tensor) -> list[tuple[float, ...]]:
    return [tuple(r) for r in t.tolist()]


class ModelRunner:
    def __init__(self, model: Qwen3GuardStream) -> None:
        self.model = model
        c = model.config
        self.layers = list(model.model.layers)
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.scaling = self.head_dim**-0.5

    # -- KV memory (the scheduler's Allocator) -------------------------------------------------------

    def _empty(self, capacity: int) -> torch.Tensor:
        shape = (len(self.layers), self.n_kv, capacity, self.head_dim)
        return torch.empty(shape, device=self.device, dtype=self.dtype)

    def allocate(self, capacity: int) -> KVBlock:
        return KVBlock(self._empty(capacity), self._empty(capacity))

    def grow(self, handle: KVBlock, used: int, capacity: int) -> KVBlock:
        k, v = self._empty(capacity), self._empty(capacity)
        k[:, :, :used] = handle.k[:, :, :used]
        v[:, :, :used] = handle.v[:, :, :used]
        return KVBlock(k, v)

    # -- the step ------------------------------------------------------------------------------------

    def execute(self, items: Sequence[WorkItem]) -> list[ItemOutput]:
        # inference_mode is thread-local: set it here, in the worker thread.
        with torch.inference_mode():
            return self._execute(items)

    def _execute(self, items: Sequence[WorkItem]) -> list[ItemOutput]:
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        spans: list[tuple[int, int]] = []
        query_rows: list[int] = []
        response_rows: list[int] = []
        for item in items:
            offset = len(ids)
            spans.append((offset, len(item.ids)))
            ids += item.ids
            positions += range(item.start, item.start + len(item.ids))
            for j, kind in enumerate(item.kinds):
                if kind == QUERY:
                    query_rows.append(offset + j)
                elif kind == RESPONSE:
                    response_rows.append(offset + j)
        total = len(ids)
        input_ids = torch.tensor(ids, device=dev)
        pos = torch.tensor(positions, device=dev)
        hidden = self.model.model.embed_tokens(input_ids)
        cos, sin = self.model.model.rotary_emb(hidden, pos[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]: broadcast over heads

        # Causal masks against each stream's cache, built once per step and shared by all layers.
        masks: list[torch.Tensor | None] = []
        for item, (_, n) in zip(items, spans, strict=True):
            if n == 1:
                masks.append(None)  # one new query sees the whole cache
                continue
            keys = torch.arange(item.start + n, device=dev)
            queries = torch.arange(item.start, item.start + n, device=dev)
            masks.append(keys[None, :] <= queries[:, None])

        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        attn_out = torch.empty(total, nh, hd, device=dev, dtype=self.dtype)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_norm(attn.q_proj(x).view(total, nh, hd))
            k = attn.k_norm(attn.k_proj(x).view(total, nkv, hd))
            v = attn.v_proj(x).view(total, nkv, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            for item, (off, n), mask in zip(items, spans, masks, strict=True):
                kv: KVBlock = item.kv
                end = item.start + n
                kv.k[li, :, item.start : end] = k[off : off + n].transpose(0, 1)
                kv.v[li, :, item.start : end] = v[off : off + n].transpose(0, 1)
                out = F.scaled_dot_product_attention(
                    q[off : off + n].transpose(0, 1)[None],
                    kv.k[li, :, :end][None],
                    kv.v[li, :, :end][None],
                    attn_mask=mask,
                    scale=self.scaling,
                    enable_gqa=nkv != nh,
                )
                attn_out[off : off + n] = out[0].transpose(0, 1)
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

        # Hand each item its rows, in order.
        outputs: list[ItemOutput] = []
        qi = ri = 0
        for item in items:
            nq = sum(1 for kind in item.kinds if kind == QUERY)
            nr = sum(1 for kind in item.kinds if kind == RESPONSE)
            outputs.append(ItemOutput(query=query_probs[qi : qi + nq], response=response_probs[ri : ri + nr]))
            qi += nq
            ri += nr
        return outputs
