"""Several proxy workers sharing one guard engine (``server.workers: 2``), run as a user runs it:
``guardproxy serve`` in its own process (a supervisor, an engine process, two workers), the real openai
client, the fake upstream. Which worker answered is in the ``x-guardproxy-worker`` header; the pids
come from the supervisor's log. The tests share one server and run in order: the last one stops it."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from .harness import FakeUpstream, engine_state, serve_process, until, wait_idle, wait_ready
from .test_metrics import scrape, value
from .test_serve_cli import free_port
from .test_ui import read_events

BENIGN = ["Fine", " words", " only", " here", "."]
CUT = ["A", " bomb", " now", "!"]


@dataclass
class Cluster:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path
    config: Path
    audit: Path

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def pids(self, name: str) -> list[int]:
        """Every pid the supervisor started ``name`` ("worker 1", "guard engine") with, in order."""
        return [int(p) for p in re.findall(rf"{name} started \(pid (\d+)\)", self.log.read_text())]


@pytest.fixture(scope="module")
def cluster(
    upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("workers")
    port = free_port()
    audit = tmp / "audit.jsonl"
    config = tmp / "guardproxy.yaml"
    config.write_text(
        "server: {reload_interval_s: 0, workers: 2, shutdown_grace_s: 20}\n"
        # refuse: a Responses API turn continuing an answer its worker does not know fails (400)
        "policy:\n  notice: ' [cut]'\n  unknown_previous_response: refuse\n"
        f"audit: {{path: {audit}}}\n"
        "guard:\n  device: cpu\n  engine: {max_cached_tokens: 8192}\n"
    )
    log_path = tmp / "serve.log"
    with log_path.open("wb") as log:
        proc = serve_process(config, upstream[1], trigger_checkpoint, port, log)
        c = Cluster(f"http://127.0.0.1:{port}", proc, log_path, config, audit)
        try:
            wait_ready(c.base, proc)
            yield c
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)


def script(pieces: list[str], delay: float = 0.0) -> dict[str, str]:
    return {"x-fake-script": json.dumps({"pieces": [pieces], "delay": delay})}


def chat(base: str, pieces: list[str], delay: float = 0.0) -> tuple[str, str, str | None]:
    """One streamed answer through the openai client on a connection of its own:
    (the worker that served it, the text, the finish reason)."""
    with (
        openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0) as c,
        c.chat.completions.with_streaming_response.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=script(pieces, delay),
        ) as resp,
    ):
        worker = resp.headers["x-guardproxy-worker"]
        text, finish = "", None
        for chunk in resp.parse():
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return worker, text, finish


def test_only_the_engine_process_loads_torch(cluster: Cluster) -> None:
    def mapped(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    assert "libtorch" in mapped(cluster.pids("guard engine")[-1])
    for w in ("worker 0", "worker 1"):
        maps = mapped(cluster.pids(w)[-1])
        assert "libtorch" not in maps and "/transformers/" not in maps


def test_both_workers_serve_and_their_streams_share_engine_steps(cluster: Cluster) -> None:
    before = scrape(cluster.v1)
    served: list[tuple[str, str, str | None]] = []

    def mixed_steps() -> tuple[float, float]:
        """Steps since ``before``, and those whose batch held one worker's streams only."""
        now = scrape(cluster.v1)
        steps = value(now, "guardproxy_engine_batch_workers_count") - value(
            before, "guardproxy_engine_batch_workers_count"
        )
        single = value(now, "guardproxy_engine_batch_workers_bucket", le="1.0") - value(
            before, "guardproxy_engine_batch_workers_bucket", le="1.0"
        )
        return steps, single

    # The kernel picks a worker per connection, and whether two workers' tokens meet in one step
    # depends on when they arrive (a faster engine makes it rarer): rounds, a bounded number, until
    # both workers have served and at least one step held both.
    for _ in range(10):
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(chat, cluster.base, CUT if i % 4 == 0 else BENIGN, 0.03) for i in range(8)]
            round_ = [j.result() for j in jobs]
        served += round_
        if {w for w, _, _ in served} == {"0", "1"}:
            wait_idle(cluster.v1, 20)
            steps, single = mixed_steps()
            if steps > single:
                break
    assert {w for w, _, _ in served} == {"0", "1"}
    # Judged as one process judges them: the benign answers whole, the trigger word cut.
    for k, (_, text, finish) in enumerate(served):
        if k % 8 % 4 == 0:
            assert (text, finish) == ("A [cut]", "content_filter")
        else:
            assert (text, finish) == ("".join(BENIGN), "stop")
    wait_idle(cluster.v1, 20)
    after = scrape(cluster.v1)
    # Steps whose batch held streams of both workers (the engine process's histogram, summed in).
    steps, single = mixed_steps()
    assert steps > single > 0, (steps, single)
    # /metrics counts every worker's requests, whichever worker answers the scrape.
    route = {"route": "/v1/chat/completions", "status": "200"}
    counted = value(after, "guardproxy_requests_total", **route) - value(
        before, "guardproxy_requests_total", **route
    )
    assert counted == len(served)
    cuts = value(after, "guardproxy_response_actions_total", action="cut", risk="Unsafe", category="Violent")
    assert cuts - value(
        before, "guardproxy_response_actions_total", action="cut", risk="Unsafe", category="Violent"
    ) == sum(1 for _, t, _ in served if t == "A [cut]")
    # One audit file, one whole JSON line per request from both workers.
    lines = cluster.audit.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(served)
    assert sum(r["outcome"] == "cut" for r in records) == cuts
    # Each worker's live view (/ui) holds every worker's decisions.
    ids = {r["request_id"] for r in records}
    pages: set[str] = set()
    for _ in range(20):
        with urllib.request.urlopen(cluster.base + "/ui/api/live", timeout=30) as live:
            pages.add(live.headers["x-guardproxy-worker"])
            got = read_events(live, lambda ev: len([e for e, _ in ev if e == "record"]) == len(ids))
            assert {d["request_id"] for e, d in got if e == "record"} == ids
        if pages == {"0", "1"}:
            break
    assert pages == {"0", "1"}


