"""`first bench`: the command's arguments, the preset they pick, and where the results go."""

from __future__ import annotations

import argparse
import json
import os
import sys

from first_lib import device as device_mod
from first_lib.bench.config import FULL_CPU_RAM_GB, preset
from first_lib.bench.models import _QWEN_05
from first_lib.bench.report import default_out, format_table, write_json
from first_lib.bench.run import run_bench
from first_lib.errors import FirstError

DESCRIPTION = (
    "`first bench`: does the implementation deliver the cost that offline top-k distillation "
    "promises?"
)


def _cmd_bench(args) -> int:
    name = "tiny" if args.tiny else ("quick" if args.quick else "full")
    overrides = {
        k: getattr(args, k)
        for k in (
            "student",
            "teacher",
            "batch_size",
            "seq_len",
            "target_frac",
            "n_examples",
            "extract_examples",
            "steps",
            "reps",
            "extract_reps",
            "threads",
            "coef_positions",
            "profile",
            "precision",
            "prefix_model",
        )
        if getattr(args, k) is not None
    }
    if args.online:
        overrides["online"] = tuple(s.strip() for s in args.online.split(",") if s.strip())
    if args.no_memory:
        overrides["memory"] = False
    cfg = preset(name, device=args.device, **overrides)
    if name == "full" and cfg.device == "cpu" and cfg.student == _QWEN_05:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        if ram_gb < FULL_CPU_RAM_GB:
            raise FirstError(
                f"the full bench (0.5B student, 1.5B teacher, online KD over full logits) needs "
                f"about {FULL_CPU_RAM_GB} GB of memory on a CPU and this machine has "
                f"{ram_gb:.0f} GB: use --quick, or --device cuda"
            )
    results = run_bench(cfg, log=lambda s: print(f"bench: {s}", file=sys.stderr, flush=True))
    out = write_json(args.out or default_out(cfg), results)
    # With `--json` and no path, stdout holds the JSON alone (`first bench --json | jq`); the
    # table goes to stderr.
    table = sys.stderr if args.json == "-" else sys.stdout
    print(format_table(results), file=table)
    print(f"\nresults: {out}", file=table)
    if args.json == "-":
        print(json.dumps(results, indent=2, sort_keys=True))
    elif args.json:
        print(f"json: {write_json(args.json, results)}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure cost against the targets (KD vs CE, extraction, disk, online KD, search)",
        description=DESCRIPTION,
    )
    p.add_argument("--quick", action="store_true", help="small real-vocabulary models (~1 min)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="print the results JSON (or write it to PATH)",
    )
    p.add_argument("--out", default=None, help="results JSON (default: FIRST_HOME/bench/...)")
    p.add_argument("--student", help="student config: shipped name, derived name or path")
    p.add_argument("--teacher", help="teacher config: shipped name, derived name or path")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--target-frac", type=float)
    p.add_argument("--n-examples", type=int)
    p.add_argument("--extract-examples", type=int, help="examples for extraction (0: n-examples)")
    p.add_argument("--steps", type=int, help="optimizer steps per timed run")
    p.add_argument("--reps", type=int, help="timed repetitions")
    p.add_argument(
        "--extract-reps", type=int, help="timed repetitions of the extraction (0: --reps)"
    )
    p.add_argument("--threads", type=int, help="torch threads (0: default)")
    p.add_argument("--coef-positions", type=int)
    p.add_argument("--online", help="comma list of auto,trl,equivalent,lean")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--profile", help="book profile whose chapter timings to include")
    p.add_argument(
        "--prefix-model",
        help=f"24-layer config of the prefix-reuse measurement (default: {_QWEN_05}, the real "
        "width; prefix-student: 1/3.5 of it)",
    )
    device_mod.add_precision_argument(p)
    p.set_defaults(func=_cmd_bench)
