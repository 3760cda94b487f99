"""Decode-step benchmark: one guard step in which N streams bring one token each (the steady state of
streaming), with their one-token attention batched (their pages gathered, one masked call a layer)
against each stream attending alone over its cache in place, in ONE run, side by side, rounds
interleaved (this machine is shared and noisy: compare the ratio, not the absolute times).

Streams hold caches of different lengths (``--min-len`` to ``--max-len``, spread evenly), so the
batched call pads and masks. Random weights of the preset's shape: same compute, no download.

    python bench/step.py                                   # tiny guard, 1/16/64 streams
    python bench/step.py --preset 0.6b --streams 8 --rounds 3 --steps 3 --threads 2
    python bench/step.py --preset 0.6b --device cuda --streams 1,16,64,256     # on a GPU (bf16)

The runner's default is per device: per-stream on CPU (where this shows batching does not pay),
batched on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from guardproxy.guard.model import default_dtype
from guardproxy.guard.pages import PagePool
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.scheduler import NO_OUTPUT, RESPONSE, WorkItem
from guardproxy.guard.testing import random_guard_model

WAYS = {"batched": 1 << 62, "per-stream": 0}  # ModelRunner(gather_max=...): no limit / never batch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_ms(runner: ModelRunner, lengths: list[int], steps: int) -> float:
    pages = PagePool()  # the streams' page ids (the engine's job), the tensors in the runner
    kvs = [pages.allocate(n + steps + 16) for n in lengths]
    for k, (kv, n) in enumerate(zip(kvs, lengths, strict=True)):  # prefill each cache
        runner.execute([WorkItem(sid=k, kv=kv, start=0, ids=[7] * n, kinds=[NO_OUTPUT] * n)])
    pos = list(lengths)

    def step() -> None:
        runner.execute(
            [WorkItem(sid=k, kv=kv, start=pos[k], ids=[5], kinds=[RESPONSE]) for k, kv in enumerate(kvs)]
        )
        for k in range(len(pos)):
            pos[k] += 1

    step()  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    took = (time.perf_counter() - t) / steps * 1e3
    for kv in kvs:
        pages.release(kv)
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.6b"])
    ap.add_argument("--streams", default="1,16,64")
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=300)
    ap.add_argument("--steps", type=int, default=50, help="timed steps a round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each way in turn; the median is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bf16 on CUDA, fp32 on CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    model = random_guard_model(args.preset, dtype=dtype).to(device).eval()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(
        f"decode step, {args.preset} guard ({dtype}), caches of {args.min_len}-{args.max_len} tokens, "
        f"{where}, median of {args.rounds} interleaved rounds"
    )
    print(f"{'streams':>8}{'batched ms':>12}{'per-stream ms':>15}{'per-stream / batched':>22}")
    for n in (int(x) for x in args.streams.split(",")):
        lengths = [args.min_len + (args.max_len - args.min_len) * k // max(1, n - 1) for k in range(n)]
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        runners = {way: ModelRunner(model, gather_max=g) for way, g in WAYS.items()}
        for _ in range(args.rounds):
            for way, runner in runners.items():
                times[way].append(step_ms(runner, lengths, args.steps))
        b, p = statistics.median(times["batched"]), statistics.median(times["per-stream"])
        print(f"{n:>8}{b:>12.2f}{p:>15.2f}{p / b:>22.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
