"""Efficient knowledge selection: the teacher's top-k at every trained position, stored on disk.

FIRST (sec. 3.1) keeps, for each position of the training data, only the teacher's k = 5 most
likely tokens and their probabilities. This module runs the teacher once over tokenized examples
and writes those top-k into a sharded, memory-mapped store; the student reads it back batch by
batch (`collate`) without the teacher in memory.

Store layout (one directory)::

    config.json          what is being extracted (k, vocab, positions, data hash, ...)
    shard-00000/         one folder per `shard_size` examples, renamed into place when complete
        ids_lo.bin       uint8/uint16 [n_pos, k]    low 8/16 bits of each token id
        ids_hi.bin       uint8 [n_pos, hi_bytes]     high bits of the k ids, bit-packed (V > 65,536)
        values.bin       float16 [n_pos, k]          probabilities (or log-probabilities), sorted
        offsets.bin      int64 [n_ex + 1]            example e owns rows offsets[e]:offsets[e+1]
        digests.bin      uint64 [n_ex]               per-example digest of (id, input_ids, mask)
        reservoir.bin    float16 [r, J]              sampled cumulative-mass rows (quantiles)
        example_ids.json the example ids, in input order
        shard.json       shapes, file hashes, coverage accumulators
    meta.json            k, vocab, bytes/position, data hash, coverage statistics, ...
    MANIFEST.json        written last (atomic rename): the store is finished

All arrays are raw little-endian bytes read back with `np.memmap`; nothing is pickled. Token ids
take ``ceil(log2(V))`` bits: for Qwen's 151,936-token vocabulary and k = 5 a position costs
10 (low 16 bits) + 2 (5 x 2 high bits) + 10 (fp16) = 22 bytes.

Reliability: each shard is written to a temporary folder and renamed; a re-run skips finished
shards and removes half-written ones; a lock per process index keeps two runs from writing the
same folder; NaN/inf teacher outputs and a full disk raise `FirstError` and leave no partial shard.
With several processes, shard i is extracted by process ``i % num_processes`` (the union does not
depend on the number of processes) and the main process calls `finalize_store` after a barrier.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from first_lib import fsio, prefix
from first_lib.errors import FirstError

FORMAT = "first-topk-store"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
COVERAGE_MAX_J = 100  # cumulative top-j mass is recorded for j = 1..100 (Figure 2 of the paper)
RESERVOIR_ROWS = 512  # cumulative-mass rows sampled per shard for the coverage quantiles
QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)
DTYPES = ("prob-fp16", "logprob-fp16")  # what `values.bin` holds
POSITIONS = ("targets", "all")
_ENOSPC = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

Example = Mapping[str, Any]  # {"id": str, "input_ids": list[int], "target_mask": list[bool]}


# --------------------------------------------------------------------------------------------
# Narrow token ids: pure functions
# --------------------------------------------------------------------------------------------


def id_bits(vocab_size: int) -> int:
    """Bits needed for a token id in [0, vocab_size): ceil(log2(V)), at least 1."""
    if not 1 <= vocab_size <= 2**32:
        raise FirstError(f"vocabulary size {vocab_size} is outside 1..2^32")
    return max(1, (vocab_size - 1).bit_length())


@dataclass(frozen=True)
class IdLayout:
    """How k token ids of one position are packed: a low part and bit-packed high bits."""

    k: int
    vocab_size: int

    @property
    def bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def lo_dtype(self) -> np.dtype:
        """uint8 when every id fits in 8 bits, else uint16 (the low 16 bits)."""
        return np.dtype("u1") if self.bits <= 8 else np.dtype("<u2")

    @property
    def hi_bits(self) -> int:
        """Bits of each id above the low 16 (0 for V <= 65,536)."""
        return max(0, self.bits - 16)

    @property
    def hi_bytes(self) -> int:
        """Bytes per position holding the k ids' high bits, bit-packed little-endian."""
        return math.ceil(self.k * self.hi_bits / 8)

    @property
    def id_bytes(self) -> int:
        return self.k * self.lo_dtype.itemsize + self.hi_bytes


def bytes_per_position(k: int, vocab_size: int) -> int:
    """Exact bytes of one stored position: packed ids + k fp16 values (22 for k=5, V=151,936)."""
    return IdLayout(k, vocab_size).id_bytes + 2 * k


