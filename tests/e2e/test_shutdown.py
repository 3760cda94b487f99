"""SIGTERM: guardproxy stops accepting, lets streams in flight finish within server.shutdown_grace_s,
then ends the rest cleanly (an error event and [DONE]), and exits 0."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .harness import FakeUpstream, serve_process, wait_ready
from .test_serve_cli import free_port


def read_stream(url: str, script: dict[str, object], out: dict[str, str]) -> None:
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", "x-fake-script": json.dumps(script)}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            out["text"] = r.read().decode()
    except Exception as exc:  # recorded, then asserted on by the test
        out["error"] = repr(exc)


@pytest.mark.parametrize(
    ("words", "finishes"), [(40, True), (900, False)], ids=["within-grace", "past-grace"]
)
def test_sigterm_drains_then_ends_streams_cleanly(
    upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path, words: int, finishes: bool
) -> None:
    _, url = upstream
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server: {shutdown_grace_s: 3.0, reload_interval_s: 0}\nguard: {device: cpu}\n")
    log = (tmp_path / "serve.log").open("wb")
    proc = serve_process(cfg, url, trigger_checkpoint, port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        result: dict[str, str] = {}
        # 10 ms a word: 40 words end well within the 3 s grace, 900 do not.
        t = threading.Thread(
            target=read_stream,
            args=(base + "/v1/chat/completions", {"pieces": [[" word"] * words], "delay": 0.01}, result),
        )
        t.start()
        time.sleep(0.3)  # the stream is flowing
        proc.send_signal(signal.SIGTERM)
        refused_by = time.monotonic() + 2.0  # within the 3 s grace: no new request served while draining
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1):
                    pass
            except (OSError, http.client.HTTPException):
                # Refused, reset, or accepted by the kernel and never answered: not served either way.
                break
            assert time.monotonic() < refused_by, "still serving new requests while draining"
            time.sleep(0.05)
        t.join(30)
        assert "text" in result, result
        text = result["text"]
        assert text.rstrip().endswith("data: [DONE]")
        if finishes:
            assert text.count(" word") == 40 and '"finish_reason":"stop"' in text.replace(" ", "")
        else:
            assert '"code":"shutdown"' in text.replace(" ", "") and text.count(" word") < 900
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
