"""Steps driven by hand the way the engine runs them: up to ``depth`` scheduled before the oldest runs.

With depth 2 (the engine's overlap) the next step is scheduled while one is in flight, so the
scheduler's bookkeeping sees feeds, retractions, closes and growth between a step's scheduling and its
completion. Each step's page tables are copied when it is scheduled, as the engine does, and steps run
in the order they were scheduled, as on one device queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace

from guardproxy.guard.scheduler import ItemOutput, Scheduler, StepPlan, WorkItem


class Pipeline:
    def __init__(
        self, scheduler: Scheduler, execute: Callable[[list[WorkItem]], list[ItemOutput]], depth: int = 1
    ) -> None:
        self.scheduler, self.execute, self.depth = scheduler, execute, depth
        self.flying: deque[tuple[StepPlan, list[WorkItem]]] = deque()

    def launch(self) -> bool:
        """Schedule a step if fewer than ``depth`` are in flight; whether one was."""
        if len(self.flying) >= self.depth:
            return False
        plan = self.scheduler.schedule()
        if plan is None:
            return False
        self.flying.append((plan, [replace(item, kv=item.kv.snapshot()) for item in plan.items]))
        return True

    def land(self) -> bool:
        """Run and complete the oldest step in flight; whether there was one."""
        if not self.flying:
            return False
        plan, items = self.flying.popleft()
        self.scheduler.complete(plan, self.execute(items))
        return True

    def step(self, during: Callable[[], None] | None = None) -> bool:
        """One engine turn: schedule (if there is room), then land the oldest step once the pipeline
        is full or nothing more could be scheduled. ``during`` runs while steps are in flight."""
        launched = self.launch()
        if not launched and not self.flying:
            return False
        if during is not None:
            during()
        if not launched or len(self.flying) >= self.depth:
            self.land()
        return True

    def drain(self) -> None:
        while self.step():
            pass
