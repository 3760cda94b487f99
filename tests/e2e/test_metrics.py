"""/metrics moves as requests run, and the engine gauges come back to zero."""

from __future__ import annotations

import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import FakeUpstream, Script


def scrape(proxy: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(proxy.removesuffix("/v1") + "/metrics") as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_the_traffic(proxy: str, fake: FakeUpstream) -> None:
    before = scrape(proxy)
    # The same long system prompt twice: the second request reads its whole pages from the prefix cache.
    chat = [
        {"role": "system", "content": "You are a careful, helpful assistant. " * 6},
        {"role": "user", "content": "hi"},
    ]
    with openai.OpenAI(base_url=proxy, api_key="k", max_retries=0) as c:
        fake.script = Script(pieces=[["Fine", " words", " only", "."]])
        list(c.chat.completions.create(model="m", messages=chat, stream=True))  # type: ignore[arg-type]
        fake.script = Script(pieces=[["A", " bomb", "."]])
        list(c.chat.completions.create(model="m", messages=chat, stream=True))  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "a grenade"}])
    after = scrape(proxy)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/chat/completions"
    assert moved("guardproxy_requests_total", route=route, status="200") == 2
    assert moved("guardproxy_requests_total", route=route, status="400") == 1
    assert moved("guardproxy_prompt_verdicts_total", risk="Safe", category="", action="allow") == 2
    assert moved("guardproxy_prompt_verdicts_total", risk="Unsafe", category="Violent", action="cut") == 1
    assert moved("guardproxy_response_actions_total", action="cut", risk="Unsafe", category="Violent") == 1
    assert (
        moved("guardproxy_engine_batch_tokens_count") > 0 and moved("guardproxy_engine_step_seconds_sum") > 0
    )
    assert moved("guardproxy_token_verdict_wait_seconds_count") > 0
    assert moved("guardproxy_chunk_added_latency_seconds_count") >= 2
    assert moved("guardproxy_time_to_first_token_seconds_count", source="proxy") == 2
    assert moved("guardproxy_time_to_first_token_seconds_count", source="upstream") == 2
    for name in (
        "guardproxy_engine_slides_total",
        "guardproxy_engine_memory_waits_total",
        "guardproxy_engine_memory_timeouts_total",
    ):
        assert (name, ()) in after and moved(name) == 0  # short answers: no slide, no wait for memory
    assert moved("guardproxy_engine_prefill_tokens_total") > 0
    assert moved("guardproxy_engine_prefix_hit_tokens_total") >= 48  # the system prompt's whole pages
    assert value(after, "guardproxy_engine_prefix_cached_pages") >= 3
    # Every guard stream was returned.
    assert value(after, "guardproxy_engine_active_streams") == 0
    assert value(after, "guardproxy_engine_cached_tokens") == 0


def test_every_metric_the_grafana_dashboard_queries_is_served(proxy: str, fake: FakeUpstream) -> None:
    """The dashboard's queries name metrics and labels guardproxy exports: a renamed metric or label
    would leave a panel silently empty."""
    import json
    import re
    from pathlib import Path

    from guardproxy.observe.metrics import Metrics

    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "guardproxy.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    # Traffic first, so the labelled counters have samples to read their labels from.
    with openai.OpenAI(base_url=proxy, api_key="k", max_retries=0) as c:
        fake.script = Script(pieces=[["A", " bomb", "."]])
        list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    with urllib.request.urlopen(proxy.removesuffix("/v1") + "/metrics") as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    labels: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    # A family with no sample yet (guard failures need a failing guard) has its labels from its collector.
    declared = {"guardproxy_guard_failures_total": set(Metrics().guard_failures._labelnames)}
    added_by_prometheus = {"instance", "job"}
    for expr in exprs:
        names = set(re.findall(r"\bguardproxy_[a-z_]+", expr))
        assert names, expr
        for name in names:
            have = labels.get(name, declared.get(name))
            assert have is not None, f"{name} (in {expr!r}) is not in /metrics"
            used = {
                lbl
                for group in re.findall(r"by \(([^)]*)\)", expr)
                for lbl in group.replace(" ", "").split(",")
            }
            used |= set(re.findall(r"[{,]\s*([a-z_]+)\s*[=!]~?", expr))
            missing = used - have - added_by_prometheus
            assert not missing, f"{expr!r}: {name} has no label {missing}"
