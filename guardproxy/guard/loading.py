"""One call for everything a guard needs from a checkpoint: the model and its chat template."""

from __future__ import annotations

from pathlib import Path

import torch

from guardproxy.guard.checkpoint import load_template
from guardproxy.guard.model import Qwen3GuardStream, load_guard_model
from guardproxy.guard.quantize import quantize_model
from guardproxy.guard.template import ChatTemplate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    source: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    quantize: str = "none",
) -> Qwen3GuardStream:
    """The checkpoint's model, strictly loaded; ``dtype`` by name (the configuration's spelling);
    ``quantize``: ``none`` or ``int8`` (``quantize.py``)."""
    model = load_guard_model(source, device=device, dtype=DTYPES[dtype] if dtype else None, revision=revision)
    return quantize_model(model, quantize)


def load_guard(
    source: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    quantize: str = "none",
) -> tuple[Qwen3GuardStream, ChatTemplate]:
    """The checkpoint's model and the template built on its own tokenizer (a hub id is resolved once)."""
    path, template = load_template(source, revision=revision)
    return load_model(path, device=device, dtype=dtype, quantize=quantize), template
