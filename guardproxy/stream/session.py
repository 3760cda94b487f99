"""One moderated request's own decisions, sans-IO: what the exchange (``server/exchange.py``) asks before
and after the answer's outputs (``Outputs``) take over. Events in, commands out, as the outputs' core:

- the prompt gate: with ``prompt_check: parallel`` the upstream is asked at once, with ``before`` only
  once the prompt's verdict allows it; a prompt whose action is a cut is blocked, answered by
  ``blocked_prompt`` (an error in the API's shape, or the API's refusal);
- a prompt the guard could not judge: the policy's ``on_guard_error`` (fail open, marked; or closed);
- what the request tells: the details of every decision, the ``x-guardproxy-*`` headers, its outcome
  and its audit record.

The exchange carries the commands out (the upstream request, the metrics, the answer); it never decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guardproxy.guard.verdict import Verdict
from guardproxy.observe.audit import capped
from guardproxy.policy import Action, Policy
from guardproxy.stream.outputs import Command, Outputs


@dataclass(frozen=True, slots=True)
class StartUpstream:
    """Send the request upstream now."""


@dataclass(frozen=True, slots=True)
class CountPrompt:
    """A prompt verdict for the metrics: its tier, its category (when not Safe), the action taken."""

    risk: str
    category: str
    action: Action


@dataclass(frozen=True, slots=True)
class BlockPrompt:
    """The prompt is blocked: stop the upstream, answer with ``message`` as an error (``as_error``) or
    with the API's refusal."""

    message: str
    as_error: bool


SessionCommand = StartUpstream | CountPrompt | BlockPrompt | Command


def verdict_details(v: Verdict | None, action: Action) -> dict[str, Any]:
    """One verdict as details report it (a prompt's; ``None``: the guard failed and the policy failed
    open)."""
    if v is None:
        return {"risk": "unjudged", "category": None, "action": str(action)}
    return {
        "risk": v.risk,
        "category": v.category,
        "action": str(action),
        "p_unsafe": round(v.p_unsafe, 6),
        "p_controversial": round(v.p_controversial, 6),
    }


@dataclass(frozen=True)
class Request:
    """What the session knows of the request: the API's route, the model asked for, whether streamed."""

    route: str
    model: str | None
    streaming: bool


class Session:
    def __init__(self, policy: Policy, outputs: Outputs, request: Request) -> None:
        self.policy = policy
        self.outputs = outputs
        self.request = request
        self.prompt_verdict: Verdict | None = None
        self.window_report: dict[str, Any] | None = None  # a prompt longer than the guard's context
        self.prompt_action = Action.ALLOW
        self.upstream_asked = False
        self.status = 200  # what the client got (499: it went away)

    # -- the prompt ------------------------------------------------------------------------------------

    def start(self) -> list[SessionCommand]:
        """The guard stream is open on the prompt."""
        return self._ask_upstream() if self.policy.prompt_check == "parallel" else []

    def prompt_judged(
        self, verdict: Verdict, window_report: dict[str, Any] | None = None
    ) -> list[SessionCommand]:
        self.prompt_verdict, self.window_report = verdict, window_report
        self.prompt_action = self.policy.action(verdict, prompt=True)
        category = verdict.top_category if verdict.risk != "Safe" else ""
        out: list[SessionCommand] = [CountPrompt(verdict.risk, category, self.prompt_action)]
        if self.prompt_action == Action.CUT:
            reason = verdict.risk + (f": {verdict.top_category}" if verdict.risk != "Safe" else "")
            message = f"The prompt was blocked by the content policy ({reason})."
            return [*out, BlockPrompt(message, as_error=self.policy.blocked_prompt == "error")]
        return [*out, *self._ask_upstream()]

    def prompt_failed(self, reason: str) -> list[SessionCommand]:
        """The guard could not judge the prompt: the policy's ``on_guard_error`` (an ``Abort``, or the
        request goes on, marked as not judged)."""
        out: list[SessionCommand] = [*self.outputs.guard_failed(None, reason)]
        return out + self._ask_upstream()

    def _ask_upstream(self) -> list[SessionCommand]:
        if self.upstream_asked:
            return []
        self.upstream_asked = True
        return [StartUpstream()]

    # -- what the request tells ------------------------------------------------------------------------

    def details(self) -> dict[str, Any]:
        """Every decision: the prompt's verdict, and for the answer the first flag, the cut or the
        redactions (token index, tier, category, probabilities); with several choices, each one's."""
        details: dict[str, Any] = {
            "prompt": verdict_details(self.prompt_verdict, self.prompt_action),
            "response": self.outputs.details(),
        }
        if self.window_report is not None:
            details["prompt"]["windowed"] = self.window_report
        if self.outputs.failure is not None:
            details["guard_error"] = self.outputs.failure  # failed open: what follows it was not judged
        return details

    def headers(self, upstream: dict[str, str]) -> dict[str, str]:
        """The response's headers: the upstream's that go back (``upstream``), and where the policy
        shows details, ours."""
        if not self.policy.details:
            return upstream
        d = self.details()
        h = {
            **upstream,
            "x-guardproxy-prompt-risk": str(d["prompt"]["risk"]),
            "x-guardproxy-policy": self.policy.name,
        }
        if "guard_error" in d:
            h["x-guardproxy-guard"] = "failed-open"
        if not self.request.streaming:  # a stream's headers leave before its answer is judged
            h["x-guardproxy-response-risk"] = d["response"]["risk"]
            h["x-guardproxy-action"] = d["response"]["action"]
        return h

    def outcome(self) -> str:
        """blocked, cut, redacted, flagged, allowed, or error (a failure with nothing decided)."""
        if self.prompt_action == Action.CUT:
            return "blocked"
        actions = [m.decided.action for m in self.outputs.moderators.values() if m.decided is not None]
        strongest = max([*actions, self.prompt_action], default=Action.ALLOW)
        if self.status >= 400 and strongest == Action.ALLOW:
            return "error"
        return {Action.CUT: "cut", Action.REDACT: "redacted", Action.FLAG: "flagged"}.get(
            strongest, "allowed"
        )

    def audit_record(
        self, request_id: str, duration_s: float, prompt_text: Callable[[], str], text_chars: int
    ) -> dict[str, Any]:
        """The request's audit record; with ``audit_text`` the prompt and each output's fields, each cut
        to ``text_chars`` (``prompt_text`` is asked only then)."""
        record: dict[str, Any] = {
            "request_id": request_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "route": self.request.route,
            "model": self.request.model,
            "policy": self.policy.name,
            "status": self.status,
            "stream": self.request.streaming,
            "outcome": self.outcome(),
            **self.details(),
            "duration_ms": round(duration_s * 1000, 1),
        }
        if self.policy.audit_text:
            try:
                prompt = prompt_text()
            except Exception:  # the prompt was rendered once already; text for the record is best effort
                prompt = ""
            record["prompt_text"] = capped(prompt, text_chars)
            record["response_text"] = {
                str(i): {name: capped(f.text, text_chars) for name, f in m.fields.items()}
                for i, m in sorted(self.outputs.moderators.items())
            }
        return record
