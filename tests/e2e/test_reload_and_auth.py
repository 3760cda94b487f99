"""Hot reload of the policy, policies chosen by API key, and guardproxy's own API keys."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest

from guardproxy.config import AuthSettings, key_hash, load_settings, load_settings_file
from guardproxy.server.state import LIVE_SETTINGS, RELOADER

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, sse_events, start_proxy, start_proxy_app


def write_config(path: Path, upstream: str, guard: Path, notice: str, extra: str = "") -> None:
    path.write_text(
        f"upstream: {{base_url: '{upstream}', retries: 0}}\n"
        f"guard: {{model: '{guard}', device: cpu, engine: {{max_cached_tokens: 8192}}}}\n"
        f"policy: {{notice: '{notice}'}}\n{extra}"
    )
    # A new modification time even within the filesystem's timestamp granularity.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def cut_text(proxy: str, fake: FakeUpstream, key: str = "k", **script: Any) -> str:
    fake.script = Script(pieces=[["Safe", " words", " then", " a", " bomb"]], **script)
    with openai.OpenAI(base_url=proxy, api_key=key, max_retries=0) as c:
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return r.choices[0].message.content or ""


def reloading_proxy(
    loopback: Loopback, cfg: Path, url: str, guard: Path, notice: str, interval: float
) -> tuple[str, Any]:
    """A proxy started from ``cfg`` (written with ``notice``) that reloads it every ``interval`` s."""
    write_config(cfg, url, guard, notice)
    return start_proxy_app(loopback, load_settings_file(cfg), str(cfg), reload_interval_s=interval)


def wait_until(check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_file_change_reloads_and_bad_files_are_rejected(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path
) -> None:
    fake, url = upstream
    cfg = tmp_path / "guardproxy.yaml"
    proxy, app = reloading_proxy(loopback, cfg, url, trigger_checkpoint, "[v1]", 0.05)
    assert cut_text(proxy, fake).endswith("[v1]")
    write_config(cfg, url, trigger_checkpoint, "[v2]")
    # (The write and the mtime bump may be seen as one change or two: count reloads, not exact ones.)
    wait_until(lambda: app[LIVE_SETTINGS].reloads >= 1 and app[LIVE_SETTINGS].current.policy.notice == "[v2]")
    assert cut_text(proxy, fake).endswith("[v2]")
    reloads = app[LIVE_SETTINGS].reloads
    cfg.write_text("policy: {mode: paranoid}\n")  # invalid: rejected whole
    os.utime(cfg, ns=(time.time_ns(), time.time_ns() + 4_000_000_000))
    wait_until(lambda: app[RELOADER].rejected >= 1)
    assert cut_text(proxy, fake).endswith("[v2]") and app[LIVE_SETTINGS].reloads == reloads


def test_a_kubernetes_configmap_update_is_picked_up(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path
) -> None:
    # The kubelet's layout: guardproxy.yaml -> ..data/guardproxy.yaml, ..data -> ..<timestamp>/; an
    # update writes a new timestamped directory and swaps the ..data link atomically.
    fake, url = upstream
    mount = tmp_path / "config"
    mount.mkdir()
    (mount / "..2026_11_22_1").mkdir()
    write_config(mount / "..2026_11_22_1" / "guardproxy.yaml", url, trigger_checkpoint, "[cm-1]")
    (mount / "..data").symlink_to("..2026_11_22_1")
    cfg = mount / "guardproxy.yaml"
    cfg.symlink_to("..data/guardproxy.yaml")
    proxy, app = start_proxy_app(loopback, load_settings_file(cfg), str(cfg), reload_interval_s=0.05)
    assert cut_text(proxy, fake).endswith("[cm-1]")
    (mount / "..2026_11_22_2").mkdir()
    new = mount / "..2026_11_22_2" / "guardproxy.yaml"
    write_config(new, url, trigger_checkpoint, "[cm-2]")
    old = (mount / "..2026_11_22_1" / "guardproxy.yaml").stat()
    os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))  # even the same time and size: another file
    (mount / "..data_tmp").symlink_to("..2026_11_22_2")
    os.replace(mount / "..data_tmp", mount / "..data")
    wait_until(lambda: app[LIVE_SETTINGS].current.policy.notice == "[cm-2]")
    assert cut_text(proxy, fake).endswith("[cm-2]")


def test_a_stream_in_flight_keeps_its_policy(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path
) -> None:
    fake, url = upstream
    cfg = tmp_path / "guardproxy.yaml"
    proxy, app = reloading_proxy(loopback, cfg, url, trigger_checkpoint, "[old]", 3600)
    result: dict[str, str] = {}
    started = len(fake.requests)
    # A slow streamed answer (about 40 events, 20 ms apart); the policy changes while it streams.
    script = {"pieces": [["Safe"] * 36 + [" words", " then", " a", " bomb"]], "delay": 0.02}

    def read() -> None:
        events = sse_events(proxy, script)
        result["text"] = "".join(
            c["delta"].get("content") or "" for e in events if isinstance(e, dict) for c in e["choices"]
        )

    worker = threading.Thread(target=read)
    worker.start()
    wait_until(lambda: len(fake.requests) > started)
    write_config(cfg, url, trigger_checkpoint, "[new]")
    assert loopback.call(_reload(app))
    assert worker.is_alive(), "the answer ended before the reload: nothing was in flight"
    worker.join(30)
    assert result["text"].endswith("[old]")
    assert cut_text(proxy, fake).endswith("[new]")


def test_an_empty_file_never_replaces_the_policy(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path
) -> None:
    # An editor's non-atomic save passes through an empty file; loading it would mean "all defaults".
    fake, url = upstream
    cfg = tmp_path / "guardproxy.yaml"
    proxy, app = reloading_proxy(loopback, cfg, url, trigger_checkpoint, "[kept]", 3600)
    cfg.write_text("")
    assert not loopback.call(_reload(app))
    assert app[RELOADER].rejected == 1 and cut_text(proxy, fake).endswith("[kept]")


def _reload(app: Any) -> Any:
    async def run() -> bool:
        return bool(app[RELOADER].reload())

    return run


def test_policy_chosen_by_api_key(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    fake, url = upstream
    base = proxy_settings(url, trigger_checkpoint, notice="[default]")
    keyed = load_settings(
        {
            "policies": {"team_a": {"notice": "[team A]"}},
            "policy_routes": [{"api_key_sha256": key_hash("sk-team-a"), "policy": "team_a"}],
        }
    )
    proxy = start_proxy(loopback, replace(base, policies=keyed.policies, routes=keyed.routes))
    assert cut_text(proxy, fake, key="sk-team-a").endswith("[team A]")
    assert cut_text(proxy, fake, key="sk-someone-else").endswith("[default]")


def test_guardproxy_keys(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    fake, url = upstream
    settings = replace(
        proxy_settings(url, trigger_checkpoint), auth=AuthSettings((key_hash("sk-proxy-key"),))
    )
    proxy = start_proxy(loopback, settings)
    with pytest.raises(openai.AuthenticationError) as err:
        cut_text(proxy, fake, key="sk-wrong")
    assert err.value.code == "invalid_api_key" and err.value.status_code == 401
    import json
    import urllib.error
    import urllib.request

    anonymous = urllib.request.Request(proxy + "/chat/completions", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(anonymous)
    with denied.value:
        assert denied.value.code == 401
        assert json.loads(denied.value.read())["error"]["code"] == "invalid_api_key"
    assert cut_text(proxy, fake, key="sk-proxy-key").startswith("Safe words then a")
    sent = {k.lower(): v for k, v in fake.headers[-1].items()}
    assert "authorization" not in sent  # the proxy's key is never passed to the upstream
    with urllib.request.urlopen(proxy.removesuffix("/v1") + "/healthz") as r:  # probes need no key
        assert r.status == 200
