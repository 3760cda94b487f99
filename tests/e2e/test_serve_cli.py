"""The main job as a user runs it: `guardproxy serve` in its own process, then the openai client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

from .harness import FakeUpstream, Script


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
    cmd = [
        sys.executable,
        "-m",
        "guardproxy",
        "serve",
        "--config",
        str(config),
        "--upstream",
        url,
        "--guard-model",
        str(trigger_checkpoint),
        "--port",
        str(port),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "guardproxy serve did not become ready"
            time.sleep(0.2)
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
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert "guardproxy ready" in out and "policy reloaded" in out
