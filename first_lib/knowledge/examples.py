"""The examples a store is made from: their bytes, digests, content hash, checks and stored rows."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib.errors import FirstError

Example = Mapping[str, Any]  # {"id": str, "input_ids": list[int], "target_mask": list[bool]}


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
