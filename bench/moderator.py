"""Moderator benchmark: the proxy's per-delta work for one choice (guard view, exact re-tokenization,
early release, policy, release), without I/O or a model, as the guard's backlog grows.

One answer of ordinary words arrives a word a delta; the fake guard answers every judged feed with a
Safe verdict, but only once ``backlog`` feeds are waiting (a guard running behind, as under load). The
figure is the time per delta, and its ratio to the no-backlog case in the same run: flat means a busy
guard does not make the proxy's own work per chunk any dearer (it grew with the backlog before: every
release scan walked all the tokens awaiting verdicts).

    python bench/moderator.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import deque

from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.testing import qwen3_tokenizer_file
from guardproxy.guard.tokenizer import GuardTokenizer
from guardproxy.guard.verdict import HeadLabels, Verdict
from guardproxy.policy import Policy
from guardproxy.stream.guardview import CONTENT, GuardFeed
from guardproxy.stream.moderator import ChoiceModerator

WORDS = ["the", "world", "of", "and", "river", "light", "green", "house"]
LABELS = HeadLabels(risk=("Safe", "Unsafe", "Controversial"), category=("Violent", "PII"))
SAFE = Verdict((0.98, 0.01, 0.01), (0.5, 0.5), LABELS)


def per_delta_us(template: ChatTemplate, words: int, backlog: int) -> float:
    m = ChoiceModerator(template, Policy(), speculate=True)
    waiting: deque[int] = deque()  # judged feeds not answered yet: their token counts

    def submit(feeds: list[GuardFeed]) -> None:
        for f in feeds:
            left = f.retract  # the newest tokens go, as the engine takes them back
            while left and waiting:
                k = min(left, waiting[-1])
                waiting[-1] -= k
                left -= k
                if not waiting[-1]:
                    waiting.pop()
            if f.spans is not None and f.ids:
                waiting.append(len(f.ids))

    submit(m.start())
    m.marker({"role": "assistant"})
    t = time.perf_counter()
    for k in range(words):
        submit(m.text(CONTENT, " " + WORDS[k % len(WORDS)]))
        while len(waiting) > backlog:
            m.judged([SAFE] * waiting.popleft())
        m.drain()
    return (time.perf_counter() - t) / words * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=2000)
    ap.add_argument("--backlogs", default="0,100,1000")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    template = ChatTemplate(GuardTokenizer.from_file(qwen3_tokenizer_file()))
    backlogs = [int(x) for x in args.backlogs.split(",")]
    times: dict[int, list[float]] = {b: [] for b in backlogs}
    for _ in range(args.rounds):  # interleaved: the machine's noise falls on every column alike
        for b in backlogs:
            times[b].append(per_delta_us(template, args.words, b))
    print(f"moderator, {args.words} one-word deltas, median of {args.rounds} interleaved rounds")
    print(f"{'backlog':>8}{'us/delta':>10}{'x backlog 0':>13}")
    base = statistics.median(times[backlogs[0]])
    for b in backlogs:
        us = statistics.median(times[b])
        print(f"{b:>8}{us:>10.1f}{us / base:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
