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
    j = ResponseJudge(Policy(debounce=False))
    out = [d for x in (SAFE_V, UNSAFE_V, SAFE_V) for d in j.judge(x)]
    assert [d.action for d in out] == [Action.ALLOW, Action.CUT, Action.ALLOW]
    assert [d.index for d in out] == [0, 1, 2]
    assert (
        j.first_flagged is not None and j.first_flagged.index == 1 and j.first_flagged.category == "Violent"
    )
    assert not j.awaiting  # without debounce nothing waits for a later verdict


def test_debounce_is_the_default_and_pairs_only_the_same_tier() -> None:
    j = ResponseJudge(Policy())
    assert j.policy.debounce
    assert [d.action for d in j.judge(SAFE_V)] == [Action.ALLOW] and not j.awaiting
    assert [d.action for d in j.judge(UNSAFE_V)] == [Action.ALLOW] and j.awaiting  # alone: not yet
    assert [d.action for d in j.judge(SAFE_V)] == [Action.ALLOW]  # a lone spike never flags
    # A Controversial pair only flags under the default policy: nothing waits for it (it is decided one
    # token late, annotating); where it may redact, the token's text waits for the next verdict.
    assert j.judge(CONTRO_V)[0].action == Action.ALLOW and not j.awaiting
    redacting = ResponseJudge(
        Policy(controversial=TierRule(Action.FLAG, MappingProxyType({"PII": Action.REDACT})))
    )
    assert redacting.judge(CONTRO_V)[0].action == Action.ALLOW and redacting.awaiting
    # Controversial then Unsafe: a mixed pair counts as neither (the authors' rule).
    assert [d.action for d in j.judge(v(0.1, 0.8, 0.1, "PII"))] == [Action.ALLOW]
    both = j.judge(v(0.1, 0.8, 0.1, "PII"))  # two Unsafe in a row: the pair covers the previous too
    assert [(d.index, d.action) for d in both] == [(4, Action.CUT), (5, Action.CUT)]
    assert both[0].category == "PII"  # the category of the token that completes the pair
    assert both[0].p_unsafe == 0.8 and j.first_flagged == both[0] and j.cut == both[0]
    d = j.details()
    assert d["action"] == "cut" and d["cut"]["token_index"] == 4 and d["judged_tokens"] == 6


def test_details_name_the_cut_not_the_first_flag() -> None:
    j = ResponseJudge(Policy())
    for x in (CONTRO_V, CONTRO_V, SAFE_V, UNSAFE_V, UNSAFE_V):
        j.judge(x)
    d = j.details()
    assert d["first_flag"]["risk"] == "Controversial" and d["first_flag"]["action"] == "flag"
    assert d["first_flag"]["token_index"] == 0
    assert d["risk"] == "Unsafe" and d["action"] == "cut" and d["cut"]["token_index"] == 3
    assert d["cut"]["p_unsafe"] == 0.8 and d["cut"]["category"] == "Violent"


def consecutive_unsafe(tiers: list[str]) -> tuple[str, int]:
    """The authors' offline rule (QwenLM/Qwen3Guard, eval/eval_stream.py), as the design notes state it:
    Unsafe at the second token of the first Unsafe pair, else Controversial at the second token of the
    first Controversial pair, else Safe."""
    for tier in ("Unsafe", "Controversial"):
        for i in range(1, len(tiers)):
            if tiers[i - 1] == tiers[i] == tier:
                return tier, i
    return "Safe", -1


@given(
    st.lists(st.sampled_from([SAFE_V, UNSAFE_V, CONTRO_V]), max_size=60), st.sampled_from(["strict", "loose"])
)
def test_online_debounce_equals_the_authors_offline_rule(verdicts: list[Verdict], mode: str) -> None:
    # Every tier acted on (flag), so each pair shows as a decision.
    p = Policy(mode=mode, unsafe=TierRule(Action.FLAG), controversial=TierRule(Action.FLAG))  # type: ignore[arg-type]
    j = ResponseJudge(p)
    decisions = [d for x in verdicts for d in j.judge(x)]
    tiers = [p.tier(x) for x in verdicts]
    expected, at = consecutive_unsafe(tiers)
    unsafe_pairs = [
        d.index for d in decisions if d.tier == "Unsafe" and d.index > 0 and tiers[d.index - 1] == "Unsafe"
    ]
    contro_pairs = [
        d.index
        for d in decisions
        if d.tier == "Controversial" and d.index > 0 and tiers[d.index - 1] == "Controversial"
    ]
    got, got_at = ("Unsafe", min(unsafe_pairs)) if unsafe_pairs else ("Safe", -1)
    if got == "Safe" and contro_pairs:
        got, got_at = "Controversial", min(contro_pairs)
    assert (got, got_at) == (expected, at)
    # Strict/loose after the rule: strict makes a Controversial result Unsafe, loose makes it Safe.
    strongest = max((d.action for d in decisions), default=Action.ALLOW)
    assert (strongest != Action.ALLOW) == (expected != "Safe")
    if expected == "Controversial":
        acted = {d.tier for d in decisions if d.action != Action.ALLOW}
        assert acted == {"Controversial"}


@given(st.lists(st.sampled_from([SAFE_V, UNSAFE_V, CONTRO_V]), max_size=60))
def test_debounced_flags_are_a_subset_of_plain_flags(verdicts: list[Verdict]) -> None:
    plain, deb = ResponseJudge(Policy(debounce=False)), ResponseJudge(Policy())
    flagged_plain = {d.index for x in verdicts for d in plain.judge(x) if d.action != Action.ALLOW}
    decisions: list[Decision] = [d for x in verdicts for d in deb.judge(x)]
    flagged_deb = {d.index for d in decisions if d.action != Action.ALLOW}
    assert flagged_deb <= flagged_plain
    # Every debounced flag belongs to a pair of two tokens of the same non-Safe tier.
    tiers = [Policy().tier(x) for x in verdicts]
    for i in flagged_deb:
        assert (i > 0 and tiers[i - 1] == tiers[i]) or (i + 1 < len(tiers) and tiers[i + 1] == tiers[i])