def test_a_responses_api_turn_continues_on_either_worker(cluster: Cluster) -> None:
    """The answer one worker passed is known to the other (shared through the engine), so a turn that
    continues it with previous_response_id is read whole whichever worker takes it."""
    with openai.OpenAI(base_url=cluster.v1, api_key="k", max_retries=0) as c:
        first = c.responses.with_raw_response.create(model="m", input="hi", extra_headers=script(BENIGN))
    served = {first.headers["x-guardproxy-worker"]}
    previous = first.parse().id
    for _ in range(40):  # each on a new connection: the kernel picks the worker
        with openai.OpenAI(base_url=cluster.v1, api_key="k", max_retries=0) as c:
            r = c.responses.with_raw_response.create(
                model="m", input="and then?", previous_response_id=previous, extra_headers=script(BENIGN)
            )
        assert r.parse().output_text == "".join(BENIGN)
        served.add(r.headers["x-guardproxy-worker"])
        if served == {"0", "1"}:
            break
    assert served == {"0", "1"}


def open_stream(base: str, pieces: list[str], delay: float) -> tuple[str, Any]:
    """A streamed request left open: (the worker serving it, the raw response to read)."""
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    headers = {"Content-Type": "application/json", **script(pieces, delay)}
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers=headers)
    resp = urllib.request.urlopen(req, timeout=60)
    return resp.headers["x-guardproxy-worker"], resp


def events(resp: Any) -> list[Any]:
    text = resp.read().decode()
    return [
        b[6:] if b[6:] == "[DONE]" else json.loads(b[6:])
        for b in text.split("\n\n")
        if b.startswith("data: ")
    ]


def streams_on_both(base: str, pieces: list[str], delay: float) -> dict[str, Any]:
    """One open stream on each worker (one that landed on a worker already holding one is closed: its
    client went away), once the engine holds exactly their two guard streams."""
    held: dict[str, Any] = {}
    for _ in range(40):
        worker, resp = open_stream(base, pieces, delay)
        if worker in held:
            resp.close()
        else:
            held[worker] = resp
        if len(held) == 2:
            until(lambda: engine_state(base + "/v1")["active_streams"] == 2, 20, "two guard streams")
            return held
    raise AssertionError(f"40 connections reached only worker(s) {sorted(held)}")