def pack_ids(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack token ids [N, k] (any integer dtype, values in [0, V)) into (lo [N, k], hi [N, hb]).

    lo holds the low 8/16 bits; hi the remaining ``hi_bits`` of each of the k ids, concatenated
    id by id, least significant bit first, packed into ``hi_bytes`` bytes (empty when V <= 2^16).
    """
    ids = np.asarray(ids)
    n, k = ids.shape
    lay = IdLayout(k, vocab_size)
    u = ids.astype(np.uint64, copy=False)
    lo = (u & np.uint64(0xFFFF)).astype(lay.lo_dtype)
    if lay.hi_bits == 0:
        return lo, np.zeros((n, 0), dtype=np.uint8)
    high = (u >> np.uint64(16)).astype(np.uint32)  # [N, k]
    shifts = np.arange(lay.hi_bits, dtype=np.uint32)
    bits = ((high[..., None] >> shifts) & 1).astype(np.uint8).reshape(n, k * lay.hi_bits)
    hi = np.packbits(bits, axis=1, bitorder="little")
    return lo, hi


def unpack_ids(lo: np.ndarray, hi: np.ndarray, vocab_size: int) -> np.ndarray:
    """Inverse of `pack_ids`: (lo [N, k], hi [N, hb]) -> int64 ids [N, k]."""
    n, k = lo.shape
    lay = IdLayout(k, vocab_size)
    ids = lo.astype(np.int64)
    if lay.hi_bits:
        bits = np.unpackbits(hi, axis=1, count=k * lay.hi_bits, bitorder="little")
        bits = bits.reshape(n, k, lay.hi_bits).astype(np.int64)
        high = (bits << np.arange(lay.hi_bits, dtype=np.int64)).sum(-1)
        ids |= high << 16
    return ids


# --------------------------------------------------------------------------------------------
# Data hashing and checks
# --------------------------------------------------------------------------------------------


def _example_bytes(ex: Example) -> bytes:
    """Unambiguous bytes of one example: len+id (utf-8), len+input_ids (int64), target_mask (u8)."""
    eid = str(ex["id"]).encode("utf-8")
    ids = np.asarray(ex["input_ids"], dtype="<i8")
    mask = np.asarray(ex["target_mask"], dtype=bool).astype(np.uint8)
    head = np.array([len(eid)], dtype="<u8").tobytes()
    return head + eid + np.array([ids.size], dtype="<u8").tobytes() + ids.tobytes() + mask.tobytes()


def example_digest(ex: Example) -> int:
    """A 64-bit digest of one example (id, input_ids, target_mask), kept per example in a store."""
    return int.from_bytes(hashlib.blake2b(_example_bytes(ex), digest_size=8).digest(), "little")


def content_hash(examples: Sequence[Example]) -> str:
    """sha256 over (id, input_ids, target_mask) of every example, in order: the data's identity."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(_example_bytes(ex))
    return h.hexdigest()


def _rows_of(ex: Example, positions: str) -> np.ndarray:
    """Token positions t whose logits are stored: target positions, or 0..len-2 for "all"."""
    n = len(ex["input_ids"])
    if positions == "all":
        return np.arange(max(0, n - 1))
    return np.flatnonzero(np.asarray(ex["target_mask"], dtype=bool))


@dataclass
class _DataSummary:
    n_examples: int
    lengths: np.ndarray  # int64 [n_ex]
    n_rows: np.ndarray  # int64 [n_ex] stored positions per example
    digests: np.ndarray  # uint64 [n_ex]
    ids: list[str]
    content_sha256: str


def _summarise(examples: Sequence[Example], positions: str, input_vocab: int) -> _DataSummary:
    """One streaming pass: checks every example, hashes the data, counts stored positions."""
    n = len(examples)
    if n == 0:
        raise FirstError("no examples to extract top-k from (empty split)")
    h = hashlib.sha256()
    lengths = np.zeros(n, dtype=np.int64)
    n_rows = np.zeros(n, dtype=np.int64)
    digests = np.zeros(n, dtype=np.uint64)
    ids: list[str] = []
    seen: set[str] = set()
    for i in range(n):
        ex = examples[i]
        try:
            eid, toks, mask = ex["id"], ex["input_ids"], ex["target_mask"]
        except (KeyError, TypeError):
            raise FirstError(f"example {i} lacks one of 'id', 'input_ids', 'target_mask'") from None
        eid = str(eid)
        if eid in seen:
            raise FirstError(f"example id {eid!r} occurs twice; ids must be unique")
        seen.add(eid)
        toks = np.asarray(toks)
        mask = np.asarray(mask, dtype=bool)
        if toks.ndim != 1 or toks.size == 0:
            raise FirstError(f"example {eid!r} has no tokens")
        if mask.shape != toks.shape:
            raise FirstError(
                f"example {eid!r}: target_mask has {mask.size} entries for {toks.size} tokens"
            )
        if mask[-1]:
            raise FirstError(
                f"example {eid!r}: target_mask marks the last position, which predicts no token"
            )
        if toks.min() < 0 or toks.max() >= input_vocab:
            raise FirstError(
                f"example {eid!r} has token id {int(toks.max())} outside the teacher's "
                f"embedding (0..{input_vocab - 1}): tokenizer and teacher do not match"
            )
        raw = _example_bytes(ex)
        h.update(raw)
        digests[i] = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
        lengths[i] = toks.size
        n_rows[i] = toks.size - 1 if positions == "all" else int(mask.sum())
        ids.append(eid)
    if n_rows.sum() == 0:
        raise FirstError(f"no positions to store: no example has a {positions!r} position")
    return _DataSummary(n, lengths, n_rows, digests, ids, h.hexdigest())


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes | memoryview) -> None:
    """Write bytes and fsync them. The single place where store bytes hit the disk (tests patch
    it to simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in _ENOSPC:
            raise FirstError(f"disk full while writing {path}") from None
        raise
    fsio.fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def _lock(out_dir: Path, process_index: int) -> Iterator[None]:
    """An exclusive, non-blocking lock per (folder, process index); released even on kill -9."""
    lock_dir = out_dir / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    f = open(lock_dir / f"process-{process_index}.lock", "a+")
    try:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            raise FirstError(
                f"another extraction (process {process_index}) is already writing {out_dir}; "
                "wait for it to finish or use another folder"
            ) from None
        yield
    finally:
        f.close()


# --------------------------------------------------------------------------------------------
# The teacher: top-k rows from hidden states
# --------------------------------------------------------------------------------------------


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 runs natively on `device` (see `first_lib.device.bf16_is_fast`)."""
    from first_lib import device as device_mod

    return device_mod.bf16_is_fast(device)


