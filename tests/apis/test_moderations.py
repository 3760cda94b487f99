"""OpenAI's moderation endpoint, sans-IO: its request read and each result written from a verdict."""

from __future__ import annotations

import pytest

from guardproxy.apis.errors import ProxyError
from guardproxy.apis.moderations import MAX_INPUTS, inputs, result
from guardproxy.guard.verdict import HeadLabels, Verdict
from guardproxy.policy import Policy

LABELS = HeadLabels(risk=("Safe", "Unsafe", "Controversial"), category=("Violent", "PII"))


def test_inputs_are_one_string_or_a_bounded_list_of_them() -> None:
    assert inputs({"input": "hi"}) == ["hi"] and inputs({"input": ["a", "b"]}) == ["a", "b"]
    for bad in ({}, {"input": []}, {"input": ["a", 1]}, {"input": 3}, {"input": ["x"] * (MAX_INPUTS + 1)}):
        with pytest.raises(ProxyError) as err:
            inputs(bad)
        assert err.value.status == 400 and err.value.param == "input"


@pytest.mark.parametrize(
    ("risk", "mode", "flagged"),
    [
        ((0.9, 0.05, 0.05), "loose", False),
        ((0.05, 0.9, 0.05), "loose", True),
        ((0.05, 0.05, 0.9), "loose", False),
        ((0.05, 0.05, 0.9), "strict", True),
    ],
)
def test_flagged_is_unsafe_or_controversial_under_a_strict_policy(
    risk: tuple[float, float, float], mode: str, flagged: bool
) -> None:
    r = result(Verdict(risk, (0.25, 0.75), LABELS), Policy(mode=mode))  # type: ignore[arg-type]
    assert r["flagged"] is flagged
    assert r["categories"] == {"Violent": False, "PII": flagged}  # only the top category, when flagged
    assert r["category_scores"] == pytest.approx(
        {"Violent": 0.25 * (1 - risk[0]), "PII": 0.75 * (1 - risk[0])}
    )
    assert r["guardproxy"]["risk_probs"] == dict(zip(LABELS.risk, risk, strict=True))
