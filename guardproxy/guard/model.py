"""Qwen3Guard-Stream as a plain torch module, and strict checkpoint loading.

The released checkpoints come with remote code that needs ``trust_remote_code`` and does not run on
transformers 5. We rebuild the architecture on transformers' own ``Qwen3Model`` (the backbone) plus the
two head pathways, keeping the released parameter names so the safetensors load as they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Model,
    Qwen3PreTrainedModel,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
)

from guardproxy.guard.checkpoint import GuardModelError, resolve_checkpoint
from guardproxy.guard.verdict import GuardLabels, HeadLabels

log = logging.getLogger(__name__)

# Config keys the guard adds on top of a Qwen3 config; a checkpoint without them is not a Stream guard.
GUARD_CONFIG_KEYS = (
    "guard_inner_size",
    "num_risk_level",
    "num_category",
    "num_query_risk_level",
    "num_query_category",
    "response_risk_level_map",
    "response_category_map",
    "query_risk_level_map",
    "query_category_map",
)

# The backbone ties its (unused) LM head to the embeddings; a checkpoint may still carry the tensor.
# It is not part of the guard, so it is the one key we drop rather than reject.
_IGNORED_CHECKPOINT_KEYS = frozenset({"lm_head.weight"})


def _label_tuple(config: Qwen3Config, key: str, size: int) -> tuple[str, ...]:
    raw = getattr(config, key, None)
    if not isinstance(raw, Mapping):
        raise GuardModelError(f"config.{key} must be a mapping of index -> label, got {type(raw).__name__}")
    try:
        by_index = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise GuardModelError(f"config.{key} keys must be integers (as strings), got {list(raw)}") from None
    if sorted(by_index) != list(range(size)):
        raise GuardModelError(f"config.{key} must label indices 0..{size - 1}, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(size))


def labels_from_config(config: Qwen3Config) -> GuardLabels:
    return GuardLabels(
        response=HeadLabels(
            risk=_label_tuple(config, "response_risk_level_map", config.num_risk_level),
            category=_label_tuple(config, "response_category_map", config.num_category),
        ),
        query=HeadLabels(
            risk=_label_tuple(config, "query_risk_level_map", config.num_query_risk_level),
            category=_label_tuple(config, "query_category_map", config.num_query_category),
        ),
    )


def check_guard_config(config: Qwen3Config) -> None:
    missing = [k for k in GUARD_CONFIG_KEYS if getattr(config, k, None) is None]
    if missing:
        raise GuardModelError(f"not a Qwen3Guard-Stream config: missing {', '.join(missing)}")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        # The engine's attention is full causal attention only.
        raise GuardModelError(f"unsupported layer_types {sorted(kinds)}: only full_attention is implemented")
    labels_from_config(config)


@dataclass(frozen=True, slots=True)
class HeadProbs:
    """Softmax probabilities of one head pathway: ``risk`` [..., n_risk], ``category`` [..., n_category]."""

    risk: torch.Tensor
    category: torch.Tensor


@dataclass(frozen=True, slots=True)
class GuardOutput:
    """Per-position probabilities of both pathways for a full forward ([batch, seq, ...])."""

    response: HeadProbs
    query: HeadProbs


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    # Probabilities in at least fp32 (bf16 rounding would blur thresholds); fp64 models stay fp64.
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


class Qwen3GuardStream(Qwen3PreTrainedModel):  # type: ignore[misc]
    """Backbone + response pathway + query pathway, with the released checkpoints' parameter names.

    Each pathway reads the backbone's final-normed hidden state:
    ``Linear(hidden -> guard_inner, no bias) -> RMSNorm(guard_inner) -> {risk, category} Linear heads``.
    """

    def __init__(self, config: Qwen3Config) -> None:
        check_guard_config(config)
        super().__init__(config)
        hidden, inner, eps = config.hidden_size, config.guard_inner_size, config.rms_norm_eps
        self.model = Qwen3Model(config)
        self.risk_level_category_pre = nn.Linear(hidden, inner, bias=False)
        self.risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.risk_level_head = nn.Linear(inner, config.num_risk_level, bias=False)
        self.category_head = nn.Linear(inner, config.num_category, bias=False)
        self.query_risk_level_category_pre = nn.Linear(hidden, inner, bias=False)
        self.query_risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.query_risk_level_head = nn.Linear(inner, config.num_query_risk_level, bias=False)
        self.query_category_head = nn.Linear(inner, config.num_query_category, bias=False)
        self.labels = labels_from_config(config)
        self.post_init()

    def response_probs(self, hidden: torch.Tensor) -> HeadProbs:
        """Response-head probabilities for final-normed hidden states [..., hidden]."""
        x = self.risk_level_category_layernorm(self.risk_level_category_pre(hidden))
        return HeadProbs(
            risk=_softmax(self.risk_level_head(x)),
            category=_softmax(self.category_head(x)),
        )

    def query_probs(self, hidden: torch.Tensor) -> HeadProbs:
        """Query-head probabilities for final-normed hidden states [..., hidden]."""
        x = self.query_risk_level_category_layernorm(self.query_risk_level_category_pre(hidden))
        return HeadProbs(
            risk=_softmax(self.query_risk_level_head(x)),
            category=_softmax(self.query_category_head(x)),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> GuardOutput:
        """One full causal forward (no cache): the reference every faster path is checked against."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return GuardOutput(response=self.response_probs(hidden), query=self.query_probs(hidden))

    @property
    def non_embedding_parameters(self) -> int:
        embed = int(self.model.embed_tokens.weight.numel())
        return sum(int(p.numel()) for p in self.parameters()) - embed


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise GuardModelError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _check_keys(expected: Iterable[str], found: Iterable[str]) -> None:
    expected_set, found_set = set(expected), set(found) - _IGNORED_CHECKPOINT_KEYS
    missing = sorted(expected_set - found_set)
    unexpected = sorted(found_set - expected_set)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} weights (e.g. {', '.join(unexpected[:5])})")
        raise GuardModelError("checkpoint does not match Qwen3Guard-Stream: " + "; ".join(parts))


def load_guard_model(
    source: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> Qwen3GuardStream:
    """Load a Qwen3Guard-Stream checkpoint (hub id or directory) strictly, without remote code.

    Every parameter must be present with the right shape, and nothing else may be there (except a tied
    ``lm_head.weight``): a partially loaded guard would judge with random weights and look fine.
    """
    path = resolve_checkpoint(source, revision)
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev)
    if not (path / "config.json").is_file():
        # transformers would quietly hand back a default config for a directory without one.
        raise GuardModelError(f"{path}: no config.json")
    try:
        config = Qwen3Config.from_pretrained(path)
    except Exception as exc:
        raise GuardModelError(f"{path}: cannot read config.json: {exc}") from exc
    config._attn_implementation = "sdpa"
    check_guard_config(config)
    # Build on the meta device: no time spent initialising weights that are overwritten next.
    with torch.device("meta"):
        model = Qwen3GuardStream(config)
    expected = {name: p for name, p in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        state.update(load_file(str(file), device="cpu"))
    _check_keys(expected, state)
    for name, tensor in list(state.items()):
        if name in _IGNORED_CHECKPOINT_KEYS:
            del state[name]
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise GuardModelError(
                f"weight {name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name].shape)}"
            )
        state[name] = tensor.to(device=dev, dtype=dt)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE frequencies) are not in the checkpoint: rebuild them for real.
    with torch.device(dev):
        model.model.rotary_emb = Qwen3RotaryEmbedding(config=config)
    model.eval()
    log.info("loaded guard model from %s (%s, %s)", path, dev, dt)
    return model
