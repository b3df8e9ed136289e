"""The configuration of a run, typed and torch-free: a `Profile` (data, models, store, evaluation,
precision) holding two `TrainConfig`s (teacher, student); every field has help text and checks.

A field either changes what is computed (it is in the artefact keys of `first_lib.pipeline.graph`,
and `tests/test_config.py` shows that setting it changes a key) or is marked `cosmetic` in its
metadata: a label, a speed knob, or a cost estimate, kept out of the keys because the numbers do
not depend on it. The resolved profile is written whole into `results.json` (`to_dict`) and read
back from there (`profile_from_dict`), so a chapter shows the configuration its run used.

Seeds: `seed` is the training seed (adapter initialisation and batch order of every trained
model); `data_seed` picks the question subsets, so runs that differ in `seed` are paired on the
same questions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from first_lib.errors import FirstError

PRECISIONS = ("auto", "fp32", "bf16")
STYLES = ("plain", "chat", "chat-nosys", "auto")  # the prompt styles of first_lib.tasks
# The multiple-choice tasks of the data wheel (`first_lib.tasks.TASKS`, which a test holds this
# equal to): named here so that a profile is checked without importing the task loaders.
TASK_NAMES = (
    "csqa",
    "boolq",
    "obqa",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "siqa",
    "hellaswag",
    "winogrande",
)
OOD_TESTS = ("csqa", "obqa")  # the paper's out-of-domain test sets (sec. 5.3)
KINDS: tuple[str, ...] = ("none", "ts", "power", "ls")  # re-calibrations of the stored top-k
_COEF_NAMES = {"ts": "temperature c", "power": "power-scaling T", "ls": "label-smoothing delta"}


def opt(default, help: str, cosmetic: bool = False):
    """A dataclass field with its help text; `cosmetic` fields stay out of the artefact keys."""
    meta = {"help": help, "cosmetic": cosmetic}
    if isinstance(default, (list, dict, set)) or hasattr(default, "__dataclass_fields__"):
        return field(default_factory=lambda: replace_or_copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def replace_or_copy(value):
    return replace(value) if hasattr(value, "__dataclass_fields__") else type(value)(value)


def help_of(cls) -> dict[str, str]:
    """Field name -> help text of a config class (for `first run --help-config`)."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def cosmetic_fields(cls) -> set[str]:
    return {f.name for f in fields(cls) if f.metadata.get("cosmetic")}


def key_dict(obj) -> dict:
    """The fields of a config that change the computation (its cosmetic ones removed)."""
    drop = cosmetic_fields(type(obj))
    return {k: v for k, v in asdict(obj).items() if k not in drop}


def check_coefficient(kind: str, coef: float | None) -> None:
    """Raise `FirstError` unless ``coef`` is valid for ``kind`` (c > 0, T > 0, 0 <= delta < 1)."""
    if kind not in KINDS:
        raise FirstError(f"unknown calibration kind {kind!r}; expected one of {KINDS}")
    if kind == "none":
        return
    if coef is None or not math.isfinite(float(coef)):
        raise FirstError(f"{_COEF_NAMES[kind]} must be a finite number, got {coef!r}")
    coef = float(coef)
    if kind == "ts" and coef <= 0:
        raise FirstError(f"temperature c must be > 0 (eq. 4 divides by it), got {coef}")
    if kind == "power" and coef <= 0:
        raise FirstError(f"power-scaling temperature T must be > 0, got {coef}")
    if kind == "ls" and not 0.0 <= coef < 1.0:
        raise FirstError(f"label-smoothing delta must satisfy 0 <= delta < 1, got {coef}")


