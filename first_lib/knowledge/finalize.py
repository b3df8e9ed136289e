"""Finishing a store: check every shard, merge coverage, write meta.json, then MANIFEST.json."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from first_lib import fsio
from first_lib.errors import FirstError
from first_lib.knowledge.coverage import _merge_coverage
from first_lib.knowledge.disk import _read_json, _write_json_atomic
from first_lib.knowledge.ids import IdLayout, bytes_per_position
from first_lib.knowledge.layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    _Config,
    _shard_is_done,
    _shard_name,
)


def finalize_store(out_dir: str | os.PathLike) -> Path:
    """Check that every shard exists, merge coverage, write meta.json, then MANIFEST.json last.

    Run it once on the main process after all processes finished `extract_topk` (a barrier).
    """
    out = Path(out_dir)
    if not (out / "config.json").exists():
        raise FirstError(f"{out} is not a top-k extraction folder (no config.json)")
    try:
        cfg = _Config(**_read_json(out / "config.json"))
    except (TypeError, ValueError):
        raise FirstError(f"{out}/config.json is not a config of this store version") from None
    if (out / MANIFEST).exists():
        return out
    for stale in out.glob(".*.tmp-*"):  # a JSON file half-written by a killed run
        stale.unlink(missing_ok=True)
    infos, samples = [], []
    for i in range(cfg.n_shards):
        path = out / _shard_name(i)
        if not path.exists() or not _shard_is_done(path, cfg):
            raise FirstError(
                f"{path.name} of {out} is missing or incomplete: not every process has finished; "
                "run the extraction again to resume"
            )
        info = _read_json(path / "shard.json")
        width = cfg.coverage_width
        res = np.fromfile(path / "reservoir.bin", dtype="<f2").reshape(-1, width)
        infos.append(info)
        samples.append(res.astype(np.float32))
    n_pos = sum(s["n_positions"] for s in infos)
    if n_pos != cfg.n_positions:
        raise FirstError(f"{out}: shards hold {n_pos} positions, expected {cfg.n_positions}")
    coverage = _merge_coverage([s["coverage"] for s in infos], samples)
    payload = sum(
        s["files"][f]["bytes"] for s in infos for f in ("ids_lo.bin", "ids_hi.bin", "values.bin")
    )
    on_disk = sum(f["bytes"] for s in infos for f in s["files"].values())
    lay = IdLayout(cfg.k, cfg.vocab_size)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "k": cfg.k,
        "vocab_size": cfg.vocab_size,
        "id_bits": lay.bits,
        "ids_lo_dtype": lay.lo_dtype.str,
        "ids_hi_bytes": lay.hi_bytes,
        "dtype": cfg.dtype,
        "positions": cfg.positions,
        "n_examples": cfg.n_examples,
        "n_positions": n_pos,
        "n_shards": cfg.n_shards,
        "shard_size": cfg.shard_size,
        "bytes_per_position": bytes_per_position(cfg.k, cfg.vocab_size),
        "payload_bytes": payload,
        "bytes_on_disk_per_position": on_disk / n_pos,
        "content_sha256": cfg.content_sha256,
        "teacher": cfg.teacher,
        "model_config_sha256": cfg.model_config_sha256,
        "batch_size": cfg.batch_size,
        "autocast_bf16": cfg.autocast,
        "mean_topk_mass": coverage["mean"][cfg.k - 1],
        "coverage": coverage,
    }
    _write_json_atomic(out / "meta.json", meta)
    fsio.crash_point("extract:store-meta-written")
    meta_sha = hashlib.sha256((out / "meta.json").read_bytes()).hexdigest()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "meta_sha256": meta_sha,
        "shards": [
            {"name": _shard_name(s["index"]), "n_examples": s["n_examples"], "files": s["files"]}
            for s in infos
        ],
    }
    _write_json_atomic(out / MANIFEST, manifest)  # last: the store is finished
    return out
