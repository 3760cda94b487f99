"""Verdicts -> actions: what a policy does with each judged token and with a prompt.

A policy maps a verdict to an effective tier (Safe, Controversial, Unsafe) by arg-max or by optional
probability thresholds, then to an action: ``allow`` (pass), ``flag`` (pass, annotated), ``redact``
(the token's text replaced by the mask), ``cut`` (nothing more is released). Controversial follows
``mode``: ``strict`` treats it as Unsafe (the technical report's strict mode); ``loose`` gives it the
``controversial`` tier's own actions (``allow`` there is the report's loose mode). Each tier has a
default action and per-category overrides.

``ResponseJudge`` applies a policy to one response's verdicts in order. ``debounce`` (on by default) is
the Qwen3Guard authors' rule, ``consecutive_unsafe`` in their streaming evaluation, taken online: token
i counts as Unsafe only when tokens i-1 and i are both Unsafe, as Controversial only when both are
Controversial (a mixed pair counts as neither), on the tiers after thresholds; ``mode`` applies after
it. The pair's decision covers both tokens with the category of the second. So a token whose own tier
is not Safe, where a pair of that tier may withhold text (``redact`` or ``cut``, for some category),
must wait for the next verdict before its text may go (``ResponseJudge.awaiting``); where the pair
could only flag, the flag is decided one token later and annotates, it delays nothing; a Safe token's
text goes exactly as early as without debounce. ``debounce: false`` decides each token alone:
stricter, and noisier than the published figures (one spiky token cuts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Any, Literal

from guardproxy.guard.verdict import CONTROVERSIAL, SAFE, UNSAFE, Verdict


class Action(IntEnum):
    """Ordered by severity, so the strongest of several decisions is ``max``."""

    ALLOW = 0
    FLAG = 1
    REDACT = 2
    CUT = 3

    @classmethod
    def parse(cls, value: str) -> Action:
        try:
            return cls[value.upper()]
        except KeyError:
            raise ValueError(f"unknown action {value!r}; use allow, flag, redact or cut") from None

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class TierRule:
    action: Action
    categories: MappingProxyType[str, Action] = field(default_factory=lambda: MappingProxyType({}))

    def for_category(self, category: str | None) -> Action:
        if category is not None and category in self.categories:
            return self.categories[category]
        return self.action

    @property
    def withholds(self) -> bool:
        """Whether this rule can keep text from the client (redact or cut), for some category."""
        return max([self.action, *self.categories.values()]) >= Action.REDACT


@dataclass(frozen=True)
class Policy:
    name: str = "default"
    mode: Literal["strict", "loose"] = "loose"
    unsafe: TierRule = TierRule(Action.CUT)
    controversial: TierRule = TierRule(Action.FLAG)
    unsafe_threshold: float | None = None
    controversial_threshold: float | None = None
    holdback_tokens: int = 0
    debounce: bool = True  # the authors' rule: two consecutive tokens of the same non-Safe tier
    early_release: bool = True  # streamed words are released once judged as they stand (moderator)
    think_in_content: bool = True  # a <think>...</think> block opening the content is read as reasoning
    prompt_check: Literal["parallel", "before"] = "parallel"
    prompt_unsafe: TierRule = TierRule(Action.CUT)  # CUT: the prompt is blocked
    prompt_controversial: TierRule = TierRule(Action.FLAG)
    blocked_prompt: Literal["error", "refusal"] = "error"
    refusal: str = "I can't help with that request."
    mask: str = "[redacted]"
    notice: str = "\n\n[guardproxy: the rest of this response was withheld by the content policy]"
    details: bool = True  # moderation details in a `guardproxy` field and x-guardproxy-* headers
    audit_text: bool = False  # write prompt and response text into the audit log (capped)
    on_guard_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    # Responses API: a previous_response_id this proxy never saw (its turns cannot be judged)
    unknown_previous_response: Literal["judge_visible", "refuse"] = "judge_visible"
    # An upstream event or output item of a kind guardproxy does not know, that carries text: judged
    # (its text read as a tool call of its own, the event released whole once judged), passed with its
    # text emptied (drop), or the response ended with an error. Never passed unread.
    unknown_events: Literal["judge", "drop", "fail"] = "judge"
    # A prompt longer than the guard's context: the earlier part judged in windows (the worst verdict
    # applied), or the request refused.
    prompt_overflow: Literal["window", "block"] = "window"

    def __post_init__(self) -> None:
        for name in ("unsafe_threshold", "controversial_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"policy.{name} must be in (0, 1], got {value}")
        if self.holdback_tokens < 0:
            raise ValueError("policy.holdback_tokens must be >= 0")
        if self.on_guard_error not in ("fail_closed", "fail_open"):
            raise ValueError(
                f"policy.on_guard_error must be fail_closed or fail_open, got {self.on_guard_error!r}"
            )
        if self.unknown_previous_response not in ("judge_visible", "refuse"):
            raise ValueError(
                "policy.unknown_previous_response must be judge_visible or refuse, "
                f"got {self.unknown_previous_response!r}"
            )
        if self.unknown_events not in ("judge", "drop", "fail"):
            raise ValueError(
                f"policy.unknown_events must be judge, drop or fail, got {self.unknown_events!r}"
            )
        if self.prompt_overflow not in ("window", "block"):
            raise ValueError(f"policy.prompt_overflow must be window or block, got {self.prompt_overflow!r}")
        if self.blocked_prompt not in ("error", "refusal"):
            raise ValueError(f"policy.blocked_prompt must be error or refusal, got {self.blocked_prompt!r}")
        if self.prompt_check not in ("parallel", "before"):
            raise ValueError(f"policy.prompt_check must be parallel or before, got {self.prompt_check!r}")
        if self.mode not in ("strict", "loose"):
            raise ValueError(f"policy.mode must be strict or loose, got {self.mode!r}")
        for rule in (self.prompt_unsafe, self.prompt_controversial):
            if rule.action == Action.REDACT or Action.REDACT in rule.categories.values():
                raise ValueError("a prompt cannot be redacted: use allow, flag or cut for prompt rules")

    def tier(self, v: Verdict) -> str:
        """Safe, Controversial or Unsafe, after thresholds (when set) and before ``mode``."""
        if self.unsafe_threshold is not None or self.controversial_threshold is not None:
            if v.p_unsafe >= (self.unsafe_threshold if self.unsafe_threshold is not None else 2.0):
                return UNSAFE
            if v.p_controversial >= (
                self.controversial_threshold if self.controversial_threshold is not None else 2.0
            ):
                return CONTROVERSIAL
            # A threshold set for one tier only: the other still follows the arg-max.
            if self.unsafe_threshold is None and v.risk == UNSAFE:
                return UNSAFE
            if self.controversial_threshold is None and v.risk == CONTROVERSIAL:
                return CONTROVERSIAL
            return SAFE
        return v.risk if v.risk in (UNSAFE, CONTROVERSIAL) else SAFE

    def _rule(self, tier: str, prompt: bool) -> TierRule | None:
        if tier == SAFE:
            return None
        if tier == CONTROVERSIAL and self.mode == "loose":
            return self.prompt_controversial if prompt else self.controversial
        return self.prompt_unsafe if prompt else self.unsafe

    def withholds(self, tier: str) -> bool:
        """Whether an answer token of ``tier`` (after thresholds) can be redacted or cut."""
        rule = self._rule(tier, prompt=False)
        return rule is not None and rule.withholds

    def action(self, v: Verdict, *, prompt: bool = False) -> Action:
        tier = self.tier(v)
        rule = self._rule(tier, prompt)
        return Action.ALLOW if rule is None else rule.for_category(v.top_category)


@dataclass(frozen=True)
class Decision:
    """The policy's word on one response token (``index`` counts judged tokens from 0). ``tier`` is the
    tier it was decided on (with debounce, the pair's), before ``mode``."""

    index: int
    action: Action
    tier: str
    category: str | None
    p_unsafe: float
    p_controversial: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "token_index": self.index,
            "action": str(self.action),
            "risk": self.tier,
            "category": self.category,
            "p_unsafe": round(self.p_unsafe, 6),
            "p_controversial": round(self.p_controversial, 6),
        }


