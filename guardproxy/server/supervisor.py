"""Several proxy workers sharing one guard engine (``server.workers`` > 1): the supervisor.

``guardproxy serve`` with N workers runs N + 3 processes. This one binds the listening socket and
starts the engine process (the only one that loads torch: the scheduler and the KV pages, with the
model in its own process under it unless ``guard.process`` is false) and N proxy workers, each an
event loop serving HTTP on the inherited socket (the kernel hands each new connection to one of them)
and reaching the engine over a Unix socket in a private run directory.

It keeps them running: a worker that exits is started again (its connections are lost, its guard
streams freed by the engine); an engine that exits is started again and the workers reconnect (their
live streams fail by the policy's ``on_guard_error`` meanwhile). An engine that cannot load the guard
(or a worker that cannot load what it needs) on its first start ends the whole server, as one process
does. SIGHUP is passed to the workers (the
policy reloads in each); SIGTERM or Ctrl+C stops the workers first, each draining its streams within
``server.shutdown_grace_s``, then the engine. The children are in their own session, so a terminal's
Ctrl+C reaches only this process and the order holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from guardproxy.config import Settings
from guardproxy.guard.link import parent_exit

log = logging.getLogger(__name__)

BACKLOG = 2048


@dataclass
class _Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: Settings, serve_argv: Sequence[str]) -> None:
        """``serve_argv``: the ``serve`` command line as given (``["serve", "--config", ...]``); each
        child runs it again with its role added."""
        self.settings = settings
        self.serve_argv = list(serve_argv)
        self.stopping = False
        self.fatal: str | None = None
        self._stop = asyncio.Event()

    def _command(self, *role: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "guardproxy",
            *self.serve_argv,
            "--engine-socket",
            self.engine_socket,
            *role,
        ]

    async def run(self) -> int:
        s = self.settings.server
        sock = socket.create_server((s.host, s.port), backlog=BACKLOG)
        sock.set_inheritable(True)
        host, port = sock.getsockname()[:2]
        self.run_dir = Path(tempfile.mkdtemp(prefix="guardproxy-"))  # 0700: only this user gets in
        self.engine_socket = str(self.run_dir / "engine.sock")
        metrics_dir = self.run_dir / "metrics"
        metrics_dir.mkdir()
        self._env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self._fd = sock.fileno()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        self.engine = _Child("guard engine", self._command("--role", "engine"))
        self.workers = [
            _Child(
                f"worker {i}",
                self._command("--role", "worker", "--worker-index", str(i), "--listen-fd", str(self._fd)),
            )
            for i in range(s.workers)
        ]
        log.info(
            "listening on http://%s:%d: %d proxy workers sharing one guard engine", host, port, s.workers
        )
        keepers = [asyncio.create_task(self._keep(c)) for c in (self.engine, *self.workers)]
        try:
            await self._stop.wait()
        finally:
            self.stopping = True
            for k in keepers:
                k.cancel()
            # Workers first: draining their streams needs the engine.
            await self._terminate(self.workers, s.shutdown_grace_s + 10)
            await self._terminate([self.engine], 30)
            sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.fatal is not None:
            log.error("%s", self.fatal)
            return 1
        log.info("stopped")
        return 0

    def _reload(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGHUP)

    async def _keep(self, child: _Child) -> None:
        failures = 0
        while not self.stopping:
            pass_fds = () if child is self.engine else (self._fd,)
            child.proc = await asyncio.create_subprocess_exec(
                *child.argv, env=self._env, pass_fds=pass_fds, start_new_session=True
            )
            child.starts += 1
            child.pids.append(child.proc.pid)
            log.info("%s started (pid %d)", child.name, child.proc.pid)
            started = time.monotonic()
            code = await child.proc.wait()
            if self.stopping:
                return
            if code == 1 and child.starts == 1:
                # guardproxy's own error exit (a model or a configuration that cannot load) on the
                # first start: starting it again cannot help.
                self.fatal = f"the {child.name} could not start (exit code 1); see its error above"
                self._stop.set()
                return
            log.error("%s (pid %d) exited with code %s: starting it again", child.name, child.proc.pid, code)
            failures = failures + 1 if time.monotonic() - started < 10 else 0
            if failures:  # crashing at start: back off, up to 30 s between tries
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))

    async def _terminate(self, children: Sequence[_Child], seconds: float) -> None:
        live = [c.proc for c in children if c.proc is not None and c.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if not live:
            return
        await asyncio.wait([asyncio.ensure_future(p.wait()) for p in live], timeout=seconds)
        for proc in live:
            if proc.returncode is None:
                log.error("pid %d did not stop within %.0fs: killing it", proc.pid, seconds)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def supervise(settings: Settings, serve_argv: Sequence[str]) -> int:
    return asyncio.run(Supervisor(settings, serve_argv).run())


async def orphan_watch(app: web.Application) -> AsyncIterator[None]:
    """A worker whose supervisor is gone (killed without a chance to stop it) stops itself."""

    async def watch() -> None:
        await parent_exit()
        log.error("the supervisor is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
