"""Proxy benchmark: N concurrent streaming clients through guardproxy vs straight to the upstream, in
ONE run, against a fast fake upstream (separate process) that streams W words per answer, one every
D ms. The words are ordinary English words, one guard token each (about what a fast LLM sends: 100
tokens/s a stream at 10 ms); the upstream records when it sent each one, and the client fetches those
times after the run (by stream id and word index), so latency is measured per word:

- added latency per chunk = client arrival - upstream send, through the proxy, minus the same
  straight to the upstream (p50/p99 of each side);
- "after final": arrival - the send time of the NEXT word. Exact re-tokenization cannot know a word
  is complete before the next text shows it (" hello" may still become " hellos"). With early release
  (the default) the word is judged as it stands and may leave before the next one is sent (negative
  values); with ``early_release: false`` (``tiny:exact``) it leaves when the next one arrives, and this
  column is the proxy's own processing time after that;
- time to first token (TTFT) both ways, throughput (words/s), the proxy's peak RSS and its CPU time
  per word streamed (user + system, all threads, the guard's process included: the cost that decides
  how many streams a core carries).

Guards: a tiny random checkpoint (isolates the proxy's own cost) and the random 0.6B-shape one
(the real model's compute), with an audit-only policy (random verdicts must not cut the streams).
``tiny:exact`` is the tiny guard with ``early_release: false``: each word then waits for the next
text to show it is complete, the cost early release removes. ``tiny:thread`` runs the guard in a
thread of the proxy's process (``guard.process: false``) instead of its own process (the default),
sharing the event loop's GIL. ``trigger`` is a tiny trigger checkpoint (``make-test-model --unsafe
bomb``: the same compute as ``tiny``) that judges every benchmark word Safe, under the default policy
(the authors' debounce rule); ``trigger:single`` the same with ``debounce: false``: the pair rule must
add no latency to safe text. All processes share this machine's cores: compare rows of one run only.

    python bench/proxy.py                # tiny, tiny:thread, tiny:exact, 0.6b at their default stream counts
    python bench/proxy.py --guards trigger,trigger:single --streams 1,16,64      # debounce vs single tokens
    python bench/proxy.py --guards tiny --api chat,responses,messages --streams 1,16,64   # per API
    python bench/proxy.py --guards tiny --streams 16 --words 32     # quick
    python bench/proxy.py --guards tiny --workers 1,2 --streams 64  # proxy workers sharing one engine

With ``--workers`` each guard runs once per worker count (``server.workers``), and the CPU per word is
also given per process role: ``loop`` (the event loops: the one process, or the workers), ``engine``
(the shared engine process: scheduler and link; with one worker this work is in ``loop``) and
``model`` (the guard's forward passes, in their own process), with each role's peak RSS and the time
from start to ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

WORDS = [
    "the",
    "world",
    "of",
    "and",
    "river",
    "light",
    "green",
    "house",
    "music",
    "table",
    "water",
    "city",
    "road",
    "paper",
    "window",
    "garden",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the fake upstream (runs in its own process: `python bench/proxy.py --upstream PORT WORDS DELAY`) --


def run_upstream(port: int, words: int, delay_ms: float) -> None:
    from aiohttp import web

    sent: dict[str, list[int]] = {}

    async def times(request: web.Request) -> web.Response:
        return web.json_response(sent.get(request.match_info["sid"], []))

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        stamps = sent.setdefault(request.headers.get("x-bench-stream", ""), [])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench"}
        first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        await resp.write(f"data: {json.dumps(first)}\n\n".encode())
        for k in range(words):
            await asyncio.sleep(delay_ms / 1000)
            word = " " + WORDS[k % len(WORDS)]
            stamps.append(time.time_ns() // 1000)
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        end = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def events(
        request: web.Request, frames: list[tuple[str, dict[str, Any]]], word_events: list[int]
    ) -> web.StreamResponse:
        """One event a frame; the frames listed in ``word_events`` carry a word, sent one every delay."""
        stamps = sent.setdefault(request.headers.get("x-bench-stream", ""), [])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words_at = set(word_events)
        for k, (name, ev) in enumerate(frames):
            if k in words_at:
                await asyncio.sleep(delay_ms / 1000)
                stamps.append(time.time_ns() // 1000)
            await resp.write(f"event: {name}\ndata: {json.dumps(ev)}\n\n".encode())
        return resp

    async def responses(request: web.Request) -> web.StreamResponse:
        await request.read()
        r = {"id": "resp_bench", "object": "response", "created_at": 0, "model": "bench", "output": []}
        ids = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
        frames: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"type": "response.created", "response": {**r, "status": "in_progress"}}),
            (
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "output_index": 0,
                    "item": {"id": "msg_1", "type": "message", "role": "assistant", "content": []},
                },
            ),
            (
                "response.content_part.added",
                {"type": "response.content_part.added", **ids, "part": {"type": "output_text", "text": ""}},
            ),
        ]
        first = len(frames)
        text = "".join(" " + WORDS[k % len(WORDS)] for k in range(words))
        frames += [
            (
                "response.output_text.delta",
                {"type": "response.output_text.delta", **ids, "delta": " " + WORDS[k % len(WORDS)]},
            )
            for k in range(words)
        ]
        item = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text}],
        }
        frames += [
            ("response.output_text.done", {"type": "response.output_text.done", **ids, "text": text}),
            (
                "response.output_item.done",
                {"type": "response.output_item.done", "output_index": 0, "item": item},
            ),
            (
                "response.completed",
                {"type": "response.completed", "response": {**r, "status": "completed", "output": [item]}},
            ),
        ]
        for n, (_, ev) in enumerate(frames):
            ev["sequence_number"] = n
        return await events(request, frames, list(range(first, first + words)))

    async def messages(request: web.Request) -> web.StreamResponse:
        await request.read()
        message = {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": "bench",
            "content": [],
            "usage": {"input_tokens": 1, "output_tokens": 0},
        }
        frames: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
        ]
        first = len(frames)
        frames += [
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": " " + WORDS[k % len(WORDS)]},
                },
            )
            for k in range(words)
        ]
        frames += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": words},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return await events(request, frames, list(range(first, first + words)))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/sent/{sid}", times)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- clients ----------------------------------------------------------------------------------------


REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/chat/completions", {"messages": [{"role": "user", "content": "Tell me some words."}]}),
    "responses": ("/responses", {"input": "Tell me some words."}),
    "messages": (
        "/messages",
        {"max_tokens": 512, "messages": [{"role": "user", "content": "Tell me some words."}]},
    ),
}


def _text_of(api: str, event: dict[str, Any]) -> str:
    """The answer text one client event carries, in each API's shape."""
    if api == "chat":
        return "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices", []))
    if api == "responses":
        return str(event.get("delta") or "") if event.get("type") == "response.output_text.delta" else ""
    delta = event.get("delta") or {}
    return str(delta.get("text") or "") if event.get("type") == "content_block_delta" else ""


