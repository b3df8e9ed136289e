"""The teacher's top-k over the vocabulary: batches, the forward, the fused top-k and normaliser."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from first_lib import prefix
from first_lib.knowledge.examples import Example, _rows_of


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 runs natively on `device` (see `first_lib.device.bf16_is_fast`)."""
    from first_lib import device as device_mod

    return device_mod.bf16_is_fast(device)


def _auto_bf16(device: torch.device) -> bool:
    """bf16 autocast when no choice is given: the precision $FIRST_PRECISION or auto resolves."""
    from first_lib import device as device_mod

    return device_mod.resolve_precision(None, device) == "bf16"


def _model_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder body returning last_hidden_state, LM head) when the model has them, else None.

    Unwraps PEFT (LoRA layers stay inside the base model). Models with a final logit
    soft-capping use the full forward instead.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        return None
    if isinstance(body, torch.nn.Module) and isinstance(head, torch.nn.Module):
        return body, head
    return None


def _vocab_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """(input embedding rows, output logits width) of a causal LM."""
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    v_in = int(emb.num_embeddings)
    if out is not None and hasattr(out, "out_features"):
        v_out = int(out.out_features)
    elif out is not None:
        v_out = int(out.weight.shape[0])
    else:
        v_out = int(getattr(model.config, "vocab_size", v_in))
    return v_in, v_out


