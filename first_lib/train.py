"""One training loop for every stage that trains: teacher fine-tuning, student fine-tuning (CE)
and student distillation (KL on the stored top-k). Driven by `accelerate`: one CPU process, one
GPU or many GPUs run the same code.

The loop only does bookkeeping; the maths lives in `first_lib.losses` (pure functions of tensors).
The decoder runs over the whole sequence, but the LM head (151,936 wide for Qwen) only at the
target rows, so a step costs the same whether the loss is CE or KD, and no [B, T, V] tensor is
ever built.

A checkpoint (`first_lib.checkpoint`) is written atomically every `save_every` optimizer steps,
and a re-run resumes from the last one, replaying the same data order. On a CPU, LoRA linears
and short attention take the fast paths of `first_lib.fastpath` (the same maths).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from first_lib import calibration, checkpoint, fastpath, losses, prefix
from first_lib.config import TrainConfig
from first_lib.errors import FirstError

Example = dict  # {"id": str, "input_ids": list[int], "target_mask": list[bool]}
TeacherLookup = Callable[[int], tuple[np.ndarray, np.ndarray]]  # i -> (ids [n,k], probs [n,k])


# ----------------------------------------------------------------------------- batching


def collate(
    examples: Sequence[Example], indices: Sequence[int], teacher: TeacherLookup | None, pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch. input_ids/attention_mask/target_mask/labels: [B, T];
    teacher_ids [B, T, k] (long) and teacher_probs [B, T, k] (float32) when `teacher` is given,
    zero where a position is not a target. labels[b, t] = input_ids[b, t+1] at targets, else -100.
    """
    rows = [examples[i] for i in indices]
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    target = torch.zeros((B, T), dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    if teacher is not None:
        k = teacher(indices[0])[0].shape[1]
        t_ids = torch.zeros((B, T, k), dtype=torch.long)
        t_probs = torch.zeros((B, T, k), dtype=torch.float32)
    for b, (i, r) in enumerate(zip(indices, rows, strict=True)):
        ids = torch.tensor(r["input_ids"], dtype=torch.long)
        n = len(ids)
        input_ids[b, :n] = ids
        attention[b, :n] = 1
        mask = torch.tensor(r["target_mask"], dtype=torch.bool)
        mask[n - 1] = False  # the last position has no next token
        target[b, :n] = mask
        pos = mask.nonzero().squeeze(1)
        labels[b, pos] = ids[pos + 1]
        if teacher is not None:
            ids_k, probs_k = teacher(i)
            if len(ids_k) != len(pos):
                raise FirstError(
                    f"store has {len(ids_k)} positions for example {r['id']!r} but the data has "
                    f"{len(pos)} targets: the store was made from other data"
                )
            t_ids[b, pos] = torch.as_tensor(ids_k, dtype=torch.long)
            t_probs[b, pos] = torch.as_tensor(probs_k, dtype=torch.float32)
    out.update(input_ids=input_ids, attention_mask=attention, target_mask=target, labels=labels)
    if teacher is not None:
        out.update(teacher_ids=t_ids, teacher_probs=t_probs)
    return out


BUCKET_POOL = 64  # batches per length-sorted pool (see `epoch_batches`)


def epoch_batches(
    n: int,
    batch_size: int,
    epoch: int,
    seed: int,
    lengths: Sequence[int] | None = None,
    pool: int = BUCKET_POOL,
) -> list[list[int]]:
    """The global batches of one epoch, a function of (n, batch_size, epoch, seed, lengths) only,
    so a resumed run replays them exactly. Every example appears once; the last batch may be short.

    Without `lengths`: a seeded permutation cut into chunks. With `lengths` (tokens per example),
    length-bucketed: the permutation is cut into pools of `pool` batches, each pool is sorted by
    length (stable, so equal lengths keep their random order) and cut into batches, and the order
    of all the batches is shuffled. A batch then holds examples of similar length and wastes
    little padding, while which examples meet and when still change from epoch to epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is None:
        return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    lengths = np.asarray(lengths)
    if len(lengths) != n:
        raise FirstError(f"epoch_batches: {len(lengths)} lengths for {n} examples")
    size = batch_size * max(1, pool)
    batches = []
    for start in range(0, n, size):
        chunk = order[start : start + size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ----------------------------------------------------------------------------- model


class TargetRowsLM(nn.Module):
    """Wraps a causal LM: decoder over all positions, LM head only at `target_mask` rows.

    forward(input_ids [B,T], attention_mask [B,T], target_mask [B,T], bottom=None) -> logits
    [N, V], where N is the number of target positions in row-major order. With `bottom`, the
    cached output of the frozen bottom `n_bottom` layers ([B, T, H], right-padded; see
    `first_lib.prefix`), only the top layers run. Going through this module's forward keeps
    DDP's gradient hooks in play.
    """

    def __init__(self, model: nn.Module, n_bottom: int = 0):
        super().__init__()
        self.model = model
        self.n_bottom = n_bottom

    def forward(self, input_ids, attention_mask, target_mask, bottom=None):
        lm = prefix.causal_lm(self.model)
        if bottom is None:
            hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
            hidden = hidden.last_hidden_state
        else:
            hidden = prefix.top_hidden(lm, bottom, attention_mask, self.n_bottom)
        return lm.get_output_embeddings()(hidden[target_mask])


def prepare_model(
    model: nn.Module, cfg: TrainConfig, bf16: bool = False, fused: bool = True
) -> nn.Module:
    """LoRA (frozen base in bf16 when `bf16`, fp32 adapters) or full fine-tuning (fp32 weights,
    bf16 autocast when `bf16`). Unless not `fused`, LoRA layers run as `fastpath.fuse_lora` and
    attention as `fastpath.use_training_attention` (the same maths, faster on CPU)."""
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        model = model.to(torch.bfloat16 if bf16 else torch.float32)
        n_layers = model.config.num_hidden_layers
        top = trained_layers(cfg, n_layers)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(cfg.lora_targets),
            layers_to_transform=list(range(n_layers - top, n_layers)),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        for p in model.parameters():  # adapters in fp32, the frozen base stays bf16
            if p.requires_grad:
                p.data = p.data.float()
        if fused:
            fastpath.fuse_lora(model)
    else:
        model = model.float()
        if not cfg.train_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
    return fastpath.use_training_attention(model) if fused else model


def trained_layers(cfg: TrainConfig, n_layers: int) -> int:
    """Decoder layers whose weights train: LoRA's top `lora_layers` (0: all), or all of them."""
    if cfg.lora_r > 0 and cfg.lora_layers > 0:
        return min(cfg.lora_layers, n_layers)
    return n_layers


def count_batch(tally, batch: dict[str, torch.Tensor], cfg: TrainConfig, forward_layers=None):
    """Add one micro-batch (still on the host) to a `flops.Tally`: its real tokens, its computed
    (padded) positions and the LM head at its target rows. `forward_layers` is where a path that
    runs only the top layers (a cached frozen prefix) says how many it ran; None: all."""
    tally.train(
        batch["attention_mask"].sum(1).tolist(),
        batch["input_ids"].numel(),
        int(batch["target_mask"].sum()),
        trained_layers(cfg, tally.shape.layers),
        lora=cfg.lora_r > 0,
        forward_layers=forward_layers,
    )


def finalize_model(model: nn.Module) -> nn.Module:
    """The trained model as a plain causal LM (LoRA merged) in bf16, ready to save."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if getattr(model.config, "_attn_implementation", None) == fastpath.ATTENTION:
        model.set_attn_implementation("sdpa")  # what a fresh process loads it with
    return model.to(torch.bfloat16)


# ----------------------------------------------------------------------------- loss


def step_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], cfg: TrainConfig
) -> torch.Tensor:
    """Loss of one micro-batch from target-row logits [N, V]."""
    mask = batch["target_mask"]
    if cfg.loss == "ce":
        per_row = losses.ce_rows(logits, batch["labels"][mask])
    else:
        probs = batch["teacher_probs"][mask]
        if cfg.transform != "none":
            probs = calibration.apply_transform(probs, cfg.transform, cfg.coef)
        per_row = losses.topk_kl_rows(
            logits, batch["teacher_ids"][mask], probs, normalize=cfg.kd_normalize
        )
    if per_row.numel() == 0:
        return logits.sum() * 0.0
    if cfg.kd_reduction == "sum_per_batch" and cfg.loss == "kd":
        return per_row.sum() / mask.shape[0]
    return per_row.mean()


# ----------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    examples: Sequence[Example],
    cfg: TrainConfig,
    pad_id: int,
    teacher: TeacherLookup | None = None,
    work_dir: Path | None = None,
    accelerator=None,
    progress: bool = True,
    stop_after: int | None = None,
    precision: str | None = None,
    log: Callable[[str], None] | None = None,
    prefix_reuse: bool = True,
    prefix_cache: str | Path | None = None,
) -> tuple[nn.Module, dict]:
    """Train `model` on `examples`; returns (finalized model, log dict).

    `teacher` (KD only) maps an example index to its stored top-k (ids, probs) at the target
    positions. `work_dir` holds the resumable checkpoint. `stop_after` stops after that many
    optimizer steps without finalising (used to test resumption). `log` reports a checkpoint
    that cannot be read (training then starts from the beginning).

    Batches are length-bucketed (`epoch_batches`). The log's `perf` (`flops.perf_record`) covers
    the optimizer steps this call ran (after a resume, not the ones before it) on this process:
    their model FLOPs, the seconds of the steps themselves (collate, forward, backward, optimizer;
    not loading, checkpoints or the progress bar) and the padding share of the micro-batches.

    With LoRA on the top L < N layers (and `prefix_reuse`), the frozen bottom's output for every
    example is computed once before the loop (read from the disk cache under `prefix_cache`
    when given, see `first_lib.prefix`) and each step runs the top L layers only; `perf` then
    counts the top layers' FLOPs and the build is recorded apart under the log's `prefix`.
    """
    from transformers import get_cosine_schedule_with_warmup

    from first_lib import device, flops

    if cfg.loss == "kd" and teacher is None:
        raise FirstError("KD training needs the teacher's top-k store")
    if len(examples) == 0:
        raise FirstError("no training examples")
    torch.manual_seed(cfg.seed)
    acc = accelerator or device.accelerator(device.resolve_precision(precision))
    precision = device.accelerator_precision(acc)
    tally = flops.Tally(flops.shape_of_config(model.config))  # this process's model work
    lengths = [len(ex["input_ids"]) for ex in examples]
    model = prepare_model(model, cfg, bf16=precision == "bf16")
    n_bottom = prefix.n_frozen(model, cfg.lora_layers) if cfg.lora_r > 0 and prefix_reuse else 0
    wrapped = TargetRowsLM(model, n_bottom)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    global_bs = cfg.batch_size * acc.num_processes
    per_epoch = math.ceil(len(examples) / global_bs)
    micro_total = math.ceil(per_epoch * cfg.epochs)
    total = math.ceil(micro_total / cfg.grad_accum)
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)
    wrapped, optimizer = acc.prepare(wrapped, optimizer)

    ckpt = work_dir / "checkpoint" if work_dir is not None else None
    step, history = 0, []
    if ckpt is not None and acc.is_main_process:
        checkpoint.recover_checkpoint(ckpt)
    acc.wait_for_everyone()
    if ckpt is not None:
        step, history = checkpoint.resume_checkpoint(ckpt, model, optimizer, scheduler, log)

    t_build = time.perf_counter()
    bottom = None
    if n_bottom:  # after resuming too: the states do not depend on the adapters
        seqs = [ex["input_ids"] for ex in examples]
        autocast = precision == "bf16"
        bottom = prefix.cached_bottom_states(model, seqs, n_bottom, autocast, prefix_cache, log)
    build_seconds = time.perf_counter() - t_build

    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"train {cfg.loss}",
        disable=not progress or not acc.is_main_process,
    )
    wrapped.train()
    micro = step * cfg.grad_accum
    epoch = micro // per_epoch
    while step < total:
        batches = epoch_batches(len(examples), global_bs, epoch, cfg.seed, lengths)
        start = micro - epoch * per_epoch
        for gb in batches[start:]:
            if step >= total:
                break
            if micro % cfg.grad_accum == 0:
                step_start = time.perf_counter()
            mine = gb[acc.process_index :: acc.num_processes] or gb[:1]
            batch = collate(examples, mine, teacher, pad_id)
            count_batch(tally, batch, cfg, forward_layers=tally.shape.layers - n_bottom)
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            states = None
            if bottom is not None:
                states, _ = prefix.pad_states([bottom[i] for i in mine])
            with acc.autocast():
                logits = wrapped(
                    batch["input_ids"], batch["attention_mask"], batch["target_mask"], states
                )
            loss = step_loss(logits.float(), batch, cfg) / cfg.grad_accum
            acc.backward(loss)
            micro += 1
            tokens += int(batch["attention_mask"].sum())
            if micro % cfg.grad_accum == 0:
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                history.append(round(float(loss.detach()) * cfg.grad_accum, 6))  # syncs
                tally.seconds += time.perf_counter() - step_start
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{history[-1]:.4f}", tok_s=f"{tokens / elapsed:.0f}")
                bar.update(1)
                if (
                    ckpt is not None
                    and acc.is_main_process
                    and (step % cfg.save_every == 0 or step == total)
                ):
                    checkpoint.save_checkpoint(
                        ckpt, acc.unwrap_model(wrapped).model, optimizer, scheduler, step, history
                    )
                if stop_after is not None and step >= stop_after:
                    bar.close()
                    raise KeyboardInterrupt(f"stopped after {step} steps (test hook)")
        epoch += 1
        micro = epoch * per_epoch
    bar.close()
    acc.wait_for_everyone()
    model = acc.unwrap_model(wrapped).model
    log = {
        "steps": step,
        "losses": history,
        "seconds": time.perf_counter() - t0,
        "prefix": {"bottom_layers": n_bottom, "build_seconds": build_seconds},
        "tokens": tokens,
        "num_processes": acc.num_processes,
        "precision": precision,
        "config": cfg.to_dict(),
        "perf": tally.record(precision, acc.device.type),
    }
    return finalize_model(model), log
