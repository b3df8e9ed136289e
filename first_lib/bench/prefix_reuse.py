"""Frozen-prefix reuse against the plain path: training steps and evaluations, at L = 8 and 12."""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from first_lib.bench.config import PREFIX_LAYERS, BenchConfig
from first_lib.bench.models import build_model, make_examples
from first_lib.bench.shared import _accelerator, _dtypes, _median, _sync


def _prefix_train_run(base, examples, cfg: BenchConfig, top: int, reuse: bool, cache: Path):
    """(seconds per optimizer step, seconds building the bottom states) of one LoRA run of
    `train.train` on a fresh copy of `base`; the bottom states go to an empty cache folder."""
    from first_lib import train

    tcfg = train.TrainConfig(
        lr=1e-5,
        epochs=1e6,  # max_steps decides
        batch_size=cfg.batch_size,
        warmup_ratio=0.0,
        lora_r=16,
        lora_layers=top,
        seed=cfg.seed,
        save_every=10**9,
        max_steps=cfg.prefix_steps,
    )
    shutil.rmtree(cache, ignore_errors=True)
    _, tlog = train.train(
        copy.deepcopy(base),
        examples,
        tcfg,
        pad_id=0,
        accelerator=_accelerator(cfg),
        progress=False,
        prefix_reuse=reuse,
        prefix_cache=cache,
    )
    return tlog["seconds"] / tlog["steps"], tlog["prefix"]["build_seconds"]


def _prefix_eval_run(model, seqs, cfg: BenchConfig, top: int, cache: Path) -> float:
    """Seconds of `evaluate.batched_logprobs` over `seqs` (every batch), from the top `top`
    layers (0: the whole model) with bottom states cached under `cache`."""
    import torch

    from first_lib import evaluate

    _sync(cfg.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in evaluate.batched_logprobs(
            model, seqs, 0, 8, cfg.precision == "bf16", top_layers=top, prefix_cache=cache
        ):
            pass
    _sync(cfg.device)
    return time.perf_counter() - t0


def _prefix_run(what: str, base, examples, cfg: BenchConfig, top: int, cache: Path):
    """One timed run of `what`: (seconds per step or per evaluation, one-off build seconds)."""
    if what.startswith("train"):
        return _prefix_train_run(base, examples, cfg, top, what == "train_cached", cache)
    seqs = [ex["input_ids"] for ex in examples]
    if what == "eval_plain":
        return _prefix_eval_run(base, seqs, cfg, 0, cache), 0.0
    shutil.rmtree(cache, ignore_errors=True)
    first = _prefix_eval_run(base, seqs, cfg, top, cache)  # builds the entry
    again = _prefix_eval_run(base, seqs, cfg, top, cache)  # as every later variant
    return again, first - again


def measure_prefix_reuse(
    cfg: BenchConfig, work: Path, log: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Frozen-prefix reuse against the plain path for each L in `PREFIX_LAYERS`, training and
    evaluation, repetitions interleaved (the order rotates); see `first_lib.bench.config`."""
    dtype, _ = _dtypes(cfg)
    base = build_model(cfg.prefix_model, cfg.device, dtype, cfg.seed + 2).eval()
    vocab = base.get_input_embeddings().num_embeddings
    frac = 2.5 / cfg.prefix_seq_len  # a few answer targets per example, as in MC tuning
    examples = make_examples(cfg.prefix_examples, cfg.prefix_seq_len, vocab, frac, cfg.seed)
    out: dict[str, Any] = {
        "model": cfg.prefix_model,
        "layers": base.config.num_hidden_layers,
        "hidden_size": base.config.hidden_size,
        "examples": len(examples),
        "seq_len": cfg.prefix_seq_len,
        "train_steps": cfg.prefix_steps,
        "batch_size": cfg.batch_size,
    }
    variants = ("train_plain", "train_cached", "eval_plain", "eval_cached")
    for top in PREFIX_LAYERS:
        runs: dict[str, list] = {v: [] for v in variants}
        for r in range(cfg.warmup + cfg.reps):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                result = _prefix_run(v, base, examples, cfg, top, work / f"prefix-{top}")
                if r >= cfg.warmup:
                    runs[v].append(result)
            log(f"prefix reuse L={top}: rep {r + 1}/{cfg.warmup + cfg.reps}")
        out[f"L{top}"] = _prefix_summary(runs)
    flat = {}
    for top in PREFIX_LAYERS:
        tail = "" if top == PREFIX_LAYERS[0] else f"_L{top}"
        for what in ("train", "eval"):
            flat[f"prefix_reuse_{what}_speedup{tail}"] = out[f"L{top}"][what]["speedup"]
    return {**flat, "prefix_reuse": out}


def _prefix_summary(runs: dict[str, list]) -> dict[str, Any]:
    """Seconds per step (per evaluation) of both paths, their paired speedup, and the one-off
    build cost in seconds and in plain steps (evaluations)."""

    def summary(plain: list, cached: list) -> dict[str, float]:
        return {
            "speedup": _median([p[0] / c[0] for p, c in zip(plain, cached, strict=True)]),
            "seconds_plain": _median([p[0] for p in plain]),
            "seconds_cached": _median([c[0] for c in cached]),
            "build_seconds": _median([c[1] for c in cached]),
            "build_in_plain_runs": _median(
                [c[1] / p[0] for p, c in zip(plain, cached, strict=True)]
            ),
        }

    return {
        "train": summary(runs["train_plain"], runs["train_cached"]),  # seconds per step
        "eval": summary(runs["eval_plain"], runs["eval_cached"]),  # seconds per evaluation
    }
