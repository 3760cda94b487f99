"""Prefix-cache benchmark: the guard engine with its prefix cache on against off, side by side in ONE run
(two engines on one model, in this process; their runs alternate so the machine's noise falls on both).

Workloads (conversations rendered by the real template from plain English text; random weights of the
preset's shape: the same compute as the real model):
1. a chat that grows by about ``--turn-tokens`` a turn for ``--turns`` turns: at each turn the whole
   conversation is judged as a prompt (the verdict at its last user turn), then the answer; the guard's
   context tokens computed and the prompt verdict's latency, per turn;
2. ``--clients`` clients at once sharing a ``--system-tokens`` system prompt with tool definitions, each
   with its own short question: context tokens computed and the time to every prompt verdict;
3. ``n = 4`` choices of one prompt: context tokens computed;
4. an agent session in Claude Code's request shape (``--agent-tokens`` of system prompt and 24 tools,
   about 27k guard tokens: longer than the guard's context, so judged as windows plus the main prompt,
   as the proxy does) over ``--agent-turns`` requests, each adding a tool call, its result and a
   question: context tokens computed and the time to the prompt verdict (the worst of the windows').

    python bench/prefix.py --preset tiny
    python bench/prefix.py --preset 0.6b --threads 2 --turns 6 --system-tokens 600 --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from guardproxy.guard.engine import GuardEngine
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.testing import qwen3_tokenizer_file, random_guard_model
from guardproxy.guard.tokenizer import GuardTokenizer
from guardproxy.stream.guardview import AssistantView

SENTENCE = (
    "the river runs past old stone houses where people keep gardens full of light and music while the "
    "city road turns toward a green hill with paper windows and quiet water under a wide evening sky"
)
WORDS = SENTENCE.split(" ")


def text(rng: random.Random, tokens: int) -> str:
    """Plain English of about ``tokens`` guard tokens (one a word, with a full stop now and then)."""
    words = [rng.choice(WORDS) for _ in range(tokens)]
    return " ".join(w + ("." if k % 12 == 11 else "") for k, w in enumerate(words)).capitalize()


def answer_feeds(template: ChatTemplate, answer: str) -> tuple[list[int], list[int]]:
    """An answer as the proxy feeds it: the context before its first judged token, then the rest."""
    view = AssistantView(template)
    feeds = view.header() + view.content(answer) + view.finish()
    first = next(k for k, f in enumerate(feeds) if f.spans is not None)
    return [i for f in feeds[:first] for i in f.ids], [i for f in feeds[first:] for i in f.ids]


async def judge_turn(
    engine: GuardEngine, template: ChatTemplate, messages: list[dict[str, Any]], answer: str
) -> tuple[int, float]:
    """One turn: the conversation's prompt verdict, then its answer. (context tokens computed, verdict s)"""
    prompt = template.render_prompt(messages, max_tokens=engine.max_prompt_tokens)
    before = engine.stats().prefill_tokens
    t = time.perf_counter()
    async with await engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start) as stream:
        await stream.prompt_verdict()
        verdict_s = time.perf_counter() - t
        context, judged = answer_feeds(template, answer)
        stream.feed_context(context)
        await stream.judge(judged)
    return engine.stats().prefill_tokens - before, verdict_s