async def one_stream(
    session: aiohttp.ClientSession, url: str, upstream: str, api: str = "chat"
) -> tuple[float, list[tuple[int, int]]]:
    """(TTFT in s, [(send µs, arrival µs) per word])."""
    path, fields = REQUESTS[api]
    body = {"model": "bench", "stream": True, **fields}
    sid = uuid.uuid4().hex
    started = time.time_ns() // 1000
    ttft = -1.0
    text: list[str] = []
    arrival: list[int] = []  # per character of the streamed text: when it came (µs)
    buf = b""
    async with session.post(url + path, json=body, headers={"x-bench-stream": sid}) as resp:
        resp.raise_for_status()
        async for data in resp.content.iter_any():
            now = time.time_ns() // 1000
            buf += data
            *events, buf = buf.split(b"\n\n")
            for e in events:
                line = next((x for x in e.split(b"\n") if x.startswith(b"data: {")), None)
                if line is None:
                    continue
                piece = _text_of(api, json.loads(line[6:]))
                if piece and ttft < 0:
                    ttft = (now - started) / 1e6
                text.append(piece)
                arrival += [now] * len(piece)
    # The proxy may release a word in pieces: a word has arrived when its last character has.
    full = "".join(text)
    ends = [m.end() - 1 for m in re.finditer(r"\S+", full)]
    async with session.get(f"{upstream}/sent/{sid}") as r:
        sent = await r.json()
    assert len(sent) == len(ends), (len(sent), len(ends))
    return ttft, [(s, arrival[e]) for s, e in zip(sent, ends, strict=True)]


