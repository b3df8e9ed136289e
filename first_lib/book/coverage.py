"""Cached studies on real models: top-k coverage, stores' disk use by k, a case study."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from first_lib.book.output import cached_json


def load_fast_model(source: str, precision: str | None = None):
    """A model for inference at `precision` (None: $FIRST_PRECISION, else auto: bf16 where the
    CPU (AMX, AVX512-BF16) or GPU runs it natively, else fp32)."""
    from first_lib import device, models

    dev = device.default_device()
    dtype = device.torch_dtype(device.resolve_precision(precision, dev))
    return models.load_model(source, dtype=dtype, device=dev)


def _coverage_summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    cov = meta["coverage"]
    keep = ("k", "mean", "min", "max", "p05", "p25", "p50", "p75", "p95", "n_positions")
    out = {key: cov[key] for key in keep if key in cov}
    out["vocab_size"] = meta["vocab_size"]
    return out


def _store_bytes(path: Path) -> int:
    """Bytes of the payload files (ids and values) of a finished store, measured on disk."""
    total = 0
    for f in path.rglob("*.bin"):
        if f.name in ("ids_lo.bin", "ids_hi.bin", "values.bin"):
            total += f.stat().st_size
    return total


def topk_mass_by_example(store_dir: str | os.PathLike, k: int = 5) -> dict[str, Any]:
    """Top-k mass of a finished store, position by position: the mean of each example (for a
    bootstrap over examples) and the share of positions whose top-k mass is at least 0.95."""
    from first_lib.knowledge import TopKStore

    store = TopKStore(store_dir)
    k = min(k, store.k)
    per_example, n_pos, n_over = [], 0, 0
    for i in range(len(store)):
        _, probs = store.example(i)
        if len(probs) == 0:
            continue
        mass = probs[:, :k].astype(np.float64).sum(1)
        per_example.append(float(mass.mean()))
        n_pos += len(mass)
        n_over += int((mass >= 0.95).sum())
    return {
        "k": k,
        "by_example_mean": per_example,
        "n_positions": n_pos,
        "share_at_least_95": n_over / max(n_pos, 1),
    }


def _extract_all_positions(model, examples, folder: Path, k: int, name: str, batch_size: int):
    from first_lib import knowledge

    return knowledge.extract_topk(
        model,
        examples,
        folder,
        k=k,
        batch_size=batch_size,
        positions="all",
        teacher_name=name,
        progress=False,
    )


def model_coverage(
    model_source: str,
    examples: Sequence[Mapping[str, Any]],
    k_max: int = 100,
    batch_size: int = 4,
    label: str = "",
) -> dict[str, Any]:
    """Cumulative top-j mass (j = 1..k_max) of a model at every position of `examples`, from a
    real top-k_max store written by `knowledge.extract_topk` (positions="all").

    Cached under first_home()/book/ by model, data and k_max; the model is loaded only on a
    miss. Returns {"label", "model", "seconds", "coverage": {"k", "mean", "min", "max",
    "p05".."p95", "n_positions", "vocab_size"} (the store's meta.json), "top5":
    `topk_mass_by_example` of the store}.
    """
    from first_lib import device, knowledge

    precision = device.resolve_precision()
    key = {
        "model": str(model_source),
        "content": knowledge.content_hash(examples),
        "k_max": k_max,
        "precision": precision,
    }

    def compute() -> dict[str, Any]:
        import tempfile

        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        model = load_fast_model(model_source, precision)
        k_top = min(k_max, int(model.get_output_embeddings().weight.shape[0]))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="first-book-coverage-") as tmp:
            store = _extract_all_positions(
                model, examples, Path(tmp) / "store", k_top, str(model_source), batch_size
            )
            meta = json.loads((store / "meta.json").read_text())
            top5 = topk_mass_by_example(store, 5)
        return {
            "label": label,
            "model": str(model_source),
            "precision": precision,
            "coverage": _coverage_summary(meta),
            "top5": top5,
            "seconds": round(time.perf_counter() - t0, 1),
        }

    return cached_json("coverage", key, compute)


def store_disk_use(
    model_source: str,
    examples: Sequence[Mapping[str, Any]],
    ks: Sequence[int],
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Bytes on disk of real top-k stores (every position of `examples`) for each k in `ks`.

    Returns [{"k", "bytes", "positions", "bytes_per_position" (measured: the payload files on
    disk / positions), "format_bytes_per_position" (what the store's format says)}], cached.
    """
    from first_lib import device, knowledge

    precision = device.resolve_precision()
    key = {
        "model": str(model_source),
        "content": knowledge.content_hash(examples),
        "ks": sorted(ks),
        "precision": precision,
    }

    def compute() -> list[dict[str, Any]]:
        import tempfile

        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        model = load_fast_model(model_source, precision)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        out = []
        with tempfile.TemporaryDirectory(prefix="first-book-disk-") as tmp:
            for k in sorted({min(k, vocab) for k in ks}):
                path = _extract_all_positions(
                    model, examples, Path(tmp) / f"k{k}", k, str(model_source), batch_size
                )
                meta = json.loads((path / "meta.json").read_text())
                n_bytes = _store_bytes(path)
                out.append(
                    {
                        "k": k,
                        "bytes": n_bytes,
                        "positions": meta["n_positions"],
                        "bytes_per_position": n_bytes / meta["n_positions"],
                        "format_bytes_per_position": meta["bytes_per_position"],
                        "vocab_size": meta["vocab_size"],
                    }
                )
        return out

    return cached_json("disk-use", key, compute)


def case_study(
    model_dirs: Mapping[str, str], questions: Sequence[Any], style: str, batch_size: int = 4
) -> dict[str, list[dict]]:
    """Evaluation records of each model on a few hand-picked questions (cached).

    model_dirs: {variant: model folder}; questions: `first_lib.tasks.MCQuestion`s.
    """
    from dataclasses import asdict

    from first_lib import device

    precision = device.resolve_precision()
    key = {
        "models": dict(model_dirs),
        "questions": [asdict(q) for q in questions],
        "style": style,
        "precision": precision,
        "v": 1,
    }

    def compute() -> dict[str, list[dict]]:
        import torch

        from first_lib import evaluate, models

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        out = {}
        for variant, path in model_dirs.items():
            model = load_fast_model(path, precision)
            tok = models.load_tokenizer(path)
            out[variant] = evaluate.evaluate_multiple_choice(
                model, tok, questions, style=style, batch_size=batch_size, progress=False
            )
            del model
        return out

    return cached_json("case-study", key, compute)
