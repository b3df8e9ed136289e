"""The store's on-disk format: names, version, the config that keys it, complete shards.

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
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from first_lib.errors import FirstError
from first_lib.knowledge.disk import _read_json

FORMAT = "first-topk-store"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
DTYPES = ("prob-fp16", "logprob-fp16")  # what `values.bin` holds
POSITIONS = ("targets", "all")


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


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


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
