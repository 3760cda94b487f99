"""OpenAI's moderation endpoint (``/v1/moderations``), sans-IO: its request read, each input's result
written from a prompt verdict of the guard's query head (the input judged as a user turn)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardproxy.apis.errors import bad_request
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Policy
from guardproxy.stream.session import verdict_details

ROUTE = "/v1/moderations"
MAX_INPUTS = 256


def inputs(body: Mapping[str, Any]) -> list[str]:
    """The texts to judge: ``input`` as one string or a list of them."""
    given = body.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad_request("input must be a string or a non-empty list of strings", param="input")
    if len(texts) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request", param="input")
    return texts


def result(v: Verdict, policy: Policy) -> dict[str, Any]:
    """One input's result. Flagged: Unsafe, or Controversial under a strict policy (the tiers after
    the policy's thresholds); the flagged category is the verdict's top one; each category's score is
    its share of the probability that the text is not Safe."""
    unsafe_mass = 1.0 - v.p("Safe")
    tier = policy.tier(v)
    flagged = tier == "Unsafe" or (tier == "Controversial" and policy.mode == "strict")
    return {
        "flagged": flagged,
        "categories": {c: flagged and c == v.top_category for c in v.labels.category},
        "category_scores": {
            c: p * unsafe_mass for c, p in zip(v.labels.category, v.category_probs, strict=True)
        },
        "guardproxy": {
            **verdict_details(v, policy.action(v, prompt=True)),
            "tier": tier,
            "risk_probs": dict(zip(v.labels.risk, v.risk_probs, strict=True)),
        },
    }
