"""Verdicts: the guard's probabilities at one position, with the label names to read them (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

SAFE = "Safe"
UNSAFE = "Unsafe"
CONTROVERSIAL = "Controversial"


@dataclass(frozen=True, slots=True)
class HeadLabels:
    """Label names of one head pathway, in the order of the head's output units."""

    risk: tuple[str, ...]
    category: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GuardLabels:
    response: HeadLabels
    query: HeadLabels


def _argmax(values: tuple[float, ...]) -> int:
    return max(range(len(values)), key=values.__getitem__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Full distributions of one head pathway at one position: risk levels and categories."""

    risk_probs: tuple[float, ...]
    category_probs: tuple[float, ...]
    labels: HeadLabels

    @property
    def risk(self) -> str:
        return self.labels.risk[_argmax(self.risk_probs)]

    @property
    def category(self) -> str | None:
        """The arg-max category, or None when the risk is Safe (the head always names one)."""
        if self.risk == SAFE:
            return None
        return self.labels.category[_argmax(self.category_probs)]

    @property
    def top_category(self) -> str:
        """The arg-max category, whatever the risk (thresholds can make a Safe arg-max count)."""
        return self.labels.category[_argmax(self.category_probs)]

    def p(self, level: str) -> float:
        """Probability of a risk level by name (0.0 if the checkpoint has no such level)."""
        try:
            return self.risk_probs[self.labels.risk.index(level)]
        except ValueError:
            return 0.0

    @property
    def p_unsafe(self) -> float:
        return self.p(UNSAFE)

    @property
    def p_controversial(self) -> float:
        return self.p(CONTROVERSIAL)

    def to_dict(self) -> dict[str, object]:
        return {
            "risk": self.risk,
            "category": self.category,
            "risk_probs": dict(zip(self.labels.risk, self.risk_probs, strict=True)),
            "category_probs": dict(zip(self.labels.category, self.category_probs, strict=True)),
        }