def check_precision(value: str, where: str = "precision") -> str:
    if value not in PRECISIONS:
        raise FirstError(f"{where} = {value!r}: choose one of {', '.join(PRECISIONS)}")
    return value


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: the paper's, sec. 5.1)."""

    loss: str = opt("ce", "ce (hard labels) or kd (KL on top-k)")
    lr: float = opt(2e-5, "peak learning rate")
    epochs: float = opt(3.0, "passes over the training set")
    batch_size: int = opt(32, "examples per device per micro-step")
    grad_accum: int = opt(1, "micro-steps per optimizer step")
    warmup_ratio: float = opt(0.03, "linear warm-up fraction")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-6, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "clip the gradient norm at this; 0 disables")
    lora_r: int = opt(0, "0: full fine-tuning; >0: LoRA rank")
    lora_alpha: int = opt(32, "LoRA scaling numerator (scale alpha / r)")
    lora_layers: int = opt(
        0,
        "LoRA only: adapt the top N decoder layers (0: all); backprop then stops at the lowest "
        "adapted layer",
    )
    lora_targets: tuple[str, ...] = opt(
        ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"),
        "LoRA only: the linear layers that get adapters",
    )
    train_embeddings: bool = opt(True, "full FT only: also train the input embedding matrix")
    kd_normalize: str = opt("renorm", "KD target: renorm | tail | full")
    kd_reduction: str = opt("mean", "KD loss: mean | sum_per_batch")
    transform: str = opt("none", "KD only: none | ts | ls | power re-calibration of the store")
    coef: float = opt(1.0, "c for ts, delta for ls, T for power")
    seed: int = opt(0, "adapter initialisation and batch order (a profile sets it from its seed)")
    save_every: int = opt(
        50,
        "optimizer steps between checkpoints (resuming replays the same data order, so the "
        "result does not depend on it)",
        cosmetic=True,
    )
    max_steps: int = opt(0, ">0 caps the optimizer steps")

    def __post_init__(self) -> None:
        for f in fields(self):  # 2 and 2.0 epochs are one run: one value, one artefact key
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
        if self.loss not in ("ce", "kd"):
            raise FirstError(f"loss must be 'ce' or 'kd', got {self.loss!r}")
        if self.lr <= 0 or self.epochs <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise FirstError("lr and epochs must be > 0, batch_size and grad_accum >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise FirstError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.kd_normalize not in ("renorm", "tail", "full"):
            raise FirstError(f"kd_normalize must be renorm|tail|full, got {self.kd_normalize!r}")
        if self.kd_reduction not in ("mean", "sum_per_batch"):
            raise FirstError(f"kd_reduction must be mean|sum_per_batch, got {self.kd_reduction!r}")
        if self.transform not in KINDS:
            raise FirstError(f"transform must be none|ts|ls|power, got {self.transform!r}")
        check_coefficient(self.transform, self.coef)  # c > 0, 0 <= delta < 1
        for name in ("lora_r", "lora_layers", "max_steps"):
            if getattr(self, name) < 0:
                raise FirstError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.save_every < 1:
            raise FirstError(f"save_every must be >= 1, got {self.save_every}")
        self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> dict:
        """What of this config an artefact key holds (the cosmetic `save_every` left out)."""
        return key_dict(self)


# ----------------------------------------------------------------------------- a run


@dataclass(frozen=True)
class Profile:
    """One named scale for every stage (see `first_lib.profiles` for the built-in ones)."""

    name: str = opt("custom", "the profile's name (a label)", cosmetic=True)
    teacher: str = opt("tiny:teacher", "an asset name, hub id, local path, or tiny:teacher")
    student: str = opt("tiny:student", "an asset name, hub id, local path, or tiny:student")
    n_train: int | None = opt(None, "training questions (null: the whole split)")
    n_val: int | None = opt(None, "validation questions, for the coefficient search (null: all)")
    n_test: int | None = opt(None, "test questions per test set (null: the whole split)")
    teacher_train: TrainConfig = opt(TrainConfig(), "the teacher's fine-tuning (CE)")
    student_train: TrainConfig = opt(
        TrainConfig(), "the students' training: fine-tuning (CE); distillation uses it with KD"
    )
    k: int = opt(5, "teacher tokens kept per position in the store (the paper's top-5)")
    style: str = opt("auto", "prompt style: plain | chat | chat-nosys | auto")
    max_length: int = opt(512, "longest tokenized example (longer ones are cut)")
    extract_batch: int = opt(
        8, "examples per extraction forward (speed only; equal up to rounding)", cosmetic=True
    )
    eval_batch: int = opt(
        8, "questions per evaluation forward (speed only; equal up to rounding)", cosmetic=True
    )
    n_boot: int = opt(1000, "bootstrap resamples of each evaluation's intervals")
    seed: int = opt(0, "training seed: adapter initialisation and batch order of every model")
    seeds: tuple[int, ...] = opt(
        (0,),
        "the training seeds a book run makes and pools, one run each on the same questions "
        "(`first run --seeds` gives them on the command line)",
        cosmetic=True,
    )
    data_seed: int = opt(0, "picks the question subsets (and the tiny models' weights)")
    params_b: tuple[float, float] = opt(
        (1.78, 0.63), "teacher, student size in billions (the memory estimate only)", cosmetic=True
    )
    threads: int = opt(0, "torch threads (0: torch's default; speed only)", cosmetic=True)
    precision: str | None = opt(
        None,
        "auto | fp32 | bf16; null: $FIRST_PRECISION, else auto (bf16 on GPUs and on CPUs with "
        "AMX or AVX512-BF16, fp32 elsewhere); the resolved precision is in every key",
    )
    baselines: bool = opt(True, "also evaluate the untuned teacher and student")
    # In no key of a real model: an evaluation's key names its test set, so another list adds
    # or drops evaluations. The tiny models' tokenizer reads the test prompts: another list
    # makes other tiny models (`pipeline.graph.tiny_key`).
    ood_tests: tuple[str, ...] = opt(
        OOD_TESTS,
        "the out-of-domain setting's test sets: tasks of the data wheel (first data stats)",
    )
    note: str = opt("", "a line that describes the profile", cosmetic=True)
    per_setting: dict = opt({}, "setting -> overrides of other fields for that setting")
    per_precision: dict = opt(
        {},
        "precision (fp32 | bf16) -> setting -> overrides applied after per_setting at that "
        "precision (the cpu profile: smaller training micro-batches where fp32 would not fit "
        "in 24 GB)",
    )

    def __post_init__(self) -> None:
        check_profile(self)

    def to_dict(self) -> dict:
        return asdict(self)


def check_profile(prof: Profile) -> Profile:
    """Refuse (FirstError) values no stage can run with, before anything is loaded."""
    for name in ("teacher_train", "student_train"):
        loss = getattr(prof, name).loss
        if loss != "ce":
            raise FirstError(
                f"{name}.loss = {loss!r}: the fine-tuning stages train with loss=ce; the distill "
                "stages set loss=kd themselves"
            )
    if prof.style not in STYLES:
        raise FirstError(f"style = {prof.style!r} must be one of {', '.join(STYLES)}")
    seeds = list(prof.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(type(s) is int for s in seeds):
        raise FirstError(f"seeds = {prof.seeds!r} must be distinct integers, at least one")
    for name in ("n_train", "n_val", "n_test"):
        n = getattr(prof, name)
        if n is not None and n < 1:
            raise FirstError(
                f"{name} = {n} leaves the {name[2:]} split empty; give at least 1 (or null: all)"
            )
    if prof.k < 1:
        raise FirstError(f"k = {prof.k}: the teacher's top-k needs k >= 1 (the paper's k is 5)")
    if prof.max_length < 2:
        raise FirstError(f"max_length = {prof.max_length} must be at least 2")
    if prof.extract_batch < 1 or prof.eval_batch < 1:
        raise FirstError("extract_batch and eval_batch must be >= 1")
    if prof.n_boot < 1:
        raise FirstError(f"n_boot = {prof.n_boot} must be >= 1")
    if prof.precision is not None:
        check_precision(prof.precision)
    for precision in prof.per_precision:
        check_precision(precision, where="a per_precision key")
    if prof.threads < 0:
        raise FirstError(f"threads = {prof.threads} must be >= 0 (0: torch's default)")
    if len(prof.params_b) != 2 or min(prof.params_b) <= 0:
        raise FirstError("params_b must be two positive sizes in billions: [teacher, student]")
    check_ood_tests(prof.ood_tests)
    return prof


def check_ood_tests(tests) -> None:
    """Refuse an out-of-domain test list that is empty, repeats a task or names an unknown one."""
    if not tests:
        raise FirstError(f"ood_tests is empty: give at least one of {', '.join(TASK_NAMES)}")
    for task in tests:
        if task not in TASK_NAMES:
            raise FirstError(
                f"ood_tests: unknown task {task!r}; choose among {', '.join(TASK_NAMES)}"
            )
    if len(set(tests)) != len(tests):
        raise FirstError(f"ood_tests = {list(tests)} names a task twice")


def with_training_seed(prof: Profile) -> Profile:
    """`prof` with its `seed` in both training configs (where a training run reads it)."""
    if prof.teacher_train.seed == prof.seed == prof.student_train.seed:
        return prof
    return replace(
        prof,
        teacher_train=replace(prof.teacher_train, seed=prof.seed),
        student_train=replace(prof.student_train, seed=prof.seed),
    )


def _field_from_json(name: str, value, tuples: tuple[str, ...]):
    """A setting's override of field `name` as the field holds it (JSON gives lists and dicts)."""
    if name in tuples:
        return tuple(value)
    if name in ("teacher_train", "student_train") and isinstance(value, dict):
        return TrainConfig(**value)
    return value


def profile_from_dict(data: dict) -> Profile:
    """The `Profile` that `Profile.to_dict` (as stored in results.json) describes."""
    known = {f.name for f in fields(Profile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FirstError(f"unknown profile field {unknown[0]!r} in a recorded config")
    values = dict(data)
    for name in ("teacher_train", "student_train"):
        if isinstance(values.get(name), dict):
            values[name] = TrainConfig(**values[name])
    tuples = ("params_b", "seeds", "ood_tests")  # JSON has lists where the fields hold tuples
    for name in tuples:
        if name in values:
            values[name] = tuple(values[name])
    if isinstance(values.get("per_setting"), dict):  # and so do a setting's overrides of them
        values["per_setting"] = {
            setting: {k: _field_from_json(k, v, tuples) for k, v in over.items()}
            for setting, over in values["per_setting"].items()
        }
    if isinstance(values.get("per_precision"), dict):
        values["per_precision"] = {
            precision: {
                setting: {k: _field_from_json(k, v, tuples) for k, v in over.items()}
                for setting, over in table.items()
            }
            for precision, table in values["per_precision"].items()
        }
    return Profile(**values)
