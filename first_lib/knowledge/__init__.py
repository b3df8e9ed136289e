"""The teacher's knowledge: its top-k at every trained position, extracted into a store on disk."""

from __future__ import annotations

from first_lib.knowledge.coverage import COVERAGE_MAX_J, QUANTILES, RESERVOIR_ROWS
from first_lib.knowledge.examples import Example, content_hash, example_digest
from first_lib.knowledge.extract import extract_topk
from first_lib.knowledge.finalize import finalize_store
from first_lib.knowledge.ids import IdLayout, bytes_per_position, id_bits, pack_ids, unpack_ids
from first_lib.knowledge.layout import DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, POSITIONS
from first_lib.knowledge.store import TopKStore, collate
from first_lib.knowledge.throughput import forward_throughput
from first_lib.knowledge.topk import FUSE_MIN_LOGITS, bf16_is_fast

__all__ = ["extract_topk", "finalize_store", "TopKStore", "collate", "forward_throughput"]
__all__ += ["Example", "content_hash", "example_digest", "bf16_is_fast", "FUSE_MIN_LOGITS"]
__all__ += ["IdLayout", "bytes_per_position", "id_bits", "pack_ids", "unpack_ids"]
__all__ += ["DTYPES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "POSITIONS"]
__all__ += ["COVERAGE_MAX_J", "QUANTILES", "RESERVOIR_ROWS"]
