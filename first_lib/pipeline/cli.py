"""The `first run`, `first clean` and `first <stage>` commands, and the `--dry-run` table: each
stage with its status, memory and estimated minutes on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from first_lib import device
from first_lib.artefacts import meta_problem
from first_lib.config import Profile, cosmetic_fields, help_of
from first_lib.errors import FirstError
from first_lib.paths import first_home
from first_lib.pipeline import clock
from first_lib.pipeline import memory as stage_memory
from first_lib.pipeline.data import test_tasks
from first_lib.pipeline.graph import run_precision, stage_graph
from first_lib.pipeline.runner import (
    UNTIL,
    available_memory_gb,
    estimate_memory_gb,
    run,
    run_seeds,
)
from first_lib.pipeline.stale import clean
from first_lib.profiles import PROFILES, all_settings, for_setting, get_profile


def describe_plan(prof: Profile, setting: str, rates: clock.Rates | None = None) -> str:
    """The `--dry-run` table: each stage with its status, memory and estimated minutes, on this
    machine or (`rates`) on the machine a rates file was measured on, from an empty cache."""
    precision = rates.precision if rates is not None else run_precision(prof)
    asked = device.requested_precision(prof.precision)
    lines = [
        f"profile {prof.name} ({prof.note}), setting {setting}",
        f"teacher {prof.teacher} -> student {prof.student}; k={prof.k}; style={prof.style}",
        f"precision {precision}" + (" (auto on this machine)" if asked == "auto" else ""),
        f"sizes: train {prof.n_train or 'all'}, validation {prof.n_val or 'all'}, "
        f"test {prof.n_test or 'all'} on {', '.join(test_tasks(prof, setting))}",
        f"artefacts under {first_home() / 'runs'}",
    ]
    est = {r["stage"]: r for r in clock.estimate(prof, setting, precision, rates=rates)}
    where_to = f"on {rates.name} at {rates.precision}" if rates else "for this machine"
    lines.append(
        f"{'stage':<36} {'status':<8} {'memory':>8} {'time':>9}  artefact  (memory: total, "
        f"before sharding; peak memory and time: estimated {where_to})"
    )
    for node in stage_graph(prof, setting, precision):
        if node.kind == "tiny-models":
            continue
        problem = meta_problem(node.path, node.key)
        status = "done" if problem is None else "missing" if problem == "missing" else "corrupt"
        memory = ""
        if node.name in est and est[node.name].get("memory_gb") is not None:
            memory = f"{est[node.name]['memory_gb']:5.1f} GB"
        elif node.kind in ("train", "extract"):
            gb = estimate_memory_gb(node.params_b, node.key.get("train"), precision)
            memory = f"{gb:5.1f} GB"
        time = f"{est[node.name]['seconds'] / 60:6.1f} min" if node.name in est else "        ?"
        where = node.path.name if node.kind != "evaluate" else ""
        lines.append(f"{node.name:<36} {status:<8} {memory:>8} {time}  {where}".rstrip())
    lines.append(clock.describe(list(est.values()), rates))
    if rates is not None:  # another machine's memory is not this one's
        return "\n".join(lines)
    need = {n: r["memory_gb"] for n, r in est.items() if r.get("memory_gb") and not r.get("done")}
    have = available_memory_gb()
    if need and max(need.values()) > have:
        worst = max(need, key=need.get)
        node = next(n for n in stage_graph(prof, setting, precision) if n.name == worst)
        source = prof.teacher if node.role == "teacher" else prof.student
        params_b = node.params_b or prof.params_b[node.role != "teacher"]
        lines.append(
            f"memory: {worst} needs about {need[worst]:.0f} GB at its peak, more than this "
            f"machine's {have:.0f} GB, so the run would stop before its first stage; "
            + stage_memory.advice(node, source, params_b, precision, need[worst], have)
        )
    return "\n".join(lines)


def describe_seeds(
    profile: str, setting: str, seeds: str, overrides: dict, rates: clock.Rates | None = None
) -> str:
    """The time still to compute for each training seed of `--seeds` and for all of them, each
    artefact counted once (the untuned baselines are shared between seeds); with `rates`, on
    that machine from an empty cache."""
    lines, rows = [], []
    missing = rates is None
    for seed in [int(s) for s in seeds.split(",") if s.strip()]:
        prof = for_setting(get_profile(profile, **overrides, seed=seed), setting)
        est = clock.estimate(prof, setting, rates=rates)
        if not est:  # nothing to count from (data or architecture not here): no made-up zero
            return "per-seed minutes: not estimated (see the line above)"
        rows += est
        lines.append(f"seed {seed}: {clock.total_minutes(est, missing):.1f} min still to compute")
    total = clock.total_minutes(rows, missing)
    lines.append(f"all seeds: {total:.1f} min (shared artefacts counted once)")
    return "\n".join(lines)


def describe_config(prof: Profile) -> str:
    """Every field of `prof` (training fields as `teacher_train.lr`) with its value and help;
    cosmetic fields (not in any artefact key) are marked."""
    lines = []
    for prefix, obj in [
        ("", prof),
        ("teacher_train.", prof.teacher_train),
        ("student_train.", prof.student_train),
    ]:
        cosmetic = cosmetic_fields(type(obj))
        for name, text in help_of(type(obj)).items():
            value = getattr(obj, name)
            if hasattr(value, "__dataclass_fields__"):
                continue  # listed field by field below
            mark = " (cosmetic: in no artefact key)" if name in cosmetic else ""
            lines.append(f"{prefix + name:<30} {json.dumps(value, default=str):<24} {text}{mark}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- clean


def _cmd_clean(args) -> int:
    clean(apply=args.yes)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    p.add_argument(
        "--setting",
        default="csqa",
        help=f"one of {', '.join(all_settings())} (default csqa): ood trains on instructions "
        "and tests on the profile's ood_tests; any task name trains and tests on that task",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile field, e.g. --set n_train=100 (repeatable)",
    )
    device.add_precision_argument(p)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise FirstError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_run(args) -> int:
    overrides = _overrides(args.set)
    if args.precision is not None:  # the same as --set precision=...
        overrides["precision"] = args.precision
    rates = clock.load_rates(args.rates) if getattr(args, "rates", None) else None
    if rates is not None and not args.dry_run:
        raise FirstError("--rates prices a run on another machine: it goes with --dry-run")
    if args.dry_run or getattr(args, "show_config", False):
        if rates is not None:
            overrides["precision"] = rates.precision
        prof = for_setting(get_profile(args.profile, **overrides), args.setting)
        if args.show_config:
            print(describe_config(prof))
        else:
            print(describe_plan(prof, args.setting, rates))
        if args.dry_run and getattr(args, "seeds", None):
            print(describe_seeds(args.profile, args.setting, args.seeds, overrides, rates))
        return 0
    if getattr(args, "seeds", None):
        if not args.out or "seed" in overrides:
            raise FirstError("--seeds needs --out DIR and no --set seed=...")
        seeds = [s for s in args.seeds.split(",") if s.strip()]
        run_seeds(args.profile, args.setting, Path(args.out), seeds, **overrides)
        return 0
    results = run(
        args.profile,
        args.setting,
        Path(args.out) if args.out else None,
        until=getattr(args, "until", None),
        **overrides,
    )
    if results and not args.out:
        print(json.dumps(results, indent=2))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("run", help="run every missing stage and write DIR/results.json")
    _common(p)
    p.add_argument("--out", help="folder for results.json (and timings.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; load nothing")
    p.add_argument(
        "--rates",
        metavar="FILE",
        help="with --dry-run: price the run on the machine this rates file was measured on "
        "(bench/stage-rates-*.json; scripts/stage_rates.py writes one), from an empty cache",
    )
    p.add_argument(
        "--seeds",
        metavar="S,S,...",
        help="one run per training seed into DIR/seed-S/; DIR/results.json lists every seed's",
    )
    p.add_argument(
        "--show-config",
        action="store_true",
        help="print every field of the resolved profile with its value and help; run nothing",
    )
    p.set_defaults(func=_cmd_run)
    c = sub.add_parser(
        "clean",
        help="list (or with --yes delete) artefacts that no built-in profile of this version uses",
    )
    c.add_argument("--yes", action="store_true", help="delete them (default: only list them)")
    c.set_defaults(func=_cmd_clean)
    for stage in UNTIL:
        q = sub.add_parser(stage, help=f"run the pipeline up to the {stage} stage (cached)")
        _common(q)
        q.set_defaults(
            func=_cmd_run, until=stage, out=None, dry_run=False, show_config=False, seeds=None
        )
