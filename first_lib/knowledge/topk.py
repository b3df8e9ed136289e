"""The teacher's top-k over the vocabulary: batches, the forward pass, the fused log-sum-exp."""

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
FUSE_MIN_LOGITS = 1 << 20  # smaller chunks stay eager: not worth a compilation


def _lse_fused(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """`_lse_from_max` compiled into one kernel that reads the (bf16) logits once, instead of
    materialising an fp32 copy and passing over it three times (H100: 0.85 -> 0.92 of the
    forward pass; a 2-core AMX CPU: the normaliser of bf16 logits 2.3x faster). Eager if
    compiling is not possible on this machine. The first call compiles (seconds; cached on
    disk by torch for later processes)."""
    global _LSE_FUSED
    if _LSE_FUSED is None:
        try:
            _LSE_FUSED = torch.compile(_lse_from_max, dynamic=True)
            _LSE_FUSED(logits[:1], m[:1])  # compile now, so a failure falls back here
        except Exception as err:  # noqa: BLE001 - no compiler/triton: the eager maths is the same
            warnings.warn(
                f"extraction: torch.compile unavailable ({err}); using eager", stacklevel=2
            )
            _LSE_FUSED = _lse_from_max
    return _LSE_FUSED(logits, m)


def _topk_logits(
    logits: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`width` of logit rows [n, V] and their log-sum-exp, computed in fp32.

    Returns (top logits fp32 [n, width] sorted descending, token ids [n, width], lse fp32 [n]).
    The row maximum is the top-1 logit, so one pass of exp/sum gives the normaliser: fused into
    one compiled kernel on a GPU and for large bf16 chunks (no fp32 copy of them), else eager and
    in place on `logits` itself when fp32 (consumed) or on an fp32 copy of small bf16 ones.
    """
    top = torch.topk(logits, width, dim=-1, sorted=True)
    top_vals = top.values.float()
    m = top_vals[:, :1]
    low_precision = logits.dtype != torch.float32
    if logits.is_cuda or (low_precision and logits.numel() >= FUSE_MIN_LOGITS):
        return top_vals, top.indices, _lse_fused(logits, m)
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
