"""Helpers every measurement shares: the median, device sync, precision and training config."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from first_lib import device as device_mod
from first_lib.bench.config import BenchConfig


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _accelerator(cfg: BenchConfig):
    """The process's `Accelerator` at the bench's precision, as the pipeline would use it."""
    return device_mod.accelerator(cfg.precision)


def _dtypes(cfg: BenchConfig):
    """(weights dtype of loaded models, bf16 autocast?) at the bench's precision."""
    return device_mod.torch_dtype(cfg.precision), cfg.precision == "bf16"


def _train_config(cfg: BenchConfig, loss: str):
    from first_lib.train import TrainConfig

    return TrainConfig(
        loss=loss,
        lr=1e-5,
        epochs=1e6,  # max_steps decides
        batch_size=cfg.batch_size,
        warmup_ratio=0.0,
        transform="ts" if loss == "kd" else "none",
        coef=cfg.coef,
        seed=cfg.seed,
        save_every=10**9,
        max_steps=cfg.steps,
    )
