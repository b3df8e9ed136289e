"""The reference for extraction's speed: tokens/s of the teacher's forward pass alone."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from first_lib.errors import FirstError
from first_lib.knowledge.examples import Example
from first_lib.knowledge.layout import POSITIONS
from first_lib.knowledge.topk import (
    _auto_bf16,
    _batches,
    _logit_chunks,
    _model_parts,
    _pad_batch,
    _vocab_sizes,
)


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
