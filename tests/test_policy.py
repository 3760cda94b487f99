"""Policy decisions on hand-made verdicts: tiers, modes, thresholds, categories, debounce."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.guard.verdict import HeadLabels, Verdict
from guardproxy.policy import Action, Decision, Policy, ResponseJudge, TierRule

LABELS = HeadLabels(risk=("Safe", "Unsafe", "Controversial"), category=("Violent", "PII", "Political"))


def v(safe: float, unsafe: float, contro: float, category: str = "Violent") -> Verdict:
    cats = tuple(0.9 if c == category else 0.05 for c in LABELS.category)
    return Verdict(risk_probs=(safe, unsafe, contro), category_probs=cats, labels=LABELS)


SAFE_V, UNSAFE_V, CONTRO_V = v(0.9, 0.05, 0.05), v(0.1, 0.8, 0.1), v(0.2, 0.1, 0.7)


def rules(**categories: str) -> MappingProxyType[str, Action]:
    return MappingProxyType({k.replace("_", " "): Action.parse(a) for k, a in categories.items()})


def test_default_policy_cuts_unsafe_and_flags_controversial() -> None:
    p = Policy()
    assert [p.action(x) for x in (SAFE_V, UNSAFE_V, CONTRO_V)] == [Action.ALLOW, Action.CUT, Action.FLAG]


def test_strict_mode_treats_controversial_as_unsafe() -> None:
    p = Policy(mode="strict", controversial=TierRule(Action.ALLOW))
    assert p.action(CONTRO_V) == Action.CUT
    assert Policy(mode="loose", controversial=TierRule(Action.ALLOW)).action(CONTRO_V) == Action.ALLOW


def test_category_overrides() -> None:
    p = Policy(unsafe=TierRule(Action.CUT, rules(PII="redact", Political="flag")))
    assert p.action(v(0.1, 0.8, 0.1, "PII")) == Action.REDACT
    assert p.action(v(0.1, 0.8, 0.1, "Political")) == Action.FLAG
    assert p.action(v(0.1, 0.8, 0.1, "Violent")) == Action.CUT
    assert p.action(v(0.9, 0.05, 0.05, "PII")) == Action.ALLOW  # the category of a Safe token is ignored


def test_thresholds_override_the_arg_max() -> None:
    p = Policy(unsafe_threshold=0.3, unsafe=TierRule(Action.CUT, rules(PII="redact")))
    borderline = v(0.6, 0.35, 0.05, "PII")  # arg-max Safe, but P(Unsafe) >= 0.3
    assert p.tier(borderline) == "Unsafe" and p.action(borderline) == Action.REDACT
    assert p.tier(v(0.75, 0.25, 0.0)) == "Safe"
    assert p.tier(CONTRO_V) == "Controversial"  # no controversial threshold: arg-max still counts
    q = Policy(controversial_threshold=0.9)
    assert q.tier(CONTRO_V) == "Safe" and q.tier(v(0.05, 0.05, 0.9)) == "Controversial"
    assert q.tier(UNSAFE_V) == "Unsafe"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unsafe_threshold": 0.0}, "unsafe_threshold must be in"),
        ({"controversial_threshold": 1.5}, "controversial_threshold must be in"),
        ({"holdback_tokens": -1}, "holdback_tokens must be >= 0"),
        ({"debounce": True}, "debounce needs policy.holdback_tokens >= 1"),
        ({"mode": "medium"}, "mode must be strict or loose"),
        ({"prompt_unsafe": TierRule(Action.REDACT)}, "prompt cannot be redacted"),
    ],
)
def test_bad_policies_name_the_key(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Policy(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown action 'block'"):
        Action.parse("block")


def test_prompt_rules_are_separate() -> None:
    p = Policy(prompt_unsafe=TierRule(Action.FLAG), unsafe=TierRule(Action.CUT))
    assert p.action(UNSAFE_V, prompt=True) == Action.FLAG and p.action(UNSAFE_V) == Action.CUT


def test_judge_without_debounce_decides_each_token() -> None:
    j = ResponseJudge(Policy())
    out = [d for x in (SAFE_V, UNSAFE_V, SAFE_V) for d in j.judge(x)]
    assert [d.action for d in out] == [Action.ALLOW, Action.CUT, Action.ALLOW]
    assert [d.index for d in out] == [0, 1, 2]
    assert (
        j.first_flagged is not None and j.first_flagged.index == 1 and j.first_flagged.category == "Violent"
    )


def test_debounce_needs_two_non_safe_tokens_and_covers_both() -> None:
    j = ResponseJudge(Policy(debounce=True, holdback_tokens=1))
    assert [d.action for d in j.judge(SAFE_V)] == [Action.ALLOW]
    assert [d.action for d in j.judge(UNSAFE_V)] == [Action.ALLOW]  # alone: not yet
    assert [d.action for d in j.judge(SAFE_V)] == [Action.ALLOW]  # a lone spike never flags
    assert j.judge(CONTRO_V)[0].action == Action.ALLOW
    both = j.judge(v(0.1, 0.8, 0.1, "PII"))  # two non-Safe in a row: flag, covering the previous too
    assert [(d.index, d.action) for d in both] == [(3, Action.CUT), (4, Action.CUT)]
    assert both[0].category == "PII"  # the category of the token that completes the run
    assert j.first_flagged == both[0]


@given(st.lists(st.sampled_from([SAFE_V, UNSAFE_V, CONTRO_V]), max_size=60))
def test_debounced_flags_are_a_subset_of_plain_flags(verdicts: list[Verdict]) -> None:
    plain, deb = ResponseJudge(Policy()), ResponseJudge(Policy(debounce=True, holdback_tokens=2))
    flagged_plain = {d.index for x in verdicts for d in plain.judge(x) if d.action != Action.ALLOW}
    decisions: list[Decision] = [d for x in verdicts for d in deb.judge(x)]
    flagged_deb = {d.index for d in decisions if d.action != Action.ALLOW}
    assert flagged_deb <= flagged_plain
    # Every debounced flag belongs to a run of at least two non-Safe tokens.
    for i in flagged_deb:
        assert (i - 1 in flagged_plain) or (i + 1 in flagged_plain)
