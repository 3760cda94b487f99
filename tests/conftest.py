"""Shared fixtures: the real Qwen3 tokenizer and guard checkpoints written and loaded for real."""

from __future__ import annotations

import os
from pathlib import Path

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

TRIGGER_UNSAFE = ["bomb", "grenade"]
TRIGGER_CONTROVERSIAL = ["gun"]
TRIGGER_CATEGORY = "Violent"


@pytest.fixture(scope="session")
def tokenizer() -> GuardTokenizer:
    return GuardTokenizer.from_file(qwen3_tokenizer_file())


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
def random_model(random_checkpoint: Path) -> Qwen3GuardStream:
    return load_guard_model(random_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def trigger_model(trigger_checkpoint: Path) -> Qwen3GuardStream:
    return load_guard_model(trigger_checkpoint, device="cpu")
