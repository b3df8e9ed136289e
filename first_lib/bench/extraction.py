"""Extraction against the forward pass it rides on: teacher tokens/s and model FLOPs utilisation."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from first_lib import flops
from first_lib.bench.config import BenchConfig
from first_lib.bench.shared import _median, _sync

ALL_VARIANTS = ("forward", "forward_all", "forward_full", "extract", "extract_all")


def measure_extraction(
    teacher, examples: Sequence[dict], cfg: BenchConfig, work: Path, variants=ALL_VARIANTS
) -> tuple[dict[str, Any], Path]:
    """Teacher tokens/s of `extract_topk` (into a fresh folder each time) and of the forward pass
    it rides on over the same batches, interleaved; returns (numbers, a finished store's folder).

    The pipeline stores the target positions only (`extract`, against `forward`: the LM head at
    the same rows); storing every position (`extract_all`, against `forward_all`) shows whether
    top-k, the copies and the writes hide behind the forward at its largest LM-head share.
    `forward_full` is the plain `model(...)` with full logits everywhere (the old reference).
    Each is also given as model FLOPs per second over the machine's peak (`*_mfu`). `variants`:
    a subset to measure (it must hold "forward" and "extract")."""
    from first_lib import knowledge

    tokens = sum(len(ex["input_ids"]) for ex in examples)
    forward_positions = {"forward": "targets", "forward_all": "all", "forward_full": None}
    variants = tuple(v for v in ALL_VARIANTS if v in variants)
    tps: dict[str, list[float]] = {v: [] for v in variants}
    store = None
    for r in range(cfg.warmup + (cfg.extract_reps or cfg.reps)):
        shift = r % len(variants)
        for what in variants[shift:] + variants[:shift]:
            if what in forward_positions:
                value = knowledge.forward_throughput(
                    teacher,
                    examples,
                    cfg.extract_batch,
                    autocast=cfg.precision == "bf16",
                    positions=forward_positions[what],
                )
            else:
                folder = work / f"{what}-{r}"
                _sync(cfg.device)
                t0 = time.perf_counter()
                knowledge.extract_topk(
                    teacher,
                    examples,
                    folder,
                    k=cfg.k,
                    batch_size=cfg.extract_batch,
                    shard_size=max(len(examples), 1),
                    teacher_name="bench",
                    progress=False,
                    positions="targets" if what == "extract" else "all",
                    autocast=cfg.precision == "bf16",
                )
                _sync(cfg.device)
                value = tokens / (time.perf_counter() - t0)
                if what == "extract":
                    if store is not None:
                        shutil.rmtree(store, ignore_errors=True)
                    store = folder
                else:
                    shutil.rmtree(folder, ignore_errors=True)
            if r >= cfg.warmup:
                tps[what].append(value)

    def paired(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(tps[a], tps[b], strict=True)]

    meta = json.loads((store / "meta.json").read_text())
    rows = {"targets": meta["n_positions"], "all": tokens - len(examples), "full": tokens}
    head_rows = {"forward": "targets", "extract": "targets", "forward_full": "full"}
    out = {
        "extract_over_forward_throughput": _median(paired("extract", "forward")),
        "extract_over_forward_samples": paired("extract", "forward"),
        "extract_tokens": tokens,
        "extract_positions": meta["n_positions"],
    }
    if "extract_all" in variants and "forward_all" in variants:
        out["extract_all_over_forward_throughput"] = _median(paired("extract_all", "forward_all"))
    if "forward_full" in variants:
        out["extract_over_full_logits_forward_throughput"] = _median(
            paired("extract", "forward_full")
        )
    for v in variants:
        median = _median(tps[v])
        out[f"{v}_tokens_per_s"] = median
        per_token = _forward_flops(teacher, examples, rows[head_rows.get(v, "all")]) / tokens
        out[f"{v}_mfu"] = _mfu(per_token * median, cfg)
    return out, store


def _forward_flops(model, examples: Sequence[dict], head_rows: int) -> float:
    """Model FLOPs of one forward pass of `model` over `examples`, the LM head at `head_rows`."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    shape = flops.shape_of_config(model.config)
    return flops.forward_flops(shape, sum(lengths), flops.attention_length(lengths), head_rows)


def _mfu(flops_per_s: float, cfg: BenchConfig) -> float:
    """A rate of model FLOPs over the machine's matmul peak at the bench's precision."""
    return flops_per_s / 1e9 / flops.peak_gflops(cfg.precision, cfg.device)
