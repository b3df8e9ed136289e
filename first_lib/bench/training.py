"""Training step costs: CE and FIRST (KD) steps of `train.train` against online KD steps."""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from first_lib.bench.config import BenchConfig
from first_lib.bench.online import (
    _gkd_labels,
    _gkd_step_fn,
    online_step_equivalent,
    online_step_lean,
    trl_available,
)
from first_lib.bench.shared import _accelerator, _median, _sync, _train_config


def measure_training(
    student,
    teacher,
    examples: Sequence[dict],
    store: Path,
    cfg: BenchConfig,
    work: Path,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Interleaved timing of CE and KD training runs (`train.train`, `cfg.steps` optimizer steps
    each) and of the online steps in `cfg.online`; per-step seconds and tokens/s."""
    import torch

    from first_lib import train
    from first_lib.knowledge import TopKStore

    acc = _accelerator(cfg)
    bf16 = cfg.precision == "bf16"
    topk = TopKStore(store)
    topk.check_alignment(examples)
    tcfg = {loss: _train_config(cfg, loss) for loss in ("ce", "kd")}

    # Online students: one fp32 copy (bf16 autocast where fast), shared by every online step.
    impls: list[str] = []
    for o in cfg.online:
        o = ("trl" if trl_available() else "equivalent") if o == "auto" else o
        if o not in impls:
            impls.append(o)
    online_student = copy.deepcopy(student).float().train()
    teacher.eval()
    batch = train.collate(examples, list(range(cfg.batch_size)), None, pad_id=0)
    batch["gkd_labels"] = _gkd_labels(batch)
    step_fns: dict[str, Callable] = {}
    labels: dict[str, str] = {}
    opt = torch.optim.AdamW(online_student.parameters(), lr=1e-5, eps=1e-6)
    for o in impls:
        if o == "trl":
            try:
                step_fns[o], labels[o] = _gkd_step_fn(online_student, teacher, cfg, work)
                continue
            except Exception as err:  # noqa: BLE001 - TRL's setup is not ours: fall back
                log(f"GKDTrainer could not be set up ({type(err).__name__}: {err})")
                failed = f"trl failed: {type(err).__name__}"
            fn = online_step_equivalent
            step_fns[o] = functools.partial(
                fn, online_student, teacher, optimizer=opt, bf16=bf16, clip=1.0
            )
            labels[o] = f"first_lib.bench.online_step_equivalent ({failed})"
        else:
            fn = online_step_equivalent if o == "equivalent" else online_step_lean
            step_fns[o] = functools.partial(
                fn, online_student, teacher, optimizer=opt, bf16=bf16, clip=1.0
            )
            labels[o] = f"first_lib.bench.online_step_{o}"

    variants = ["ce", "kd", *[f"online:{o}" for o in impls]]
    secs: dict[str, list[float]] = {v: [] for v in variants}
    toks: dict[str, list[float]] = {v: [] for v in variants}
    mfu: dict[str, list[float]] = {"ce": [], "kd": []}  # from the loop's own perf record
    n_tok_batch = int(batch["attention_mask"].sum())
    for r in range(cfg.warmup + cfg.reps):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if v in ("ce", "kd"):
                _, tlog = train.train(
                    student,
                    examples,
                    tcfg[v],
                    pad_id=0,
                    teacher=topk.example if v == "kd" else None,
                    accelerator=acc,
                    progress=False,
                )
                acc.free_memory()
                per_step, tps = tlog["seconds"] / tlog["steps"], tlog["tokens"] / tlog["seconds"]
                if r >= cfg.warmup:
                    mfu[v].append(tlog["perf"]["mfu"])
            else:
                fn = step_fns[v.split(":", 1)[1]]
                _sync(cfg.device)
                t0 = time.perf_counter()
                for _ in range(cfg.steps):
                    fn(batch)
                _sync(cfg.device)
                per_step = (time.perf_counter() - t0) / cfg.steps
                tps = n_tok_batch / per_step
            if r >= cfg.warmup:
                secs[v].append(per_step)
                toks[v].append(tps)
        log(
            f"training rep {r + 1}/{cfg.warmup + cfg.reps}: "
            + ", ".join(f"{v} {secs[v][-1]:.3f}s" for v in variants if secs[v])
        )

    def paired(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(secs[a], secs[b], strict=True)]

    out: dict[str, Any] = {
        "kd_over_ce_step_time": _median(paired("kd", "ce")),
        "step_seconds": {v: _median(secs[v]) for v in variants},
        "train_tokens_per_s": {v: _median(toks[v]) for v in variants},
        "train_mfu": {v: _median(x) for v, x in mfu.items()},
        "step_seconds_samples": secs,
        "online_impl": labels[impls[0]],
        "online_impls": labels,
        "offline_over_online_step_time": _median(paired("kd", f"online:{impls[0]}")),
        "offline_over_online_step_time_by_impl": {
            o: _median(paired("kd", f"online:{o}")) for o in impls
        },
        "tokens_per_step": n_tok_batch,
        "target_rows_per_step": int(batch["target_mask"].sum()),
    }
    del step_fns, opt, online_student
    return out
