"""A fake finished run (results.json, records.jsonl and meta.json files shaped as `first run`
writes them) for the lab tests: seconds to make, any size, no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VARIANTS = ("teacher", "finetune", "distill", "distill_ls", "first_ts")
POSTHOC = {"finetune_posthoc_ts": "finetune", "distill_posthoc_ts": "distill"}
BASELINES = ("teacher_base", "student_base")


def _records(rng, ids, gold, sharpness: float, pull: float = 1.0) -> list[dict]:
    """Evaluation records of a model whose candidate logits are noise plus a pull to gold
    (`pull` x `sharpness`: the pull sets the accuracy, the sharpness the confidence), in float32
    as `evaluate._record` computes them."""
    n, c = len(ids), 5
    z = rng.normal(0.0, sharpness, (n, c)) + pull * sharpness * (np.arange(c) == gold[:, None])
    logp = (z - np.log(np.exp(z).sum(1, keepdims=True))).astype(np.float32)
    logp = logp + np.log(rng.uniform(0.2, 0.99, (n, 1))).astype(np.float32)  # vocabulary share
    raw = np.exp(logp)
    probs = raw / raw.sum(1, keepdims=True)
    out = []
    for i in range(n):
        pred = int(np.argmax(logp[i]))
        out.append(
            {
                "id": ids[i],
                "gold": int(gold[i]),
                "pred": pred,
                "probs": [float(p) for p in probs[i]],
                "raw_probs": [float(p) for p in raw[i]],
                "confidence": float(probs[i, pred]),
                "correct": pred == int(gold[i]),
            }
        )
    return out


def _tempered(records, temperature: float) -> list[dict]:
    from first_lib import posthoc

    return posthoc.apply_temperature(records, temperature)


def _write(folder: Path, records: list[dict], meta: dict) -> str:
    folder.mkdir(parents=True)
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(path)


def fake_run(
    root: Path,
    n: int = 40,
    seeds=(0, 1),
    test: str = "csqa",
    seed: int = 0,
    out: Path | None = None,
    setting: str | None = None,
) -> Path:
    """Write a finished run of `len(seeds)` training seeds on `n` questions under `root` (its
    results.json in `out`, default root/out); returns the run's --out folder. `setting`: the
    run's setting when it is not `test` (e.g. "ood": trained on a mix, tested on `test`)."""
    rng = np.random.default_rng(seed)
    ids = [f"{test}-test-{i}" for i in range(n)]
    gold = rng.integers(0, 5, n)
    home, out = root / "home", out or root / "out"
    teacher = home / "teacher"
    teacher.mkdir(parents=True)
    perf = {"hardware": "Fake CPU", "device": "cpu", "peak_gflops": 100.0}
    (teacher / "meta.json").write_text(
        json.dumps({"key": {"code": "abc"}, "num_processes": 1, "perf": perf})
    )
    shared = {
        # the untuned models: a weak pull to gold, so the tuned ones (pull 1) learned
        b: _write(
            home / f"{b}-eval", _records(rng, ids, gold, 0.5, pull=0.2), {"stage": "evaluate"}
        )
        for b in BASELINES
    }
    config = {"name": "fake", "seed": seeds[0], "seeds": list(seeds), "n_test": n}
    by_seed = {}
    for s in seeds:
        paths, made = dict(shared), {}
        for v in VARIANTS:
            made[v] = _records(rng, ids, gold, 2.0 + rng.uniform())
            meta = {"stage": "evaluate", "key": {"code": "e1"}}
            paths[v] = _write(home / f"{v}-{s}-eval", made[v], meta)
        for v, base in POSTHOC.items():
            t = float(rng.uniform(0.5, 3.0))
            meta = {"stage": "posthoc-ts", "temperature": t, "key": {"code": "p1"}}
            paths[v] = _write(home / f"{v}-{s}-posthoc", _tempered(made[base], t), meta)
        by_seed[str(s)] = {
            "by_test": {test: {"n_test": n, "records": paths}},
            "c_star": 1.5,
            "delta": 0.1,
            "artefacts": {"teacher": str(teacher)},
        }
    results = {
        "profile": "fake",
        "setting": setting or test,
        "note": "a fake run for tests",
        "precision": "fp32",
        "teacher": "fake:teacher",
        "student": "fake:student",
        "n_train": 10,
        "n_validation": 5,
        "config": config,
        **by_seed[str(seeds[0])],
        "seeds": list(seeds),
        "by_seed": by_seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
    return out