async def growing_chat(
    engines: dict[str, GuardEngine], template: ChatTemplate, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rng = random.Random(1)
    messages: list[dict[str, Any]] = [{"role": "system", "content": text(rng, 60)}]
    rows = []
    for turn in range(1, args.turns + 1):
        messages.append({"role": "user", "content": text(rng, args.turn_tokens // 3)})
        answer = text(rng, args.turn_tokens * 2 // 3)
        row: dict[str, Any] = {"turn": turn, "prompt_tokens": len(template.render_prompt(messages).ids)}
        for name, engine in engines.items():
            row[f"{name}_tokens"], row[f"{name}_verdict_s"] = await judge_turn(
                engine, template, messages, answer
            )
        messages.append({"role": "assistant", "content": answer})
        rows.append(row)
    return rows


async def shared_system(
    engine: GuardEngine, template: ChatTemplate, args: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(2)
    tools = [
        {
            "type": "function",
            "function": {"name": f"tool_{k}", "description": text(rng, 40), "parameters": {"type": "object"}},
        }
        for k in range(3)
    ]
    system = {"role": "system", "content": text(rng, args.system_tokens - 180)}
    prompts = [
        template.render_prompt([system, {"role": "user", "content": text(rng, 20)}], tools=tools)
        for _ in range(args.clients)
    ]
    before = engine.stats().prefill_tokens
    t = time.perf_counter()

    async def one(p: Any) -> None:
        async with await engine.open(p.ids, p.verdict_index, p.anchor_start) as stream:
            await stream.prompt_verdict()

    await asyncio.gather(*(one(p) for p in prompts))
    return {
        "prompt_tokens": len(prompts[0].ids),
        "tokens": engine.stats().prefill_tokens - before,
        "seconds": time.perf_counter() - t,
    }


async def choices(engine: GuardEngine, template: ChatTemplate, n: int) -> dict[str, Any]:
    rng = random.Random(3)
    prompt = template.render_prompt(
        [{"role": "system", "content": text(rng, 300)}, {"role": "user", "content": text(rng, 30)}]
    )
    context, judged = answer_feeds(template, text(rng, 20))
    before = engine.stats().prefill_tokens
    first = await engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start)
    await first.prompt_verdict()  # the proxy opens further choices once the prompt is judged
    streams = [first] + [await engine.open(prompt.ids, None, prompt.anchor_start) for _ in range(n - 1)]
    for s in streams:
        s.feed_context(context)
    await asyncio.gather(*(s.judge(judged) for s in streams))
    for s in streams:
        s.close()
    return {"prompt_tokens": len(prompt.ids), "tokens": engine.stats().prefill_tokens - before}


CLAUDE_CODE_TOOLS = [  # the 24 tools Claude Code 2.1.197 sends, by name
    *("Agent", "Bash", "CronCreate", "CronDelete", "CronList", "Edit", "EnterWorktree", "ExitWorktree"),
    *("NotebookEdit", "Read", "ReportFindings", "ScheduleWakeup", "SendMessage", "Skill", "TaskCreate"),
    *("TaskGet", "TaskList", "TaskOutput", "TaskStop", "TaskUpdate", "WebFetch", "WebSearch", "Workflow"),
    "Write",
]


async def agent_session(
    engines: dict[str, GuardEngine], template: ChatTemplate, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Claude Code's shape: a system prompt and 24 tools (their descriptions most of it), then turns."""
    rng = random.Random(4)
    per_tool = (args.agent_tokens - 2000) // len(CLAUDE_CODE_TOOLS)
    schema = {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}
    tools = [
        {
            "type": "function",
            "function": {"name": n, "description": text(rng, per_tool), "parameters": schema},
        }
        for n in CLAUDE_CODE_TOOLS
    ]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": text(rng, 1800)},
        {"role": "user", "content": text(rng, 40)},
    ]
    rows = []
    for turn in range(1, args.agent_turns + 1):
        row: dict[str, Any] = {"turn": turn}
        for name, engine in engines.items():
            prompt = template.render_prompt(messages, tools=tools, max_tokens=engine.max_prompt_tokens)
            row["prompt_tokens"], row["windows"] = prompt.judged_tokens, len(prompt.windows)
            before = engine.stats().prefill_tokens
            t = time.perf_counter()

            async def verdict(ids: list[int], at: int, engine: GuardEngine = engine) -> None:
                async with await engine.open(ids, at) as stream:
                    await stream.prompt_verdict()

            await asyncio.gather(
                verdict(prompt.ids, prompt.verdict_index),
                *(verdict(w.ids, w.verdict_index) for w in prompt.windows),
            )
            row[f"{name}_verdict_s"] = time.perf_counter() - t
            row[f"{name}_tokens"] = engine.stats().prefill_tokens - before
        call = {"id": f"c{turn}", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}
        messages += [
            {"role": "assistant", "content": text(rng, 30), "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{turn}", "content": text(rng, 120)},
            {"role": "user", "content": text(rng, 30)},
        ]
        rows.append(row)
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = random_guard_model(args.preset)
    template = ChatTemplate(GuardTokenizer.from_file(qwen3_tokenizer_file()))
    limits = EngineLimits(max_cached_tokens=args.cache_tokens, max_batch_tokens=args.batch_tokens)
    out: dict[str, Any] = {}
    async with (
        GuardEngine(model, limits) as on,
        GuardEngine(model, replace(limits, prefix_cache=False)) as off,
    ):
        engines = {"on": on, "off": off}
        out["chat"] = await growing_chat(engines, template, args)
        for name, engine in engines.items():
            engine.scheduler.clear_cache()  # each workload starts cold
            out[f"shared_{name}"] = await shared_system(engine, template, args)
        for name, engine in engines.items():
            engine.scheduler.clear_cache()
            out[f"n4_{name}"] = await choices(engine, template, 4)
        for engine in engines.values():
            engine.scheduler.clear_cache()
        out["agent"] = await agent_session(engines, template, args) if args.agent_turns else []
    return out


def print_turns(rows: list[dict[str, Any]], windows: bool = False) -> None:
    """Per turn: the prompt, context tokens computed with the cache on and off, the verdict's latency."""
    cols = f"{'turn':>5}{'prompt':>8}" + (f"{'windows':>9}" if windows else "")
    print(f"{cols}{'tokens on':>11}{'off':>8}{'off/on':>8}{'verdict on':>12}{'off':>9}")
    for r in rows:
        ratio = r["off_tokens"] / max(1, r["on_tokens"])
        cells = f"{r['turn']:>5}{r['prompt_tokens']:>8}" + (f"{r['windows']:>9}" if windows else "")
        print(
            f"{cells}{r['on_tokens']:>11}{r['off_tokens']:>8}{ratio:>8.1f}"
            f"{r['on_verdict_s'] * 1000:>10.0f}ms{r['off_verdict_s'] * 1000:>7.0f}ms"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "0.6b"], default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--turn-tokens", type=int, default=300)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cache-tokens", type=int, default=131072, help="engine.max_cached_tokens")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="engine.max_batch_tokens")
    ap.add_argument("--agent-tokens", type=int, default=27000, help="agent system prompt and tools")
    ap.add_argument("--agent-turns", type=int, default=4, help="agent requests (0: skip)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    out = asyncio.run(run(args))
    print(f"prefix cache on vs off, {args.preset} guard, CPU, {args.threads} torch threads, one run")
    print(f"\n1. a chat growing ~{args.turn_tokens} tokens a turn: context tokens computed, prompt verdict")
    print_turns(out["chat"])
    on, off = out["shared_on"], out["shared_off"]
    size = on["prompt_tokens"]
    print(f"\n2. {args.clients} clients at once, a {size}-token prompt each (shared system prompt, tools)")
    ratio = off["tokens"] / max(1, on["tokens"])
    print(f"   context tokens computed: on {on['tokens']}, off {off['tokens']} ({ratio:.1f}x)")
    ratio = off["seconds"] / on["seconds"]
    seconds = f"on {on['seconds']:.2f} s, off {off['seconds']:.2f} s"
    print(f"   time to every prompt verdict: {seconds} ({ratio:.1f}x)")
    on, off = out["n4_on"], out["n4_off"]
    size = on["prompt_tokens"]
    tokens = f"on {on['tokens']}, off {off['tokens']}"
    print(f"\n3. n = 4 choices of a {size}-token prompt: context tokens computed {tokens}")
    if out["agent"]:
        print(
            f"\n4. an agent session, Claude Code's shape (~{args.agent_tokens} tokens of system and 24 tools)"
        )
        print_turns(out["agent"], windows=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
