"""Shared fixtures: the real Qwen3 tokenizer and guard checkpoints written and loaded for real."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from guardproxy.guard.model import Qwen3GuardStream, load_guard_model
from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.testing import (
    TriggerSpec,
    make_random_checkpoint,
    make_trigger_checkpoint,
    qwen3_tokenizer_file,
)
from guardproxy.guard.tokenizer import GuardTokenizer
from guardproxy.stream.guardview import AssistantView

TRIGGER_UNSAFE = ["bomb", "grenade"]
TRIGGER_CONTROVERSIAL = ["gun"]
TRIGGER_CATEGORY = "Violent"


@pytest.fixture(scope="session")
def tokenizer() -> GuardTokenizer:
    return GuardTokenizer.from_file(qwen3_tokenizer_file())


class _Reference:
    """The tokenizer with its own Jinja chat template (Qwen3's, shipped beside tokenizer.json): the
    ground truth for what the guard must be fed. (A short repr: Hypothesis prints its arguments.)"""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_file().parent))

    def __repr__(self) -> str:
        return "<the Qwen3 tokenizer and chat template>"


@pytest.fixture(scope="session")
def hf_tokenizer() -> _Reference:
    return _Reference()


def hf_chat_ids(
    ref: _Reference, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """``apply_chat_template`` of a finished conversation (thinking off, no generation prompt), tokenized
    as the official evaluation does."""
    text = ref.hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=False, enable_thinking=False
    )
    ids: list[int] = ref.hf(text, add_special_tokens=False)["input_ids"]
    return ids


@pytest.fixture(scope="session")
def template(tokenizer: GuardTokenizer) -> ChatTemplate:
    return ChatTemplate(tokenizer)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("random-guard"), preset="tiny", seed=1)


@pytest.fixture(scope="session")
def trigger_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TriggerSpec(unsafe=TRIGGER_UNSAFE, controversial=TRIGGER_CONTROVERSIAL, category=TRIGGER_CATEGORY)
    return make_trigger_checkpoint(tmp_path_factory.mktemp("trigger-guard"), spec)


@pytest.fixture(scope="session")
def isolated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trigger words flag only themselves (for single-token rules: ``debounce: false``)."""
    spec = TriggerSpec(TRIGGER_UNSAFE, TRIGGER_CONTROVERSIAL, TRIGGER_CATEGORY, isolated=True)
    return make_trigger_checkpoint(tmp_path_factory.mktemp("isolated-guard"), spec)


@pytest.fixture(scope="session")
def random_model(random_checkpoint: Path) -> Qwen3GuardStream:
    return load_guard_model(random_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def trigger_model(trigger_checkpoint: Path) -> Qwen3GuardStream:
    return load_guard_model(trigger_checkpoint, device="cpu")


def answer_ids(template: ChatTemplate, text: str) -> tuple[list[int], list[int]]:
    """A finished answer as the proxy feeds it after the prompt: the context before its first judged
    token (``<|im_start|>assistant`` and the empty think block), then every judged id to ``<|im_end|>``."""
    view = AssistantView(template)
    feeds = view.header() + view.content(text) + view.finish()
    first = next(k for k, f in enumerate(feeds) if f.spans is not None)
    context = [i for f in feeds[:first] for i in f.ids]
    judged = [i for f in feeds[first:] for i in f.ids]
    assert all(f.spans is not None for f in feeds[first:] if f.ids)
    return context, judged


def scaffold(template: ChatTemplate) -> list[int]:
    """What the guard reads between the prompt and an answer's first token (thinking off)."""
    return answer_ids(template, "x")[0]