def test_a_killed_worker_leaves_no_engine_stream_and_is_replaced(cluster: Cluster) -> None:
    wait_idle(cluster.v1, 20)
    held = streams_on_both(cluster.base, BENIGN * 40, 0.05)  # ~10 s answers
    victim = cluster.pids("worker 1")[-1]
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    with pytest.raises((OSError, http.client.HTTPException)):  # its client's connection ends mid-stream
        events(held["1"])
    # The other worker's stream goes on whole; the dead worker's guard stream is gone from the engine.
    survivor = events(held["0"])
    assert survivor[-1] == "[DONE]"
    wait_idle(cluster.v1, 20)
    # The supervisor started a new worker 1, and it serves.
    until(lambda: len(cluster.pids("worker 1")) == 2, 60, lambda: cluster.log.read_text()[-3000:])
    for _ in range(40):
        worker, text, finish = chat(cluster.base, CUT)
        if worker == "1":
            break
    assert (worker, text, finish) == ("1", "A [cut]", "content_filter")


def test_a_killed_engine_fails_streams_cleanly_in_both_workers_and_a_new_one_serves(
    cluster: Cluster,
) -> None:
    wait_ready(cluster.base, cluster.proc)
    wait_idle(cluster.v1, 20)
    before = scrape(cluster.v1)
    held = streams_on_both(cluster.base, BENIGN * 40, 0.05)
    subprocess.run(["kill", "-KILL", str(cluster.pids("guard engine")[-1])], check=True)
    for worker, resp in held.items():
        got = events(resp)
        # fail_closed: an error event ends the stream, then [DONE], as the guard failure tests show.
        assert got[-1] == "[DONE]" and "guard" in got[-2]["error"]["message"], (worker, got[-3:])
    # A new engine loads, both workers reconnect, and the next requests are judged.
    wait_ready(cluster.base, cluster.proc)
    assert len(cluster.pids("guard engine")) == 2
    served = set()
    for _ in range(40):
        worker, text, finish = chat(cluster.base, CUT)
        assert (text, finish) == ("A [cut]", "content_filter")
        served.add(worker)
        if served == {"0", "1"}:
            break
    assert served == {"0", "1"}
    failures = value(scrape(cluster.v1), "guardproxy_guard_failures_total", mode="fail_closed")
    assert failures - value(before, "guardproxy_guard_failures_total", mode="fail_closed") == 2


def test_reload_and_sigterm_reach_every_worker(cluster: Cluster) -> None:
    wait_ready(cluster.base, cluster.proc)
    cluster.config.write_text(cluster.config.read_text().replace("' [cut]'", "' [withheld]'"))
    cluster.proc.send_signal(signal.SIGHUP)
    reloaded: set[str] = set()
    deadline = time.monotonic() + 30
    while reloaded != {"0", "1"}:
        assert time.monotonic() < deadline, reloaded
        worker, text, _ = chat(cluster.base, CUT)
        if text == "A [withheld]":
            reloaded.add(worker)
    # SIGTERM: both workers finish the answers they are streaming, then everything stops.
    held = streams_on_both(cluster.base, BENIGN * 6, 0.05)  # ~1.5 s answers
    pids = cluster.pids("worker 0")[-1:] + cluster.pids("worker 1")[-1:] + cluster.pids("guard engine")[-1:]
    cluster.proc.send_signal(signal.SIGTERM)
    for resp in held.values():
        got = events(resp)
        text = "".join(
            c["delta"].get("content") or "" for e in got if isinstance(e, dict) for c in e.get("choices", [])
        )
        assert got[-1] == "[DONE]" and text == "".join(BENIGN * 6)
    assert cluster.proc.wait(60) == 0
    log = cluster.log.read_text()
    assert log.count("policy reloaded") >= 2 and "stopped" in log
    for pid in pids:  # nothing left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(cluster.base + "/healthz", timeout=2)


def test_an_engine_that_cannot_load_the_guard_ends_the_server(
    upstream: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """As one process does: a checkpoint that does not load is an error at startup, not a restart loop."""
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    config = tmp_path / "guardproxy.yaml"
    config.write_text("server: {workers: 2}\n")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = serve_process(config, upstream[1], empty, free_port(), log)
        assert proc.wait(120) == 1
    out = log_path.read_text()
    assert "could not start (exit code 1)" in out, out[-3000:]
    workers = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", out)]
    assert len(workers) == 2 and not any(Path(f"/proc/{p}").exists() for p in workers)
