"""Audit records per decision (no text unless the policy asks), request ids end to end, and logs that
never carry a key."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from guardproxy.config import AuditSettings
from guardproxy.observe import logs
from guardproxy.observe.audit import AuditLog
from guardproxy.observe.logs import scrub

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, start_proxy

SECRET = "sk-test-SECRETKEY1234567890"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    logs.configure("json", "info", stream=buffer)
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def audited_proxy(loopback: Loopback, url: str, guard: Path, audit: Path, **policy: object) -> str:
    s = proxy_settings(url, guard, **policy)
    return start_proxy(loopback, replace(s, audit=AuditSettings(path=str(audit), max_text_chars=12)))


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_records_decisions_without_text(
    loopback: Loopback,
    upstream: tuple[FakeUpstream, str],
    trigger_checkpoint: Path,
    tmp_path: Path,
    json_logs: io.StringIO,
) -> None:
    fake, url = upstream
    audit = tmp_path / "audit.jsonl"
    proxy = audited_proxy(loopback, url, trigger_checkpoint, audit)
    with openai.OpenAI(base_url=proxy, api_key=SECRET, max_retries=0) as c:
        msgs = [{"role": "user", "content": "hello there"}]
        fake.script = Script(pieces=[["All", " fine", "."]])
        c.chat.completions.create(model="m", messages=msgs, extra_headers={"x-request-id": "req-benign-1"})
        fake.script = Script(pieces=[["A", " bomb", "."]])
        r = c.chat.completions.with_raw_response.create(
            model="m", messages=msgs, stream=True, extra_headers={"x-request-id": "req-cut-2"}
        )
        list(r.parse())
        assert r.headers["x-request-id"] == "req-cut-2"
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "a grenade"}])
        generated = err.value.response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)  # made up when the client sends none
    got = records(audit)
    assert [r["request_id"] for r in got] == ["req-benign-1", "req-cut-2", generated]
    assert [r["outcome"] for r in got] == ["allowed", "cut", "blocked"]
    assert [r["status"] for r in got] == [200, 200, 400]
    cut = got[1]
    assert cut["response"]["category"] == "Violent" and cut["response"]["first_flagged_token"] == 1
    assert cut["policy"] == "default" and cut["route"] == "/v1/chat/completions" and cut["stream"] is True
    assert got[2]["prompt"]["risk"] == "Unsafe"
    text = audit.read_text()
    assert "hello" not in text and "bomb" not in text and "grenade" not in text and SECRET not in text
    # The upstream got the same request ids; the logs carry them, and never the key.
    # (In parallel mode the blocked request may have reached the upstream too before it was cancelled.)
    sent = [{k.lower(): v for k, v in h.items()}.get("x-request-id") for h in fake.headers]
    assert sent.index("req-benign-1") < sent.index("req-cut-2")
    captured = json_logs.getvalue()
    assert SECRET not in captured
    import urllib.request

    with urllib.request.urlopen(proxy.removesuffix("/v1") + "/metrics") as r:
        assert SECRET not in r.read().decode()  # nor in the metrics
    lines = [json.loads(line) for line in captured.splitlines()]
    assert any(x["request_id"] == "req-cut-2" and x["logger"] == "guardproxy.access" for x in lines)


def test_audit_text_when_the_policy_asks(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path
) -> None:
    fake, url = upstream
    audit = tmp_path / "audit.jsonl"
    proxy = audited_proxy(loopback, url, trigger_checkpoint, audit, audit_text=True)
    fake.script = Script(pieces=[["A rather long answer", " that goes on."]])
    with openai.OpenAI(base_url=proxy, api_key="k", max_retries=0) as c:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "tell me a story"}])
    (rec,) = records(audit)
    assert rec["prompt_text"] == "user: tell m...[9 more characters]"
    assert rec["response_text"] == {"0": {"content": "A rather lon...[22 more characters]"}}


def test_audit_rotates_by_size(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", max_bytes=1024, backups=2)
    for i in range(100):
        log.write({"i": i, "pad": "x" * 50})
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.jsonl", "a.jsonl.1", "a.jsonl.2", "a.jsonl.lock"]
    assert all(p.stat().st_size <= 1024 for p in tmp_path.iterdir())
    last = [json.loads(x)["i"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert last[-1] == 99 and last == list(range(last[0], 100))


def _append(path: str, writer: int, n: int) -> None:
    log = AuditLog(path, max_bytes=4096, backups=1000)
    for i in range(n):
        log.write({"writer": writer, "i": i, "pad": "y" * (i % 97)})
    log.close()


def test_audit_appends_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    """Proxy workers share one audit file: lines from four processes, rotating often, are all there,
    whole and in each writer's order, and no file grows past the limit."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(str(tmp_path / "a.jsonl"), w, 400)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert len(files) > 10 and all(p.stat().st_size <= 4096 for p in files)
    # Oldest first: a.jsonl.N ... a.jsonl.1, then a.jsonl.
    ordered = sorted(files, key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    lines = [json.loads(x) for p in ordered for x in p.read_text().splitlines()]
    assert len(lines) == 4 * 400
    for w in range(4):
        assert [r["i"] for r in lines if r["writer"] == w] == list(range(400))


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {SECRET}",
        f"upstream said: invalid key {SECRET}",
        'config {"api_key": "hunter2hunter2"}',
        "api-key=hunter2hunter2 ok",
    ],
)
def test_scrub_removes_keys(text: str) -> None:
    cleaned = scrub(text)
    assert SECRET not in cleaned and "hunter2" not in cleaned and "[redacted]" in cleaned
