"""The study the chapter `beyond_k` reads: students distilled from top-k stores of several k
(truncated from one extraction at the largest k) and from stores of tokens sampled from the
teacher (random-sampling KD), each evaluated on the setting's test questions.

It builds on a finished run of the profile (`first run`, `book.run_setting`): the run's
fine-tuned teacher, its top-k store, its plain-distillation student and that student's
evaluation (the point k = the profile's k, 5 in the paper). Everything else is an artefact of
its own under first_home()/runs, keyed like the pipeline's, so a re-run computes only what is
missing:

    extract (k = k_max, train split)  -> beyond-topk (k)      -> beyond-distill -> evaluate
    teacher samples (N draws)         -> beyond-sampled (N)   -> beyond-distill -> evaluate

Every student is plain distillation (KL on the store as stored, no re-calibration), with one
training seed per teacher run studied. Top-k students use the profile's KD loss
(`kd_normalize`, the pipeline's); sampled students the RS-KD loss (`kd_normalize="full"`, see
`first_lib.beyond.sampled`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from first_lib.beyond.plan import (  # noqa: F401 - the study's keys and defaults, re-exported
    CODE,
    DRAWS,
    KS,
    _base,
    _Item,
    _profile,
    _student_cfg,
    artefact_names,
    minutes,
    plan,
    priced_rows,
)
from first_lib.errors import FirstError

ALLOW_COMPUTE = "FIRST_ALLOW_COMPUTE"


def _store_path(item: _Item, samples_dir: Path | None) -> Path:
    """The training store of a store item (a sampled store lives in its samples' artefact)."""
    if item.stage == "beyond-store":
        return samples_dir / f"draws-{item.key['draws']}"
    return item.path / "train"


def _seconds(base: dict) -> dict:
    """Wall seconds the run's own stages took here: the prices of the study's artefacts."""
    from first_lib.artefacts import read_meta

    return {
        "extract": read_meta(base["extract"].path).get("wall_seconds"),
        "train": read_meta(base["distill"].path).get("wall_seconds"),
        "evaluate": read_meta(base["evaluate"].path).get("wall_seconds"),
        "store": 0.0,
    }


def costs(profile: str, setting: str, ks, draws, seeds, sample_seed=0, **overrides) -> list[dict]:
    """Per seed and artefact of the study: the time estimated from the run's own stages on this
    machine (the run's extraction, plain-distillation training and its evaluation), whether it
    is done, and the time it took (`wall_seconds` of its meta.json) where it is."""
    rows = []
    for seed in seeds:
        prof = _profile(profile, setting, seed, overrides)
        base, items, _ = plan(prof, setting, ks, draws, sample_seed)
        rows += priced_rows(seed, items, _seconds(base))
    return rows


def _allowed(profile: str, allow_compute: bool | None) -> bool:
    if allow_compute is None:
        return profile == "tiny" or os.environ.get(ALLOW_COMPUTE, "") not in ("", "0")
    return bool(allow_compute)


def run_study(
    profile: str,
    setting: str = "csqa",
    ks=KS,
    draws=DRAWS,
    n_seeds: int = 1,
    sample_seed: int = 0,
    allow_compute: bool | None = None,
    log=None,
    **overrides,
) -> dict:
    """Compute what is missing of the study (unless not allowed: then one line naming it and its
    price) and return its results: {"seeds", "ks", "draws", "test", "records": {label: {seed:
    records}}, "stores": {label: {seed: folder}}, "costs", "samples": {seed: meta}}."""

    ks = sorted({int(k) for k in ks})
    draws = sorted({int(n) for n in draws})
    if not ks or ks[0] < 1:
        raise FirstError(f"ks must be positive integers, got {ks}")
    first = _profile(profile, setting, 0, overrides)
    seeds = list(first.seeds)[: max(1, int(n_seeds))]
    rows = costs(profile, setting, ks, draws, seeds, sample_seed, **overrides)
    todo = [r for r in rows if not r["done"]]
    if todo and not _allowed(profile, allow_compute):
        names = ", ".join(f"{r['artefact']} (seed {r['seed']})" for r in todo[:5])
        more = f" and {len(todo) - 5} more" if len(todo) > 5 else ""
        raise FirstError(
            f"the beyond-k study at profile {profile}: {len(todo)} artefacts are not computed yet "
            f"({names}{more}), about {minutes(rows):.0f} min of compute on this machine (priced "
            f"by the run's own stages); let the chapter compute them ({ALLOW_COMPUTE}=1, or "
            "papermill -p allow_compute True)"
        )
    log = log or (lambda msg: None)
    out = {"seeds": seeds, "ks": ks, "draws": draws, "records": {}, "stores": {}, "samples": {}}
    for seed in seeds:
        prof = _profile(profile, setting, seed, overrides)
        base, items, labels = plan(prof, setting, ks, draws, sample_seed)
        out["test"] = base["test"]
        if any(not i.done() for i in items):
            _compute(prof, setting, base, items, labels, log)
        samples = next((i for i in items if i.stage == "beyond-sampled"), None)
        if samples is not None:
            from first_lib.artefacts import read_meta

            out["samples"][seed] = read_meta(samples.path)
        extract_dir = base["extract"].path
        for label, (store, _, ekey) in labels.items():
            from first_lib.artefacts import artefact_dir
            from first_lib.book.runs import load_records

            recs = load_records(artefact_dir("evaluate", ekey) / "records.jsonl")
            recs = sorted(recs, key=lambda r: str(r["id"]))
            out["records"].setdefault(label, {})[seed] = recs
            folder = (
                extract_dir / "train"
                if store is None
                else _store_path(store, samples.path if samples else None)
            )
            out["stores"].setdefault(label, {})[seed] = str(folder)
        wide = next((i for i in items if i.stage == "extract"), None)
        out.setdefault("wide_store", {})[seed] = str((wide.path if wide else extract_dir) / "train")
        out.setdefault("run_store", {})[seed] = str(extract_dir / "train")
    out["costs"] = costs(profile, setting, ks, draws, seeds, sample_seed, **overrides)
    return out


def _compute(prof, setting: str, base: dict, items: list[_Item], labels: dict, log) -> None:
    """Make the missing artefacts of one seed, in order (each under its lock, meta.json last)."""
    import time

    from first_lib.artefacts import artefact_lock, claim_done, write_meta
    from first_lib.pipeline import stages
    from first_lib.pipeline.data import load_questions
    from first_lib.pipeline.graph import tiny_key
    from first_lib.pipeline.runner import _Run

    if prof.threads:
        import torch

        torch.set_num_threads(prof.threads)
    precision = base["precision"]
    acc = stages.accelerator(precision)
    state = _Run(prof, setting, precision, acc, log)
    state.data = load_questions(prof, setting)
    if prof.teacher.startswith("tiny:"):
        from first_lib.artefacts import artefact_dir

        state.tiny_dir = artefact_dir("tiny-models", tiny_key(prof, setting))
    tok, split = state.examples()
    train = split["train"]
    teacher_dir = base["teacher"].path
    made: dict[str, Path] = {"extract": base["extract"].path}
    samples_dir = None
    for item in items:
        if item.stage == "extract":
            wide = replace(prof, k=item.key["k"])
            made["extract"] = stages.stage_extract(
                item.key, teacher_dir, {"train": train}, wide, acc, log
            )
            continue
        if item.stage == "beyond-sampled":
            samples_dir = item.path
            if not item.done():
                _sample(item, teacher_dir, train, prof, acc, log)
            continue
        if item.stage in ("beyond-topk", "beyond-store"):
            if item.stage == "beyond-topk" and not item.done():
                from first_lib.beyond.stores import truncate_store

                with artefact_lock(item.path, log=log):
                    if not claim_done(item.path, item.key, log):
                        t0 = time.perf_counter()
                        truncate_store(
                            made["extract"] / "train", item.path / "train", item.key["k"], train
                        )
                        write_meta(
                            item.path,
                            {
                                "stage": item.stage,
                                "key": item.key,
                                "wall_seconds": time.perf_counter() - t0,
                            },
                        )
            continue
        if item.stage == "beyond-distill":
            kind = "sampled" if item.key["store"]["stage"] == "beyond-store" else "top"
            cfg = _student_cfg(prof, kind)
            store_key = {k: v for k, v in item.key["store"].items() if k != "stage"}
            store = _store_path(_Item("", item.key["store"]["stage"], store_key, ""), samples_dir)
            made["student"] = stages.stage_train(
                item.stage,
                item.key,
                state.source("student"),
                tok,
                train,
                cfg,
                acc,
                log,
                store_dir=store,
            )
            continue
        if item.stage == "evaluate":
            questions = state.data["tests"][base["test"]]
            stages.stage_evaluate(item.key, item.key["model"], questions, prof, acc, log)


def _sample(item: _Item, teacher_dir: Path, train, prof, acc, log) -> None:
    """The teacher's draws at every training position, one store per number of draws."""
    import time

    from first_lib import device
    from first_lib.artefacts import artefact_lock, claim_done, verify_upstream, write_meta
    from first_lib.beyond.sampled import sample_teacher
    from first_lib.beyond.stores import write_store
    from first_lib.pipeline import stages

    out = item.path
    with artefact_lock(out, log=log):
        if claim_done(out, item.key, log):
            return
        verify_upstream(teacher_dir, log, acc)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model = stages._load(str(teacher_dir), acc)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        bf16 = device.accelerator_precision(acc) == "bf16"
        log(f"beyond: drawing {item.key['draws']} tokens from the teacher at every position")
        got = sample_teacher(
            model, train, item.key["draws"], item.key["seed"], prof.extract_batch, autocast=bf16
        )
        distinct = {}
        for n, rows in got.items():
            write_store(
                out / f"draws-{n}", train, lambda i, rows=rows: rows[i], n, vocab, str(teacher_dir)
            )
            w = np.concatenate([r[1] for r in rows])
            distinct[str(n)] = float((w > 0).sum(1).mean()) if len(w) else 0.0
        meta = {
            "stage": item.stage,
            "key": item.key,
            "mean_distinct_tokens": distinct,
            "wall_seconds": time.perf_counter() - t0,
        }
        write_meta(out, meta)
