"""How far int8 weights (``guard.quantize: int8``) move the guard's verdicts: every response position of
a few streams judged by the same weights in float32 and in int8, compared position by position.

- random weights of the 0.6B shape (random ids): the largest risk-probability difference and the share
  of positions whose tier (arg-max risk level) is the same;
- the trigger checkpoint (real weights, every real layer; a text with Safe, Controversial and Unsafe
  words): the same figures, and whether any tier moved (the tests require none to).

The released weights are not on this machine: ``guardproxy eval --quantize int8`` is how a user
checks F1 and timeliness on them before turning int8 on.

    python bench/quantize.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile

import torch

from guardproxy.guard.model import Qwen3GuardStream, load_guard_model
from guardproxy.guard.pages import PagePool
from guardproxy.guard.quantize import quantize_model
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.scheduler import RESPONSE, WorkItem
from guardproxy.guard.testing import (
    TriggerSpec,
    make_trigger_checkpoint,
    qwen3_tokenizer_file,
    random_guard_model,
)
from guardproxy.guard.tokenizer import GuardTokenizer

TEXT = (
    "Bread wants flour, water, salt and yeast; knead it and let it rise. Then the story turns: a gun on "
    "the table, a grenade in the drawer, and in the end a bomb. "
)


def risk_probs(model: Qwen3GuardStream, streams: list[list[int]]) -> torch.Tensor:
    """The response head's risk probabilities at every position of every stream, [positions, levels]."""
    runner = ModelRunner(model)
    pool = PagePool()
    rows = []
    for ids in streams:
        kv = pool.allocate(len(ids) + 16)
        (out,) = runner.execute([WorkItem(0, kv, 0, ids, [RESPONSE] * len(ids))])
        rows += [r for r, _ in out.response]
        pool.release(kv)
    return torch.tensor(rows)


def compare(name: str, model: Qwen3GuardStream, streams: list[list[int]]) -> None:
    fp = risk_probs(model, streams)
    q8 = risk_probs(quantize_model(copy.deepcopy(model), "int8"), streams)
    same = (fp.argmax(-1) == q8.argmax(-1)).float().mean().item()
    print(
        f"{name:<36}{len(fp):>10}{(fp - q8).abs().max().item():>14.4f}{(fp - q8).abs().mean().item():>12.5f}"
        f"{same * 100:>14.2f}%"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--length", type=int, default=256, help="tokens a stream (random weights)")
    ap.add_argument("--preset", default="0.6b", choices=["tiny", "0.6b"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    print(f"int8 against float32, CPU, {args.threads} threads")
    print(f"{'weights':<36}{'positions':>10}{'max |dp|':>14}{'mean |dp|':>12}{'same tier':>15}")
    randoms = [[rng.randrange(151643) for _ in range(args.length)] for _ in range(args.streams)]
    compare(f"random, {args.preset} shape", random_guard_model(args.preset).eval(), randoms)
    tokenizer = GuardTokenizer.from_file(qwen3_tokenizer_file())
    with tempfile.TemporaryDirectory() as tmp:
        spec = TriggerSpec(unsafe=["bomb", "grenade"], controversial=["gun"], category="Violent")
        model = load_guard_model(make_trigger_checkpoint(tmp, spec), device="cpu")
    compare("trigger checkpoint (tiny, 3 layers)", model, [tokenizer.encode_text(TEXT * 4)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
