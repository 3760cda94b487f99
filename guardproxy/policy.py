"""Verdicts -> actions: what a policy does with each judged token and with a prompt.

A policy maps a verdict to an effective tier (Safe, Controversial, Unsafe) by arg-max or by optional
probability thresholds, then to an action: ``allow`` (pass), ``flag`` (pass, annotated), ``redact``
(the token's text replaced by the mask), ``cut`` (nothing more is released). Controversial follows
``mode``: ``strict`` treats it as Unsafe (the technical report's strict mode); ``loose`` gives it the
``controversial`` tier's own actions (``allow`` there is the report's loose mode). Each tier has a
default action and per-category overrides.

``ResponseJudge`` applies a policy to one response's verdicts in order. With ``debounce`` (the report's
rule) a token is flagged only when it and the token before it are both non-Safe; the decision then
covers both, which is why debounce needs ``holdback_tokens >= 1``: the earlier token must still be in
hand when the later one decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Literal

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


@dataclass(frozen=True)
class Policy:
    name: str = "default"
    mode: Literal["strict", "loose"] = "loose"
    unsafe: TierRule = TierRule(Action.CUT)
    controversial: TierRule = TierRule(Action.FLAG)
    unsafe_threshold: float | None = None
    controversial_threshold: float | None = None
    holdback_tokens: int = 0
    debounce: bool = False
    early_release: bool = True  # streamed words are released once judged as they stand (moderator)
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

    def __post_init__(self) -> None:
        for name in ("unsafe_threshold", "controversial_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"policy.{name} must be in (0, 1], got {value}")
        if self.holdback_tokens < 0:
            raise ValueError("policy.holdback_tokens must be >= 0")
        if self.debounce and self.holdback_tokens < 1:
            raise ValueError("policy.debounce needs policy.holdback_tokens >= 1 to act before release")
        if self.on_guard_error not in ("fail_closed", "fail_open"):
            raise ValueError(
                f"policy.on_guard_error must be fail_closed or fail_open, got {self.on_guard_error!r}"
            )
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

    def action(self, v: Verdict, *, prompt: bool = False) -> Action:
        tier = self.tier(v)
        rule = self._rule(tier, prompt)
        return Action.ALLOW if rule is None else rule.for_category(v.top_category)


@dataclass(frozen=True)
class Decision:
    """The policy's word on one response token (``index`` counts judged tokens from 0)."""

    index: int
    action: Action
    tier: str
    category: str | None
    p_unsafe: float
    p_controversial: float


class ResponseJudge:
    """One response's verdicts in order -> decisions in order (debounce may revise the one before)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.count = 0
        self.first_flagged: Decision | None = None
        self._prev: tuple[str, float, float] | None = None  # the previous token's tier and probs

    def judge(self, verdict: Verdict) -> list[Decision]:
        """This token's decision, preceded under debounce by the previous token's when a run of two
        non-Safe tokens starts a flag. Earlier decisions are never weakened."""
        p = self.policy
        index = self.count
        self.count += 1
        tier = p.tier(verdict)
        prev, self._prev = self._prev, (tier, verdict.p_unsafe, verdict.p_controversial)
        if p.debounce and (prev is None or prev[0] == SAFE):
            tier = SAFE  # a lone non-Safe token is not flagged under debounce
        rule = p._rule(tier, prompt=False)
        category = verdict.top_category if tier != SAFE else None
        action = Action.ALLOW if rule is None else rule.for_category(category)
        decision = Decision(index, action, tier, category, verdict.p_unsafe, verdict.p_controversial)
        out = [decision]
        if p.debounce and action != Action.ALLOW and prev is not None:
            out.insert(0, Decision(index - 1, action, tier, category, prev[1], prev[2]))
        if self.first_flagged is None and action != Action.ALLOW:
            self.first_flagged = out[0]
        return out
