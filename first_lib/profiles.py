"""Profiles: one named scale for every stage, from tiny random models to the paper's Llama runs.

- `tiny`: random tiny Qwen2-architecture models and a small slice of real data. For tests only:
  its numbers say nothing about FIRST.
- `cpu`: the real Qwen2.5-Coder 1.5B teacher and 0.5B student on task subsets, sized for a
  2-core CPU (the default; the book's numbers).
- `gpu`: the same pair on the full data with the paper's hyper-parameters.
- `paper`: the paper's model pairs from the hub, multi-GPU, the paper's hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from first_lib.errors import FirstError
from first_lib.train import TrainConfig


@dataclass(frozen=True)
class Profile:
    name: str
    teacher: str  # an asset name, hub id, local path, or "tiny:teacher"
    student: str
    n_train: int | None  # None: the whole split
    n_val: int | None
    n_test: int | None
    teacher_train: TrainConfig
    student_train: TrainConfig
    k: int = 5
    style: str = "auto"  # prompt style: plain | chat | auto
    max_length: int = 512
    extract_batch: int = 8
    eval_batch: int = 8
    n_boot: int = 1000
    seed: int = 0
    params_b: tuple[float, float] = (1.78, 0.63)  # teacher, student (billions), for --dry-run
    threads: int = 0  # torch threads (0: torch's default); tiny models run best on one
    baselines: bool = (
        True  # also evaluate the untuned teacher and student (the miscalibration chapter)
    )
    note: str = ""
    per_setting: dict = field(default_factory=dict)  # setting -> overrides of n_* / max_length


_PAPER_TRAIN = dict(lr=2e-5, epochs=3, batch_size=32, warmup_ratio=0.03, adam_eps=1e-6)

PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        teacher="tiny:teacher",
        student="tiny:student",
        n_train=64,
        n_val=32,
        n_test=64,
        teacher_train=TrainConfig(lr=3e-3, epochs=4, batch_size=8, bf16=False, save_every=4),
        student_train=TrainConfig(lr=3e-3, epochs=2, batch_size=8, bf16=False, save_every=4),
        style="plain",
        max_length=192,
        extract_batch=16,
        eval_batch=16,
        n_boot=200,
        params_b=(0.0005, 0.0003),
        threads=1,
        note="TINY RANDOM MODELS: for tests of the machinery only; the numbers mean nothing.",
    ),
    "cpu": Profile(
        name="cpu",
        teacher="qwen2.5-coder-1.5b-instruct",
        student="qwen2.5-coder-0.5b-instruct",
        # Sized for a 2-core AVX2 CPU (fp32: a 1.5B LoRA step on 8 x 77 tokens takes 25-50 s).
        n_train=64,
        n_val=48,
        n_test=100,
        # LoRA on the top 8 decoder layers: backprop stops there, so a step costs ~1.6 forwards.
        teacher_train=TrainConfig(
            lr=3e-4, epochs=2, batch_size=8, lora_r=16, lora_layers=8, save_every=5
        ),
        student_train=TrainConfig(
            lr=3e-4, epochs=2, batch_size=8, lora_r=16, lora_layers=8, save_every=5
        ),
        style="chat",
        max_length=384,
        note="Real Qwen2.5-Coder 1.5B -> 0.5B on task subsets; LoRA on the top 8 layers; "
        "sized for a 2-core CPU.",
        per_setting={"boolq": {"max_length": 320}},
    ),
    "gpu": Profile(
        name="gpu",
        teacher="qwen2.5-coder-1.5b-instruct",
        student="qwen2.5-coder-0.5b-instruct",
        n_train=None,
        n_val=None,
        n_test=None,
        teacher_train=TrainConfig(**_PAPER_TRAIN),
        student_train=TrainConfig(**_PAPER_TRAIN),
        style="chat",
        max_length=1024,
        extract_batch=32,
        eval_batch=32,
        note="Real Qwen2.5-Coder 1.5B -> 0.5B, full data, the paper's hyper-parameters.",
    ),
    "paper": Profile(
        name="paper",
        teacher="meta-llama/Llama-2-13b-hf",
        student="meta-llama/Llama-2-7b-hf",
        n_train=None,
        n_val=None,
        n_test=None,
        teacher_train=TrainConfig(**_PAPER_TRAIN),
        student_train=TrainConfig(**_PAPER_TRAIN),
        style="plain",
        max_length=1024,
        extract_batch=32,
        eval_batch=32,
        params_b=(13.0, 6.7),
        note="The paper's Llama-2 13B -> 7B from the hub; multi-GPU (see scripts/accelerate/).",
    ),
}

SETTINGS = ("csqa", "boolq", "ood")


def get_profile(name: str, **overrides) -> Profile:
    """A profile by name, with optional field overrides: `n_train=100`, or a training field
    through a dotted key, `**{"student_train.batch_size": 4}`."""
    if name not in PROFILES:
        raise FirstError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    prof = PROFILES[name]
    flat, nested = {}, {}
    for key, value in overrides.items():
        head, _, field_name = key.partition(".")
        if head not in Profile.__dataclass_fields__:
            raise FirstError(f"unknown profile key {key!r}")
        if field_name:
            if head not in ("teacher_train", "student_train"):
                raise FirstError(f"unknown profile key {key!r}")
            if field_name not in TrainConfig.__dataclass_fields__:
                raise FirstError(
                    f"unknown profile key {key!r} ({field_name!r} is no training field)"
                )
            nested.setdefault(head, {})[field_name] = value
        else:
            flat[key] = value
    for head, fields in nested.items():
        flat[head] = replace(flat.get(head, getattr(prof, head)), **fields)
    return replace(prof, **flat) if flat else prof


def for_setting(prof: Profile, setting: str) -> Profile:
    if setting not in SETTINGS:
        raise FirstError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    extra = prof.per_setting.get(setting, {})
    return replace(prof, **extra) if extra else prof
