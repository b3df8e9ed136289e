"""Online distillation steps (teacher in memory): TRL's GKDTrainer, written out, lean."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from first_lib.bench.config import BenchConfig
from first_lib.bench.shared import _dtypes


def _gkd_labels(batch) -> Any:
    """TRL's label convention: labels[t + 1] = token t + 1 where logits at t are trained."""
    import torch

    ids, tgt = batch["input_ids"], batch["target_mask"]
    shifted = torch.zeros_like(tgt)
    shifted[:, 1:] = tgt[:, :-1]
    return torch.where(shifted, ids, torch.full_like(ids, -100))


def _update(loss, student, optimizer, clip: float) -> float:
    """Backward, clip (when clip > 0), AdamW step: the end of every online step. Returns the loss."""
    import torch

    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def online_step_equivalent(student, teacher, batch, optimizer, bf16: bool, clip: float) -> float:
    """One online distillation step written out as TRL's ``GKDTrainer`` computes it with
    ``lmbda=0`` (no generation) and ``beta=0`` (forward KL): full logits of the student and of
    the teacher (no_grad) over the whole sequence, ``KL(P_T || P_S)`` over the full vocabulary at
    the trained positions, mean over positions; backward, clip, AdamW. Returns the loss."""
    import torch
    import torch.nn.functional as F

    dev = next(student.parameters()).device
    ids, att = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    labels = batch["gkd_labels"].to(dev)
    with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
        s = student(input_ids=ids, attention_mask=att).logits
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=att).logits
    log_s = F.log_softmax(s[:, :-1].float(), dim=-1)
    log_t = F.log_softmax(t[:, :-1].float(), dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True)
    mask = labels[:, 1:] != -100
    loss = kl[mask].sum() / mask.sum().clamp_min(1)
    return _update(loss, student, optimizer, clip)


def online_step_lean(student, teacher, batch, optimizer, bf16: bool, clip: float) -> float:
    """The cheapest online step we could write: both decoders run, but both LM heads only at the
    trained rows (`train.TargetRowsLM`), forward KL over the full vocabulary on those rows."""
    import torch
    import torch.nn.functional as F

    from first_lib.train import TargetRowsLM

    dev = next(student.parameters()).device
    ids, att = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    tgt = batch["target_mask"].to(dev)
    with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
        s = TargetRowsLM(student)(ids, att, tgt)
        with torch.no_grad():
            t = TargetRowsLM(teacher)(ids, att, tgt)
    loss = F.kl_div(
        F.log_softmax(s.float(), -1),
        F.log_softmax(t.float(), -1),
        reduction="batchmean",
        log_target=True,
    )
    return _update(loss, student, optimizer, clip)


def trl_available() -> bool:
    try:
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return False
    return True


def _gkd_step_fn(student, teacher, cfg: BenchConfig, work: Path) -> tuple[Callable, str]:
    """A step function running TRL's own ``GKDTrainer.training_step`` (forward KL, no
    generation), then clip, AdamW and the scheduler as `Trainer`'s loop does."""
    import trl
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from first_lib.models import make_tiny_tokenizer

    bf16 = _dtypes(cfg)[1]  # TRL's accelerator at the bench's precision (one state per process)
    args = GKDConfig(
        output_dir=str(work / "gkd"),
        lmbda=0.0,
        beta=0.0,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        bf16=bf16,
        use_cpu=cfg.device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        max_length=cfg.seq_len,
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    # GKDTrainer wants a tokenizer (for its collator and generation config); steps are fed
    # pre-tokenized batches, so a tiny one is enough.
    tok = make_tiny_tokenizer(["a b c d e f g"], vocab_size=300)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": "a"}]}])
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop
    trainer.model.train()

    def step(batch) -> float:
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": batch["gkd_labels"],
        }
        loss = trainer.training_step(trainer.model, inputs)
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad()
        return float(loss)

    return step, f"trl.experimental.gkd.GKDTrainer (trl {trl.__version__}, lmbda=0, beta=0)"
