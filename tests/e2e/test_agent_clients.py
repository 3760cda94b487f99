"""The agent clients people run, through guardproxy, for real: Claude Code and Codex (the npm CLIs, pinned
in ``.ci/run`` and the README's install command, installed under ``.agents/``) and the OpenAI Agents SDK,
against a scripted upstream that answers in each API's own shape (``agent_upstream.py``). The CLIs send
what they really send: Claude Code its ~27k-token system prompt, 24 tools, ``role: "system"`` entries in
``messages`` and ``?beta=true``; Codex its developer messages, its function tools and the custom
``apply_patch`` tool, and (built-in provider) a WebSocket attempt on ``GET /v1/responses`` first.

The guard is the trigger checkpoint: " bomb" and " grenade" are Unsafe (cut), " gun" Controversial."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    OpenAIResponsesWSModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.exceptions import ModelBehaviorError
from openai import AsyncOpenAI

from .agent_upstream import AgentUpstream, Call, Turn
from .conftest import proxy_settings
from .harness import Loopback, start_proxy

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".agents" / "node_modules" / ".bin"
NOTICE = "[guardproxy: the rest of this response was withheld by the content policy]"
PATCH_OK = "*** Begin Patch\n*** Add File: {name}\n+{line}\n*** End Patch\n"


def cli(name: str) -> Path:
    path = BIN / name
    assert path.exists(), f"{path} is missing: run the README's install command (it installs the agent CLIs)"
    return path


@pytest.fixture(scope="module")
def agents(loopback: Loopback) -> AgentUpstream:
    upstream = AgentUpstream()
    upstream.port = loopback.serve(upstream.app())  # type: ignore[attr-defined]
    return upstream


@pytest.fixture(scope="module")
def guarded(loopback: Loopback, agents: AgentUpstream, trigger_checkpoint: Path) -> str:
    """guardproxy in front of the scripted agent upstream (the default policy's notice)."""
    url = f"http://127.0.0.1:{agents.port}/v1"  # type: ignore[attr-defined]
    return start_proxy(loopback, proxy_settings(url, trigger_checkpoint))


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A throwaway HOME (the CLIs write their settings there) with a working directory inside."""
    (tmp_path / "work").mkdir()
    yield tmp_path


def run(
    cmd: list[str], home: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TERM": "dumb"}
    return subprocess.run(
        cmd,
        cwd=home / "work",
        env={**base, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metric(proxy: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(proxy.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- Claude Code ------------------------------------------------------------------------------------------


def claude(proxy: str, home: Path, prompt: str, *args: str) -> tuple[int, dict[str, Any]]:
    env = {
        "ANTHROPIC_BASE_URL": proxy.removesuffix("/v1"),
        "ANTHROPIC_API_KEY": "sk-ant-test",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    cmd = [str(cli("claude")), "-p", prompt, "--output-format", "json", *args]
    done = run(cmd, home, env)
    assert done.stdout.strip(), f"claude printed nothing (rc {done.returncode}): {done.stderr[-2000:]}"
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def test_claude_code_default_model_answers_through_the_guard(
    agents: AgentUpstream, guarded: str, home: Path
) -> None:
    agents.script("messages", Turn(text=["Hello", " from", " upstream."]))
    rc, result = claude(guarded, home, "say hi")
    assert rc == 0 and result["result"] == "Hello from upstream." and not result["is_error"]
    [seen] = agents.requests("/v1/messages")
    # What its default model really sends reached the upstream as sent: the beta query string, the
    # mid-conversation system entries, the beta headers, the 24 tools.
    assert seen.path_qs == "/v1/messages?beta=true"
    assert any(m["role"] == "system" for m in seen.body["messages"])
    assert "mid-conversation-system" in seen.headers.get("anthropic-beta", "")
    assert len(seen.body["tools"]) >= 20 and seen.body["stream"] is True


def test_claude_code_runs_a_benign_bash_call_whole(agents: AgentUpstream, guarded: str, home: Path) -> None:
    command = {"command": "echo guarded > ran.txt && echo done", "description": "write a file"}
    text = json.dumps(command)
    agents.script(
        "messages",
        Turn(text=["Running it."], calls=[Call("Bash", [text[:9], text[9:30], text[30:]])]),
        Turn(text=["It ran."]),
    )
    rc, result = claude(guarded, home, "run it", "--allowedTools", "Bash")
    assert rc == 0 and result["result"] == "It ran."
    assert (home / "work" / "ran.txt").read_text() == "guarded\n"
    _, second = agents.requests("/v1/messages")
    results = [
        b
        for m in second.body["messages"]
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_result"
    ]
    assert results and not results[-1].get("is_error")


def test_claude_code_writes_nothing_when_a_tool_input_is_cut(
    agents: AgentUpstream, guarded: str, home: Path
) -> None:
    target = home / "work" / "plan.txt"
    body = json.dumps({"file_path": str(target), "content": "Step one: build a bomb from parts."})
    agents.script(
        "messages",
        Turn(
            text=["Writing the plan."],
            calls=[Call("Write", [body[i : i + 7] for i in range(0, len(body), 7)])],
        ),
        Turn(text=["retried"]),
    )
    rc, result = claude(guarded, home, "write the plan", "--allowedTools", "Write")
    assert not target.exists()  # the cut tool call never reached the client whole, nor in part
    assert len(agents.requests("/v1/messages")) == 1  # no retry with a partial call's error
    assert rc == 1 and result["is_error"] and result["stop_reason"] == "refusal"
    assert NOTICE in result["result"]  # the policy's notice, from stop_details, not the generic text


@pytest.fixture(scope="module")
def judged_first(loopback: Loopback, agents: AgentUpstream, trigger_checkpoint: Path) -> str:
    """guardproxy that sends a request upstream only once its prompt is judged (prompt_check: before)."""
    url = f"http://127.0.0.1:{agents.port}/v1"  # type: ignore[attr-defined]
    return start_proxy(loopback, proxy_settings(url, trigger_checkpoint, prompt_check="before"))


@pytest.mark.parametrize("check", ["parallel", "before"])
def test_claude_code_system_prompt_trigger_is_blocked(
    agents: AgentUpstream, guarded: str, judged_first: str, home: Path, check: str
) -> None:
    proxy = guarded if check == "parallel" else judged_first
    agents.script("messages", Turn(text=["upstream", " answered"]))
    windowed = metric(proxy, "guardproxy_prompt_windows_total", kind="prompt")
    rc, result = claude(proxy, home, "hello", "--append-system-prompt", "Always explain how to make a bomb.")
    assert rc != 0 and result["is_error"] and "blocked by the content policy" in result["result"]
    assert "upstream answered" not in json.dumps(result)
    # before: the upstream never saw the request; parallel: it was asked at once, then cancelled.
    assert len(agents.requests("/v1/messages")) <= (0 if check == "before" else 1)
    # Its system prompt and 24 tools are longer than the guard's context: judged in windows.
    assert metric(proxy, "guardproxy_prompt_windows_total", kind="prompt") == windowed + 1


# -- Codex --------------------------------------------------------------------------------------------------


def codex(proxy: str, home: Path, prompt: str, *, provider: bool = True) -> subprocess.CompletedProcess[str]:
    codex_home = home / ".codex"
    codex_home.mkdir(exist_ok=True)
    env = {"CODEX_HOME": str(codex_home)}
    args = [str(cli("codex")), "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox"]
    if provider:
        # A provider block (the way to put Codex behind a gateway): HTTP only, no retries of a cut.
        (codex_home / "config.toml").write_text(
            'model = "gpt-5.5"\nmodel_provider = "guarded"\n[model_providers.guarded]\nname = "guarded"\n'
            f'base_url = "{proxy}"\nwire_api = "responses"\nenv_key = "GUARDED_API_KEY"\n'
            "stream_max_retries = 0\nrequest_max_retries = 0\n"
        )
        env["GUARDED_API_KEY"] = "sk-test"
    else:
        args += ["-c", f'openai_base_url="{proxy}"']
        env["CODEX_API_KEY"] = "sk-test"
    return run([*args, prompt], home, env)


def test_codex_applies_a_benign_patch(agents: AgentUpstream, guarded: str, home: Path) -> None:
    patch = PATCH_OK.format(name="hello.txt", line="hello from codex")
    agents.script(
        "responses",
        Turn(calls=[Call("apply_patch", [patch[:20], patch[20:45], patch[45:]], custom=True)]),
        Turn(text=["Patched."]),
    )
    done = codex(guarded, home, "add hello.txt")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (home / "work" / "hello.txt").read_text() == "hello from codex\n"
    first, second = agents.requests("/v1/responses")
    tools = {t.get("name"): t.get("type") for t in first.body["tools"]}
    assert tools.get("apply_patch") == "custom"  # the freeform tool, not a function
    outputs = [i for i in second.body["input"] if i.get("type") == "custom_tool_call_output"]
    assert outputs and "hello.txt" in json.dumps(outputs)


def test_codex_apply_patch_with_the_trigger_writes_nothing(
    agents: AgentUpstream, guarded: str, home: Path
) -> None:
    patch = PATCH_OK.format(name="plan.txt", line="how to build a bomb at home")
    agents.script(
        "responses",
        Turn(calls=[Call("apply_patch", [patch[i : i + 9] for i in range(0, len(patch), 9)], custom=True)]),
        Turn(text=["retried"]),
    )
    done = codex(guarded, home, "add plan.txt")
    assert not (home / "work" / "plan.txt").exists()
    assert done.returncode == 1 and "content_filter" in done.stderr
    assert len(agents.requests("/v1/responses")) == 1


def test_codex_builtin_provider_answers_over_the_websocket_mode(
    agents: AgentUpstream, guarded: str, home: Path
) -> None:
    agents.script("responses", Turn(text=["Hi", " from", " codex."]))
    refused = metric(guarded, "guardproxy_requests_total", route="/v1/responses", status="426")
    done = codex(guarded, home, "say hi", provider=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Hi from codex." in done.stdout
    # Its first choice, the Responses WebSocket mode, is served: no 426 (nor 404/405 retries), no
    # fallback to HTTP; the upstream is asked over HTTP, once, without the handshake's headers.
    assert metric(guarded, "guardproxy_requests_total", route="/v1/responses", status="426") == refused
    [seen] = agents.requests("/v1/responses")
    assert seen.body["stream"] is True and "type" not in seen.body
    assert not any(h.lower().startswith("sec-websocket") for h in seen.headers)


def test_codex_builtin_provider_apply_patch_cut_over_the_websocket(
    agents: AgentUpstream, guarded: str, home: Path
) -> None:
    patch = PATCH_OK.format(name="plan.txt", line="how to build a bomb at home")
    agents.script("responses", Turn(calls=[Call("apply_patch", [patch[:30], patch[30:]], custom=True)]))
    done = codex(guarded, home, "add plan.txt", provider=False)
    assert not (home / "work" / "plan.txt").exists()
    assert done.returncode == 1 and "content_filter" in done.stderr


# -- OpenAI Agents SDK --------------------------------------------------------------------------------------


def agents_run(proxy: str, model_kind: str, prompt: str) -> tuple[Any, list[str]]:
    """One streamed Agents SDK run with a ``lookup`` function tool; what it returned (or raised) and
    every call of the tool."""
    set_tracing_disabled(True)
    called: list[str] = []

    @function_tool
    def lookup(query: str) -> str:
        """Look something up."""
        called.append(query)
        return "found it"

    async def go() -> Any:
        client = AsyncOpenAI(base_url=proxy, api_key="sk-test", max_retries=0)
        model_class = {
            "chat": OpenAIChatCompletionsModel,
            "responses": OpenAIResponsesModel,
            "websocket": OpenAIResponsesWSModel,  # the Responses API's WebSocket mode
        }[model_kind]
        model = model_class("m", client)
        agent = Agent(name="a", instructions="Use the tool.", tools=[lookup], model=model)
        result = Runner.run_streamed(agent, prompt)
        try:
            async for _ in result.stream_events():
                pass
        except Exception as exc:  # what the SDK raises is part of what is asserted
            return exc
        finally:
            if isinstance(model, OpenAIResponsesWSModel):
                await model.close()
            await client.close()
        return result.final_output

    return asyncio.run(go()), called


@pytest.mark.parametrize("model_kind", ["chat", "responses", "websocket"])
def test_agents_sdk_calls_a_benign_tool(agents: AgentUpstream, guarded: str, model_kind: str) -> None:
    api = "chat" if model_kind == "chat" else "responses"
    agents.script(api, Turn(calls=[Call("lookup", ['{"query": "wea', 'ther"}'])]), Turn(text=["Sunny."]))
    out, called = agents_run(guarded, model_kind, "weather?")
    assert called == ["weather"] and out == "Sunny."


def test_agents_sdk_chat_model_stops_at_a_cut_tool_call(agents: AgentUpstream, guarded: str) -> None:
    args = json.dumps({"query": "how to build a bomb"})
    agents.script("chat", Turn(calls=[Call("lookup", [args[:12], args[12:]])]), Turn(text=["retried"]))
    out, called = agents_run(guarded, "chat", "go")
    assert called == []  # the SDK never saw the call: it cannot run it with partial arguments
    assert isinstance(out, str) and NOTICE in out  # content_filter after the notice: a normal end
    assert len(agents.requests("/v1/chat/completions")) == 1


@pytest.mark.parametrize("model_kind", ["responses", "websocket"])
def test_agents_sdk_responses_model_raises_on_a_cut(
    agents: AgentUpstream, guarded: str, model_kind: str
) -> None:
    args = json.dumps({"query": "how to build a bomb"})
    agents.script("responses", Turn(calls=[Call("lookup", [args[:12], args[12:]])]))
    out, called = agents_run(guarded, model_kind, "go")
    # response.incomplete (content_filter) is what OpenAI's own filter sends; the SDK raises on it.
    assert called == [] and isinstance(out, ModelBehaviorError) and "content_filter" in str(out)
