"""Evaluation: multiple-choice questions answered with one token, and their metrics.

For each question the model reads the rendered prompt (`first_lib.tasks.render_prompt`) and its
next-token distribution at the last position is read at the answer candidates (the letters
``a``..``e``, or `` yes`` / `` no``). Prediction = the candidate with the highest probability.
Confidence = that candidate's probability renormalised over the candidates (``"renorm"``, the
default) or its raw full-vocabulary probability (``"raw"``); both are kept in every record.

Records (one dict per question, JSON-ready)::

    {"id": str, "gold": int, "pred": int,
     "probs": [C] floats  (renormalised or raw, per the `confidence` switch),
     "raw_probs": [C] floats (full-vocabulary probabilities of the candidates),
     "confidence": float (= probs[pred]), "correct": bool}

`summarize` turns records into ECE (10 equal-width bins), accuracy, Trust = Acc - ECE, Brier,
NLL and percentile bootstrap intervals, using `first_lib.metrics`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from first_lib import fsio, metrics, prefix
from first_lib.errors import FirstError
from first_lib.tasks import (
    STYLES,
    CandidateIds,
    MCQuestion,
    encode,
    render_prompt,
    resolve_style,
)

CONFIDENCES = ("renorm", "raw")


@dataclass
class EvalConfig:
    """Settings of the evaluation stage."""

    style: str = field(
        default="auto",
        metadata={
            "help": "prompt style: plain, chat, or auto (chat if the tokenizer has a chat template)"
        },
    )
    confidence: str = field(
        default="renorm",
        metadata={
            "help": "renorm: best candidate's probability renormalised over the "
            "candidates; raw: its full-vocabulary probability"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "questions per forward pass"})
    max_length: int | None = field(
        default=None, metadata={"help": "cut longer prompts from the left (None: never)"}
    )
    autocast: bool = field(default=False, metadata={"help": "bf16 autocast (CPUs with AMX, GPUs)"})
    top_layers: int = field(
        default=0,
        metadata={
            "help": "run only the top N decoder layers from cached bottom states "
            "(first_lib.prefix; 0: the whole model)"
        },
    )
    n_bins: int = field(default=10, metadata={"help": "equal-width ECE bins (paper: 10)"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap replicates for intervals"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise FirstError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.confidence not in CONFIDENCES:
            raise FirstError(f"confidence must be one of {CONFIDENCES}, got {self.confidence!r}")
        if self.batch_size < 1:
            raise FirstError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 1:
            raise FirstError(f"max_length must be >= 1, got {self.max_length}")
        if self.top_layers < 0:
            raise FirstError(f"top_layers must be >= 0, got {self.top_layers}")
        if self.n_bins < 1 or self.n_boot < 1:
            raise FirstError(f"n_bins and n_boot must be >= 1, got {self.n_bins}, {self.n_boot}")


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_left(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> input_ids [B, L] int64 and attention_mask [B, L] int64."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s) :] = 1
    return ids, mask


def last_token_logprobs(
    model: Any, seqs: Sequence[list[int]], pad_id: int, autocast: bool = False
) -> torch.Tensor:
    """Next-token log-probabilities after each sequence: [B, V] float32.

    Left padding with explicit position ids (so padding does not shift positions), logits at
    the last position only (``logits_to_keep=1`` where the model takes it), log-softmax in fp32.
    """
    device = _model_device(model)
    ids, mask = _pad_left(seqs, pad_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"attention_mask": mask.to(device), "use_cache": False}
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids.to(device)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids.to(device), **kwargs).logits[:, -1, :]
    return logits.float().log_softmax(dim=-1)


def batched_logprobs(
    model: Any,
    seqs: Sequence[list[int]],
    pad_id: int,
    batch_size: int = 8,
    autocast: bool = False,
    top_layers: int = 0,
    prefix_cache: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices into `seqs`, next-token log-probabilities [b, V]) batch by batch, longest
    sequences first (little padding). With `top_layers` L < N, the frozen bottom's output is
    computed once for all sequences (or read from the disk cache under `prefix_cache`, see
    `first_lib.prefix`) and each batch runs the top L layers only."""
    n_bottom = prefix.n_frozen(model, top_layers)
    states = None
    if n_bottom:
        states = prefix.cached_bottom_states(model, seqs, n_bottom, autocast, prefix_cache, log)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if states is None:
            logp = last_token_logprobs(model, [seqs[i] for i in batch], pad_id, autocast)
        else:
            logp = prefix.last_token_logprobs(model, [states[i] for i in batch], n_bottom, autocast)
        yield batch, logp


