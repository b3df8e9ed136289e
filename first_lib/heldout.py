"""Did training work, where no test set can tell? The training objective on held-out data,
tuned against untuned, example by example.

A tuned model is checked against its untuned start on the test questions when the untuned
model is evaluated there (`first_lib.verdicts.training_checks`, accuracy, paired). That check
needs the test to be the task the model trained on: in the out-of-domain setting the models train
on instructions and are tested on tasks they never saw, and a run made with `baselines=false`
evaluates no untuned model at all. There the question "did it learn?" is asked where the answer
lives, on the validation split of its own training data: each example's loss under the training
objective (`train.step_loss` on that example alone: cross-entropy on the response for the
teacher and the fine-tuned student, the KL to the stored, re-calibrated top-k for a distilled
one), once for the tuned model and once for the untuned one it started from, on the same
examples. A model learned when its loss fell, paired over the examples
(`first_lib.verdicts.held_out_check`).

The forward is training's (`train.TargetRowsLM`: the decoder over the sequence, the LM head at
the target rows only) under the run's precision, without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from first_lib import train
from first_lib.config import TrainConfig
from first_lib.errors import FirstError


def example_losses(
    model: nn.Module,
    examples: Sequence[dict],
    cfg: TrainConfig,
    pad_id: int,
    teacher: train.TeacherLookup | None = None,
    batch_size: int = 8,
    autocast: bool = False,
    tally=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(loss, targets) per example, float64 [n] and int64 [n]: the training objective of `cfg`
    (`train.step_loss`) on each example as a batch of its own, and its number of target
    positions (an example without one: loss NaN). Examples are batched by length for the
    forward, on the model's device; the loss is split by example after it.

    `teacher`: the stored top-k of each example (KD only), as in `train.train`. `autocast`:
    bf16 autocast, as training ran. `tally`: a `first_lib.flops.Tally` that counts and times
    the forward passes."""
    from first_lib import flops

    if cfg.loss == "kd" and teacher is None:
        raise FirstError("the KD objective needs the teacher's top-k store")
    if len(examples) == 0:
        raise FirstError("no held-out examples")
    device = next(model.parameters()).device
    tally = tally if tally is not None else flops.Tally(flops.shape_of_config(model.config))
    wrapped = train.TargetRowsLM(model).eval()
    order = np.argsort([len(ex["input_ids"]) for ex in examples], kind="stable")
    loss = np.full(len(examples), np.nan)
    targets = np.zeros(len(examples), dtype=np.int64)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size].tolist()
        batch = train.collate(examples, idx, teacher, pad_id)
        lengths = batch["attention_mask"].sum(1).tolist()
        tally.forward(lengths, batch["input_ids"].numel(), int(batch["target_mask"].sum()))
        batch = {k: v.to(device) for k, v in batch.items()}
        with tally.clock(device.type), torch.inference_mode(), amp:
            logits = wrapped(batch["input_ids"], batch["attention_mask"], batch["target_mask"])
        logits = logits.float()
        counts = batch["target_mask"].sum(1).tolist()
        offsets = np.cumsum([0, *counts])
        for b, i in enumerate(idx):
            targets[i] = counts[b]
            if counts[b]:
                one = {k: v[b : b + 1] for k, v in batch.items()}
                loss[i] = float(train.step_loss(logits[offsets[b] : offsets[b + 1]], one, cfg))
    return loss, targets


def compare_models(tuned: dict, untuned: dict) -> dict:
    """One check's record from the two passes (`example_losses` of the tuned and of the untuned
    model over the same examples, each {"ids", "loss", "targets"}): {"ids", "tuned", "untuned",
    "targets", "mean_drop"}; `mean_drop` is the mean over examples of untuned - tuned (nats per
    target position; positive: the tuned model fits held-out data of its task better)."""
    if list(tuned["ids"]) != list(untuned["ids"]):
        raise FirstError("the tuned and untuned losses are over different examples")
    if list(tuned["targets"]) != list(untuned["targets"]):
        raise FirstError("the tuned and untuned losses count different target positions")
    a, b = np.asarray(tuned["loss"], float), np.asarray(untuned["loss"], float)
    keep = np.isfinite(a) & np.isfinite(b)
    if not keep.any():
        raise FirstError("no held-out example has a target position")
    return {
        "ids": [str(i) for i, k in zip(tuned["ids"], keep, strict=True) if k],
        "tuned": a[keep].round(6).tolist(),
        "untuned": b[keep].round(6).tolist(),
        "targets": np.asarray(tuned["targets"])[keep].astype(int).tolist(),
        "mean_drop": float(np.mean(b[keep] - a[keep])),
    }
