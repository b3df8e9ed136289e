"""Extraction: the teacher's top-k written into shards, resumable, locked per process.

FIRST (sec. 3.1) keeps, for each position of the training data, only the teacher's k = 5 most
likely tokens and their probabilities. `extract_topk` runs the teacher once over tokenized
examples and writes those top-k into a sharded store (`first_lib.knowledge.layout`).

Reliability: each shard is written to a temporary folder and renamed; a re-run skips finished
shards and removes half-written ones; a lock per process index keeps two runs from writing the
same folder; NaN/inf teacher outputs and a full disk raise `FirstError` and leave no partial shard.
With several processes, shard i is extracted by process ``i % num_processes`` (the union does not
depend on the number of processes) and the main process calls `finalize_store` after a barrier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import first_lib.knowledge.disk as disk
from first_lib import fsio, prefix
from first_lib.errors import FirstError
from first_lib.knowledge.coverage import COVERAGE_MAX_J, _Coverage
from first_lib.knowledge.disk import _ENOSPC, _lock, _read_json, _write_json_atomic
from first_lib.knowledge.examples import Example, _DataSummary, _summarise
from first_lib.knowledge.finalize import finalize_store
from first_lib.knowledge.ids import IdLayout, pack_ids
from first_lib.knowledge.layout import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    POSITIONS,
    _Config,
    _shard_is_done,
    _shard_name,
)
from first_lib.knowledge.topk import (
    _auto_bf16,
    _batches,
    _model_parts,
    _pad_batch,
    _teacher_topk,
    _vocab_sizes,
)


class _Pending:
    """Device results of one batch on their way to the host (non-blocking on CUDA)."""

    def __init__(self, tensors: dict[str, torch.Tensor], local: np.ndarray):
        self.local = local
        self.event = None
        if all(x.device.type == "cpu" for x in tensors.values()):
            self.host = tensors
            return
        self.host = {}
        for name, x in tensors.items():
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
            buf.copy_(x, non_blocking=True)
            self.host[name] = buf
        if tensors["ids"].device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def numpy(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return {name: x.numpy() for name, x in self.host.items()}


def _model_config_hash(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    text = cfg.to_json_string() if hasattr(cfg, "to_json_string") else type(model).__name__
    return hashlib.sha256(text.encode()).hexdigest()


def _write_shard(out_dir: Path, index: int, files: dict[str, bytes], info: dict) -> None:
    """Write a shard's files into a temporary folder, then rename it into place.

    On a full disk the partial folder is removed and a FirstError raised.
    """
    final = out_dir / _shard_name(index)
    tmp = out_dir / f"{_shard_name(index)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        info["files"] = {}
        for name, data in files.items():
            disk._write_file(tmp / name, data)
            info["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        disk._write_file(
            tmp / "shard.json", (json.dumps(info, indent=1, sort_keys=True) + "\n").encode()
        )
        fsio.fsync_dir(tmp)
        if final.exists():  # a stale, incomplete shard under the final name
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsio.fsync_dir(out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in _ENOSPC:
            raise FirstError(
                f"disk full while writing {final.name} of {out_dir}: the partial shard was "
                "removed; free some space and run again to resume"
            ) from None
        raise


def extract_topk(
    model: torch.nn.Module,
    examples: Sequence[Example],
    out_dir: str | os.PathLike,
    k: int = 5,
    batch_size: int = 8,
    shard_size: int = 256,
    positions: str = "targets",
    teacher_name: str = "",
    dtype: str = "prob-fp16",
    autocast: bool | None = None,
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    on_shard_written: Callable[[int], None] | None = None,
    tally: Any = None,
    top_layers: int = 0,
    prefix_cache: str | os.PathLike | None = None,
) -> Path:
    """Run the teacher over `examples` and store its top-k at every stored position.

    Args:
        model: a causal LM (HF `*ForCausalLM`, possibly PEFT-wrapped); put in eval mode.
        examples: dicts {"id", "input_ids", "target_mask"}; target_mask[t] means the logits at
            t predict input_ids[t+1] and are trained.
        out_dir: the store folder (created; a finished store with the same config is reused).
        k: tokens kept per position (the paper's 5).
        batch_size: examples per forward pass (sorted by length within a shard).
        shard_size: examples per shard, the unit of resumption and of multi-process work.
        positions: "targets" (positions where target_mask is True) or "all" (every position
            but the last, e.g. for coverage on free text).
        teacher_name: the teacher's name/config hash, recorded in meta.json.
        dtype: "prob-fp16" (probabilities) or "logprob-fp16" (log-probabilities), both float16.
        autocast: bf16 autocast; None = on where bf16 is fast (CUDA, CPUs with AVX512-BF16/AMX).
        progress: show a tqdm bar with tokens/s.
        process_index, num_processes: this process takes shards i with
            i % num_processes == process_index; with several processes the caller waits for
            all (a barrier) and then calls `finalize_store` on the main process.
        on_shard_written: called with the shard index after each shard is renamed into place.
        tally: a `first_lib.flops.Tally` that counts this process's model work (tokens, padding,
            FLOPs with the LM head at the stored rows, the top layers only with `top_layers`)
            and its seconds (the forward passes, top-k and copies to the host of each shard;
            not the writes to disk nor building the frozen bottom's states).
        top_layers: with 0 < L < N (a teacher tuned with LoRA on its top L layers), the frozen
            bottom's output of every example is read from the disk cache under `prefix_cache`
            (written there by the teacher's training when it ran on the same examples; computed
            otherwise) and only the top L layers run (`first_lib.prefix`).

    Returns:
        out_dir as a Path. With one process the store is finished (MANIFEST.json written).
    """
    if dtype not in DTYPES:
        raise FirstError(f"unknown store dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if positions not in POSITIONS:
        raise FirstError(f"unknown positions {positions!r}; choose 'targets' or 'all'")
    if batch_size <= 0 or shard_size <= 0:
        raise FirstError("batch_size and shard_size must be positive")
    if not 0 <= process_index < num_processes:
        raise FirstError(f"process_index {process_index} is not in 0..{num_processes - 1}")
    v_in, vocab = _vocab_sizes(model)
    if not 0 < k <= vocab:
        raise FirstError(f"k = {k} must be between 1 and the vocabulary size {vocab}")
    out = Path(out_dir)
    device = next(model.parameters()).device
    use_bf16 = _auto_bf16(device) if autocast is None else bool(autocast)
    data = _summarise(examples, positions, v_in)
    cfg = _Config(
        k=k,
        vocab_size=vocab,
        dtype=dtype,
        positions=positions,
        shard_size=shard_size,
        batch_size=batch_size,
        autocast=use_bf16,
        teacher=teacher_name,
        model_config_sha256=_model_config_hash(model),
        content_sha256=data.content_sha256,
        n_examples=data.n_examples,
        n_positions=int(data.n_rows.sum()),
        coverage_width=max(k, min(COVERAGE_MAX_J, vocab)),
        bottom_layers=prefix.n_frozen(model, top_layers) if _model_parts(model) else 0,
    )
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out, process_index):
        if (out / "config.json").exists():
            old = _read_json(out / "config.json")
            if old != cfg.__dict__:
                diff = sorted(key for key in cfg.__dict__ if old.get(key) != cfg.__dict__[key])
                raise FirstError(
                    f"{out} holds an extraction with different settings ({', '.join(diff)}); "
                    "use another folder or the same settings"
                )
            if (out / MANIFEST).exists():
                return out  # finished before: nothing to do
        else:
            _write_json_atomic(out / "config.json", cfg.__dict__)

        mine = [i for i in range(cfg.n_shards) if i % num_processes == process_index]
        todo = []
        for i in mine:
            for stale in out.glob(f"{_shard_name(i)}.tmp-*"):  # half-written by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            path = out / _shard_name(i)
            if path.exists() and not _shard_is_done(path, cfg):
                shutil.rmtree(path)
            if not path.exists():
                todo.append(i)
        if todo:
            _extract_shards(
                model,
                examples,
                out,
                cfg,
                data,
                todo,
                progress,
                on_shard_written,
                tally,
                prefix_cache,
            )
    if num_processes == 1:
        finalize_store(out)
    return out


def _extract_shards(
    model: torch.nn.Module,
    examples: Sequence[Example],
    out: Path,
    cfg: _Config,
    data: _DataSummary,
    shards: list[int],
    progress: bool,
    on_shard_written: Callable[[int], None] | None,
    tally: Any = None,
    prefix_cache: str | os.PathLike | None = None,
) -> None:
    parts = _model_parts(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = sum(
        int(data.lengths[i * cfg.shard_size : (i + 1) * cfg.shard_size].sum()) for i in shards
    )
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"top-{cfg.k} [{out.name}]",
        disable=not progress,
    )
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.autocast)
    try:
        bottom = None
        if cfg.bottom_layers:  # every example, so the entry is the one training wrote
            seqs = [ex["input_ids"] for ex in examples]
            n = cfg.bottom_layers
            bottom = prefix.cached_bottom_states(model, seqs, n, cfg.autocast, prefix_cache)
        with torch.inference_mode(), amp:
            for index in shards:
                lo, hi = index * cfg.shard_size, min((index + 1) * cfg.shard_size, cfg.n_examples)
                with tally.clock(device.type) if tally is not None else contextlib.nullcontext():
                    files, info = _extract_one_shard(
                        model, parts, device, examples, cfg, data, index, lo, hi, bar, tally, bottom
                    )
                _write_shard(out, index, files, info)
                fsio.crash_point("extract:shard-written")
                if on_shard_written is not None:
                    on_shard_written(index)
    finally:
        bar.close()
        model.train(was_training)


def _extract_one_shard(
    model: torch.nn.Module,
    parts: tuple[torch.nn.Module, torch.nn.Module] | None,
    device: torch.device,
    examples: Sequence[Example],
    cfg: _Config,
    data: _DataSummary,
    index: int,
    lo: int,
    hi: int,
    bar: Any,
    tally: Any = None,
    bottom: list[torch.Tensor] | None = None,
) -> tuple[dict[str, bytes], dict]:
    """Top-k of examples[lo:hi]: returns the shard's files (name -> bytes) and its info.
    `bottom`: every example's cached bottom states (`cfg.bottom_layers` > 0)."""
    k, width = cfg.k, cfg.coverage_width
    exs = [examples[i] for i in range(lo, hi)]
    n_rows = data.n_rows[lo:hi]
    per_ids: list[np.ndarray | None] = [None] * len(exs)
    per_vals: list[np.ndarray | None] = [None] * len(exs)
    cov = _Coverage(width, seed=index)
    log_values = cfg.dtype == "logprob-fp16"
    id_type = torch.int32 if cfg.vocab_size <= 2**31 else torch.int64

    def consume(p: _Pending) -> None:
        h = p.numpy()
        if not (np.isfinite(h["lse"]).all() and np.isfinite(h["cum"]).all()):
            bad = [data.ids[lo + j] for j in p.local]
            raise FirstError(
                f"the teacher produced NaN or inf logits in {_shard_name(index)} (examples "
                f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); refusing to write the store"
            )
        cov.update(h["cum"])
        start = 0
        for j in p.local:
            end = start + int(n_rows[j])
            per_ids[j] = h["ids"][start:end]
            per_vals[j] = h["vals"][start:end]
            start = end

    pending: _Pending | None = None
    for local in _batches(data.lengths[lo:hi], cfg.batch_size):
        ids, att, rows, n_tok = _pad_batch([exs[j] for j in local], cfg.positions)
        if tally is not None:
            layers = tally.shape.layers - cfg.bottom_layers  # the layers this pass runs
            tally.forward(data.lengths[lo + local].tolist(), ids.numel(), len(rows), layers=layers)
        ids, att, rows = (x.to(device, non_blocking=True) for x in (ids, att, rows))
        states = None
        if bottom is not None:
            states = prefix.pad_states([bottom[lo + j] for j in local])[0]
        top, idx, lse = _teacher_topk(
            model, parts, ids, att, rows, width, cfg.vocab_size, states, cfg.bottom_layers
        )
        logp = top - lse[:, None]  # [N, width] fp32
        probs = logp.exp()
        vals = logp[:, :k] if log_values else probs[:, :k]
        batch = {
            "ids": idx[:, :k].to(id_type),
            "vals": vals.to(torch.float16),
            "cum": probs.cumsum(-1),
            "lse": lse,
        }
        nxt = _Pending(batch, local)
        if pending is not None:  # host work of the previous batch overlaps this one (CUDA)
            consume(pending)
        pending = nxt
        bar.update(n_tok)
    if pending is not None:
        consume(pending)

    empty_i = np.zeros((0, k), dtype=np.int64)
    empty_v = np.zeros((0, k), dtype=np.float16)
    all_ids = np.concatenate([x if x is not None else empty_i for x in per_ids])
    all_vals = np.concatenate([x if x is not None else empty_v for x in per_vals])
    ids_lo, ids_hi = pack_ids(all_ids, cfg.vocab_size)
    offsets = np.zeros(len(exs) + 1, dtype="<i8")
    np.cumsum(n_rows, out=offsets[1:])
    files = {
        "ids_lo.bin": ids_lo.astype(IdLayout(k, cfg.vocab_size).lo_dtype).tobytes(),
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
    return files, info
