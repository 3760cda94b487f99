"""The main job as a user runs it: `guardproxy serve` in its own process, then the openai client."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import openai

from .harness import FakeUpstream, Script, serve_process, wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_runs_the_proxy_until_sigterm(
    upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path
) -> None:
    fake, url = upstream
    fake.script = Script(pieces=[["All", " good", " here", "."]])
    port = free_port()
    config = tmp_path / "guardproxy.yaml"
    # reload_interval_s 0: no file watch, so only SIGHUP can bring in the new policy below.
    config.write_text(
        "server: {reload_interval_s: 0}\npolicy:\n  notice: ' [cut]'\n"
        "guard:\n  device: cpu\n  engine: {max_cached_tokens: 8192}\n"
    )
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    proc = serve_process(config, url, trigger_checkpoint, port, log)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0) as c:
            r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].message.content == "All good here."
            fake.script = Script(pieces=[["A", " bomb", "!"]])
            r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert (
                r.choices[0].message.content == "A [cut]" and r.choices[0].finish_reason == "content_filter"
            )
            # A new policy file and SIGHUP: the requests after it follow the new policy.
            config.write_text(config.read_text().replace("' [cut]'", "' [withheld]'"))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while True:
                fake.script = Script(pieces=[["A", " bomb", "!"]])
                r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                if r.choices[0].message.content == "A [withheld]":
                    break
                assert time.monotonic() < deadline, r.choices[0].message.content
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    out = log_path.read_text()
    assert proc.returncode == 0, out
    assert "guardproxy ready" in out and "policy reloaded" in out
    # The startup heap (torch, transformers, the model) is frozen once the services are up, so full
    # collections during serving scan only what requests made (they paused the loop ~200 ms before).
    frozen = re.search(r"froze (\d+) startup objects", out)
    assert frozen is not None and int(frozen.group(1)) > 50_000, out
    assert out.index("guardproxy ready") < frozen.start()
