"""Narrow token ids: how the k ids of a stored position are packed, and the bytes per position."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from first_lib.errors import FirstError


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