def _chunk_rows(vocab: int, device: torch.device | None = None) -> int:
    """Rows per LM-head chunk: about 2^25 logits (128 MB in fp32) at a time on a CPU, 2^28 on a
    GPU, where fewer, larger launches keep it busy (measured on an H100: extraction went from
    0.82 to 0.85 of the forward pass's tokens/s, see first_lib/bench.py)."""
    budget = 2**28 if device is not None and device.type == "cuda" else 2**25
    return max(1, budget // vocab)


def _lse_from_max(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(logits))) per row [n] in fp32, given the row maxima m [n, 1] (fp32)."""
    return (logits.float() - m).exp().sum(-1).log() + m.squeeze(-1)


_LSE_FUSED: Any = None  # torch.compile(_lse_from_max), built on first use
FUSE_MIN_LOGITS = 1 << 20  # smaller CPU chunks stay eager: not worth a compilation


def _compile_or_eager(fn: Any, *example: torch.Tensor) -> Any:
    """`fn` compiled by torch.compile (dynamic shapes) and run once on `example` (two rows: torch
    specialises sizes 0 and 1, and would compile again for the first real chunk), so that a
    failure shows here; `fn` itself, with a warning, where this machine cannot compile (the
    eager maths is the same). Compiling takes seconds, cached on disk by torch."""
    try:
        compiled = torch.compile(fn, dynamic=True)
        compiled(*example)
        return compiled
    except Exception as err:  # noqa: BLE001 - no compiler/triton
        warnings.warn(f"extraction: torch.compile unavailable ({err}); using eager", stacklevel=3)
        return fn


def _lse_fused(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """`_lse_from_max` compiled into one kernel that reads the (bf16) logits once, instead of
    materialising an fp32 copy and passing over it three times (H100: 0.85 -> 0.92 of the
    forward pass)."""
    global _LSE_FUSED
    if _LSE_FUSED is None:
        _LSE_FUSED = _compile_or_eager(_lse_from_max, logits[:2], m[:2])
    return _LSE_FUSED(logits, m)


TOPK_GROUP = 64  # logits per group of the two-stage top-k on a CPU (`_grouped_topk`)

_STATS_FUSED: Any = None  # torch.compile(_row_stats), built on first use


def _row_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logits [n, V]: the maxima of its groups of TOPK_GROUP consecutive logits (fp32
    [n, V // group]; a tail of V % group logits is not grouped) and its log-sum-exp (fp32 [n]).
    The row maximum, the shift of the log-sum-exp, is the largest group maximum (or tail logit)."""
    n, v = logits.shape
    group = TOPK_GROUP
    main = v - v % group
    maxima = logits[:, :main].reshape(n, main // group, group).amax(-1).float()
    m = maxima.amax(-1, keepdim=True)
    if main < v:
        m = torch.maximum(m, logits[:, main:].amax(-1, keepdim=True).float())
    return maxima, _lse_from_max(logits, m)


def _row_stats_fused(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_row_stats` compiled into one kernel that reads each row twice while it sits in the
    cache (a row of the real vocabulary is 0.6 MB in fp32), in either precision, instead of
    eager passes over the whole chunk in memory (2-core AVX2 CPU, 128 rows of 151,936: 11 ms
    against ~45 ms for eager top-k and normaliser)."""
    global _STATS_FUSED
    if _STATS_FUSED is None:
        _STATS_FUSED = _compile_or_eager(_row_stats, logits[:2])
    return _STATS_FUSED(logits)


def _grouped_topk(
    logits: torch.Tensor, maxima: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`width` of each row of logits [n, V] from its group maxima [n, G] (`_row_stats`):
    the `width` groups with the largest maxima, and the ungrouped tail, hold the row's
    `width` largest values, so `torch.topk` runs over width * group + (V % group) candidates
    instead of V. (If a top value lay in an unselected group, each of the `width` selected
    groups would hold a value at least as large, distinct elements all: then it is not among
    the top `width`, or it ties with values that are.) Returns (values in the logits' dtype
    [n, width] descending, token ids [n, width]); the values are torch.topk's, and so are
    the ids but where values tie (either tied token is a top-`width` token)."""
    n, v = logits.shape
    n_groups, group = maxima.shape[1], TOPK_GROUP
    if n_groups <= 2 * width:  # a small vocabulary: nothing to skip
        top = torch.topk(logits, width, dim=-1, sorted=True)
        return top.values, top.indices
    picked = torch.topk(maxima, width, dim=-1, sorted=False).indices  # [n, width]
    offsets = torch.arange(group, device=logits.device)
    cols = (picked.unsqueeze(-1) * group + offsets).reshape(n, width * group)
    if n_groups * group < v:
        tail = torch.arange(n_groups * group, v, device=logits.device).expand(n, -1)
        cols = torch.cat([cols, tail], 1)
    top = torch.topk(logits.gather(1, cols), width, dim=-1, sorted=True)
    return top.values, cols.gather(1, top.indices)


def _topk_logits(
    logits: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`width` of logit rows [n, V] and their log-sum-exp, computed in fp32.

    Returns (top logits fp32 [n, width] sorted descending, token ids [n, width], lse fp32 [n]).
    Three paths, the same numbers (to fp32 summation order; ids differ only between tied
    logits):
    - a GPU: `torch.topk`, then the normaliser in one compiled kernel (`_lse_fused`) shifted
      by the top-1 logit;
    - a large chunk on a CPU (>= FUSE_MIN_LOGITS logits): one compiled pass gives each row's
      group maxima and normaliser (`_row_stats_fused`), and top-k runs over the candidate
      groups only (`_grouped_topk`), where torch.topk over the vocabulary costs as much as
      the LM head of a thin model;
    - small chunks: eager, `torch.topk` and the normaliser in place on `logits` itself when
      fp32 (consumed) or on an fp32 copy of bf16 ones.
    """
    if logits.is_cuda:
        top = torch.topk(logits, width, dim=-1, sorted=True)
        top_vals = top.values.float()
        return top_vals, top.indices, _lse_fused(logits, top_vals[:, :1])
    if logits.numel() >= FUSE_MIN_LOGITS:
        maxima, lse = _row_stats_fused(logits)
        values, ids = _grouped_topk(logits, maxima, width)
        return values.float(), ids, lse
    top = torch.topk(logits, width, dim=-1, sorted=True)
    top_vals = top.values.float()
    m = top_vals[:, :1]
    work = logits.float()  # a copy for bf16 logits; the same tensor (consumed) for fp32 ones
    lse = work.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
    return top_vals, top.indices, lse


def _logit_chunks(
    model: torch.nn.Module,
    parts: tuple[torch.nn.Module, torch.nn.Module] | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    flat_rows: torch.Tensor,
    vocab: int,
    bottom: torch.Tensor | None = None,
    n_bottom: int = 0,
) -> Iterator[torch.Tensor]:
    """The teacher's logits [n, V] at the positions `flat_rows` [N] (indices b * T + t into
    [B, T]), chunk by chunk: the forward pass that extraction rides on. With (body, head) the
    LM head is applied to the selected rows only; else the full forward's logits are selected.
    With `bottom`, the cached output of the frozen bottom `n_bottom` layers ([B, T, H],
    right-padded, see `first_lib.prefix`), only the top layers run."""
    if parts is not None:
        body, head = parts
        if bottom is not None:
            hidden = prefix.top_hidden(model, bottom, attention_mask, n_bottom)
        else:
            out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_rows)  # [N, H]
        project = head
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, flat_rows)  # [N, V]
        project = None
    step = _chunk_rows(vocab, rows.device)
    for s in range(0, rows.shape[0], step):
        chunk = rows[s : s + step]
        yield project(chunk) if project is not None else chunk


def _teacher_topk(
    model: torch.nn.Module,
    parts: tuple[torch.nn.Module, torch.nn.Module] | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    flat_rows: torch.Tensor,
    width: int,
    vocab: int,
    bottom: torch.Tensor | None = None,
    n_bottom: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-`width` at the positions `flat_rows` [N] (indices b * T + t into [B, T]).

    With `bottom` (cached states of the frozen bottom `n_bottom` layers), only the top layers run.
    Returns (top logits fp32 [N, width], ids [N, width], lse fp32 [N]).
    """
    tops, idxs, lses = [], [], []
    chunks = _logit_chunks(
        model, parts, input_ids, attention_mask, flat_rows, vocab, bottom, n_bottom
    )
    for logits in chunks:
        t, i, lse = _topk_logits(logits, width)
        tops.append(t)
        idxs.append(i)
        lses.append(lse)
    if not tops:
        empty = torch.zeros((0, width), dtype=torch.float32, device=input_ids.device)
        return empty, empty.long(), empty[:, 0]
    return torch.cat(tops), torch.cat(idxs), torch.cat(lses)


def _batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Local example indices grouped into batches, longest first (less padding, early OOM)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _pad_batch(
    exs: list[Example], positions: str, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-padded (input_ids [B, T], attention_mask [B, T], flat row index [N], n_tokens).

    The row index lists the stored positions as b * T + t, example by example: computed on the
    host, so selecting them on the device needs no synchronisation.
    """
    lens = [len(ex["input_ids"]) for ex in exs]
    b, t = len(exs), max(lens)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    att = np.zeros((b, t), dtype=bool)
    rows = np.zeros((b, t), dtype=bool)
    for j, ex in enumerate(exs):
        ids[j, : lens[j]] = ex["input_ids"]
        att[j, : lens[j]] = True
        rows[j, _rows_of(ex, positions)] = True
    flat = torch.from_numpy(np.flatnonzero(rows))
    return torch.from_numpy(ids), torch.from_numpy(att).long(), flat, sum(lens)
