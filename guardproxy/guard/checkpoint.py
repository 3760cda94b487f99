"""Where a guard checkpoint lives and what a process needs of it without the weights: its local
directory (a hub id fetched into the Hugging Face cache) and the chat template on its tokenizer.

Nothing here imports torch or transformers: a proxy worker (``server.workers`` > 1) renders prompts
and re-tokenizes answers with this, and leaves the model to the guard engine's process."""

from __future__ import annotations

from pathlib import Path

from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.tokenizer import GuardTokenizer

DEFAULT_GUARD_MODEL = "Qwen/Qwen3Guard-Stream-0.6B"

_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "tokenizer*"]


class GuardModelError(RuntimeError):
    """A checkpoint that cannot be loaded as Qwen3Guard-Stream (the message says why)."""


def resolve_checkpoint(source: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id fetched (weights, config, tokenizer) into the HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise GuardModelError(f"guard model {text!r}: no such checkpoint directory (nor a hub id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=_CHECKPOINT_PATTERNS))
    except Exception as exc:  # the hub client raises many types; all mean "could not fetch"
        raise GuardModelError(f"guard model {text!r}: could not fetch from the hub: {exc}") from exc


def load_template(source: str | Path, *, revision: str | None = None) -> tuple[Path, ChatTemplate]:
    """The checkpoint's local directory (fetched if a hub id) and the template on its tokenizer, for a
    process that leaves the weights to another."""
    path = resolve_checkpoint(source, revision)
    return path, ChatTemplate(GuardTokenizer.from_checkpoint(path))
