"""The /ui page's data: the playground's judge and decide calls, the policies, the live feed, the
keys that guard them and the fixed set of files the page is made of."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest

from guardproxy.config import AuthSettings, UiSettings, key_hash
from guardproxy.guard.testing import QUERY_CATEGORIES
from guardproxy.observe.live import LiveFeed

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, start_proxy

ANSWER = "Take a gun and then a bomb. Done"
# A prompt verdict as the judge call gives it (the test checkpoint's query labels), and risk
# probabilities that are not a distribution over its labels.
PROMPT = {
    "risk_probs": {"Safe": 1.0, "Unsafe": 0.0, "Controversial": 0.0},
    "category_probs": {c: 1.0 / len(QUERY_CATEGORIES) for c in QUERY_CATEGORIES},
}
UNDER = {"Safe": -0.5, "Unsafe": 0.0, "Controversial": 0.0}


def sent_back(answer: dict[str, Any]) -> dict[str, Any]:
    """What the page sends to /ui/api/decide: the judge call's verdicts, as they came."""

    def probs(v: dict[str, Any]) -> dict[str, Any]:
        return {"risk_probs": v["risk_probs"], "category_probs": v["category_probs"]}

    return {"prompt": probs(answer["prompt"]), "tokens": [probs(t) for t in answer["tokens"]]}


KEY = "sk-ui-test"


def root(proxy: str) -> str:
    return proxy.removesuffix("/v1")


