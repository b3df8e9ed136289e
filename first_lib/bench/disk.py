"""Disk use per stored position: the top-k store, the authors' JSON lines, the full distribution."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from first_lib.bench.config import BenchConfig
from first_lib.bench.shared import _dtypes
from first_lib.errors import FirstError


def _dir_bytes(path: Path, names: Sequence[str] | None = None) -> int:
    """Bytes on disk of the files under `path` (only those called one of `names`, if given)."""
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and (names is None or f.name in names)
    )


def write_jsonl_topk(path: Path, ids: np.ndarray, probs: np.ndarray) -> int:
    """Write top-k as JSON lines, one position per line, the way the authors' released code kept
    its teacher knowledge (REFERENCE.md: raw top-5 probabilities as text, per position):
    ``{"token_ids": [5 ints], "probs": [5 floats]}``, the floats being float32 probabilities
    turned into Python floats (``tensor.tolist()``). Returns the bytes written. The exact key
    names of the released files are not known here; they change the size by a few bytes."""
    with open(path, "w") as f:
        for i, p in zip(ids.tolist(), probs.tolist(), strict=True):
            f.write(json.dumps({"token_ids": i, "probs": p}) + "\n")
    return path.stat().st_size


def measure_store_bytes(
    teacher, examples: Sequence[dict], cfg: BenchConfig, work: Path
) -> dict[str, Any]:
    """Disk use per stored position of three layouts of the teacher's knowledge on the same
    positions (the target positions of `examples`), measured on files actually written:

    - this library's top-k store (`extract_topk`): payload files (ids and values), and every file;
    - the authors' JSON lines of the top-k (`write_jsonl_topk`), from the fp32 probabilities;
    - the full distribution in float16, ``n_positions x vocab`` raw values.
    """
    import torch

    from first_lib import knowledge

    store = knowledge.extract_topk(
        teacher,
        examples,
        work / "bytes-store",
        k=cfg.k,
        batch_size=cfg.extract_batch,
        teacher_name="bench",
        progress=False,
        autocast=cfg.precision == "bf16",
    )
    meta = json.loads((store / "meta.json").read_text())
    n = int(meta["n_positions"])
    payload = _dir_bytes(store, ("ids_lo.bin", "ids_hi.bin", "values.bin"))
    everything = _dir_bytes(store)

    # The teacher's full distribution at the same positions, in fp32, example by example.
    device = next(teacher.parameters()).device
    _, bf16 = _dtypes(cfg)
    rows = []
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]], device=device)
            logits = teacher(input_ids=ids, use_cache=False).logits[0]
            mask = torch.tensor(ex["target_mask"], device=device)
            rows.append(torch.softmax(logits[mask].float(), dim=-1).cpu())
    probs = torch.cat(rows)  # [n, V] fp32
    if probs.shape[0] != n:
        raise FirstError(f"store has {n} positions, the teacher gave {probs.shape[0]}")
    full_path = work / "full-fp16.bin"
    probs.to(torch.float16).numpy().tofile(full_path)
    full_bytes = full_path.stat().st_size
    top = torch.topk(probs, cfg.k, dim=-1)
    jsonl_bytes = write_jsonl_topk(work / "topk.jsonl", top.indices.numpy(), top.values.numpy())
    vocab = int(probs.shape[1])
    full_path.unlink()
    return {
        "store_bytes_per_token": payload / n,
        "store_bytes_on_disk_per_token": everything / n,
        "store_format_bytes_per_token": knowledge.bytes_per_position(cfg.k, meta["vocab_size"]),
        "jsonl_bytes_per_token": jsonl_bytes / n,
        "full_fp16_bytes_per_token": full_bytes / n,
        "store_positions": n,
        "store_payload_bytes": payload,
        "store_all_files_bytes": everything,
        "jsonl_bytes": jsonl_bytes,
        "full_fp16_bytes": full_bytes,
        "vocab_size": vocab,
        "k": cfg.k,
    }
