"""Guard engine benchmark: the engine against the two ways a user judges a stream today, in ONE run.

- R0, the released helper's way: for every response token, a full forward over the whole prefix
  (prompt + response so far), no cache. Timed on a few response positions spread evenly over the
  response (cost is linear in the prefix, so their mean is the mean over all positions), plus the
  prompt's own forward, and reported per token.
- R1, per token with a KV cache (transformers' DynamicCache): prompt prefilled in one forward, then one
  forward per response token; streams judged one after another.
- The engine at N concurrent streams: all streams open at once (prompts prefilled in chunks), then each
  feeds its response in chunks of ``--feed`` tokens, feeding the next chunk when the last one's verdicts
  are back (as the proxy does with upstream deltas).

Figures: response tokens judged per second of wall time (prompt work included for all three), ratios
engine/R1 and engine/R0, and the share of the machine's measured matmul peak (fp32 on CPU, bf16 on
CUDA): tokens/s x 2 x non-embedding parameters / peak, counted on judged tokens and on all tokens
processed (prompt + response). Random weights of the exact 0.6B shape: same compute, no download.

    python bench/engine.py --threads 2                # the README's figures
    python bench/engine.py --preset tiny --streams 1,2 --prompt-len 16 --response-len 16   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import DynamicCache

from guardproxy.guard.engine import GuardEngine
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.model import Qwen3GuardStream
from guardproxy.guard.testing import random_guard_model


@dataclass
class Row:
    name: str
    streams: int
    response_tokens: int
    seconds: float
    processed_tokens: int
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.response_tokens / self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul: the machine's practical peak for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def workload(n: int, prompt_len: int, response_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(151643) for _ in range(prompt_len)],
            [rng.randrange(151643) for _ in range(response_len)],
        )
        for _ in range(n)
    ]


@torch.inference_mode()
def run_r0(model: Qwen3GuardStream, prompt: list[int], response: list[int], samples: int) -> Row:
    dev = next(model.parameters()).device
    positions = sorted({round(i * (len(response) - 1) / max(1, samples - 1)) for i in range(samples)})
    sync(dev)
    t = time.perf_counter()
    model(torch.tensor([prompt], device=dev))  # the prompt verdict
    sync(dev)
    prompt_s = time.perf_counter() - t
    times = []
    for j in positions:
        ids = torch.tensor([prompt + response[: j + 1]], device=dev)
        sync(dev)
        t = time.perf_counter()
        model(ids).response.risk[0, -1].tolist()
        sync(dev)
        times.append(time.perf_counter() - t)
    per_token = statistics.mean(times) + prompt_s / len(response)
    processed = len(prompt) + sum(len(prompt) + j + 1 for j in range(len(response)))
    return Row(
        "R0 helper (prefix re-run)",
        1,
        len(response),
        per_token * len(response),
        processed,
        f"timed on {len(positions)} positions, scaled to {len(response)}",
    )


@torch.inference_mode()
def run_r1(model: Qwen3GuardStream, work: list[tuple[list[int], list[int]]]) -> Row:
    dev = next(model.parameters()).device
    backbone = model.model
    sync(dev)
    t = time.perf_counter()
    judged = processed = 0
    for prompt, response in work:
        cache = DynamicCache(config=model.config)
        out = backbone(input_ids=torch.tensor([prompt], device=dev), past_key_values=cache, use_cache=True)
        model.query_probs(out.last_hidden_state[:, -1]).risk.tolist()
        for tok in response:
            out = backbone(input_ids=torch.tensor([[tok]], device=dev), past_key_values=cache, use_cache=True)
            model.response_probs(out.last_hidden_state[:, -1]).risk.tolist()
        judged += len(response)
        processed += len(prompt) + len(response)
    sync(dev)
    return Row(
        "R1 per token, KV cache",
        len(work),
        judged,
        time.perf_counter() - t,
        processed,
        "one stream after another",
    )


async def run_engine(
    model: Qwen3GuardStream,
    work: list[tuple[list[int], list[int]]],
    feed: int,
    limits: EngineLimits,
    attention: str = "auto",
    overlap: bool = False,
) -> tuple[Row, dict[str, Any]]:
    async with GuardEngine(model, limits, attention=attention, overlap=overlap) as engine:
        # Warm-up step (allocator, kernels) outside the timed region.
        async with await engine.open([1, 2, 3], 2) as s:
            await s.judge([4, 5])

        async def one(prompt: list[int], response: list[int]) -> int:
            async with await engine.open(prompt, len(prompt) - 1) as stream:
                await stream.prompt_verdict()
                n = 0
                for i in range(0, len(response), feed):
                    n += len(await stream.judge(response[i : i + feed]))
                return n

        steps0 = engine.stats().steps
        t = time.perf_counter()
        judged = sum(await asyncio.gather(*(one(p, r) for p, r in work)))
        sync(next(model.parameters()).device)
        seconds = time.perf_counter() - t
        steps = engine.stats().steps - steps0
    processed = sum(len(p) + len(r) for p, r in work)
    row = Row(
        f"engine, {attention}" + (", overlap" if overlap else ""),
        len(work),
        judged,
        seconds,
        processed,
        f"feed {feed}, {steps} steps, {processed / steps:.0f} tokens/step",
    )
    return row, {"steps": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.6b", choices=["tiny", "0.6b"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 CPU, bf16 CUDA"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--feed", type=int, default=16, help="response tokens per feed in the engine runs")
    ap.add_argument("--r0-samples", type=int, default=4)
    ap.add_argument("--r1-streams", type=int, default=1)
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak measurement")
    ap.add_argument(
        "--attention", default="auto", help="attention backends to compare, e.g. reference,batched"
    )
    ap.add_argument(
        "--overlap", default="off", help="off, on or off,on: the next step scheduled while one runs"
    )
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    counts = [int(x) for x in args.streams.split(",")]

    t = time.perf_counter()
    model = random_guard_model(args.preset, seed=0).to(device=device, dtype=dtype)
    build_s = time.perf_counter() - t
    params = model.non_embedding_parameters
    peak = matmul_peak(device, dtype, args.peak_n)
    max_n = max(counts)
    per_stream = args.prompt_len + args.response_len + 64
    limits = EngineLimits(
        max_positions=int(model.config.max_position_embeddings),
        max_streams=max(256, max_n),
        max_cached_tokens=max(per_stream * max_n + 4096, 65536),
        max_batch_tokens=args.max_batch_tokens,
        max_batch_streams=max(64, max_n),
        prefill_chunk=min(512, args.max_batch_tokens),
        response_reserve=min(512, max(64, args.response_len)),
    )
    work = workload(max_n, args.prompt_len, args.response_len)

    rows: list[Row] = [
        run_r0(model, *work[0], samples=args.r0_samples),
        run_r1(model, work[: args.r1_streams]),
    ]
    for n in counts:
        for attention in args.attention.split(","):
            for overlap in args.overlap.split(","):
                row, _ = asyncio.run(
                    run_engine(model, work[:n], args.feed, limits, attention, overlap == "on")
                )
                rows.append(row)

    r0, r1 = rows[0].tok_s, rows[1].tok_s
    print(
        f"guard engine benchmark - {args.preset} shape ({params / 1e6:.0f}M non-embedding params), "
        f"{dtype}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"measured {dtype} matmul peak ({args.peak_n}^3): {peak / 1e9:.1f} GFLOP/s; "
        f"model built in {build_s:.1f}s"
    )
    print(f"workload: prompts of {args.prompt_len} tokens, responses of {args.response_len} tokens")
    print()
    head = f"{'run':<28}{'streams':>8}{'judged tok/s':>14}{'x R1':>8}{'x R0':>9}{'peak% judged':>14}"
    print(head + f"{'peak% all':>11}  note")
    print("-" * (len(head) + 40))
    out = []
    for row in rows:
        share_j = row.tok_s * 2 * params / peak * 100
        share_all = row.processed_tokens / row.seconds * 2 * params / peak * 100
        print(
            f"{row.name:<28}{row.streams:>8}{row.tok_s:>14.2f}{row.tok_s / r1:>8.2f}{row.tok_s / r0:>9.1f}"
            f"{share_j:>13.1f}%{share_all:>10.1f}%  {row.note}"
        )
        out.append(
            {
                **asdict(row),
                "tok_s": row.tok_s,
                "x_r1": row.tok_s / r1,
                "x_r0": row.tok_s / r0,
                "peak_share_judged": share_j,
                "peak_share_processed": share_all,
            }
        )
    if args.json:
        meta = {
            "preset": args.preset,
            "device": str(device),
            "dtype": str(dtype),
            "threads": args.threads,
            "peak_flops": peak,
            "non_embedding_params": params,
            "torch": torch.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
