"""Reading a finished store: `TopKStore` (memory-mapped) and `collate` into training batches.

The student reads the teacher's top-k back batch by batch without the teacher in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from first_lib.errors import FirstError
from first_lib.knowledge.disk import _read_json
from first_lib.knowledge.examples import Example, _rows_of, content_hash, example_digest
from first_lib.knowledge.ids import IdLayout, unpack_ids
from first_lib.knowledge.layout import FORMAT, FORMAT_VERSION, MANIFEST


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