def call(proxy: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(root(proxy) + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            status, got = r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, got = e.read(), e.code, dict(e.headers)
    ctype = got.get("Content-Type", "")
    return status, got, json.loads(raw) if ctype.startswith("application/json") else raw


@pytest.fixture(scope="module")
def ui_proxy(loopback: Loopback, upstream: tuple[FakeUpstream, str], graded_checkpoint: Path) -> str:
    """Strict mode (Controversial is cut too) and a second policy, looser, to pick in the playground."""
    settings = proxy_settings(upstream[1], graded_checkpoint, mode="strict", audit_text=True)
    loose = replace(settings.policy, name="loose", mode="loose", unsafe_threshold=0.5)
    return start_proxy(loopback, replace(settings, policies={"loose": loose}))


def judge(proxy: str, **body: Any) -> dict[str, Any]:
    status, _, answer = call(
        proxy, "/ui/api/judge", {"messages": [{"role": "user", "content": "Tell me a story"}], **body}
    )
    assert status == 200, answer
    return answer


def cut_token(answer: dict[str, Any]) -> str | None:
    at = answer["decisions"]["cut_at"]
    return None if at is None else answer["tokens"][at]["token"]


def test_judge_gives_every_token_its_verdict_and_the_cut(ui_proxy: str) -> None:
    answer = judge(ui_proxy, response=ANSWER)
    tokens = answer["tokens"]
    # Every judged token, the answer's text exactly, then the <|im_end|> the guard also judges.
    assert "".join(t["token"] for t in tokens if not t["markup"]) == ANSWER
    assert tokens[-1]["markup"] and tokens[-1]["token"] == "<|im_end|>"
    assert [t["position"] for t in tokens] == list(
        range(tokens[0]["position"], tokens[0]["position"] + len(tokens))
    )
    by_text = {t["token"]: t for t in tokens}
    assert by_text[" gun"]["risk"] == "Controversial" and 0.9 < by_text[" gun"]["p_controversial"] < 0.99
    assert by_text[" bomb"]["risk"] == "Unsafe" and 0.5 < by_text[" bomb"]["p_unsafe"] < 0.6
    assert [(t["token"], t["risk"]) for t in tokens[:2]] == [("Take", "Safe"), (" a", "Safe")]
    # Strict mode: the Controversial " gun" and the token after it make the pair that cuts, at " gun".
    assert cut_token(answer) == " gun"
    d = answer["decisions"]
    assert d["details"]["cut"]["token_index"] == d["cut_at"]
    assert d["actions"][: d["cut_at"]] == ["allow"] * d["cut_at"]
    assert answer["prompt_action"] == "allow" and answer["prompt"]["risk"] == "Safe"


def test_thresholds_move_the_cut_without_the_guard(ui_proxy: str) -> None:
    answer = judge(ui_proxy, response=ANSWER)
    # " gun" is Controversial at ~0.96: a 0.97 threshold leaves it Safe, and the cut moves to " bomb".
    status, _, later = call(
        ui_proxy, "/ui/api/decide", {"verdicts": sent_back(answer), "thresholds": {"controversial": 0.97}}
    )
    assert status == 200, later
    at = later["decisions"]["cut_at"]
    assert answer["tokens"][at]["token"] == " bomb" and later["decisions"]["tiers"][at] == "Unsafe"
    # " bomb" is Unsafe at ~0.55: an Unsafe threshold of 0.6 as well, and nothing is cut.
    status, _, none = call(
        ui_proxy,
        "/ui/api/decide",
        {"verdicts": sent_back(answer), "thresholds": {"controversial": 0.97, "unsafe": 0.6}},
    )
    assert none["decisions"]["cut_at"] is None and set(none["decisions"]["actions"]) == {"allow"}
    # The other policy (loose: Controversial is only flagged) cuts at " bomb" and flags " gun".
    _, _, loose = call(ui_proxy, "/ui/api/decide", {"verdicts": sent_back(answer), "policy": "loose"})
    assert loose["policy"] == "loose"
    assert answer["tokens"][loose["decisions"]["cut_at"]]["token"] == " bomb"
    assert loose["decisions"]["details"]["first_flag"]["action"] == "flag"


def test_policies_list_names_modes_and_thresholds(ui_proxy: str) -> None:
    status, _, policies = call(ui_proxy, "/ui/api/policies")
    assert status == 200
    assert [(p["name"], p["mode"], p["thresholds"]) for p in policies] == [
        ("default", "strict", {"unsafe": None, "controversial": None}),
        ("loose", "loose", {"unsafe": 0.5, "controversial": None}),
    ]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/ui/api/judge", {"messages": [], "response": "x"}, 400, "messages"),
        ("/ui/api/judge", {"messages": [{"role": "user", "content": "x"}], "response": 3}, 400, "response"),
        ("/ui/api/judge", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
        ("/ui/api/judge", {"messages": [{"role": "user", "content": "x"}], "policy": "nope"}, 400, "policy"),
        ("/ui/api/decide", {"id": "a judge call's id: nothing is kept"}, 400, "verdicts"),
        ("/ui/api/decide", {"verdicts": {"prompt": {}, "tokens": []}}, 400, "verdicts"),
        (
            "/ui/api/decide",
            {"verdicts": {"prompt": PROMPT, "tokens": [{"risk_probs": {"Safe": 1}}]}},
            400,
            "verdicts",
        ),
        (
            "/ui/api/decide",
            {"verdicts": {"prompt": {**PROMPT, "risk_probs": UNDER}, "tokens": []}},
            400,
            "verdicts",
        ),
    ],
)
def test_bad_calls_get_clear_errors(
    ui_proxy: str, path: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    got, _, error = call(ui_proxy, path, body)
    assert got == status
    assert error["error"]["message"]
    assert error["error"].get("param") == param


@pytest.mark.parametrize("thresholds", [{"unsafe": "high"}, {"unsafe": 0}, {"controversial": 1.5}, [0.5]])
def test_bad_thresholds_are_refused(ui_proxy: str, thresholds: Any) -> None:
    answer = judge(ui_proxy, response="Fine words")
    status, _, error = call(
        ui_proxy, "/ui/api/decide", {"verdicts": sent_back(answer), "thresholds": thresholds}
    )
    assert status == 400 and error["error"]["param"] == "thresholds"


def test_the_page_is_a_fixed_set_of_files(ui_proxy: str) -> None:
    status, headers, page = call(ui_proxy, "/ui")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/ui/app.js"' in page and b"//" not in page.split(b"<script")[1].split(b">")[0].replace(
        b'src="/ui/', b""
    )  # the script is ours, from this server: nothing from a CDN
    for name, ctype in (("app.js", "application/javascript"), ("style.css", "text/css")):
        status, headers, _ = call(ui_proxy, f"/ui/{name}")
        assert status == 200 and headers["Content-Type"].startswith(ctype)
    for name in ("index.html", "..%2Fconfig.py", "nope.js", "__init__.py"):
        assert call(ui_proxy, f"/ui/{name}")[0] == 404


def read_events(resp: Any, want: Any, seconds: float = 20.0) -> list[tuple[str, Any]]:
    """Server-sent events from ``resp`` until ``want(events)`` holds (a deadline, not a sleep)."""
    events: list[tuple[str, Any]] = []
    deadline = time.monotonic() + seconds
    name, data = "message", []
    while not want(events):
        assert time.monotonic() < deadline, f"live feed: condition not met; got {[e for e, _ in events]}"
        line = resp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
    return events


def test_live_feed_streams_decisions_with_tokens_and_engine_state(ui_proxy: str, fake: FakeUpstream) -> None:
    req = urllib.request.Request(root(ui_proxy) + "/ui/api/live")
    with urllib.request.urlopen(req, timeout=30) as live:
        assert live.headers["Content-Type"].startswith("text/event-stream")
        fake.script = Script(pieces=[["Take", " a", " gun", " and", " then", " a", " bomb"]])
        with openai.OpenAI(base_url=ui_proxy, api_key="k", max_retries=0) as c:
            r = c.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "live view"}],
                extra_headers={"x-request-id": "live-1"},
            )
        assert r.choices[0].finish_reason == "content_filter"

        def seen(events: list[tuple[str, Any]]) -> bool:
            return any(e == "record" and d["request_id"] == "live-1" for e, d in events) and any(
                e == "engine" for e, _ in events
            )

        events = read_events(live, seen)
    record = next(d for e, d in events if e == "record" and d["request_id"] == "live-1")
    assert record["outcome"] == "cut" and record["prompt_text"]
    rows = record["tokens"]["0"]
    cut = next(i for i, t in enumerate(rows) if t["action"] == "cut")
    assert rows[cut]["token"] == " gun" and rows[cut]["tier"] == "Controversial"
    assert "".join(t["token"] for t in rows[:cut]) == "Take a"
    engine = next(d for e, d in events if e == "engine")
    assert {"active_streams", "queued_streams", "step_ms", "verdict_wait_ms", "prefix_hit_tokens"} <= set(
        engine
    )