async def run_clients(url: str, streams: int, upstream: str, api: str = "chat") -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        t = time.perf_counter()
        results = await asyncio.gather(*(one_stream(s, url, upstream, api) for _ in range(streams)))
        wall = time.perf_counter() - t
    lat, after_final, ttfts, words = [], [], [], 0
    for ttft, seen in results:
        ttfts.append(ttft)
        words += len(seen)
        for i, (sent, arrived) in enumerate(seen):
            lat.append((arrived - sent) / 1000)
            if i + 1 < len(seen):
                after_final.append((arrived - seen[i + 1][0]) / 1000)
    return {"latency_ms": lat, "after_final_ms": after_final, "ttft_s": ttfts, "words": words, "wall_s": wall}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process and its descendants, summed."""
    return sum(status_mb(p, "VmHWM") for p in process_tree(pid))


def status_mb(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status (VmHWM: peak RSS, VmRSS: now) in MB; 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (guardproxy's guard runs in a child process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in task.read_text().split()]
    return out


def roles(pid: int) -> dict[int, str]:
    """Each process of a running ``guardproxy serve`` by role: ``loop`` (the one process, or each
    worker), ``engine`` (the shared engine process), ``model`` (the guard's forward passes),
    ``supervisor``."""
    out: dict[int, str] = {}

    def below(p: int, role: str) -> None:
        for d in process_tree(p)[1:]:
            out[d] = role

    kids = _children(pid)
    cmds = {k: Path(f"/proc/{k}/cmdline").read_bytes() for k in kids}
    if not any(b"--role" in c for c in cmds.values()):  # one process; its child runs the model
        out[pid] = "loop"
        below(pid, "model")
        return out
    out[pid] = "supervisor"
    for k, cmd in cmds.items():
        out[k] = "engine" if b"--role\x00engine" in cmd else "loop"
        below(k, "model")
    return out


def cpu_by_role(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for p, role in roles(pid).items():
        out[role] = out.get(role, 0.0) + cpu_seconds(p, tree=False)
    return out


def rss_by_role(pid: int) -> dict[str, float]:
    """The largest peak RSS among each role's processes (MB)."""
    out: dict[str, float] = {}
    for p, role in roles(pid).items():
        out[role] = max(out.get(role, 0.0), status_mb(p, "VmHWM"))
    return out


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU time a process and its descendants have used so far (Linux /proc)."""
    total = 0.0
    for p in process_tree(pid) if tree else [pid]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in (200, 404, 405):
                    return
        except OSError as exc:
            if getattr(exc, "code", None) in (404, 405):
                return
        time.sleep(0.2)
    raise TimeoutError(url)


def steps(base: str) -> tuple[float, float]:
    """(batched guard forwards so far, streams they held in all), from the proxy's /metrics."""
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    found = dict(re.findall(r"^guardproxy_engine_batch_streams_(count|sum) (\S+)$", text, re.M))
    return float(found.get("count", 0)), float(found.get("sum", 0))


def worker_startup(ckpt: Path, cfg: Path, env: dict[str, str]) -> tuple[float, float]:
    """A proxy worker started alone (its real entry point, on a socket made here, no engine behind
    it): seconds from spawn to serving (imports, tokenizer, app) and its RSS in MB then."""
    import urllib.request

    sock = socket.create_server(("127.0.0.1", 0))
    sock.set_inheritable(True)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/healthz"
    with tempfile.TemporaryDirectory() as run:
        cmd = [sys.executable, "-m", "guardproxy", "serve", "--config", str(cfg), "--guard-model", str(ckpt)]
        cmd += [
            "--engine-socket",
            f"{run}/engine.sock",
            "--role",
            "worker",
            "--listen-fd",
            str(sock.fileno()),
        ]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, pass_fds=(sock.fileno(),), stderr=subprocess.DEVNULL)
        try:
            deadline = started + 120
            while True:
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
                if proc.poll() is not None:
                    raise RuntimeError(f"the worker exited: {proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the worker did not serve within 120 s")
                time.sleep(0.02)
            took = time.monotonic() - started
            return took, status_mb(proc.pid, "VmRSS")
        finally:
            proc.terminate()
            proc.wait(30)
            sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", nargs=3, metavar=("PORT", "WORDS", "DELAY_MS"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--guards",
        default="tiny,tiny:thread,tiny:exact,0.6b",
        help="tiny, tiny:thread, tiny:exact, trigger, trigger:single, 0.6b (a list)",
    )
    ap.add_argument("--streams", default="16,64", help="concurrent streams with the tiny guard (a list)")
    ap.add_argument("--streams-0.6b", dest="streams_big", default="2,8", help="with the 0.6B-shape guard")
    ap.add_argument(
        "--api", default="chat", help="chat, responses, messages (a list: each measured in the same run)"
    )
    ap.add_argument(
        "--workers", default="1", help="server.workers: proxy processes sharing one engine (a list)"
    )
    ap.add_argument("--words", type=int, default=64)
    ap.add_argument("--delay-ms", type=float, default=10.0, help="between two upstream words")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the proxy")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    # Neither the upstream nor the clients may add collector pauses to what is measured (as
    # ``guardproxy serve`` does for itself): their startup heap is frozen.
    gc.collect()
    gc.freeze()
    if args.upstream:
        run_upstream(int(args.upstream[0]), int(args.upstream[1]), float(args.upstream[2]))
        return 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--upstream", str(up_port), str(args.words), str(args.delay_ms)], env=env
    )
    up_url = f"http://127.0.0.1:{up_port}/v1"
    rows: list[dict[str, Any]] = []
    worker_counts = [int(x) for x in args.workers.split(",")]
    startups: list[tuple[float, float]] = []  # a proxy worker started alone: (seconds, RSS MB)
    try:
        wait_ready(f"http://127.0.0.1:{up_port}/", upstream)
        with tempfile.TemporaryDirectory() as tmp:
            for guard in args.guards.split(","):
                preset, _, variant = guard.partition(":")
                counts = [int(x) for x in (args.streams if preset != "0.6b" else args.streams_big).split(",")]
                ckpt = Path(tmp) / preset
                if not ckpt.exists():  # one checkpoint per preset, shared by its variants
                    weights = (
                        ["--unsafe", "bomb"] if preset == "trigger" else ["--random", "--preset", preset]
                    )
                    subprocess.run(
                        [sys.executable, "-m", "guardproxy", "make-test-model", str(ckpt), *weights],
                        check=True,
                        env=env,
                        stdout=subprocess.DEVNULL,
                    )
                for workers in worker_counts:
                    port = free_port()
                    cfg = Path(tmp) / f"{preset}-{variant or 'early'}-{workers}.yaml"
                    # Random weights judge at random: an audit-only policy (flag, never block or cut) keeps
                    # every stream whole, with exactly the same guard work.
                    flag = "{unsafe: {action: flag}, controversial: {action: flag}}"
                    process = str(variant != "thread").lower()
                    cfg.write_text(
                        f"guard: {{device: cpu, threads: {args.threads}, process: {process}}}\n"
                        "logging: {level: warning}\n"
                        f"policy: {{details: false, early_release: {str(variant != 'exact').lower()}, "
                        f"debounce: {str(variant != 'single').lower()}, response: {flag}, prompt: {flag}}}\n"
                    )
                    started = time.monotonic()
                    proxy = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "guardproxy",
                            "serve",
                            "--config",
                            str(cfg),
                            "--upstream",
                            up_url,
                            "--guard-model",
                            str(ckpt),
                            "--port",
                            str(port),
                            "--workers",
                            str(workers),
                        ],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    try:
                        wait_ready(f"http://127.0.0.1:{port}/readyz", proxy)
                        startup_s = time.monotonic() - started
                        root = f"http://127.0.0.1:{up_port}"
                        for api in args.api.split(","):
                            asyncio.run(run_clients(f"http://127.0.0.1:{port}/v1", 2, root, api))  # warm-up
                            for streams in counts:
                                direct = asyncio.run(run_clients(up_url, streams, root, api))
                                cpu0, by_role0 = cpu_seconds(proxy.pid), cpu_by_role(proxy.pid)
                                steps0 = steps(f"http://127.0.0.1:{port}")
                                through = asyncio.run(
                                    run_clients(f"http://127.0.0.1:{port}/v1", streams, root, api)
                                )
                                through["cpu_s"] = cpu_seconds(proxy.pid) - cpu0
                                by_role = cpu_by_role(proxy.pid)
                                through["cpu_role_s"] = {
                                    r: by_role[r] - by_role0.get(r, 0.0) for r in by_role
                                }
                                steps1 = steps(f"http://127.0.0.1:{port}")
                                through["step_streams"] = (steps1[1] - steps0[1]) / max(
                                    1.0, steps1[0] - steps0[0]
                                )
                                label = guard if args.api == "chat" else f"{guard}/{api}"
                                label += f" w{workers}" if len(worker_counts) > 1 or workers > 1 else ""
                                row = {
                                    "guard": label,
                                    "streams": streams,
                                    "direct": direct,
                                    "proxy": through,
                                    "rss_mb": peak_rss_mb(proxy.pid),
                                    "rss_role_mb": rss_by_role(proxy.pid),
                                    "startup_s": startup_s,
                                }
                                rows.append(row)
                    finally:
                        proxy.terminate()
                        proxy.wait(60)
                    if workers > 1 and not startups:
                        startups.append(worker_startup(ckpt, cfg, env))
    finally:
        upstream.terminate()
        upstream.wait(30)

    print(
        f"proxy benchmark: {args.words} words a stream, one every {args.delay_ms:g} ms; proxy torch threads "
        f"{args.threads}; {os.cpu_count()} cores shared by upstream, proxy and clients"
    )
    head = (
        f"{'guard':<20}{'streams':>8}{'p50 direct':>12}{'p50 proxy':>11}{'p99 direct':>12}{'p99 proxy':>11}"
        f"{'p99 added':>11}{'p50/p99 after final':>21}{'TTFT +':>9}{'words/s d/p':>14}{'RSS MB':>8}"
        f"{'CPU us/word':>13}"
    )
    print(head)
    print("-" * len(head))
    out = []
    for r in rows:
        d, p = r["direct"], r["proxy"]
        rec = {
            "guard": r["guard"],
            "streams": r["streams"],
            "p50_direct_ms": pct(d["latency_ms"], 50),
            "p50_proxy_ms": pct(p["latency_ms"], 50),
            "p99_direct_ms": pct(d["latency_ms"], 99),
            "p99_proxy_ms": pct(p["latency_ms"], 99),
            "p50_after_final_ms": pct(p["after_final_ms"], 50),
            "p99_after_final_ms": pct(p["after_final_ms"], 99),
            "ttft_direct_s": statistics.median(d["ttft_s"]),
            "ttft_proxy_s": statistics.median(p["ttft_s"]),
            "words_s_direct": d["words"] / d["wall_s"],
            "words_s_proxy": p["words"] / p["wall_s"],
            "words_direct": d["words"],
            "words_proxy": p["words"],
            "peak_rss_mb": r["rss_mb"],
            "proxy_cpu_us_per_word": p["cpu_s"] / max(1, p["words"]) * 1e6,
            "cpu_us_per_word_by_role": {k: v / max(1, p["words"]) * 1e6 for k, v in p["cpu_role_s"].items()},
            "peak_rss_mb_by_role": r["rss_role_mb"],
            "startup_s": r["startup_s"],
            "streams_per_step": p["step_streams"],
        }
        rec["p99_added_ms"] = rec["p99_proxy_ms"] - rec["p99_direct_ms"]
        out.append(rec)
        print(
            f"{rec['guard']:<20}{rec['streams']:>8}{rec['p50_direct_ms']:>12.2f}{rec['p50_proxy_ms']:>11.2f}"
            f"{rec['p99_direct_ms']:>12.2f}{rec['p99_proxy_ms']:>11.2f}{rec['p99_added_ms']:>11.2f}"
            f"{rec['p50_after_final_ms']:>10.2f}/{rec['p99_after_final_ms']:<10.2f}"
            f"{rec['ttft_proxy_s'] - rec['ttft_direct_s']:>8.3f}s"
            f"{rec['words_s_direct']:>7.0f}/{rec['words_s_proxy']:<6.0f}{rec['peak_rss_mb']:>8.0f}"
            f"{rec['proxy_cpu_us_per_word']:>13.0f}"
        )
    print()
    print(
        "by process role: CPU us per streamed word (all processes of the role), peak RSS of one process; "
        "mean streams per batched guard forward"
    )
    head = (
        f"{'guard':<20}{'streams':>8}{'loop':>8}{'engine':>8}{'model':>8}{'super':>7}"
        f"{'RSS loop':>10}{'engine':>8}{'model':>8}{'ready s':>9}{'streams/step':>14}"
    )
    print(head)
    print("-" * len(head))
    for rec in out:
        cpu, rss = rec["cpu_us_per_word_by_role"], rec["peak_rss_mb_by_role"]
        print(
            f"{rec['guard']:<20}{rec['streams']:>8}{cpu.get('loop', 0):>8.0f}{cpu.get('engine', 0):>8.0f}"
            f"{cpu.get('model', 0):>8.0f}{cpu.get('supervisor', 0):>7.0f}{rss.get('loop', 0):>10.0f}"
            f"{rss.get('engine', 0):>8.0f}{rss.get('model', 0):>8.0f}{rec['startup_s']:>9.1f}"
            f"{rec['streams_per_step']:>14.1f}"
        )
    for took, rss in startups:
        print(f"a proxy worker alone: serving {took:.2f} s after spawn, RSS {rss:.0f} MB (no torch)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
