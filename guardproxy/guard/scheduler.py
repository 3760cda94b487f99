"""The guard engine's scheduler: a plain synchronous object, no torch, no asyncio.

It owns every stream's state (pending tokens, KV handle, what has been judged) and, each step, packs
the pending work of all streams into one plan under a token budget and a stream budget. The runner
executes a plan; ``complete`` maps its outputs back to the tickets that wait for them. Tests drive it by
hand with a fake allocator and hand-made outputs.

Memory is asked of the KV manager (``kv.py``: reservations, the prefix cache, copy-on-write); what this
module decides with it: a stream the pool cannot grow waits for memory (no new stream is admitted
meanwhile), so a verdict never depends on load; a wait longer than ``memory_wait_s`` fails the stream
(``expire``), which the proxy handles by the policy's ``on_guard_error``. Only at the guard's context
limit (``max_positions``) does a stream slide: the cache is dropped and re-filled with its *head* (the
last user turn of the prompt, at most ``anchor_tokens``, plus the context before the answer) and the last
``window_tokens`` judged tokens, then judging goes on. So a response of any length keeps being judged,
with the newest context. A stream whose next prompt page another stream is computing holds its prefill
until that page is cached (``waiting_prefix``).

Steps may overlap (the engine's ``guard.overlap``): the next step is scheduled before the one in flight
completes, and a stream may be in both. Each keeps a ``Flight`` record per step; steps land in order.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from guardproxy.guard.errors import EngineError, EngineOverloaded, GuardFailure, StreamClosed
from guardproxy.guard.kv import Allocator, KVManager
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.pages import PAGE_SIZE

# What each pending token is: prompt/head context, the prompt-verdict position, a judged response token,
# or context after the head (fed unjudged after judging began, or replayed by a slide).
NO_OUTPUT, QUERY, RESPONSE, CONTEXT = 0, 1, 2, 3
_TAIL_KINDS = (RESPONSE, CONTEXT)

RawProbs = tuple[tuple[float, ...], tuple[float, ...]]  # (risk probs, category probs)


@dataclass(eq=False)
class Ticket:
    """Waits for ``need`` outputs of one feed. ``waiter`` is the caller's (an asyncio future)."""

    need: int
    waiter: Any = None
    results: list[RawProbs] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.results) >= self.need


@dataclass(eq=False)
class StreamState:
    sid: int
    kv: Any
    capacity: int
    head: list[int]  # kept on a slide: prompt anchor + context fed before the first judged token
    window: int
    cached: int = 0
    pend_ids: list[int] = field(default_factory=list)
    pend_kind: list[int] = field(default_factory=list)
    pend_since: int = 0  # arrival order of the oldest pending token (fairness)
    prompt_ticket: Ticket | None = None
    tickets: deque[Ticket] = field(default_factory=deque)
    tail: deque[int] = field(default_factory=deque)  # tokens after the head, newest last (bounded)
    judging: bool = False
    closed: bool = False
    failed: BaseException | None = None
    slides: int = 0
    judged: int = 0
    flights: deque[Flight] = field(default_factory=deque)  # its items in the steps in flight, oldest first
    waiting_since: float | None = None  # when it began to wait for KV memory to grow
    ids: list[int] = field(default_factory=list)  # the token at each position up to ``cached``
    keys: list[bytes] = field(default_factory=list)  # keys of its full pages, from the first on
    prompt_keys: list[bytes] = field(default_factory=list)  # keys of the prompt pages it may share
    waiting_prefix: bool = False  # another stream is computing its next prompt page: it waits for it


@dataclass(eq=False)
class Flight:
    """One stream's item in a step in flight: positions ``at..at+len(kinds)``, of which those from
    ``end`` on were retracted since (their verdicts are discarded when the step completes)."""

    at: int
    kinds: list[int]
    end: int

    def dropped(self) -> int:
        return sum(1 for k in self.kinds[max(0, self.end - self.at) :] if k == RESPONSE)