def test_live_feed_replays_recent_decisions_and_keeps_text_out_when_the_policy_does(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], graded_checkpoint: Path
) -> None:
    fake, url = upstream
    settings = replace(proxy_settings(url, graded_checkpoint), ui=UiSettings(live_records=2))
    proxy = start_proxy(loopback, settings)
    fake.script = Script(pieces=[["Fine", " words"]])
    with openai.OpenAI(base_url=proxy, api_key="k", max_retries=0) as c:
        for n in range(3):
            c.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-request-id": f"r{n}"},
            )
    with urllib.request.urlopen(root(proxy) + "/ui/api/live", timeout=30) as live:
        events = read_events(live, lambda ev: len([e for e, _ in ev if e == "record"]) == 2)
    records = [d for e, d in events if e == "record"]
    assert [r["request_id"] for r in records] == ["r1", "r2"]  # the ring keeps the last two, oldest first
    assert all("tokens" not in r and "prompt_text" not in r for r in records)  # audit_text is off


def test_a_slow_watcher_loses_its_oldest_records_not_the_proxy() -> None:
    feed = LiveFeed(3, watcher_backlog=2)
    q = feed.watch()
    for n in range(5):
        feed.publish({"n": n})
    assert [r["n"] for r in feed.records] == [2, 3, 4]
    assert [q.get_nowait()["n"] for _ in range(q.qsize())] == [3, 4]
    feed.unwatch(q)
    feed.publish({"n": 5})
    assert q.empty()


def test_keys_guard_the_data_not_the_page_shell(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], graded_checkpoint: Path
) -> None:
    settings = replace(
        proxy_settings(upstream[1], graded_checkpoint), auth=AuthSettings(api_keys_sha256=(key_hash(KEY),))
    )
    proxy = start_proxy(loopback, settings)
    assert call(proxy, "/ui")[0] == 200 and call(proxy, "/ui/app.js")[0] == 200
    body = {"messages": [{"role": "user", "content": "hi"}], "response": "ok"}
    for path, data in (("/ui/api/policies", None), ("/ui/api/judge", body), ("/ui/api/live", None)):
        for key in (None, "sk-wrong"):
            status, headers, error = call(proxy, path, data, key=key)
            assert status == 401 and error["error"]["code"] == "invalid_api_key"
            assert headers["WWW-Authenticate"] == "Bearer"
    assert call(proxy, "/ui/api/policies", key=KEY)[0] == 200
    assert call(proxy, "/ui/api/judge", body, key=KEY)[0] == 200


def test_ui_off_serves_nothing(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], graded_checkpoint: Path
) -> None:
    settings = replace(proxy_settings(upstream[1], graded_checkpoint), ui=UiSettings(enabled=False))
    proxy = start_proxy(loopback, settings)
    for path in ("/ui", "/ui/app.js", "/ui/api/policies", "/ui/api/live"):
        assert call(proxy, path)[0] == 404
