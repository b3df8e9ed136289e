"""Seconds of training steps on this CPU with the fused LoRA forward and the short-sequence
attention (`train.prepare_model(fused=True)`, what training uses) against PEFT's own LoRA forward
and sdpa everywhere (`fused=False`, what it used before): the same model, examples, batches and
seed, in one process, the two alternated so that a slower phase of the machine hits both.

    python -m scripts.train_step_probe [--profile cpu] [--setting csqa] [--role student]
        [--steps 15] [--rounds 2] [--precision auto|fp32|bf16]

It trains on the profile's own training questions with its own `TrainConfig` (fine-tuning with
the cross-entropy loss) for `--steps` optimizer steps (no checkpoint, no prefix cache): loading
is not timed, the steps are (`perf.seconds` of the training log: collate, forward, backward,
optimizer).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json

from first_lib import device, profiles, train
from first_lib.pipeline import data as run_data


@contextlib.contextmanager
def fused(on: bool):
    """`train.train` with `prepare_model(fused=on)`."""
    original = train.prepare_model
    train.prepare_model = functools.partial(original, fused=on)
    try:
        yield
    finally:
        train.prepare_model = original


def probe_inputs(profile: str, setting: str, role: str, steps: int, precision: str):
    """(precision resolved, `TrainConfig` of `steps` CE steps, model source, tokenizer, tokenized
    training examples) of `role` in `profile` x `setting`: what a probe trains on."""
    from first_lib import models

    prof = profiles.for_setting(profiles.get_profile(profile), setting)
    precision = device.resolve_precision(precision)
    cfg = prof.student_train if role == "student" else prof.teacher_train
    cfg = dataclasses.replace(cfg, max_steps=steps, loss="ce")
    source = prof.student if role == "student" else prof.teacher
    tokenizer = models.load_tokenizer(source)
    rows = run_data.load_questions(prof, setting)["train"]
    return precision, cfg, source, tokenizer, run_data.tokenize(tokenizer, rows, prof, setting)


def train_steps(model, examples, cfg, tokenizer, precision: str) -> dict:
    """The training log of `train.train` over those steps (no checkpoint, no prefix cache)."""
    _, log = train.train(
        model,
        examples,
        cfg,
        pad_id=tokenizer.pad_token_id,
        progress=False,
        precision=precision,
        prefix_reuse=False,
    )
    return log


def main(argv=None) -> dict:
    from first_lib import models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--setting", default="csqa")
    p.add_argument("--role", choices=("student", "teacher"), default="student")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    precision, cfg, source, tokenizer, examples = probe_inputs(
        args.profile, args.setting, args.role, args.steps, args.precision
    )
    times: dict[str, list[float]] = {"plain": [], "fused": []}
    for r in range(args.rounds):
        for label in ("plain", "fused") if r % 2 == 0 else ("fused", "plain"):
            model = models.load_model(source, dtype=device.torch_dtype(precision))
            with fused(label == "fused"):
                log = train_steps(model, examples, cfg, tokenizer, precision)
            seconds = log["perf"]["seconds"]
            times[label].append(seconds)
            print(f"round {r} {label:5s} {args.steps} steps {seconds:6.1f} s", flush=True)
            del model
    out = {
        "profile": args.profile,
        "setting": args.setting,
        "role": args.role,
        "precision": precision,
        "steps": args.steps,
        "machine": device.cpu_model(),
        "bf16_features": device.cpu_bf16_features(),
        "seconds": times,
        "speedup": min(times["plain"]) / min(times["fused"]),
    }
    print(f"fused over plain: {out['speedup']:.2f}x (best of {args.rounds} each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
