"""Seconds of the calibration coefficient search on 10^6 stored positions."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from first_lib.bench.shared import _median


def measure_coefficient_search(n: int, k: int, reps: int, warmup: int, seed: int) -> dict[str, Any]:
    """Seconds (wall and CPU) of `search_coefficient` on n positions x k: TS and LS interleaved,
    median of `reps` after `warmup`. The probabilities are sorted Dirichlet draws (top-k of a
    k+1-outcome distribution, so rows sum below 1) and the gold rank is uniform on -1..k-1."""
    from first_lib.calibration import search_coefficient

    rng = np.random.default_rng(seed)
    draws = rng.dirichlet(np.full(k + 1, 0.3), size=n)[:, :k].astype(np.float32)
    probs = -np.sort(-draws, axis=1)
    gold = rng.integers(-1, k, size=n)
    wall: dict[str, list[float]] = {"ts": [], "ls": []}
    cpu: dict[str, list[float]] = {"ts": [], "ls": []}
    for r in range(warmup + reps):
        for kind in ("ts", "ls") if r % 2 == 0 else ("ls", "ts"):
            t0, c0 = time.perf_counter(), time.process_time()
            search_coefficient(probs, gold, kind=kind)
            if r >= warmup:
                wall[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
    return {
        "coefficient_search_seconds": _median(wall["ts"]),
        "coefficient_search_seconds_ls": _median(wall["ls"]),
        "coefficient_search_cpu_seconds": _median(cpu["ts"]),
        "coefficient_search_cpu_seconds_ls": _median(cpu["ls"]),
        "coefficient_search_positions": n,
    }