def evaluate_multiple_choice(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    style: str = "auto",
    batch_size: int = 8,
    confidence: str = "renorm",
    progress: bool = True,
    autocast: bool = False,
    max_length: int | None = None,
    tally: Any = None,
    top_layers: int = 0,
    prefix_cache: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Score each question's answer candidates at the next token; one record per question.

    Questions are batched by length (longest first) to waste little padding; records come back
    in the order of ``questions``. The model is put in eval mode and restored afterwards.
    `top_layers`, `prefix_cache`: frozen-prefix reuse (see `batched_logprobs`). A
    `first_lib.flops.Tally` given as `tally` counts the forward passes (the layers run, the LM
    head at one row per question) and their seconds (which include building the frozen bottom's
    states when this evaluation had to compute them rather than read them).
    """
    if confidence not in CONFIDENCES:
        raise FirstError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    if batch_size < 1:
        raise FirstError(f"batch_size must be >= 1, got {batch_size}")
    style = resolve_style(tokenizer, style)
    cands = CandidateIds(tokenizer, style)
    seqs, cand_ids = [], []
    for q in questions:
        prompt = render_prompt(q, tokenizer, style)
        ids = encode(tokenizer, prompt, style)
        seqs.append(ids[-max_length:] if max_length else ids)
        cand_ids.append(cands(q, prompt))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    device = _model_device(model).type
    layers = top_layers if prefix.n_frozen(model, top_layers) else None
    records: list[dict[str, Any] | None] = [None] * len(seqs)
    was_training = getattr(model, "training", False)
    model.eval()
    bar = tqdm(total=len(seqs), unit="q", desc="evaluate", disable=not progress)
    reuse = {"top_layers": top_layers, "prefix_cache": prefix_cache, "log": log}
    try:
        with torch.inference_mode():
            batches = batched_logprobs(model, seqs, pad_id, batch_size, autocast, **reuse)
            while True:
                with tally.clock(device) if tally is not None else contextlib.nullcontext():
                    item = next(batches, None)
                    if item is None:
                        break
                    batch, logp = item
                    for row, i in enumerate(batch):
                        records[i] = _record(questions[i], logp[row, cand_ids[i]], confidence)
                if tally is not None:
                    lengths = [len(seqs[i]) for i in batch]
                    computed = len(batch) * max(lengths)
                    tally.forward(lengths, computed, head_rows=len(batch), layers=layers)
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return records  # type: ignore[return-value]


def _record(q: MCQuestion, cand_logp: torch.Tensor, confidence: str) -> dict[str, Any]:
    """One record from the candidates' log-probabilities [C] (float32)."""
    raw = cand_logp.exp()
    renorm = cand_logp.softmax(dim=-1)
    probs = renorm if confidence == "renorm" else raw
    pred = int(torch.argmax(cand_logp))
    return {
        "id": q.id,
        "gold": int(q.gold),
        "pred": pred,
        "probs": [float(p) for p in probs],
        "raw_probs": [float(p) for p in raw],
        "confidence": float(probs[pred]),
        "correct": pred == q.gold,
    }


def summarize(
    records: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0, n_bins: int = 10
) -> dict[str, Any]:
    """Metrics of evaluation records (fractions, not percentages).

    Returns ``{"n", "ece", "acc", "trust", "ece_ci", "acc_ci", "trust_ci", "brier", "nll",
    "mean_confidence", "ece_equal_mass", "smece", "aurc"}``; the intervals are 95% percentile
    bootstrap intervals over questions (``n_boot`` replicates, ``seed``). ``ece_equal_mass``,
    ``smece`` (smooth ECE) and ``aurc`` (area under the risk-coverage curve): see
    `first_lib.metrics`. Brier and NLL use each record's ``probs`` (questions with
    fewer candidates are padded with zeros, which changes neither score).
    """
    if not records:
        raise FirstError("no evaluation records to summarize")
    conf = np.array([r["confidence"] for r in records], dtype=np.float64)
    correct = np.array([bool(r["correct"]) for r in records], dtype=np.float64)
    gold = np.array([r["gold"] for r in records], dtype=np.int64)
    width = max(len(r["probs"]) for r in records)
    probs = np.zeros((len(records), width))
    for i, r in enumerate(records):
        probs[i, : len(r["probs"])] = r["probs"]

    def trust(c: np.ndarray, k: np.ndarray) -> float:
        return metrics.trust_score(metrics.accuracy(k), metrics.ece(c, k, n_bins))

    ece = metrics.ece(conf, correct, n_bins)
    acc = metrics.accuracy(correct)
    boot = {"n_boot": n_boot, "seed": seed}
    return {
        "n": len(records),
        "ece": ece,
        "acc": acc,
        "trust": metrics.trust_score(acc, ece),
        "ece_ci": list(metrics.bootstrap_ci(metrics.ece, conf, correct, n_bins=n_bins, **boot)),
        "acc_ci": list(metrics.bootstrap_ci(metrics.accuracy, correct, **boot)),
        "trust_ci": list(metrics.bootstrap_ci(trust, conf, correct, **boot)),
        "brier": metrics.brier(probs, gold),
        "nll": metrics.nll(probs, gold),
        "mean_confidence": float(conf.mean()),
        "ece_equal_mass": metrics.ece_equal_mass(conf, correct, n_bins),
        "smece": metrics.smooth_ece(conf, correct),
        "aurc": metrics.aurc(conf, correct),
    }


# --------------------------------------------------------------------------- the stage


def save_records(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSON lines (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read records written by `save_records`."""
    path = Path(path)
    if not path.is_file():
        raise FirstError(f"no evaluation records at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def run_evaluation(
    config: EvalConfig,
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    out_dir: str | Path | None = None,
    progress: bool = True,
    tally: Any = None,
    prefix_cache: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The evaluation stage: records and metrics; with ``out_dir``, also written there as
    ``records.jsonl`` and ``metrics.json`` (the metrics with the config that made them).
    `tally`: see `evaluate_multiple_choice`; `prefix_cache`: where bottom states are cached when
    ``config.top_layers`` asks for reuse."""
    records = evaluate_multiple_choice(
        model,
        tokenizer,
        questions,
        style=config.style,
        batch_size=config.batch_size,
        confidence=config.confidence,
        progress=progress,
        autocast=config.autocast,
        max_length=config.max_length,
        tally=tally,
        top_layers=config.top_layers,
        prefix_cache=prefix_cache,
        log=log,
    )
    summary = summarize(records, n_boot=config.n_boot, seed=config.seed, n_bins=config.n_bins)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_records(records, out / "records.jsonl")
        payload = {**summary, "config": asdict(config)}
        fsio.atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2) + "\n")
    return records, summary