def _auto_bf16(device: torch.device) -> bool:
    """bf16 autocast when no choice is given: the precision $FIRST_PRECISION or auto resolves."""
    from first_lib import device as device_mod

    return device_mod.resolve_precision(None, device) == "bf16"


def _model_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder body returning last_hidden_state, LM head) when the model has them, else None.

    Unwraps PEFT (LoRA layers stay inside the base model). Models with a final logit
    soft-capping use the full forward instead.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        return None
    if isinstance(body, torch.nn.Module) and isinstance(head, torch.nn.Module):
        return body, head
    return None


def _vocab_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """(input embedding rows, output logits width) of a causal LM."""
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    v_in = int(emb.num_embeddings)
    if out is not None and hasattr(out, "out_features"):
        v_out = int(out.out_features)
    elif out is not None:
        v_out = int(out.weight.shape[0])
    else:
        v_out = int(getattr(model.config, "vocab_size", v_in))
    return v_in, v_out


def _chunk_rows(vocab: int, device: torch.device | None = None) -> int:
    """Rows per LM-head chunk: about 2^25 logits (128 MB in fp32) at a time on a CPU, 2^28 on a
    GPU, where fewer, larger launches keep it busy (measured on an H100: extraction went from
    0.82 to 0.85 of the forward pass's tokens/s, see first_lib/bench.py)."""
    budget = 2**28 if device is not None and device.type == "cuda" else 2**25
    return max(1, budget // vocab)


def _lse_from_max(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(logits))) per row [n] in fp32, given the row maxima m [n, 1] (fp32)."""
    return (logits.float() - m).exp().sum(-1).log() + m.squeeze(-1)


_LSE_FUSED: Any = None  # torch.compile(_lse_from_max), built on first use
FUSE_MIN_LOGITS = 1 << 20  # smaller chunks stay eager: not worth a compilation


def _lse_fused(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """`_lse_from_max` compiled into one kernel that reads the (bf16) logits once, instead of
    materialising an fp32 copy and passing over it three times (H100: 0.85 -> 0.92 of the
    forward pass; a 2-core AMX CPU: the normaliser of bf16 logits 2.3x faster). Eager if
    compiling is not possible on this machine. The first call compiles (seconds; cached on
    disk by torch for later processes)."""
    global _LSE_FUSED
    if _LSE_FUSED is None:
        try:
            _LSE_FUSED = torch.compile(_lse_from_max, dynamic=True)
            _LSE_FUSED(logits[:1], m[:1])  # compile now, so a failure falls back here
        except Exception as err:  # noqa: BLE001 - no compiler/triton: the eager maths is the same
            warnings.warn(
                f"extraction: torch.compile unavailable ({err}); using eager", stacklevel=2
            )
            _LSE_FUSED = _lse_from_max
    return _LSE_FUSED(logits, m)


def _topk_logits(
    logits: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`width` of logit rows [n, V] and their log-sum-exp, computed in fp32.

    Returns (top logits fp32 [n, width] sorted descending, token ids [n, width], lse fp32 [n]).
    The row maximum is the top-1 logit, so one pass of exp/sum gives the normaliser: fused into
    one compiled kernel on a GPU and for large bf16 chunks (no fp32 copy of them), else eager and
    in place on `logits` itself when fp32 (consumed) or on an fp32 copy of small bf16 ones.
    """
    top = torch.topk(logits, width, dim=-1, sorted=True)
    top_vals = top.values.float()
    m = top_vals[:, :1]
    low_precision = logits.dtype != torch.float32
    if logits.is_cuda or (low_precision and logits.numel() >= FUSE_MIN_LOGITS):
        return top_vals, top.indices, _lse_fused(logits, m)
    work = logits.float()  # a copy for bf16 logits; the same tensor (consumed) for fp32 ones
    lse = work.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
    return top_vals, top.indices, lse


