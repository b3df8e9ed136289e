"""Random-sampling knowledge distillation (RS-KD), after Anshumann et al. (2025).

Instead of the teacher's k most likely tokens, store N tokens *drawn* from a proposal q (here
the teacher's own distribution p, unless another is given) with their importance weights. At a
position, with draws x_1..x_N ~ q, the sparse target is

    p_hat(v) = (1/N) * sum_n [x_n = v] * p(x_n) / q(x_n),

an unbiased estimate of p: E[p_hat(v)] = p(v) for every token v of the vocabulary. With q = p
the weights are 1 and p_hat(v) is the share of draws that picked v; it sums to exactly 1.

The student's loss is the cross-entropy of its full-vocabulary softmax s = softmax(z) against
the sparse target, -sum_v p_hat(v) log s(v). Its gradient in the logits is
s * sum_v p_hat(v) - p_hat, whose expectation is s - p: the gradient of KL(p || s) over the
whole vocabulary, which the top-k loss only approximates (its target drops the tail mass).

`sparse_targets` draws and aggregates (ids and weights, sorted by weight, zero-padded to N
slots, so a store of N draws has the same width as a top-N store); `sampled_kd_rows` is the
loss; `sample_teacher` runs a teacher over tokenized examples and draws at every stored
position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from first_lib.errors import FirstError

__all__ = ["sparse_targets", "dense_target", "sampled_kd_rows", "sample_teacher"]


def sparse_targets(
    probs: torch.Tensor,
    n_draws: int,
    generator: torch.Generator | None = None,
    proposal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `n_draws` tokens per row from `proposal` (default: `probs` itself) and aggregate.

    Args:
        probs: [n, V] the teacher's probabilities (rows sum to 1).
        n_draws: N, draws per row (with replacement).
        generator: the random stream (seeded by the caller, for a reproducible store).
        proposal: [n, V] q, positive wherever probs is (None: q = probs).

    Returns:
        (ids long [n, N], weights float32 [n, N]): the distinct drawn tokens first, sorted by
        weight (descending), then zero-weight padding slots; weights are p_hat of the module
        docstring, (count / N) * p / q.
    """
    if probs.dim() != 2:
        raise FirstError(f"probs must be [n, V], got {tuple(probs.shape)}")
    if n_draws < 1:
        raise FirstError(f"n_draws must be at least 1, got {n_draws}")
    p = probs.float()
    q = p if proposal is None else proposal.float()
    if q.shape != p.shape:
        raise FirstError(f"proposal {tuple(q.shape)} must have the shape of probs {tuple(p.shape)}")
    if ((q <= 0) & (p > 0)).any():
        raise FirstError("the proposal must be positive wherever the teacher's probability is")
    n, vocab = p.shape
    width = min(n_draws, vocab)
    if n == 0:
        return torch.zeros((0, width), dtype=torch.long), torch.zeros((0, width))
    draws = torch.multinomial(q, n_draws, replacement=True, generator=generator)  # [n, N]
    ratio = p.gather(1, draws) / q.gather(1, draws)
    dense = torch.zeros_like(p).scatter_add_(1, draws, ratio / n_draws)  # [n, V]
    weights, ids = torch.topk(dense, width, dim=-1, sorted=True)
    return ids, weights


def dense_target(ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """The sparse target as a dense [n, V] tensor (for tests and inspection)."""
    return torch.zeros((ids.shape[0], vocab)).scatter_add_(1, ids, weights.float())


def sampled_kd_rows(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-row RS-KD loss: -sum_j weights_j * log softmax(logits)[ids_j], in float32.

    Args:
        logits: [N, V] student logits of the rows that count.
        ids: [N, W] long, the drawn tokens (padding slots have weight 0).
        weights: [N, W] their importance weights (p_hat).

    Returns:
        [N] float32. Up to a constant in the logits, this is `first_lib.losses.topk_kl_rows`
        with normalize="full" on the same (ids, weights): training the pipeline's loop with
        `kd_normalize="full"` on a sampled store minimises this loss.
    """
    if logits.dim() != 2 or ids.shape != weights.shape or ids.shape[0] != logits.shape[0]:
        raise FirstError(
            f"expected logits [N, V], ids and weights [N, W]; got {tuple(logits.shape)}, "
            f"{tuple(ids.shape)}, {tuple(weights.shape)}"
        )
    log_s = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.long())
    return -(weights.float() * log_s).sum(-1)


def sample_teacher(
    model: torch.nn.Module,
    examples: Sequence[dict],
    draws: Sequence[int],
    seed: int = 0,
    batch_size: int = 8,
    autocast: bool = False,
) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Run the teacher over `examples` and draw from its full softmax at every target position.

    Every entry of `draws` (N) gets draws of its own (independent stores), from one forward
    pass. Returns {N: [(ids int64 [n_pos, N], weights float32 [n_pos, N]) per example, in
    input order]}. The random stream is seeded by `seed` and consumed in a fixed order (batches
    of `batch_size`, longest examples first), so the same call gives the same store.
    """
    from first_lib.knowledge.examples import _rows_of
    from first_lib.knowledge.topk import _batches, _logit_chunks, _model_parts, _pad_batch

    draws = sorted({int(n) for n in draws})
    if not draws or draws[0] < 1:
        raise FirstError(f"draws must be positive integers, got {list(draws)}")
    device = next(model.parameters()).device
    parts = _model_parts(model)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    lengths = np.array([len(ex["input_ids"]) for ex in examples])
    out: dict[int, list] = {n: [None] * len(examples) for n in draws}
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), amp:
            for local in _batches(lengths, batch_size):
                exs = [examples[j] for j in local]
                ids, att, rows, _ = _pad_batch(exs, "targets")
                ids, att, rows = (x.to(device) for x in (ids, att, rows))
                chunks = [
                    torch.softmax(c.float(), dim=-1)
                    for c in _logit_chunks(model, parts, ids, att, rows, vocab)
                ]
                probs = torch.cat(chunks) if chunks else torch.zeros((0, vocab), device=device)
                if not torch.isfinite(probs).all():
                    raise FirstError("the teacher produced NaN or inf logits; no store written")
                for n in draws:
                    t_ids, t_w = sparse_targets(probs, n, gen)
                    t_ids, t_w = t_ids.cpu().numpy(), t_w.cpu().numpy()
                    start = 0
                    for j, ex in zip(local, exs, strict=True):
                        m = len(_rows_of(ex, "targets"))
                        out[n][j] = (t_ids[start : start + m], t_w[start : start + m])
                        start += m
    finally:
        model.train(was_training)
    return out