class ResponseJudge:
    """One response's verdicts in order -> decisions in order (debounce may raise the one before).

    It keeps what details and audit report: the first flag (the first decision stronger than allow),
    the cut, the first redaction and how many tokens were redacted."""

    def __init__(self, policy: Policy, *, record: bool = False) -> None:
        self.policy = policy
        self.count = 0
        # With ``record``, every token's own verdict (tier after thresholds, probabilities, category),
        # for a live view that shows an answer as it was judged.
        self.verdicts: list[tuple[str, float, float, str]] | None = [] if record else None
        self.first_flagged: Decision | None = None
        self.cut: Decision | None = None
        self.first_redaction: Decision | None = None
        self.redacted = 0  # tokens redacted (a token raised twice by two pairs counts once)
        # Where each tier was first decided (the pair's second token under debounce), whatever the
        # action: the authors' response verdict and its position (guardproxy eval).
        self.first_at: dict[str, int] = {}
        self._last_redacted = -1
        self._prev: tuple[str, Verdict] | None = None  # the previous token's tier (after thresholds)

    @property
    def awaiting(self) -> bool:
        """Under debounce, whether the last token's text must wait for the next verdict: its own tier
        is not Safe, so the next one may make a pair, and a pair of that tier may withhold text. (A
        pair that can only flag is decided one token late and delays nothing.)"""
        p, prev = self.policy, self._prev
        return p.debounce and prev is not None and prev[0] != SAFE and p.withholds(prev[0])

    def judge(self, verdict: Verdict) -> list[Decision]:
        """This token's decision, preceded under debounce by the previous token's when the two make a
        pair. Earlier decisions are never weakened."""
        p = self.policy
        index = self.count
        self.count += 1
        tier = p.tier(verdict)
        if self.verdicts is not None:
            self.verdicts.append((tier, verdict.p_unsafe, verdict.p_controversial, verdict.top_category))
        prev, self._prev = self._prev, (tier, verdict)
        paired = prev is not None and prev[0] == tier
        if p.debounce and not paired:
            tier = SAFE  # a lone non-Safe token, or a mixed pair, is not flagged under debounce
        rule = p._rule(tier, prompt=False)
        category = verdict.top_category if tier != SAFE else None
        action = Action.ALLOW if rule is None else rule.for_category(category)
        if tier != SAFE:
            self.first_at.setdefault(tier, index)
        out = [Decision(index, action, tier, category, verdict.p_unsafe, verdict.p_controversial)]
        if p.debounce and action != Action.ALLOW and prev is not None:
            before = prev[1]
            out.insert(
                0, Decision(index - 1, action, tier, category, before.p_unsafe, before.p_controversial)
            )
        for d in out:
            self._note(d)
        return out

    def _note(self, d: Decision) -> None:
        if d.action == Action.ALLOW:
            return
        if self.first_flagged is None:
            self.first_flagged = d
        if d.action == Action.CUT and self.cut is None:
            self.cut = d
        if d.action == Action.REDACT and d.index > self._last_redacted:
            self._last_redacted = d.index
            self.redacted += 1
            if self.first_redaction is None:
                self.first_redaction = d

    def verdict(self) -> tuple[str, int | None]:
        """The response's verdict by the authors' rule, before ``mode``: Unsafe if any token was decided
        Unsafe, else Controversial if any was, else Safe; with the index where it was first decided."""
        for tier in (UNSAFE, CONTROVERSIAL):
            if tier in self.first_at:
                return tier, self.first_at[tier]
        return SAFE, None

    @property
    def strongest(self) -> Decision | None:
        """The decision that names the outcome: the cut, else the first redaction, else the first flag."""
        return self.cut or self.first_redaction or self.first_flagged

    def details(self) -> dict[str, Any]:
        """Every decision taken on this response, for details and audit."""
        top = self.strongest
        out: dict[str, Any] = {
            "risk": top.tier if top else SAFE,
            "category": top.category if top else None,
            "action": str(top.action) if top else "allow",
            "judged_tokens": self.count,
        }
        if top is not None:
            out["p_unsafe"] = round(top.p_unsafe, 6)
            out["p_controversial"] = round(top.p_controversial, 6)
        if self.first_flagged is not None:
            out["first_flagged_token"] = self.first_flagged.index
            out["first_flag"] = self.first_flagged.as_dict()
        if self.cut is not None:
            out["cut"] = self.cut.as_dict()
        if self.first_redaction is not None:
            out["first_redaction"] = self.first_redaction.as_dict()
            out["redacted_tokens"] = self.redacted
        return out


def decide(policy: Policy, verdicts: list[Verdict]) -> dict[str, Any]:
    """The policy's decisions on a whole answer's verdicts: each token's action (the strongest decision
    on it, pairs included), each token's tier after thresholds, where the cut falls, and the details.
    The playground re-applies a policy with other thresholds this way, without running the guard."""
    judge = ResponseJudge(policy)
    actions = [Action.ALLOW] * len(verdicts)
    for v in verdicts:
        for d in judge.judge(v):
            actions[d.index] = max(actions[d.index], d.action)
    cut = next((i for i, a in enumerate(actions) if a == Action.CUT), None)
    return {
        "actions": [str(a) for a in actions],
        "tiers": [policy.tier(v) for v in verdicts],
        "cut_at": cut,
        "details": judge.details(),
    }