@dataclass(frozen=True)
class WorkItem:
    """One stream's slice of a step: ``ids`` at positions ``start..start+len(ids)``, after the page
    ``copies`` (from, to) its copy-on-write needs."""

    sid: int
    kv: Any
    start: int
    ids: list[int]
    kinds: list[int]
    copies: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ItemOutput:
    query: list[RawProbs]
    response: list[RawProbs]


@dataclass(frozen=True)
class StepPlan:
    items: list[WorkItem]

    @property
    def tokens(self) -> int:
        return sum(len(i.ids) for i in self.items)


def fair_shares(demands: Sequence[int], budget: int) -> list[int]:
    """Max-min fair split of ``budget`` over ``demands`` (in order: earlier entries win ties)."""
    shares = [0] * len(demands)
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    left, remaining = budget, len(demands)
    for i in order:
        give = min(demands[i], left // remaining) if remaining else 0
        shares[i] = give
        left -= give
        remaining -= 1
    # Integer division can leave a few tokens: hand them out in priority order.
    for i in range(len(demands)):
        if left <= 0:
            break
        extra = min(demands[i] - shares[i], left)
        shares[i] += extra
        left -= extra
    return shares


class Scheduler:
    def __init__(self, limits: EngineLimits, allocator: Allocator) -> None:
        self.limits = limits
        self.streams: dict[int, StreamState] = {}
        self.kv = KVManager(limits, allocator, self._may_compute)  # memory, and its figures (reserved...)
        self._ids = itertools.count(1)
        self._arrivals = itertools.count()
        self._flying: deque[StepPlan] = deque()  # steps scheduled and not yet completed, oldest first
        self.steps = 0
        self.slides = 0
        self.memory_waits = 0  # times a stream had to wait for KV memory
        self.memory_timeouts = 0  # waits that ran out (the stream failed)
        self.prefill_tokens = 0  # context positions computed (everything but judged response tokens)

    def _may_compute(self, sid: int) -> bool:
        s = self.streams.get(sid)
        return s is not None and not s.closed and s.failed is None

    # -- admission -----------------------------------------------------------------------------------

    def cost(self, prompt_len: int) -> int:
        return self.kv.cost(prompt_len)

    def can_admit(self, cost: int, promised_cost: int = 0, promised_streams: int = 0) -> bool:
        """Whether a stream of ``cost`` fits, beside admissions promised but not yet added. Live streams
        waiting for memory to grow come first: nothing new is admitted while one waits."""
        return (
            not self.waiting_for_memory()
            and len(self.streams) + promised_streams < self.limits.max_streams
            and self.kv.fits(promised_cost + cost)
        )

    def add_stream(self, prompt_ids: Sequence[int], verdict_index: int | None, anchor_start: int = 0) -> int:
        cost = self.cost(len(prompt_ids))
        if not self.can_admit(cost):
            raise EngineOverloaded("guard engine is full")
        if verdict_index is not None and not 0 <= verdict_index < len(prompt_ids):
            raise ValueError("verdict_index outside the prompt")
        prompt = list(prompt_ids)
        kv, keys, hit = self.kv.open(prompt, verdict_index, cost)
        sid = next(self._ids)
        anchor = prompt[anchor_start:][-self.limits.anchor_tokens :]
        s = StreamState(sid=sid, kv=kv, capacity=cost, head=anchor, window=self.limits.window_tokens)
        s.cached, s.ids, s.keys, s.prompt_keys = hit, prompt[:hit], keys[: hit // PAGE_SIZE], keys
        self.streams[sid] = s
        kinds = [NO_OUTPUT] * len(prompt)
        if verdict_index is not None:
            kinds[verdict_index] = QUERY
            s.prompt_ticket = Ticket(need=1)
        self._enqueue(s, prompt[hit:], kinds[hit:])
        self.kv.claim(s)
        return sid

    # -- feeding -------------------------------------------------------------------------------------

    def _live(self, sid: int) -> StreamState:
        s = self.streams.get(sid)
        if s is None or s.closed:
            raise StreamClosed(f"guard stream {sid} is closed")
        if s.failed is not None:
            raise GuardFailure(f"guard stream {sid} failed: {s.failed}")
        return s

    def _enqueue(self, s: StreamState, ids: list[int], kinds: list[int]) -> None:
        if not s.pend_ids:
            s.pend_since = next(self._arrivals)
        s.pend_ids += ids
        s.pend_kind += kinds

    def feed(self, sid: int, ids: Sequence[int], *, judge: bool = True) -> Ticket | None:
        """Queue tokens after everything fed so far. With ``judge``, a ticket waits for a verdict each."""
        s = self._live(sid)
        ids = list(ids)
        if not ids:
            return Ticket(need=0) if judge else None
        if judge:
            s.judging = True
            ticket = Ticket(need=len(ids))
            s.tickets.append(ticket)
            self._enqueue(s, ids, [RESPONSE] * len(ids))
            return ticket
        if not s.judging:
            s.head += ids  # context before the response (the scaffold) is part of what a slide keeps
            self._enqueue(s, ids, [NO_OUTPUT] * len(ids))
        else:
            self._enqueue(s, ids, [CONTEXT] * len(ids))
        return None

    def retract(self, sid: int, n: int) -> list[Ticket]:
        """Take back the last ``n`` tokens fed, all of them judged ones (a tentative tail that the exact
        re-tokenization changed). Pending ones are dropped; cached ones are forgotten (what is fed next
        overwrites their positions) and their verdicts from the step in flight, if any, discarded.
        Their tickets shrink; returns the tickets that are done now."""
        s = self._live(sid)
        if n <= 0:
            return []
        unsent = min(n, len(s.pend_ids))
        cached = n - unsent
        if cached > len(s.tail):  # judged tokens after a slide are still in the replayed tail
            raise EngineError(f"cannot retract {n} tokens of guard stream {sid}: they are not all fed")
        del s.pend_ids[len(s.pend_ids) - unsent :], s.pend_kind[len(s.pend_kind) - unsent :]
        if cached:
            s.cached -= cached
            for f in s.flights:  # steps in flight judging these positions now: their verdicts go
                f.end = min(f.end, max(s.cached, f.at))
            del s.ids[s.cached :], s.keys[s.cached // PAGE_SIZE :]
            for _ in range(cached):
                s.tail.pop()
        left = n
        for t in reversed(s.tickets):
            take = min(left, t.need)
            t.need -= take
            del t.results[t.need :]
            left -= take
            if not left:
                break
        done = [t for t in s.tickets if t.done]
        s.tickets = deque(t for t in s.tickets if not t.done)
        return done

    def close(self, sid: int) -> list[Ticket]:
        """Forget a stream; its unfinished tickets are returned failed. Memory is freed now, or after
        the step that is using it."""
        s = self.streams.get(sid)
        if s is None or s.closed:
            return []
        s.closed = True
        self.kv.drop_claims(sid)
        dropped = self._fail_tickets(s, StreamClosed(f"guard stream {sid} was closed"))
        if not s.flights:
            self._free(s)
        return dropped

    def _free(self, s: StreamState) -> None:
        self.kv.release(s)
        del self.streams[s.sid]

    def _fail_tickets(self, s: StreamState, exc: BaseException) -> list[Ticket]:
        self.kv.drop_claims(s.sid)  # a failed or closed stream computes nothing more for the others
        out = []
        pending = [s.prompt_ticket, *s.tickets] if s.prompt_ticket else list(s.tickets)
        for t in pending:
            if not t.done:
                t.error = exc
                out.append(t)
        s.prompt_ticket = None
        s.tickets.clear()
        s.pend_ids, s.pend_kind = [], []
        return out

    # -- stepping ------------------------------------------------------------------------------------

    def schedule(self, now: float = 0.0) -> StepPlan | None:
        """Pack the next step (``now``: the caller's clock, for memory waits). Steps already in flight
        may not have completed: a stream in one goes on from the positions it is computing (steps run in
        the order they are scheduled, on one device queue). None: nothing can run now (idle, or every
        ready stream waits for memory)."""
        lim = self.limits
        for waiting in [s for s in self.streams.values() if s.waiting_prefix and not s.closed]:
            more = self.kv.advance(waiting)  # pages the stream it waited for has cached since
            if more:
                waiting.ids += waiting.pend_ids[:more]
                del waiting.pend_ids[:more], waiting.pend_kind[:more]
                waiting.cached += more
        ready = sorted(
            (
                s
                for s in self.streams.values()
                if s.pend_ids and not s.closed and s.failed is None and not s.waiting_prefix
            ),
            key=lambda s: s.pend_since,
        )[: lim.max_batch_streams]
        if not ready:
            return None
        shares = fair_shares([min(len(s.pend_ids), lim.prefill_chunk) for s in ready], lim.max_batch_tokens)
        items = []
        for s, n in zip(ready, shares, strict=True):
            if n <= 0:
                continue
            n = self._make_room(s, n, now)
            if n <= 0:
                continue
            ids, kinds = s.pend_ids[:n], s.pend_kind[:n]
            del s.pend_ids[:n], s.pend_kind[:n]
            if s.pend_ids:
                s.pend_since = next(self._arrivals)  # back of the line for the rest
            copies = self.kv.prepare_write(s, n)
            items.append(WorkItem(sid=s.sid, kv=s.kv, start=s.cached, ids=ids, kinds=kinds, copies=copies))
            s.flights.append(Flight(at=s.cached, kinds=kinds, end=s.cached + n))
            s.cached += n
            s.ids += ids
            self.prefill_tokens += sum(1 for k in kinds if k != RESPONSE)
            s.tail.extend(i for i, k in zip(ids, kinds, strict=True) if k in _TAIL_KINDS)
            while len(s.tail) > s.window:
                s.tail.popleft()
        if not items:
            return None
        self.steps += 1
        plan = StepPlan(items)
        self._flying.append(plan)
        return plan

    def _make_room(self, s: StreamState, n: int, now: float) -> int:
        """How many of ``n`` more positions fit in the stream's KV now: grow from the pool; at the
        context limit, slide; with the pool exhausted, what is left of its capacity, else wait (0)."""
        lim = self.limits
        if s.cached + n <= s.capacity:
            return n
        if s.capacity >= lim.max_positions:
            if s.flights:  # a slide rewrites positions a step in flight computes: after it lands
                return s.capacity - s.cached
            self._slide(s)  # the context limit: judged on a window from here on
            return min(n, s.capacity - s.cached)
        if self.kv.grow(s, n):
            s.waiting_since = None
            return min(n, s.capacity - s.cached)
        if s.cached < s.capacity:
            return s.capacity - s.cached
        if s.waiting_since is None:
            s.waiting_since = now
            self.memory_waits += 1
        return 0

    def waiting_for_memory(self) -> bool:
        return any(
            s.waiting_since is not None for s in self.streams.values() if not s.closed and s.failed is None
        )

    def next_expiry(self) -> float | None:
        """When the earliest memory wait runs out (the caller's clock), or None if nobody waits."""
        times = [
            s.waiting_since + self.limits.memory_wait_s
            for s in self.streams.values()
            if s.waiting_since is not None and not s.closed and s.failed is None
        ]
        return min(times, default=None)

    def expire(self, now: float) -> list[Ticket]:
        """Fail the streams that waited for memory past ``memory_wait_s`` (their memory is freed now, for
        the others); returns their tickets."""
        failed: list[Ticket] = []
        for s in list(self.streams.values()):
            if s.waiting_since is None or s.closed or s.failed is not None:
                continue
            waited = now - s.waiting_since
            if waited < self.limits.memory_wait_s:
                continue
            self.memory_timeouts += 1
            exc = GuardFailure(f"guard stream {s.sid} waited {waited:.1f}s for guard memory (engine full)")
            s.failed = exc
            s.waiting_since = None
            failed += self._fail_tickets(s, exc)
            if not s.flights:
                self.kv.release(s)
        return failed

    def _slide(self, s: StreamState) -> None:
        if len(s.head) > s.capacity // 2:  # unjudged context fed before the response can be long
            s.head = s.head[-(s.capacity // 2) :]
        keep = min(s.window, (s.capacity - len(s.head)) // 2, len(s.tail))
        context = s.head + list(s.tail)[len(s.tail) - keep :]
        s.cached = 0
        s.ids, s.keys = [], []
        s.slides += 1
        self.slides += 1
        s.pend_ids = context + s.pend_ids
        s.pend_kind = [NO_OUTPUT] * len(s.head) + [CONTEXT] * keep + s.pend_kind
        s.tail.clear()

    def complete(self, plan: StepPlan, outputs: Sequence[ItemOutput]) -> list[Ticket]:
        """Deliver a step's outputs; returns the tickets that are now done."""
        done: list[Ticket] = []
        landed = self._land(plan)
        for (s, flight), out in zip(landed, outputs, strict=True):
            if s.closed or s.failed is not None:  # failed meanwhile (a memory wait, the step before)
                continue
            # Only what completed steps computed: a step still in flight may yet fail.
            self.kv.register(s, min((f.at for f in s.flights), default=s.cached))
            if out.query and s.prompt_ticket is not None:
                s.prompt_ticket.results.append(out.query[-1])
                done.append(s.prompt_ticket)
                s.prompt_ticket = None
            for probs in out.response[: len(out.response) - flight.dropped()]:
                ticket = s.tickets[0]
                ticket.results.append(probs)
                s.judged += 1
                if ticket.done:
                    done.append(s.tickets.popleft())
        self._free_landed(landed)
        return done

    def clear_cache(self) -> None:
        """The KV pages' contents are gone (the guard's process died): nothing cached may be reused."""
        self.kv.clear_cache(list(self.streams.values()))

    def fail(self, plan: StepPlan, exc: BaseException) -> list[Ticket]:
        """The step raised: every stream in it is dead (its cache may be half-written); others go on."""
        failed: list[Ticket] = []
        landed = self._land(plan)
        for s, _ in landed:
            if s.closed:
                continue
            s.failed = exc
            failed += self._fail_tickets(s, GuardFailure(f"guard model failed: {exc!r}"))
        self._free_landed(landed)
        return failed

    def fail_all(self, exc: BaseException) -> list[Ticket]:
        """Last resort after an internal error: every live stream is failed, memory accounting kept,
        and the steps in flight are forgotten (the caller drops their outputs)."""
        failed: list[Ticket] = []
        for s in self.streams.values():
            if not s.closed and s.failed is None:
                s.failed = exc
                failed += self._fail_tickets(s, GuardFailure(f"guard engine error: {exc!r}"))
        while self._flying:
            self._free_landed(self._land(self._flying[0]))
        return failed

    @property
    def in_flight(self) -> int:
        """Steps scheduled and not yet completed or failed."""
        return len(self._flying)

    def _land(self, plan: StepPlan) -> list[tuple[StreamState, Flight]]:
        """The step is over: each of its streams' oldest flight is this step's."""
        assert self._flying and self._flying[0] is plan, "steps land in the order they were scheduled"
        self._flying.popleft()
        return [(s, s.flights.popleft()) for s in (self.streams[item.sid] for item in plan.items)]

    def _free_landed(self, landed: list[tuple[StreamState, Flight]]) -> None:
        for s, _ in landed:
            if s.closed and not s.flights and s.sid in self.streams:
                self._free(s)

    # -- introspection -------------------------------------------------------------------------------

    def cached_tokens(self) -> int:
        return sum(s.cached for s in self.streams.values())
