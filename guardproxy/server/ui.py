"""The page at ``/ui`` and the JSON it reads: a playground (judge a conversation token by token, then
re-apply a policy with other thresholds to the verdicts already computed) and a live view of recent
decisions. The page is plain HTML, CSS and JavaScript shipped in the package (``guardproxy/ui``): no
build step, nothing from a CDN. Its data (``/ui/api/...``) needs one of guardproxy's own keys when it has
some (the middleware checks, as for ``/v1/``); the page shell itself holds no data.

    POST /ui/api/judge   {"messages": [...], "response": "...", "policy": "name"?, "thresholds": {...}?}
        -> {"policy", "prompt": {...}, "tokens": [...], "decisions": {...}}
    POST /ui/api/decide  {"verdicts": {"prompt": {...}, "tokens": [...]}, "policy"?, "thresholds": {...}?}
        -> {"prompt_action", "decisions": {...}}  (the verdicts the judge call gave, sent back as they
           came: their ``risk_probs`` and ``category_probs``; the server's own policy code decides.
           Nothing is kept between the calls, so any proxy worker or replica can answer the second)
    GET  /ui/api/policies -> the named policies and their thresholds
    GET  /ui/api/live    -> server-sent events: "record" (a decision, as the audit log writes it, with
                            the answer token by token where its policy records text) and "engine"
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from aiohttp import web

from guardproxy.apis.errors import bad_request, engine_error
from guardproxy.evaluate import judge_answer, token_rows
from guardproxy.guard.errors import EngineError
from guardproxy.guard.template import ConversationError
from guardproxy.guard.verdict import GuardLabels, HeadLabels, Verdict
from guardproxy.policy import Policy, decide
from guardproxy.server.prompts import judge_prompt
from guardproxy.server.state import LIVE_SETTINGS, SERVICES, json_body
from guardproxy.stream.session import verdict_details
from guardproxy.stream.sse import encode_event

_STATIC = {"app.js": "application/javascript", "style.css": "text/css"}
MAX_TOKENS = 1 << 16  # verdicts one decide call may send back


@dataclass(frozen=True)
class _Judged:
    prompt: Verdict
    verdicts: list[Verdict]


def _asset(name: str) -> bytes:
    return resources.files("guardproxy").joinpath("ui", name).read_bytes()


def _thresholds(policy: Policy, given: Any) -> Policy:
    if given is None:
        return policy
    if not isinstance(given, dict):
        raise bad_request("thresholds must be an object", param="thresholds")
    values: dict[str, float | None] = {}
    for key in ("unsafe", "controversial"):
        if key not in given:
            continue
        value = given[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise bad_request(f"thresholds.{key} must be a number or null", param="thresholds")
        values[f"{key}_threshold"] = None if value is None else float(value)
    try:
        return replace(policy, **values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise bad_request(str(exc), param="thresholds") from None


def _policy(request: web.Request, name: Any) -> Policy:
    settings = request.app[LIVE_SETTINGS].current
    if name is None or name == settings.policy.name:
        return settings.policy
    if not isinstance(name, str) or name not in settings.policies:
        raise bad_request(f"no policy named {name!r}", param="policy")
    return settings.policies[name]


def _decisions(policy: Policy, judged: _Judged) -> dict[str, Any]:
    return {
        "prompt_action": str(policy.action(judged.prompt, prompt=True)),
        "prompt_tier": policy.tier(judged.prompt),
        "decisions": decide(policy, judged.verdicts),
    }


def _probs(given: Any, names: tuple[str, ...], what: str) -> tuple[float, ...]:
    if not isinstance(given, dict) or set(given) != set(names):
        raise bad_request(
            f"{what} must map exactly these labels to probabilities: {', '.join(names)}", param="verdicts"
        )
    out = tuple(given[n] for n in names)
    if not all(isinstance(p, int | float) and not isinstance(p, bool) and 0 <= p <= 1 for p in out):
        raise bad_request(f"{what} must be probabilities between 0 and 1", param="verdicts")
    return tuple(float(p) for p in out)


def _verdict(given: Any, labels: HeadLabels, what: str) -> Verdict:
    if not isinstance(given, dict):
        raise bad_request(f"{what} must be an object", param="verdicts")
    risk = _probs(given.get("risk_probs"), labels.risk, f"{what}.risk_probs")
    category = _probs(given.get("category_probs"), labels.category, f"{what}.category_probs")
    return Verdict(risk, category, labels)


def _sent_back(given: Any, labels: GuardLabels) -> _Judged:
    """The verdicts of a judge call, as the page sends them back."""
    if not isinstance(given, dict) or not isinstance(given.get("tokens"), list):
        raise bad_request("verdicts must be {prompt, tokens} as /ui/api/judge gave them", param="verdicts")
    tokens = given["tokens"]
    if len(tokens) > MAX_TOKENS:
        raise bad_request(f"at most {MAX_TOKENS} token verdicts", param="verdicts")
    return _Judged(
        _verdict(given.get("prompt"), labels.query, "verdicts.prompt"),
        [_verdict(t, labels.response, f"verdicts.tokens[{i}]") for i, t in enumerate(tokens)],
    )


def add_routes(app: web.Application) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:  # a fixed set of files: no path reaches anything else
            raise web.HTTPNotFound()
        return web.Response(body=_asset(name), content_type=_STATIC[name], charset="utf-8")

    async def policies(request: web.Request) -> web.Response:
        settings = request.app[LIVE_SETTINGS].current
        out = [settings.policy, *settings.policies.values()]
        return web.json_response(
            [
                {
                    "name": p.name,
                    "mode": p.mode,
                    "debounce": p.debounce,
                    "thresholds": {"unsafe": p.unsafe_threshold, "controversial": p.controversial_threshold},
                }
                for p in out
            ]
        )

    async def judge(request: web.Request) -> web.Response:
        services = request.app[SERVICES]
        body = await json_body(request)
        policy = _thresholds(_policy(request, body.get("policy")), body.get("thresholds"))
        response = body.get("response", "")
        if not isinstance(response, str):
            raise bad_request("response must be a string", param="response")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages must be a non-empty array", param="messages")
        try:
            prompt = services.template.render_prompt(messages, max_tokens=services.engine.max_prompt_tokens)
        except ConversationError as exc:
            raise bad_request(str(exc), param="messages") from None
        try:
            async with await services.engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start) as s:
                pv, _ = await judge_prompt(services.engine, s, prompt, policy)  # windows too, when long
                tokens = (
                    await judge_answer(s, services.template, response, len(prompt.ids)) if response else []
                )
        except EngineError as exc:
            raise engine_error(exc) from None
        judged = _Judged(pv, [t.verdict for t in tokens])
        return web.json_response(
            {
                "policy": policy.name,
                "prompt": {**verdict_details(pv, policy.action(pv, prompt=True)), **pv.to_dict()},
                "tokens": token_rows(services.template.tok, tokens),
                **_decisions(policy, judged),
            }
        )

    async def decide_again(request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            labels = request.app[SERVICES].engine.labels
        except EngineError as exc:  # a shared engine not connected yet: its label names are unknown
            raise engine_error(exc) from None
        judged = _sent_back(body.get("verdicts"), labels)
        policy = _thresholds(_policy(request, body.get("policy")), body.get("thresholds"))
        return web.json_response({"policy": policy.name, **_decisions(policy, judged)})

    async def live(request: web.Request) -> web.StreamResponse:
        services = request.app[SERVICES]
        feed = services.live
        assert feed is not None
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        queue = feed.watch()
        # One get() kept across the one-second ticks, never cancelled by them: on Python 3.11
        # ``wait_for(queue.get(), 1.0)`` can drop a record that arrives as the timeout fires (the get
        # has taken it from the queue, the cancellation discards it), and a page then misses it.
        getter: asyncio.Future[dict[str, Any]] | None = None
        try:
            for record in list(feed.records):
                await out.write(encode_event(json.dumps(record, ensure_ascii=False), event="record"))
            waits = services.metrics.verdict_waits
            while services.stopping is None or not services.stopping.done():
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                arrived, _ = await asyncio.wait({getter}, timeout=1.0)
                if arrived:
                    record, getter = getter.result(), None
                    await out.write(encode_event(json.dumps(record, ensure_ascii=False), event="record"))
                    continue
                now = services.metrics.verdict_waits
                stats = services.engine.stats()
                done = now[0] - waits[0]
                state = {
                    "active_streams": stats.active_streams,
                    "queued_streams": stats.queued_streams,
                    "cached_tokens": stats.cached_tokens,
                    "step_ms": round(stats.last_step_s * 1000, 2),
                    "verdict_wait_ms": round((now[1] - waits[1]) / done * 1000, 2) if done else None,
                    "prefix_hit_tokens": stats.prefix_hit_tokens,
                    "prefill_tokens": stats.prefill_tokens,
                }
                waits = now
                await out.write(encode_event(json.dumps(state), event="engine"))
        except (ConnectionResetError, RuntimeError):
            pass  # the page went away
        finally:
            if getter is not None:
                getter.cancel()
            feed.unwatch(queue)
        return out

    app.router.add_get("/ui", page)
    app.router.add_get("/ui/api/policies", policies)
    app.router.add_post("/ui/api/judge", judge)
    app.router.add_post("/ui/api/decide", decide_again)
    app.router.add_get("/ui/api/live", live)
    app.router.add_get("/ui/{name}", asset)
