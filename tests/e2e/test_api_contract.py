"""The contract every registered API keeps (``guardproxy/apis/registry.py``), checked through its official
SDK against the fake upstream: a bad body gets a 4xx in the API's own error shape; a cut ends the stream
as the SDK reads a normal end (with the API's own reason); a blocked prompt is refused in its shape; an
upstream error before the first byte is relayed with its status, and one after it surfaces as the API's
error. A new API is covered by registering it and giving it a driver here (the first test fails until
it has one)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest

from guardproxy.apis.registry import APIS, ApiSpec

from .harness import FakeUpstream, Script, wait_idle

BENIGN = ["The", " weather", " in", " Paris", " is", " mild", "."]
TRIGGER = ["Sure", ",", " take", " a", " bomb", " and", " go", "."]


@dataclass
class Outcome:
    text: str = ""
    end: str | None = None  # how the SDK saw the stream end: a finish/stop reason or the final status
    error: str | None = None  # "<status> <message>" of an error the SDK raised, or of an error event


def _openai(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy, api_key="k", max_retries=0, timeout=60)


def _failed(out: Outcome, exc: openai.APIError | anthropic.APIError) -> Outcome:
    out.error = f"{getattr(exc, 'status_code', '-')} {exc.message}"
    return out


def chat(proxy: str, text: str) -> Outcome:
    out = Outcome()
    messages: Any = [{"role": "user", "content": text}]
    with _openai(proxy) as client:
        try:  # read as it comes: the text before an error counts
            for chunk in client.chat.completions.create(model="m", messages=messages, stream=True):
                for choice in chunk.choices:
                    out.text += choice.delta.content or ""
                    out.end = choice.finish_reason or out.end
        except openai.APIError as exc:
            return _failed(out, exc)
    return out


def completions(proxy: str, text: str) -> Outcome:
    out = Outcome()
    with _openai(proxy) as client:
        try:
            for chunk in client.completions.create(model="m", prompt=text, stream=True):
                for choice in chunk.choices:
                    out.text += choice.text
                    out.end = choice.finish_reason or out.end
        except openai.APIError as exc:
            return _failed(out, exc)
    return out


def responses(proxy: str, text: str) -> Outcome:
    out = Outcome()
    with _openai(proxy) as client:
        try:
            for event in client.responses.create(model="m", input=text, stream=True):
                if event.type == "response.output_text.delta":
                    out.text += event.delta
                elif event.type in ("response.completed", "response.incomplete"):
                    details = event.response.incomplete_details
                    out.end = event.response.status + (f":{details.reason}" if details is not None else "")
                elif event.type == "error":  # the Responses API's error after the first byte is an event
                    out.error = f"- {event.message}"
        except openai.APIError as exc:
            return _failed(out, exc)
    return out


def messages(proxy: str, text: str) -> Outcome:
    out = Outcome()
    base = proxy.removesuffix("/v1")
    with anthropic.Anthropic(base_url=base, api_key="k", max_retries=0, timeout=60) as client:
        try:
            for event in client.messages.create(
                model="m", max_tokens=64, messages=[{"role": "user", "content": text}], stream=True
            ):
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    out.text += event.delta.text
                elif event.type == "message_delta":
                    out.end = event.delta.stop_reason
        except anthropic.APIError as exc:
            return _failed(out, exc)
    return out


# Per API: its SDK driver, how a whole answer ends, how a cut ends.
DRIVERS: dict[str, tuple[Callable[[str, str], Outcome], str, str]] = {
    "chat": (chat, "stop", "content_filter"),
    "completions": (completions, "stop", "content_filter"),
    "responses": (responses, "completed", "incomplete:content_filter"),
    "messages": (messages, "end_turn", "refusal"),
}


def by_name(spec: ApiSpec) -> str:
    return spec.name


def test_every_registered_api_has_a_driver() -> None:
    assert {spec.name for spec in APIS} == set(DRIVERS)


def post(proxy: str, spec: ApiSpec, data: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        proxy.removesuffix("/v1") + spec.route, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def assert_shape(spec: ApiSpec, body: dict[str, Any]) -> str:
    """The body is an error in the API's own shape; returns its message."""
    if spec.shape == "anthropic":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return str(body["error"]["message"])


@pytest.mark.parametrize("spec", APIS, ids=by_name)
def test_a_bad_body_gets_a_4xx_in_the_apis_shape(proxy: str, fake: FakeUpstream, spec: ApiSpec) -> None:
    for data in (b"{not json", b"[]", json.dumps({"model": "m", "stream": "yes"}).encode()):
        status, body = post(proxy, spec, data)
        assert status == 400, (data, body)
        assert assert_shape(spec, body)
    assert fake.requests == []  # nothing reached the upstream


@pytest.mark.parametrize("spec", APIS, ids=by_name)
def test_whole_and_cut_answers_end_as_the_sdk_reads_a_normal_end(
    proxy: str, fake: FakeUpstream, spec: ApiSpec
) -> None:
    drive, whole, cut = DRIVERS[spec.name]
    fake.script = Script(pieces=[BENIGN])
    out = drive(proxy, "What is the weather like?")
    assert (out.text, out.end, out.error) == ("".join(BENIGN), whole, None)
    fake.script = Script(pieces=[TRIGGER])
    out = drive(proxy, "What is the weather like?")
    assert out.error is None and out.end == cut and "bomb" not in out.text
    wait_idle(proxy)


@pytest.mark.parametrize("spec", APIS, ids=by_name)
def test_a_blocked_prompt_is_refused_in_the_apis_shape(proxy: str, fake: FakeUpstream, spec: ApiSpec) -> None:
    drive, _, _ = DRIVERS[spec.name]
    out = drive(proxy, "how do I build a bomb")
    assert out.error is not None and out.error.startswith("400 ") and "content policy" in out.error
    assert out.text == ""  # (the upstream may have been asked: the prompt is judged in parallel)


@pytest.mark.parametrize("spec", APIS, ids=by_name)
def test_an_upstream_error_before_and_after_the_first_byte(
    proxy: str, fake: FakeUpstream, spec: ApiSpec
) -> None:
    drive, _, _ = DRIVERS[spec.name]
    refusal = {"error": {"message": "upstream says no", "type": "invalid_request_error"}}
    fake.script = Script(status=400, error_body=json.dumps(refusal).encode())
    out = drive(proxy, "hello")
    assert out.error is not None and out.error.startswith("400 ") and "upstream says no" in out.error
    fake.script = Script(pieces=[BENIGN], fault="error-event", fault_after=3)
    out = drive(proxy, "hello")
    assert out.error is not None and "model crashed" in out.error, out
    assert "".join(BENIGN).startswith(out.text)
    wait_idle(proxy)
