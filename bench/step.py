"""Step benchmark: one guard step in which N streams bring k tokens each (k=1: the steady state of
streaming; k=4: a server that streams a few tokens a chunk), for each attention backend, weight
format and thread count, in ONE run, side by side, rounds interleaved (this machine is shared and
noisy: compare the ratios, not the absolute times).

Streams hold caches of different lengths (``--min-len`` to ``--max-len``, spread evenly), so a
batched call pads and masks. Random weights of the preset's shape: same compute, no download. The
caches are not prefilled (their contents do not change a step's cost); every configuration reads and
writes the same KV tensors, so a 0.6B run at 256 streams fits in memory once, not once a backend.

    python bench/step.py                                        # tiny guard, both backends
    python bench/step.py --preset 0.6b --streams 1,16,32,64 --k 1,4 --quantize none,int8 --steps 2
    python bench/step.py --threads 1,2 --busy 1                 # the other core busy: 1 or 2 threads?
    python bench/step.py --preset 0.6b --device cuda --streams 1,16,64,256 --json out.json   # a GPU

``--json OUT`` writes a list of rows {preset, streams, k, attention, quantize, threads, step_ms,
judged_tokens_per_s}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

import torch

from guardproxy.guard.attention import pick_attention
from guardproxy.guard.model import default_dtype
from guardproxy.guard.pages import PagePool
from guardproxy.guard.quantize import quantize_model
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.scheduler import RESPONSE, WorkItem
from guardproxy.guard.testing import random_guard_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(runner: ModelRunner, kvs: list[Any], lengths: list[int], k: int, steps: int) -> float:
    """Mean time of ``steps`` steps of k tokens a stream (after one warm-up), from the same cache
    lengths every time: a round leaves the caches as long as it found them, to the next one."""

    def items(done: int) -> list[WorkItem]:
        return [
            WorkItem(sid=s, kv=kv, start=n + done * k, ids=[5] * k, kinds=[RESPONSE] * k)
            for s, (kv, n) in enumerate(zip(kvs, lengths, strict=True))
        ]

    runner.execute(items(0))
    sync(runner.device)
    t = time.perf_counter()
    for done in range(steps):
        runner.execute(items(done))
    sync(runner.device)
    return (time.perf_counter() - t) / steps * 1e3


def _spin() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.6b"])
    ap.add_argument("--streams", default="1,16,64,256")
    ap.add_argument("--k", default="1,4", help="new tokens a stream a step")
    ap.add_argument("--attention", default="reference,batched")
    ap.add_argument("--quantize", default="none", help="none,int8 (int8: CPU only)")
    ap.add_argument("--threads", default="2", help="torch intra-op threads (CPU), a list to compare")
    ap.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile")
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20, help="timed steps a round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each configuration in turn; the median")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    attentions = args.attention.split(",")
    quantizes = args.quantize.split(",")
    threads = [int(x) for x in args.threads.split(",")]
    base = random_guard_model(args.preset, dtype=dtype).to(device).eval()
    runners = {}
    for q in quantizes:
        model = (
            base if q == "none" else quantize_model(random_guard_model(args.preset, dtype=dtype).eval(), q)
        )
        runners[q] = ModelRunner(model)
    first = runners[quantizes[0]]
    backends = {a: pick_attention(a, first.shape) for a in attentions}
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.busy} core(s) kept busy"
    )
    print(
        f"step, {args.preset} guard ({dtype}), caches of {args.min_len}-{args.max_len} tokens, {where}, "
        f"median of {args.rounds} interleaved rounds of {args.steps} steps"
    )
    head = f"{'streams':>8}{'k':>4}{'attention':>11}{'quantize':>9}{'threads':>8}"
    print(head + f"{'step ms':>10}{'judged tok/s':>14}")
    spinners = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    rows: list[dict[str, Any]] = []
    try:
        for n, k in itertools.product(
            (int(x) for x in args.streams.split(",")), (int(x) for x in args.k.split(","))
        ):
            lengths = [args.min_len + (args.max_len - args.min_len) * j // max(1, n - 1) for j in range(n)]
            pages = PagePool()  # the streams' page ids (the engine's job); the tensors are the runners'
            kvs = [pages.allocate(length + (args.steps + 1) * k + 16) for length in lengths]
            first.reserve(kvs)
            for r in runners.values():  # one set of KV tensors for every configuration
                r.share_pool(first)
            configs = list(itertools.product(attentions, quantizes, threads))
            times: dict[tuple[str, str, int], list[float]] = {c: [] for c in configs}
            for _ in range(args.rounds):
                for a, q, t in configs:
                    torch.set_num_threads(t)
                    runner = runners[q]
                    runner.attention = backends[a]
                    times[(a, q, t)].append(step_ms(runner, kvs, lengths, k, args.steps))
            for a, q, t in configs:
                ms = statistics.median(times[(a, q, t)])
                row = dict(
                    preset=args.preset, streams=n, k=k, attention=a, quantize=q, threads=t,
                    step_ms=round(ms, 3), judged_tokens_per_s=round(n * k / ms * 1e3, 1),
                )  # fmt: skip
                rows.append(row)
                print(f"{n:>8}{k:>4}{a:>11}{q:>9}{t:>8}{ms:>10.2f}{row['judged_tokens_per_s']:>14.0f}")
            for kv in kvs:
                pages.release(kv)
    finally:
        for p in spinners:
            p.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
