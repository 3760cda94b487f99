"""The proxy's JSON work a stream event, stdlib against orjson, side by side in one run: every event
of a real captured stream (llama.cpp's chat stream, tests/stream/captures) parsed as the proxy reads
an upstream event and written back as it sends one to the client (``wire.parse_json``/``wire.dumps``
use orjson; the stdlib pair is what they replaced), rounds interleaved.

    python bench/json_codec.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

CAPTURE = (
    Path(__file__).resolve().parent.parent / "tests" / "stream" / "captures" / "llamacpp-chat-stream.sse"
)


def events() -> list[bytes]:
    lines = CAPTURE.read_bytes().splitlines()
    return [line[6:] for line in lines if line.startswith(b"data: ") and line != b"data: [DONE]"]


def per_event_us(
    data: list[bytes], loads: Callable[[bytes], Any], dumps: Callable[[Any], str], reps: int
) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        for raw in data:
            dumps(loads(raw))
    return (time.perf_counter() - t) / (reps * len(data)) * 1e6


CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], str]]] = {
    "stdlib json": (json.loads, lambda v: json.dumps(v, ensure_ascii=False)),
    "orjson": (orjson.loads, lambda v: orjson.dumps(v).decode()),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2000, help="passes over the capture a round")
    args = ap.parse_args(argv)
    data = events()
    times: dict[str, list[float]] = {name: [] for name in CODECS}
    for _ in range(args.rounds):
        for name, (loads, dumps) in CODECS.items():
            times[name].append(per_event_us(data, loads, dumps, args.reps))
    base = statistics.median(times["stdlib json"])
    print(f"{len(data)} events of {CAPTURE.name}, parse + write each, median of {args.rounds} rounds")
    for name in CODECS:
        us = statistics.median(times[name])
        print(f"{name:<12}{us:>8.2f} us an event{base / us:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
