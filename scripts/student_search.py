"""Which student recipe learns the task? A search over the student's fine-tuning settings on
validation data only (issue 18, item 2): each candidate fine-tunes the student (CE), then the
tuned and the untuned student answer the same validation questions; accuracy gained is a paired
difference with its 95% interval. Test questions are never read.

    python -m scripts.student_search --setting csqa --n-train 400 --n-val 200 \\
        --out bench/student-search-csqa.json [--dry-run]

Each candidate's artefacts are the pipeline's own (the keys of `first_lib.pipeline.graph`), so the
chosen recipe's fine-tuned student and its validation evaluation are reused by `first run`.
Resumable: a candidate already trained or evaluated is read from its artefact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from first_lib import device, fsio, stats
from first_lib.artefacts import artefact_dir, read_meta
from first_lib.pipeline import clock, stages
from first_lib.pipeline.data import load_questions, tokenize
from first_lib.pipeline.graph import eval_key, prefix_top_layers, run_precision, stage_graph
from first_lib.profiles import for_setting, get_profile

# (LoRA depth: top layers adapted, 0 = all 24; peak learning rate), LoRA rank 16, 2 epochs.
# ASSETS.md: the top 8 at 3e-4 did not move on 400 CSQA questions; all 24 at 3e-4 did (one
# seed, 100 test questions); the top 8 at 2e-3 and the top 12 at 1e-3 collapsed.
CANDIDATES = [(8, 3e-4), (8, 1e-3), (16, 3e-4), (0, 3e-4), (0, 1e-4)]


# The teacher's recipe in the `cpu` profile before this search (LoRA on the top 8 of 28 layers).
TEACHER_CANDIDATES = [(8, 3e-4)]

# decoder layers of the cpu profile's models (Qwen2.5-Coder 0.5B, 1.5B): LAYERS 0 means all
DEPTH = {"student": 24, "teacher": 28}

# role -> (its training config in the profile, the stage that trains it)
ROLES = {"student": ("student_train", "finetune"), "teacher": ("teacher_train", "teacher")}


def candidate_profile(
    setting: str,
    n_train: int,
    n_val: int,
    layers: int,
    lr: float,
    epochs: float,
    role: str = "student",
):
    field = ROLES[role][0]
    over = {"n_train": n_train, "n_val": n_val}
    over.update({f"{field}.lora_layers": layers, f"{field}.lr": lr, f"{field}.epochs": epochs})
    return for_setting(get_profile("cpu", **over), setting)


def search(
    setting: str,
    n_train: int,
    n_val: int,
    epochs: float,
    out: Path | None,
    log,
    candidates=None,
    role: str = "student",
) -> list:
    rows = _earlier_rows(out, setting, role)
    acc = None
    field, stage = ROLES[role]
    default = CANDIDATES if role == "student" else TEACHER_CANDIDATES
    for layers, lr in candidates or default:
        prof = candidate_profile(setting, n_train, n_val, layers, lr, epochs, role)
        precision = run_precision(prof)
        untuned = prof.student if role == "student" else prof.teacher
        node = next(n for n in stage_graph(prof, setting, precision) if n.stage == stage)
        if acc is None:
            from first_lib import models

            acc = stages.accelerator(precision)
            data = load_questions(prof, setting)
            tok = models.load_tokenizer(prof.teacher)  # as `first run` tokenizes (one vocabulary)
            examples = tokenize(tok, data["train"], prof, setting)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        model_dir = stages.stage_train(
            stage, node.key, untuned, tok, examples, getattr(prof, field), acc, log
        )
        train_s = time.perf_counter() - t0
        load = [round(load0, 2), round(os.getloadavg()[0], 2)]  # other work slows training
        top = prefix_top_layers(prof, "finetune" if role == "student" else "teacher")
        records = {}
        for label, model in (("tuned", model_dir), ("untuned", untuned)):
            key = eval_key(prof, f"{setting}-validation", model, precision, top, prof.n_val)
            meta = stages.stage_evaluate(key, key["model"], data["validation"], prof, acc, log)
            records[label] = _records(artefact_dir("evaluate", key))
            records[label + "_metrics"] = meta["metrics"]
        learned, gain = stats.learned(records["tuned"], records["untuned"], n_boot=2000)
        meta = read_meta(model_dir)
        row = {
            "role": role,
            "lora_layers": layers or DEPTH[role],
            "lr": lr,
            "epochs": epochs,
            "n_train": n_train,
            "n_validation": len(data["validation"]),
            "steps": meta["steps"],
            "train_seconds": round(meta.get("seconds", train_s), 1),
            "final_loss": round(sum(meta["losses"][-10:]) / len(meta["losses"][-10:]), 4),
            "acc_tuned": records["tuned_metrics"]["acc"],
            "acc_untuned": records["untuned_metrics"]["acc"],
            "acc_gain": gain.point,
            "acc_gain_ci": [gain.lo, gain.hi],
            "ece_tuned": records["tuned_metrics"]["ece"],
            "ece_untuned": records["untuned_metrics"]["ece"],
            "learned": learned,
            "precision": precision,
            "load_average": load,
            "artefact": model_dir.name,
        }
        rows = _merged(rows, row)
        log(_line(row))
        if out is not None:  # after each candidate: an interrupted search keeps what it found
            found = {
                "role": role,
                "setting": setting,
                "machine": device.cpu_model(),
                "date": time.strftime("%F"),
            }
            fsio.atomic_write_json(out, {**found, "candidates": rows}, indent=2)
    return rows


def _recipe(row: dict) -> tuple:
    """What a candidate row was: a later search of the same recipe replaces it."""
    return tuple(row.get(k) for k in ("lora_layers", "lr", "epochs", "n_train", "n_validation"))


def _merged(rows: list[dict], row: dict) -> list[dict]:
    """`rows` with `row` last, in place of an earlier row of the same recipe."""
    return [r for r in rows if _recipe(r) != _recipe(row)] + [row]


def _earlier_rows(out: Path | None, setting: str, role: str) -> list[dict]:
    """The candidates an earlier search of the same setting and role wrote to `out`: a search of
    new candidates adds to them instead of dropping them."""
    if out is None or not out.is_file():
        return []
    try:
        found = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    if found.get("setting") != setting or found.get("role", "student") != role:
        return []
    return list(found.get("candidates", []))


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def _line(r: dict) -> str:
    lo, hi = r["acc_gain_ci"]
    return (
        f"top {r['lora_layers']:>2} layers, lr {r['lr']:.0e}: {r['steps']} steps, "
        f"{r['train_seconds'] / 60:.1f} min; validation acc {r['acc_tuned']:.3f} vs untuned "
        f"{r['acc_untuned']:.3f} (gain {r['acc_gain']:+.3f}, 95% [{lo:+.3f}, {hi:+.3f}]); "
        f"ECE {r['ece_untuned']:.3f} -> {r['ece_tuned']:.3f}; "
        f"{'learned' if r['learned'] else 'did not learn'}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="csqa", choices=["csqa", "boolq"])
    p.add_argument("--role", default="student", choices=sorted(ROLES), help="which model to tune")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--candidates",
        help="LAYERS:LR,... instead of the built-in list (LAYERS 0 = all), e.g. 8:3e-4,0:3e-4",
    )
    p.add_argument("--dry-run", action="store_true", help="price each candidate; train nothing")
    args = p.parse_args(argv)

    def log(msg):
        print(f"[search] {msg}", file=sys.stderr, flush=True)

    candidates = CANDIDATES if args.role == "student" else TEACHER_CANDIDATES
    if args.candidates:
        pairs = [c.split(":") for c in args.candidates.split(",")]
        candidates = [(int(layers), float(lr)) for layers, lr in pairs]
    if args.dry_run:
        total = 0.0
        for layers, lr in candidates:
            prof = candidate_profile(
                args.setting, args.n_train, args.n_val, layers, lr, args.epochs, args.role
            )
            rows = {r["stage"]: r for r in clock.estimate(prof, args.setting)}
            priced = ("finetune", "evaluate finetune on validation")
            if args.role == "teacher":  # no graph node evaluates the teacher on validation
                priced = ("teacher",)
            mins = sum(rows[s]["seconds"] / 60 for s in priced if not rows[s]["done"])
            total += mins
            print(f"top {layers or DEPTH[args.role]:>2} layers, lr {lr:.0e}: about {mins:.1f} min")
        print(f"the search: about {total:.0f} min on this machine (plus the untuned evaluations)")
        return 0
    search(
        args.setting, args.n_train, args.n_val, args.epochs, args.out, log, candidates, args.role
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