def _logit_chunks(
    model: torch.nn.Module,
    parts: tuple[torch.nn.Module, torch.nn.Module] | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    flat_rows: torch.Tensor,
    vocab: int,
    bottom: torch.Tensor | None = None,
    n_bottom: int = 0,
) -> Iterator[torch.Tensor]:
    """The teacher's logits [n, V] at the positions `flat_rows` [N] (indices b * T + t into
    [B, T]), chunk by chunk: the forward pass that extraction rides on. With (body, head) the
    LM head is applied to the selected rows only; else the full forward's logits are selected.
    With `bottom`, the cached output of the frozen bottom `n_bottom` layers ([B, T, H],
    right-padded, see `first_lib.prefix`), only the top layers run."""
    if parts is not None:
        body, head = parts
        if bottom is not None:
            hidden = prefix.top_hidden(model, bottom, attention_mask, n_bottom)
        else:
            out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_rows)  # [N, H]
        project = head
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, flat_rows)  # [N, V]
        project = None
    step = _chunk_rows(vocab, rows.device)
    for s in range(0, rows.shape[0], step):
        chunk = rows[s : s + step]
        yield project(chunk) if project is not None else chunk


def _teacher_topk(
    model: torch.nn.Module,
    parts: tuple[torch.nn.Module, torch.nn.Module] | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    flat_rows: torch.Tensor,
    width: int,
    vocab: int,
    bottom: torch.Tensor | None = None,
    n_bottom: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-`width` at the positions `flat_rows` [N] (indices b * T + t into [B, T]).

    With `bottom` (cached states of the frozen bottom `n_bottom` layers), only the top layers run.
    Returns (top logits fp32 [N, width], ids [N, width], lse fp32 [N]).
    """
    tops, idxs, lses = [], [], []
    chunks = _logit_chunks(
        model, parts, input_ids, attention_mask, flat_rows, vocab, bottom, n_bottom
    )
    for logits in chunks:
        t, i, lse = _topk_logits(logits, width)
        tops.append(t)
        idxs.append(i)
        lses.append(lse)
    if not tops:
        empty = torch.zeros((0, width), dtype=torch.float32, device=input_ids.device)
        return empty, empty.long(), empty[:, 0]
    return torch.cat(tops), torch.cat(idxs), torch.cat(lses)


# --------------------------------------------------------------------------------------------
# Coverage accumulators (per shard; merged in `finalize_store`)
# --------------------------------------------------------------------------------------------


class _Coverage:
    """Streaming statistics of the cumulative top-j mass rows [n, J]: sum, sum of squares,
    min, max per j, and a seeded reservoir sample of rows for quantiles."""

    def __init__(self, width: int, seed: int, reservoir: int = RESERVOIR_ROWS):
        self.width = width
        self.count = 0
        self.sum = np.zeros(width, dtype=np.float64)
        self.sumsq = np.zeros(width, dtype=np.float64)
        self.min = np.full(width, np.inf)
        self.max = np.full(width, -np.inf)
        self.res = np.zeros((reservoir, width), dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    def update(self, cum: np.ndarray) -> None:
        """cum: float32 [n, J] cumulative mass of each row, non-decreasing in j."""
        n = cum.shape[0]
        if n == 0:
            return
        c64 = cum.astype(np.float64)
        self.sum += c64.sum(0)
        self.sumsq += np.square(c64).sum(0)
        np.minimum(self.min, cum.min(0), out=self.min)
        np.maximum(self.max, cum.max(0), out=self.max)
        # Algorithm R, vectorised: row t (0-based, over the shard) replaces slot j ~ U{0..t}.
        r = self.res.shape[0]
        t = np.arange(self.count, self.count + n)
        fill = t < r
        self.res[t[fill]] = cum[fill]
        rest = np.flatnonzero(~fill)
        if rest.size:
            slots = self.rng.integers(0, t[rest] + 1)
            for row, slot in zip(rest[slots < r], slots[slots < r], strict=True):
                self.res[slot] = cum[row]  # in order: a later row wins a slot, as in Algorithm R
        self.count += n

    def state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "sumsq": self.sumsq.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
        }

    def sample(self) -> np.ndarray:
        return self.res[: min(self.count, self.res.shape[0])]


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list:
    """Quantiles of weighted samples (values [n], weights [n]): midpoint-interpolated CDF."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cdf = (np.cumsum(w) - 0.5 * w) / w.sum()
    return [float(np.interp(q, cdf, v)) for q in qs]


def _merge_coverage(states: list[dict], samples: list[np.ndarray]) -> dict[str, Any]:
    """Combine per-shard accumulators (in shard order) into the `coverage` entry of meta.json."""
    count = sum(s["count"] for s in states)
    width = len(states[0]["sum"])
    tot = np.zeros(width)
    totsq = np.zeros(width)
    lo = np.full(width, np.inf)
    hi = np.full(width, -np.inf)
    for s in states:
        if s["count"]:
            tot += np.asarray(s["sum"])
            totsq += np.asarray(s["sumsq"])
            lo = np.minimum(lo, s["min"])
            hi = np.maximum(hi, s["max"])
    mean = tot / count
    std = np.sqrt(np.maximum(totsq / count - mean**2, 0.0))
    # Each sampled row stands for count_shard / rows_sampled positions of its shard.
    vals = [x for x in samples if len(x)]
    wts = [
        np.full(len(x), s["count"] / len(x)) for s, x in zip(states, samples, strict=True) if len(x)
    ]
    rows = np.concatenate(vals).astype(np.float64)
    weights = np.concatenate(wts)
    quant = np.array([_weighted_quantiles(rows[:, j], weights, QUANTILES) for j in range(width)])
    quant = np.clip(quant, lo[:, None], hi[:, None])  # the sample is fp16: keep it in range
    cov: dict[str, Any] = {
        "k": list(range(1, width + 1)),
        "n_positions": count,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "min": lo.tolist(),
        "max": hi.tolist(),
        "quantile_sample_rows": int(len(rows)),
    }
    for qi, q in enumerate(QUANTILES):
        cov[f"p{round(q * 100):02d}"] = quant[:, qi].tolist()
    return cov


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Local example indices grouped into batches, longest first (less padding, early OOM)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _pad_batch(
    exs: list[Example], positions: str, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-padded (input_ids [B, T], attention_mask [B, T], flat row index [N], n_tokens).

    The row index lists the stored positions as b * T + t, example by example: computed on the
    host, so selecting them on the device needs no synchronisation.
    """
    lens = [len(ex["input_ids"]) for ex in exs]
    b, t = len(exs), max(lens)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    att = np.zeros((b, t), dtype=bool)
    rows = np.zeros((b, t), dtype=bool)
    for j, ex in enumerate(exs):
        ids[j, : lens[j]] = ex["input_ids"]
        att[j, : lens[j]] = True
        rows[j, _rows_of(ex, positions)] = True
    flat = torch.from_numpy(np.flatnonzero(rows))
    return torch.from_numpy(ids), torch.from_numpy(att).long(), flat, sum(lens)


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


@dataclass
class _Config:
    """Everything that determines the store's bytes; saved as config.json."""

    k: int
    vocab_size: int
    dtype: str
    positions: str
    shard_size: int
    batch_size: int
    autocast: bool
    teacher: str
    model_config_sha256: str
    content_sha256: str
    n_examples: int
    n_positions: int
    coverage_width: int
    bottom_layers: int = 0  # frozen bottom layers run once from cached states (first_lib.prefix)

    def key(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_examples / self.shard_size)


def _model_config_hash(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    text = cfg.to_json_string() if hasattr(cfg, "to_json_string") else type(model).__name__
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_is_done(path: Path, cfg: _Config) -> bool:
    """A renamed shard folder whose shard.json matches this extraction and whose files have
    their recorded sizes."""
    try:
        info = _read_json(path / "shard.json")
    except (OSError, ValueError):
        return False
    if info.get("config_key") != cfg.key():
        raise FirstError(
            f"{path} was made by a different extraction (config {info.get('config_key')} vs "
            f"{cfg.key()}); use another folder or the same settings"
        )
    return all(
        (path / name).is_file() and (path / name).stat().st_size == f["bytes"]
        for name, f in info["files"].items()
    )


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
            _write_file(tmp / name, data)
            info["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_file(
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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _map(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read-only memory map; zero-size arrays cannot be mapped and are returned empty."""
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class TopKStore:
    """A finished top-k store, memory-mapped. Examples are indexed in input order.

    `store.example(i)` / `store.get(id)` -> (ids int64 [n_pos, k], probs float32 [n_pos, k]).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / MANIFEST).exists():
            raise FirstError(
                f"{self.path} is not a finished top-k store (no {MANIFEST}): the extraction was "
                "interrupted or is still running; run it again to resume"
            )
        self.manifest = _read_json(self.path / MANIFEST)
        self.meta = _read_json(self.path / "meta.json")
        if self.manifest.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise FirstError(f"{self.path} is not a version-{FORMAT_VERSION} {FORMAT}")
        self.k: int = self.meta["k"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.positions: str = self.meta["positions"]
        self.layout = IdLayout(self.k, self.vocab_size)
        self.shard_names = [s["name"] for s in self.manifest["shards"]]
        counts = [s["n_examples"] for s in self.manifest["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"TopKStore({str(self.path)!r}, k={self.k}, vocab={self.vocab_size}, "
            f"examples={m['n_examples']}, positions={m['n_positions']}, {m['dtype']})"
        )

    def __getstate__(self) -> dict:  # DataLoader workers re-open the maps instead of copying
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    @property
    def ids(self) -> list[str]:
        """Example ids in input order."""
        if self._ids is None:
            self._ids = []
            for name in self.shard_names:
                self._ids += _read_json(self.path / name / "example_ids.json")
        return self._ids

    def index_of(self, example_id: str) -> int:
        if self._index is None:
            self._index = {eid: i for i, eid in enumerate(self.ids)}
        try:
            return self._index[str(example_id)]
        except KeyError:
            raise FirstError(f"example {example_id!r} is not in the store {self.path}") from None

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._shards:
            d = self.path / self.shard_names[s]
            files = self.manifest["shards"][s]["files"]
            n_ex = self.manifest["shards"][s]["n_examples"]
            n = files["values.bin"]["bytes"] // (2 * self.k)
            lay = self.layout
            self._shards[s] = {
                "lo": _map(d / "ids_lo.bin", lay.lo_dtype.str, (n, self.k)),
                "hi": _map(d / "ids_hi.bin", "u1", (n, lay.hi_bytes)),
                "vals": _map(d / "values.bin", "<f2", (n, self.k)),
                "offsets": np.fromfile(d / "offsets.bin", dtype="<i8"),
                "digests": np.fromfile(d / "digests.bin", dtype="<u8"),
            }
            if len(self._shards[s]["offsets"]) != n_ex + 1:
                raise FirstError(f"{self.shard_names[s]} of {self.path}: index does not match")
        return self._shards[s]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"example index {i} out of range 0..{len(self) - 1}")
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return s, i - int(self._starts[s])

    def _to_probs(self, vals: np.ndarray) -> np.ndarray:
        v = vals.astype(np.float32)
        return np.exp(v) if self.meta["dtype"] == "logprob-fp16" else v

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of example i: (ids int64 [n_pos, k], probs float32 [n_pos, k]), rank order."""
        s, j = self._locate(i)
        sh = self._shard(s)
        a, b = int(sh["offsets"][j]), int(sh["offsets"][j + 1])
        ids = unpack_ids(np.asarray(sh["lo"][a:b]), np.asarray(sh["hi"][a:b]), self.vocab_size)
        return ids, self._to_probs(np.asarray(sh["vals"][a:b]))

    def get(self, example_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the example with this id (see `example`)."""
        return self.example(self.index_of(example_id))

    def digest(self, i: int) -> int:
        s, j = self._locate(i)
        return int(self._shard(s)["digests"][j])

    def check_alignment(self, examples: Sequence[Example]) -> None:
        """Raise FirstError unless `examples` are exactly the data this store was made from."""
        got = content_hash(examples)
        want = self.meta["content_sha256"]
        if got != want:
            raise FirstError(
                f"store made from other data: {self.path} has content hash {want[:12]}, "
                f"the examples given hash to {got[:12]}"
            )

    def validate(self, check_hashes: bool = False, chunk: int = 1 << 20) -> None:
        """Scan every shard for NaN/inf, ids outside the vocabulary, probabilities outside [0, 1]
        and a broken index; with `check_hashes`, also compare file sha256s with the manifest."""
        logp = self.meta["dtype"] == "logprob-fp16"
        for s, name in enumerate(self.shard_names):
            where = f"{name} of {self.path}"
            d = self.path / name
            files = self.manifest["shards"][s]["files"]
            for fname, f in files.items():
                if not (d / fname).is_file() or (d / fname).stat().st_size != f["bytes"]:
                    raise FirstError(f"{where}: {fname} is missing or has the wrong size")
                if check_hashes:
                    h = hashlib.sha256((d / fname).read_bytes()).hexdigest()
                    if h != f["sha256"]:
                        raise FirstError(f"{where}: {fname} does not match its sha256")
            sh = self._shard(s)
            off = sh["offsets"]
            n = sh["vals"].shape[0]
            if off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
                raise FirstError(f"{where}: example offsets are inconsistent")
            for a in range(0, n, chunk):
                vals = np.asarray(sh["vals"][a : a + chunk]).astype(np.float32)
                if not np.isfinite(vals).all():
                    raise FirstError(f"{where}: NaN or inf values in the store")
                p = np.exp(vals) if logp else vals
                if logp and (vals > 1e-3).any():
                    raise FirstError(f"{where}: log-probabilities above 0")
                if (p < 0).any() or (p > 1.0).any():
                    raise FirstError(f"{where}: probabilities outside [0, 1]")
                if (p.sum(-1) > 1.0 + 2e-3 * self.k).any():
                    raise FirstError(f"{where}: top-k probabilities sum above 1")
                ids = unpack_ids(
                    np.asarray(sh["lo"][a : a + chunk]),
                    np.asarray(sh["hi"][a : a + chunk]),
                    self.vocab_size,
                )
                if ids.size and ids.max() >= self.vocab_size:
                    raise FirstError(
                        f"{where}: token id {int(ids.max())} outside the vocabulary "
                        f"(0..{self.vocab_size - 1})"
                    )


def collate(
    examples: Sequence[Example],
    store: TopKStore,
    pad_token_id: int = 0,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch with the teacher's stored top-k at each stored position.

    Returns input_ids [B, T], attention_mask [B, T] (long), target_mask [B, T] bool,
    labels [B, T] (next token at targets, -100 elsewhere), teacher_ids [B, T, k] long and
    teacher_probs [B, T, k] float32, zero where nothing is stored (not a target in a
    "targets" store; padding and the last token in an "all" store). With `check`, each
    example's digest must equal the stored one (the store was made from this data).
    """
    if len(examples) == 0:
        raise FirstError("collate got an empty batch")
    b = len(examples)
    t = max(len(ex["input_ids"]) for ex in examples)
    k = store.k
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    target = torch.zeros((b, t), dtype=torch.bool)
    labels = torch.full((b, t), -100, dtype=torch.long)
    t_ids = torch.zeros((b, t, k), dtype=torch.long)
    t_probs = torch.zeros((b, t, k), dtype=torch.float32)
    for j, ex in enumerate(examples):
        toks = torch.as_tensor(np.asarray(ex["input_ids"], dtype=np.int64))
        mask = torch.as_tensor(np.asarray(ex["target_mask"], dtype=bool))
        n = toks.numel()
        i = store.index_of(ex["id"])
        if check and store.digest(i) != example_digest(ex):
            raise FirstError(
                f"store made from other data: example {ex['id']!r} differs from the one in "
                f"{store.path}"
            )
        ids, probs = store.example(i)
        rows = torch.as_tensor(_rows_of(ex, store.positions))
        if rows.numel() != ids.shape[0]:
            raise FirstError(
                f"store made from other data: example {ex['id']!r} has {rows.numel()} "
                f"positions, the store {ids.shape[0]}"
            )
        input_ids[j, :n] = toks
        attention[j, :n] = 1
        target[j, :n] = mask
        tgt = torch.nonzero(mask[:-1]).squeeze(-1)
        labels[j, tgt] = toks[tgt + 1]
        t_ids[j, rows] = torch.from_numpy(ids)
        t_probs[j, rows] = torch.from_numpy(probs)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "target_mask": target,
        "labels": labels,
        "teacher_ids": t_ids,
        "teacher_probs": t_probs,
    }


# --------------------------------------------------------------------------------------------
# Throughput reference
# --------------------------------------------------------------------------------------------


def forward_throughput(
    model: torch.nn.Module,
    examples: Sequence[Example],
    batch_size: int = 8,
    autocast: bool | None = None,
    positions: str | None = "targets",
) -> float:
    """Tokens/s of the teacher's forward pass over `examples`, batched as `extract_topk` batches
    them: the reference for the extraction's throughput.

    `positions` ("targets" | "all") computes the LM head at the rows an extraction with those
    positions stores, as the extraction does (the same positions, dtype and batches: only the
    top-k, the normaliser and the store differ); None runs the plain `model(...)`, with full
    logits at every position (more LM-head work than an extraction of the targets does).
    """
    if positions is not None and positions not in POSITIONS:
        raise FirstError(f"unknown positions {positions!r}; choose 'targets', 'all' or None")
    parts = _model_parts(model)
    vocab = _vocab_sizes(model)[1]
    device = next(model.parameters()).device
    use_bf16 = _auto_bf16(device) if autocast is None else bool(autocast)
    lengths = np.array([len(ex["input_ids"]) for ex in examples], dtype=np.int64)
    was_training = model.training
    model.eval()
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode(), amp:
        for local in _batches(lengths, batch_size):
            ids, att, rows, n_tok = _pad_batch([examples[j] for j in local], positions or "all")
            ids, att, rows = ids.to(device), att.to(device), rows.to(device)
            if positions is None:
                model(input_ids=ids, attention_mask=att, use_cache=False)
            else:
                for _ in _logit_chunks(model, parts, ids, att, rows, vocab):
                    pass
            tokens += n_tok
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.train(was_training)
    return tokens / (time.perf_counter() - start)
