"""The guard model in its own process: each engine step runs there, off the proxy's GIL.

In one process the event loop and the engine share one GIL: every torch op of a step hands it back
and forth with the loop, so a busy proxy is capped at one core and each step waits on the loop. A
``GuardWorker`` keeps the model, the KV pool tensors and ``ModelRunner.execute`` in a child process
(spawned, so CUDA is safe); the engine keeps the scheduler and the page ids (``PagePool``) and sends
each step's items over a pipe.

If the child dies, every stream's cache died with it: ``execute`` raises ``WorkerDied``, the engine
fails every live stream, and the next step starts a fresh child.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from guardproxy.guard.checkpoint import GuardModelError
from guardproxy.guard.errors import EngineError
from guardproxy.guard.scheduler import ItemOutput, WorkItem
from guardproxy.guard.verdict import GuardLabels


class WorkerDied(EngineError):
    """The guard's process exited: every stream's cache is gone."""


def _serve(
    conn: Connection,
    path: str,
    device: str | None,
    dtype: str | None,
    threads: int | None,
    max_pages: int | None,
    attention: str,
    quantize: str,
    kv_memory_fraction: float | None,
) -> None:
    # Ctrl+C reaches the whole process group: the parent decides when this process ends (it closes
    # the pipe, or sends None), so an interrupt here would only print a traceback mid-shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        from guardproxy.guard.loading import load_model
        from guardproxy.guard.runner import ModelRunner

        if threads is not None:
            torch.set_num_threads(threads)
        model = load_model(path, device=device, dtype=dtype, quantize=quantize)
        runner = ModelRunner(
            model, max_pages=max_pages, attention=attention, kv_memory_fraction=kv_memory_fraction
        )
    except Exception as exc:  # tell the parent why, instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", (model.labels, int(model.config.max_position_embeddings), runner.kv_pages)))
    while True:
        try:
            items = conn.recv()
        except EOFError:  # the parent is gone
            return
        if items is None:
            return
        try:
            conn.send(("ok", runner.execute(items)))
        except Exception as exc:  # a failed step: the engine fails its streams, the worker goes on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class GuardWorker:
    """A child process that loads the guard from ``path`` (a local checkpoint directory) and runs
    steps for the engine. Blocking calls: the engine makes them from its worker thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        max_pages: int | None = None,
        attention: str = "auto",
        quantize: str = "none",
        kv_memory_fraction: float | None = None,
    ) -> None:
        self._args = (str(path), device, dtype, threads, max_pages, attention, quantize, kv_memory_fraction)
        self.kv_pages: int | None = None  # the pool the guard's process took up front (GPU sizing)
        self._proc: Any = None
        self._conn: Connection | None = None
        self.starts = 0
        self.labels, self.max_positions = self._start()

    def _start(self) -> tuple[GuardLabels, int]:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, *self._args), name="guardproxy-guard", daemon=True)
        proc.start()
        child.close()
        try:
            kind, payload = parent.recv()
        except EOFError:
            proc.join(5)
            raise GuardModelError(
                f"the guard process exited while loading (exit code {proc.exitcode})"
            ) from None
        if kind != "ready":
            proc.join(5)
            raise GuardModelError(f"the guard process could not load the model: {payload}")
        self._proc, self._conn = proc, parent
        self.starts += 1
        labels, max_positions, self.kv_pages = payload
        return labels, int(max_positions)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def execute(self, items: Sequence[WorkItem]) -> list[ItemOutput]:
        if self._conn is None:
            self._start()  # after a death: a fresh process, an empty cache
        assert self._conn is not None
        try:
            self._conn.send(list(items))
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            code = self._reap()
            raise WorkerDied(f"the guard process died (exit code {code})") from exc
        if kind != "ok":
            raise RuntimeError(f"guard step failed in the guard process: {payload}")
        out: list[ItemOutput] = payload
        return out

    def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        code: int | None = proc.exitcode
        return code

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):  # already gone
                self._conn.send(None)
        self._reap()
