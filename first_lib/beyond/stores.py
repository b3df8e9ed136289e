"""Stores of any rows in the top-k store format: a top-k truncated from a wider one, or sampled
tokens with their weights. Written shard by shard with the extraction's own writer and
finished with `finalize_store`, so `TopKStore` reads them, training consumes them unchanged,
and their bytes on disk are those of a real store of that width."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from first_lib.errors import FirstError


def write_store(
    out_dir: str | os.PathLike,
    examples: Sequence[dict],
    rows: Callable[[int], tuple[np.ndarray, np.ndarray]],
    width: int,
    vocab_size: int,
    teacher: str,
    shard_size: int = 256,
) -> Path:
    """Write a finished store of `width` slots a position: `rows(i)` gives example i's
    (ids [n_pos, width], values [n_pos, width]) at its target positions, values in [0, 1]."""
    from first_lib.knowledge.coverage import _Coverage
    from first_lib.knowledge.examples import _summarise
    from first_lib.knowledge.extract import _write_shard
    from first_lib.knowledge.finalize import finalize_store
    from first_lib.knowledge.ids import IdLayout, pack_ids
    from first_lib.knowledge.layout import FORMAT, FORMAT_VERSION, _Config

    out = Path(out_dir)
    data = _summarise(examples, "targets", vocab_size)
    cfg = _Config(
        k=width,
        vocab_size=vocab_size,
        dtype="prob-fp16",
        positions="targets",
        shard_size=shard_size,
        batch_size=0,
        autocast=False,
        teacher=teacher,
        model_config_sha256="",
        content_sha256=data.content_sha256,
        n_examples=data.n_examples,
        n_positions=int(data.n_rows.sum()),
        coverage_width=width,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.__dict__, indent=1, sort_keys=True) + "\n")
    for index in range(cfg.n_shards):
        lo, hi = index * shard_size, min((index + 1) * shard_size, cfg.n_examples)
        ids, vals = [], []
        for i in range(lo, hi):
            a, b = rows(i)
            if a.shape != (int(data.n_rows[i]), width) or b.shape != a.shape:
                raise FirstError(
                    f"example {data.ids[i]}: rows of shape {a.shape}, expected "
                    f"({int(data.n_rows[i])}, {width})"
                )
            ids.append(np.asarray(a, dtype=np.int64))
            vals.append(np.asarray(b, dtype=np.float32))
        all_ids = np.concatenate(ids) if ids else np.zeros((0, width), np.int64)
        all_vals = np.concatenate(vals) if vals else np.zeros((0, width), np.float32)
        cov = _Coverage(width, seed=index)
        cov.update(np.cumsum(all_vals, axis=1, dtype=np.float32))
        ids_lo, ids_hi = pack_ids(all_ids, vocab_size)
        offsets = np.zeros(hi - lo + 1, dtype="<i8")
        np.cumsum(data.n_rows[lo:hi], out=offsets[1:])
        files = {
            "ids_lo.bin": ids_lo.astype(IdLayout(width, vocab_size).lo_dtype).tobytes(),
            "ids_hi.bin": np.ascontiguousarray(ids_hi).tobytes(),
            "values.bin": all_vals.astype("<f2").tobytes(),
            "offsets.bin": offsets.tobytes(),
            "digests.bin": data.digests[lo:hi].astype("<u8").tobytes(),
            "reservoir.bin": cov.sample().astype("<f2").tobytes(),
            "example_ids.json": (json.dumps(data.ids[lo:hi]) + "\n").encode(),
        }
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "index": index,
            "config_key": cfg.key(),
            "first_example": lo,
            "n_examples": hi - lo,
            "n_positions": int(offsets[-1]),
            "reservoir_rows": len(cov.sample()),
            "coverage": cov.state(),
        }
        _write_shard(out, index, files, info)
    return finalize_store(out)


def truncate_store(src: str | os.PathLike, out_dir: str | os.PathLike, k: int, examples) -> Path:
    """The top-k of a finished wider top-K store (K >= k), as a store of its own: the same ids
    and the same float16 probabilities an extraction at k writes (the top-k of a sorted top-K)."""
    from first_lib.knowledge import TopKStore

    store = TopKStore(src)
    if not 1 <= k <= store.k:
        raise FirstError(f"cannot truncate the top-{store.k} store {src} to k = {k}")
    store.check_alignment(examples)

    def rows(i: int):
        ids, probs = store.example(i)
        return ids[:, :k], probs[:, :k]

    name = f"{store.meta['teacher']} (top-{k} of top-{store.k})"
    return write_store(out_dir, examples, rows, k, store.vocab_size, name)


def payload_bytes(store_dir: str | os.PathLike) -> int:
    """Bytes on disk of a finished store's payload files (ids and values), measured as the
    coverage studies measure them (`first_lib.book.coverage`)."""
    from first_lib.book.coverage import _store_bytes

    return _store_bytes(Path(store_dir))
