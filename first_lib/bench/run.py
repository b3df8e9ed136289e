"""The whole bench in one process: every measurement, the results dict and its target checks."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from first_lib import flops
from first_lib.bench.coefficient import measure_coefficient_search
from first_lib.bench.config import TARGETS, BenchConfig
from first_lib.bench.context import chapter_timings, machine_info
from first_lib.bench.disk import measure_store_bytes
from first_lib.bench.extraction import measure_extraction
from first_lib.bench.memory import measure_memory
from first_lib.bench.models import _params, build_model, make_examples
from first_lib.bench.prefix_reuse import measure_prefix_reuse
from first_lib.bench.shared import _dtypes
from first_lib.bench.training import measure_training
from first_lib.errors import FirstError


def check_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{metric: {"op", "target", "value", "holds"}} for every metric in `TARGETS`."""
    ops = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b}
    out = {}
    for key, (op, target) in TARGETS.items():
        value = results.get(key)
        ok = value is not None and math.isfinite(value) and ops[op](value, target)
        out[key] = {"op": op, "target": target, "value": value, "holds": bool(ok)}
    return out


def run_bench(
    cfg: BenchConfig,
    work_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Every measurement listed in `first_lib.bench.config`, in one process; returns the results
    dict (JSON-serialisable): the metrics of `TARGETS` at the top level, `targets`, `machine`,
    `details` and the config."""
    import torch

    from first_lib import knowledge

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    machine = machine_info(cfg.device, cfg.precision)
    log("matmul peak at fp32 and bf16")
    peaks = {p: flops.peak_gflops(p, cfg.device, remeasure=True) for p in ("fp32", "bf16")}
    dtype, _ = _dtypes(cfg)
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="first-bench-")
        work_dir = tmp.name
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"models: teacher {cfg.teacher}, student {cfg.student} ({dtype}, {cfg.device})")
        teacher = build_model(cfg.teacher, cfg.device, dtype, cfg.seed).eval()
        student = build_model(cfg.student, cfg.device, dtype, cfg.seed + 1)
        vocab = student.get_input_embeddings().num_embeddings
        if teacher.get_input_embeddings().num_embeddings != vocab:
            raise FirstError("teacher and student configs have different vocabularies")
        examples = make_examples(cfg.n_examples, cfg.seq_len, vocab, cfg.target_frac, cfg.seed)
        details: dict[str, Any] = {
            "teacher_params": _params(teacher),
            "student_params": _params(student),
            "vocab_size": vocab,
        }
        details["teacher_over_student_params"] = (
            details["teacher_params"] / details["student_params"]
        )

        log("coefficient search")
        details.update(
            measure_coefficient_search(cfg.coef_positions, cfg.k, cfg.reps, cfg.warmup, cfg.seed)
        )
        log("extraction vs forward")
        n_ext = max(cfg.extract_examples, cfg.n_examples)
        if n_ext > cfg.n_examples:
            big = make_examples(n_ext, cfg.seq_len, vocab, cfg.target_frac, cfg.seed)
            ext, _ = measure_extraction(teacher, big, cfg, work / "big")
            store = work / "train-store"  # the training steps need a store of their examples
            knowledge.extract_topk(
                teacher,
                examples,
                store,
                k=cfg.k,
                batch_size=cfg.extract_batch,
                shard_size=len(examples),
                teacher_name="bench",
                progress=False,
                autocast=cfg.precision == "bf16",
            )
        else:
            ext, store = measure_extraction(teacher, examples, cfg, work)
        details.update(ext)
        if cfg.extract_model == cfg.teacher:  # the measurement above already was at it
            details["extract_over_forward_throughput_real"] = ext["extract_over_forward_throughput"]
        elif cfg.extract_model:
            log(f"extraction vs forward at {cfg.extract_model}")
            details.update(_extraction_at(cfg.extract_model, cfg, work / "real"))
        log("disk use")
        details.update(measure_store_bytes(teacher, examples[: cfg.bytes_examples], cfg, work))
        log("training steps: CE, KD, online")
        details.update(measure_training(student, teacher, examples, store, cfg, work, log))
        log("frozen-prefix reuse: training and evaluation, cached vs plain")
        details.update(measure_prefix_reuse(cfg, work, log))
        del teacher, student
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        if cfg.memory:
            log("peak memory (one fresh process per loss)")
            details.update(measure_memory(cfg, store))
        details.update(chapter_timings(cfg.profile))
    finally:
        if tmp is not None:
            tmp.cleanup()

    results: dict[str, Any] = {key: details.get(key) for key in TARGETS}
    results.update({k: v for k, v in details.items() if k.startswith("prefix_reuse_")})
    results["targets"] = check_targets(results)
    results["online_impl"] = details.get("online_impl")
    results["matmul_peak_gflops"] = peaks
    results["machine"] = machine
    results["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    results["note"] = (
        "Ratios compare variants measured in one process with interleaved repetitions (median "
        "of per-repetition ratios after warm-up), so load from other processes slows both sides "
        "alike; absolute seconds and tokens/s depend on that load (see load_average). Models are "
        "randomly initialised: speed and memory do not depend on the weights."
    )
    results["details"] = details
    results["config"] = asdict(cfg)
    results["precision"] = cfg.precision
    results["wall_seconds"] = time.perf_counter() - t_start
    return results


def _extraction_at(model_name: str, cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """Extraction against the forward it rides on (targets only) with a teacher of config
    `model_name`: `extract_over_forward_throughput_real` and its details."""
    dtype, _ = _dtypes(cfg)
    model = build_model(model_name, cfg.device, dtype, cfg.seed).eval()
    vocab = model.get_input_embeddings().num_embeddings
    examples = make_examples(
        cfg.extract_model_examples, cfg.seq_len, vocab, cfg.target_frac, cfg.seed
    )
    ext, _ = measure_extraction(model, examples, cfg, work, variants=("forward", "extract"))
    del model
    return {
        "extract_over_forward_throughput_real": ext["extract_over_forward_throughput"],
        "extract_real": {"model": model_name, **ext},
    }
