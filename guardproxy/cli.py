"""Command line: ``guardproxy make-test-model`` and ``guardproxy check``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardproxy.guard.checkpoint import DEFAULT_GUARD_MODEL, GuardModelError


def _make_test_model(args: argparse.Namespace) -> int:
    import torch

    from guardproxy.guard.testing import (
        RESPONSE_CATEGORIES,
        TriggerSpec,
        make_random_checkpoint,
        make_trigger_checkpoint,
    )

    if args.random:
        if args.unsafe or args.controversial:
            print("error: --random takes no trigger words", file=sys.stderr)
            return 2
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        out = make_random_checkpoint(args.out, preset=args.preset, seed=args.seed, dtype=dtype)
    else:
        if not args.unsafe and not args.controversial:
            print("error: give --unsafe/--controversial words, or --random", file=sys.stderr)
            return 2
        if args.category not in RESPONSE_CATEGORIES:
            print(f"error: --category must be one of: {', '.join(RESPONSE_CATEGORIES)}", file=sys.stderr)
            return 2
        spec = TriggerSpec(
            unsafe=args.unsafe,
            controversial=args.controversial,
            category=args.category,
            isolated=args.isolated,
            strength=args.strength,
        )
        out = make_trigger_checkpoint(args.out, spec)
    print(f"wrote {out}")
    return 0


_COLORS = {"Safe": "", "Controversial": "\x1b[33m", "Unsafe": "\x1b[1;31m"}


def _load_conversation(args: argparse.Namespace) -> tuple[list[Any], str | None]:
    if args.file:
        data = json.loads(Path(args.file).read_text(encoding="utf-8"))
        messages = data.get("messages", data) if isinstance(data, dict) else data
        if not isinstance(messages, list):
            raise ValueError(f"{args.file}: expected a list of messages or {{'messages': [...]}}")
        response = args.response
        last = messages[-1] if messages else None
        if response is None and isinstance(last, dict) and last.get("role") == "assistant":
            response = last.get("content") or ""
            messages = messages[:-1]
        return messages, response
    if args.text is None:
        raise ValueError("give a prompt text or --file")
    return [{"role": "user", "content": args.text}], args.response


async def _check(args: argparse.Namespace) -> int:
    from guardproxy.evaluate import judge_answer, token_rows
    from guardproxy.guard.engine import GuardEngine
    from guardproxy.guard.loading import load_guard
    from guardproxy.policy import Policy, ResponseJudge
    from guardproxy.server.prompts import judge_prompt

    messages, response = _load_conversation(args)
    model, template = load_guard(args.guard_model, device=args.device, quantize=args.quantize)
    tokenizer = template.tok
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    async with GuardEngine(model, attention=args.attention) as engine:
        prompt = template.render_prompt(messages, max_tokens=engine.max_prompt_tokens)
        async with await engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start) as stream:
            pv, _ = await judge_prompt(engine, stream, prompt, Policy())  # a long one in windows too
            # The answer as the proxy feeds it: the assistant turn's layout, judged token by token.
            judged = await judge_answer(stream, template, response, len(prompt.ids)) if response else []
    tokens = [t.id for t in judged]
    verdicts = [t.verdict for t in judged]
    # The response verdict by the authors' rule (two consecutive tokens of the same tier), or per token.
    judge = ResponseJudge(Policy(debounce=args.debounce))
    for v in verdicts:
        judge.judge(v)
    risk, at = judge.verdict()
    verdict = {
        "risk": risk,
        "token_index": at,
        "category": verdicts[at].top_category if at is not None else None,
    }
    if args.json:
        rows = token_rows(tokenizer, judged)
        print(
            json.dumps(
                {"prompt": pv.to_dict(), "response": rows, "verdict": verdict}, ensure_ascii=False, indent=2
            )
        )
        return 0
    print(
        f"prompt: {pv.risk}" + (f" ({pv.category})" if pv.category else "") + f"  p={max(pv.risk_probs):.3f}"
    )
    if tokens:
        print("response:")
        for tid, v in zip(tokens, verdicts, strict=True):
            text = tokenizer.decode([tid])
            label = v.risk + (f"/{v.category}" if v.category else "")
            if color:
                print(f"  {_COLORS.get(v.risk, '')}{text!r:<24}\x1b[0m {label}  p={max(v.risk_probs):.3f}")
            else:
                print(f"  {text!r:<24} {label}  p={max(v.risk_probs):.3f}")
        rule = "two consecutive tokens" if args.debounce else "any single token"
        where = f" from token {at} ({verdict['category']})" if at is not None else ""
        print(f"response verdict: {risk}{where}, by {rule}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import socket

    from aiohttp import web

    from guardproxy.config import Settings, load_settings_file, with_overrides
    from guardproxy.observe import logs
    from guardproxy.server.app import create_app, freeze_startup_heap

    settings = load_settings_file(args.config) if args.config else Settings()
    role = {"engine": "engine", "worker": f"worker {args.worker_index}"}.get(args.role or "")
    logs.configure(settings.logging.format, settings.logging.level, role=role)
    settings = with_overrides(
        settings,
        upstream_base_url=args.upstream,
        guard_model=args.guard_model,
        guard_device=args.device,
        server_host=args.host,
        server_port=args.port,
        server_workers=args.workers,
    )
    if args.role == "engine":  # the engine process of several workers (started by the supervisor)
        from guardproxy.server.engines import serve_engine

        asyncio.run(serve_engine(settings, args.engine_socket))
        return 0
    if args.role is None and settings.server.workers > 1:
        from guardproxy.server.supervisor import supervise

        return supervise(settings, args.argv)
    listen: dict[str, Any] = {"host": settings.server.host, "port": settings.server.port}
    worker = args.role == "worker"
    app = create_app(
        settings,
        config_path=args.config,
        reload_interval_s=settings.server.reload_interval_s,
        engine_socket=args.engine_socket if worker else None,
        worker=args.worker_index if worker else None,
    )
    if worker:  # a proxy worker: the supervisor's socket, the shared engine
        from guardproxy.server.supervisor import orphan_watch

        listen = {"sock": socket.socket(fileno=args.listen_fd), "print": None}
        app.cleanup_ctx.append(orphan_watch)
    app.on_startup.append(freeze_startup_heap)  # runs after the services are up (cleanup_ctx is first)
    web.run_app(
        app,
        **listen,
        shutdown_timeout=settings.server.shutdown_grace_s,
        handler_cancellation=True,  # a client gone away cancels its handler: upstream closed, guard freed
        access_log=None,
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from guardproxy.config import Settings, load_settings_file
    from guardproxy.evaluate import Report, evaluate, load_items, plot_delays
    from guardproxy.guard.engine import GuardEngine
    from guardproxy.guard.loading import load_guard

    settings = load_settings_file(args.config) if args.config else Settings()
    if args.policy and args.policy not in settings.policies:
        print(f"error: no policy named {args.policy!r} in the configuration", file=sys.stderr)
        return 2
    policy = settings.policies[args.policy] if args.policy else settings.policy
    changes: dict[str, Any] = {}
    if args.mode:
        changes["mode"] = args.mode
    if args.debounce is not None:
        changes["debounce"] = args.debounce
    policy = replace(policy, **changes)
    items = load_items(args.data, label=args.label)
    source = args.guard_model or settings.guard.model
    model, template = load_guard(
        source,
        device=args.device or settings.guard.device,
        dtype=settings.guard.dtype,
        quantize=args.quantize or settings.guard.quantize,
    )
    attention = args.attention or settings.guard.attention

    async def run() -> Report:
        async with GuardEngine(model, settings.guard.engine, attention=attention) as engine:
            return await evaluate(
                engine, template, policy, items, concurrency=args.concurrency, progress=sys.stderr.isatty()
            )

    report = asyncio.run(run())
    print(report.text())
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2))
    if args.plot:
        plot_delays(report, args.plot)
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from guardproxy.config import key_hash

    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    print(key_hash(key))
    return 0


def _speed_options(p: argparse.ArgumentParser, *, configured: bool) -> None:
    """How the guard runs, to compare verdicts on one's own text before changing the configuration
    (``configured``: left out, the configuration's choice applies)."""
    where = "the configuration's, else " if configured else ""
    p.add_argument(
        "--attention",
        choices=["auto", "batched", "reference"],
        default=None if configured else "auto",
        help=f"attention backend (default: {where}auto)",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default=None if configured else "none",
        help=f"int8: the backbone's Linear layers in int8, CPU only (default: {where}none)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardproxy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the guard proxy")
    s.add_argument("--config", help="YAML configuration (see config/guardproxy.yaml)")
    s.add_argument("--upstream", help="the upstream's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--guard-model", help=f"hub id or checkpoint directory (default {DEFAULT_GUARD_MODEL})")
    s.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (default 8080)")
    s.add_argument(
        "--workers",
        type=int,
        help="proxy processes sharing one guard engine process (default 1: one process)",
    )
    # Set by the supervisor of several workers on the processes it starts, not by users.
    s.add_argument("--role", choices=["engine", "worker"], help=argparse.SUPPRESS)
    s.add_argument("--engine-socket", help=argparse.SUPPRESS)
    s.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    s.set_defaults(func=_serve)

    e = sub.add_parser(
        "eval", help="score a policy on labelled conversations (Qwen3GuardTest JSONL) or prompts"
    )
    e.add_argument("data", help=".jsonl conversations, or prompts: .txt one per line / .json list")
    e.add_argument("--config", help="YAML configuration whose policy is scored")
    e.add_argument("--policy", help="a named policy from the configuration (default: its default policy)")
    e.add_argument("--mode", choices=["strict", "loose"], help="override the policy's mode")
    e.add_argument(
        "--debounce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the authors' pair rule (default: the policy's, on unless it says otherwise)",
    )
    e.add_argument(
        "--label", choices=["Safe", "Unsafe", "Controversial"], help="label for unlabelled prompts"
    )
    e.add_argument("--guard-model", help="hub id or checkpoint directory")
    e.add_argument("--device", help="cpu, cuda ...")
    e.add_argument("--concurrency", type=int, default=32, help="conversations judged at once")
    _speed_options(e, configured=True)
    e.add_argument("--json", help="write the figures as JSON here")
    e.add_argument("--plot", help="write a PNG histogram of the flag delays here")
    e.set_defaults(func=_eval)

    h = sub.add_parser("hash-key", help="print the SHA-256 of an API key, as the configuration takes it")
    h.add_argument("key", help="the key, or - to read it from standard input")
    h.set_defaults(func=_hash_key)

    m = sub.add_parser("make-test-model", help="write a Qwen3Guard-Stream checkpoint for tests and CI")
    m.add_argument("out", help="output directory")
    m.add_argument(
        "--unsafe",
        nargs="+",
        default=[],
        metavar="WORD",
        help="words judged Unsafe (a word the tokenizer splits: at its last token, right after the others)",
    )
    m.add_argument(
        "--controversial", nargs="+", default=[], metavar="WORD", help="words judged Controversial"
    )
    m.add_argument("--category", default="Violent", help="category of the trigger words")
    m.add_argument(
        "--isolated",
        action="store_true",
        help="flag only the trigger tokens (default: the tokens after one keep its tier, as real models do)",
    )
    m.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="scale of the risk logits: below 1 probabilities are graded (0.1: a trigger at about 0.96)",
    )
    m.add_argument("--random", action="store_true", help="random weights instead of trigger words")
    m.add_argument("--preset", choices=["tiny", "0.6b"], default="tiny", help="shape of a --random model")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="saved dtype (--random)"
    )
    m.set_defaults(func=_make_test_model)

    c = sub.add_parser("check", help="moderate a prompt (and a response) offline, token by token")
    c.add_argument("text", nargs="?", help="the user prompt")
    c.add_argument("--response", help="an assistant response to judge token by token")
    c.add_argument("--file", help="a JSON conversation: a list of messages, or {'messages': [...]}")
    c.add_argument("--guard-model", default=DEFAULT_GUARD_MODEL, help="hub id or local checkpoint directory")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    c.add_argument("--json", action="store_true", help="print verdicts as JSON")
    _speed_options(c, configured=False)
    c.add_argument(
        "--debounce",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the response verdict by the authors' pair rule (default) or by any single token",
    )
    c.set_defaults(func=lambda a: asyncio.run(_check(a)))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the supervisor's children run it again
    try:
        return int(args.func(args))
    except (GuardModelError, ValueError, OSError, RuntimeError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
