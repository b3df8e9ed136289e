"""The stage graph, declared once as data: which artefacts a run of a profile and setting makes,
in which order, with which keys. `plan`, `run`, `--dry-run`, `first clean` and the clock all read
it; nothing here loads a model or the data.

    teacher fine-tune (CE) -> extract top-k (train, validation) -> calibrate (c*, delta)
    student fine-tune (CE)        student distill (KL on the store: none | LS | TS)
                     \\___________________|___________________/
                                 evaluate -> results.json

Where no test can tell whether a trained model learned (out of domain, or without the untuned
baselines), a `check` node per trained model compares its training loss on the validation split
with its untuned start's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from first_lib import device
from first_lib.artefacts import artefact_dir, code_version, is_done
from first_lib.config import OOD_TESTS, Profile, TrainConfig
from first_lib.pipeline.data import data_key, test_tasks


@dataclass(frozen=True)
class Variant:
    """A trained model the paper compares: its role, the stage that makes it, and (for a
    distilled student) how the stored top-k is re-calibrated before it trains on it."""

    name: str
    role: str  # teacher | student
    stage: str
    transform: str | None = None  # None: fine-tuned with CE; else distilled with KD


MODELS = (
    Variant("teacher", "teacher", "teacher"),
    Variant("finetune", "student", "finetune"),
    Variant("distill", "student", "distill-none", "none"),
    Variant("distill_ls", "student", "distill-ls", "ls"),
    Variant("first_ts", "student", "distill-ts", "ts"),
)
VARIANTS = tuple(v.name for v in MODELS)
STUDENT_VARIANTS = tuple(v.name for v in MODELS if v.role == "student")
TRANSFORM_OF = {v.name: v.transform for v in MODELS if v.transform}
BASELINES = {"teacher_base": "teacher", "student_base": "student"}  # untuned models
# Re-calibrated after training by a temperature on the answers' logits, fitted on the validation
# split FIRST uses (`first_lib.posthoc`): the cheap competitor, where that split is
# multiple-choice (not in the out-of-domain setting, whose validation data is instructions).
POSTHOC = {"finetune_posthoc_ts": "finetune", "distill_posthoc_ts": "distill"}

# The project's modules whose code each kind of stage runs: a change to their code (not to
# comments, docstrings or formatting) changes the stage's key, so old results are never served to
# new code. A package counts with all its files.
CODE_OF = {
    "train": (
        "first_lib.train",
        "first_lib.fastpath",
        "first_lib.checkpoint",
        "first_lib.losses",
        "first_lib.calibration",
        "first_lib.models",
        "first_lib.prefix",
    ),
    "extract": ("first_lib.knowledge", "first_lib.models", "first_lib.prefix"),
    "calibrate": ("first_lib.calibration", "first_lib.metrics"),
    "evaluate": ("first_lib.evaluate", "first_lib.metrics", "first_lib.models", "first_lib.prefix"),
    "tiny-models": ("first_lib.models",),
    "posthoc": ("first_lib.posthoc", "first_lib.evaluate", "first_lib.metrics"),
}
CODE_OF["check"] = ("first_lib.heldout", *CODE_OF["train"])  # training's forward and objective


@dataclass(frozen=True)
class Node:
    """One artefact of a run. `stage` names its folder (`<stage>-<hash of key>`); evaluations
    are named `evaluate <model> on <test>`."""

    stage: str
    kind: str  # tiny-models | train | extract | calibrate | check | evaluate | posthoc
    key: dict = field(hash=False)
    role: str = ""  # teacher | student: the model it trains, reads or evaluates
    reads: tuple[str, ...] = ()  # the splits its model passes over (train, validation, a test)
    variant: str = ""  # the model it makes or evaluates (a variant or a baseline)
    train: TrainConfig | None = None  # training stages: the config (coef set at run time)
    params_b: float = 0.0  # billions of parameters of its model (memory estimate)

    @property
    def name(self) -> str:
        if self.kind in ("evaluate", "posthoc"):
            return f"{self.kind} {self.variant} on {self.reads[0]}"
        return self.stage

    @property
    def path(self) -> Path:
        return artefact_dir(self.stage, self.key)

    def done(self) -> bool:
        return is_done(self.path, self.key)

    def as_step(self) -> dict:
        """The node as the plan's older dict form: {stage, key, params_b, train?, variant?}."""
        step = {"stage": self.stage, "key": self.key, "params_b": self.params_b}
        if self.train is not None:
            step["train"] = self.key["train"]
        if self.transform_variant:
            step["variant"] = self.variant
        return step

    @property
    def transform_variant(self) -> bool:
        return self.kind == "train" and self.stage.startswith("distill-")


def run_precision(prof: Profile) -> str:
    """The precision a run of `prof` computes in: its `precision` field, else $FIRST_PRECISION,
    else auto (bf16 where the hardware runs it natively, fp32 elsewhere)."""
    return device.resolve_precision(prof.precision)


def tiny_key(prof: Profile, setting: str) -> dict:
    key = {
        "stage": "tiny-models",
        "data": data_key(prof, setting),
        "n_test": prof.n_test,  # the tokenizer is trained on the test prompts too
        "data_seed": prof.data_seed,
        "code": code_version(CODE_OF["tiny-models"]),
        "v": 1,
    }
    # and so on the test sets: named where they are not the paper's out-of-domain pair (the
    # keys made before `ood_tests` existed stay as they were)
    if setting == "ood" and tuple(prof.ood_tests) != OOD_TESTS:
        key["tests"] = list(prof.ood_tests)
    return key


def model_source(prof: Profile, role: str, tiny_dir: Path | None) -> str:
    """The untuned `role` model: a source name, or its folder among the tiny models."""
    name = prof.teacher if role == "teacher" else prof.student
    if name.startswith("tiny:"):
        return str(tiny_dir / name.split(":", 1)[1])
    return name


def prefix_top_layers(prof: Profile, label: str) -> int:
    """The top layers that evaluating (or extracting with) model `label` (a variant,
    "teacher_base" or "student_base") runs from cached bottom states (`first_lib.prefix`): the
    LoRA depth of its model's training, also for the untuned model, so that it and its tuned
    variants share one cache entry; 0 (the whole model) for full fine-tuning."""
    cfg = prof.teacher_train if label.startswith("teacher") else prof.student_train
    return cfg.lora_layers if cfg.lora_r > 0 else 0


def eval_key(
    prof: Profile, test_name: str, model, precision: str, top_layers: int = 0, n: int | None = -1
) -> dict:
    """An evaluation: the model, the test set (not the setting, so the untuned baselines are
    shared between settings that test on the same set), the precision it computes in and the
    top layers it runs from cached bottom states (`prefix_top_layers`)."""
    return {
        "model": str(model),
        "precision": precision,
        "top_layers": top_layers,
        "test": test_name,
        "n_test": prof.n_test if n == -1 else n,
        "data_seed": prof.data_seed,
        "max_length": prof.max_length,
        "style": prof.style,
        "n_boot": prof.n_boot,
        "code": code_version(CODE_OF["evaluate"]),
    }


def stage_graph(prof: Profile, setting: str, precision: str | None = None) -> list[Node]:
    """Every artefact of a run of `prof` x `setting`, in the order a run makes them. `precision`
    defaults to the one this machine resolves for `prof`; it is part of every key, so runs at
    different precisions never share an artefact."""
    precision = precision or run_precision(prof)
    dk = data_key(prof, setting)
    code = {kind: code_version(modules) for kind, modules in CODE_OF.items()}
    size = {"teacher": prof.params_b[0], "student": prof.params_b[1]}
    nodes, tiny_dir, data = [], None, {"data": dk}
    if prof.teacher.startswith("tiny:"):
        key = tiny_key(prof, setting)
        tiny_dir = artefact_dir("tiny-models", key)
        nodes.append(Node("tiny-models", "tiny-models", key))
        if "tests" in key:  # other test sets, other tiny models: the models trained from them too
            data["tests"] = key["tests"]
    cfg = {"teacher": prof.teacher_train, "student": prof.student_train}
    source = {"teacher": prof.teacher, "student": prof.student}

    def trained(role: str, train: TrainConfig, **upstream) -> dict:
        origin = upstream or data
        key = {"source": source[role], **origin, "train": train.key(), "precision": precision}
        return {**key, "code": code["train"]}

    teacher = Node(
        "teacher",
        "train",
        trained("teacher", cfg["teacher"]),
        role="teacher",
        reads=("train",),
        variant="teacher",
        train=cfg["teacher"],
        params_b=size["teacher"],
    )
    extract_key = {"teacher": teacher.key, "k": prof.k, "code": code["extract"]}
    extract = Node(
        "extract",
        "extract",
        extract_key,
        role="teacher",
        reads=("train", "validation"),
        params_b=size["teacher"],
    )
    calib_key = {"extract": extract_key, "ece": "answer" if setting != "ood" else "token"}
    calibrate = Node("calibrate", "calibrate", {**calib_key, "code": code["calibrate"]})
    nodes += [teacher, extract, calibrate]
    for v in MODELS[1:]:
        if v.transform is None:
            key, train = trained(v.role, cfg[v.role]), cfg[v.role]
        else:
            # the coefficient is the calibration stage's choice (set when the run reaches it)
            coef = 0.0 if v.transform == "ls" else 1.0
            train = replace(cfg[v.role], loss="kd", transform=v.transform, coef=coef)
            key = trained(v.role, train, extract=extract_key, calibrate=calibrate.key)
            key["train"]["coef"] = "calibrate"
        nodes.append(
            Node(v.stage, "train", key, v.role, ("train",), v.name, train, params_b=size[v.role])
        )
    if checks_on_held_out(prof, setting):
        for n in [n for n in nodes if n.kind == "train"]:
            key = {"model": n.key, "code": code["check"]}
            nodes.append(Node(f"check-{n.stage}", "check", key, n.role, ("validation",),
                              n.variant, n.train, n.params_b))  # fmt: skip
    made = {n.variant: n.path for n in nodes if n.kind == "train"}
    models = [(v.name, v.role, made[v.name]) for v in MODELS]
    if prof.baselines:
        models += [(b, role, model_source(prof, role, tiny_dir)) for b, role in BASELINES.items()]
    for test in test_tasks(prof, setting):
        for label, role, model in models:
            key = eval_key(prof, test, model, precision, prefix_top_layers(prof, label))
            nodes.append(Node("evaluate", "evaluate", key, role, (test,), label))
    if setting != "ood":  # post-hoc TS: each base model on the validation questions, then a T
        val = {}
        for name, base in POSTHOC.items():
            top = prefix_top_layers(prof, base)
            key = eval_key(prof, f"{setting}-validation", made[base], precision, top, prof.n_val)
            val[name] = Node("evaluate", "evaluate", key, "student", ("validation",), base)
        nodes += val.values()
        tested = {(n.variant, n.reads[0]): n.key for n in nodes if n.kind == "evaluate"}
        for test in test_tasks(prof, setting):
            for name, base in POSTHOC.items():
                key = {"test": tested[base, test], "validation": val[name].key, "fit": "nll"}
                key["code"] = code["posthoc"]
                nodes.append(Node("posthoc-ts", "posthoc", key, "student", (test,), name))
    return nodes


def checks_on_held_out(prof: Profile, setting: str) -> bool:
    """Whether a run checks its trained models on held-out data of their training task
    (`first_lib.heldout`): where no test can, because the tests are other tasks (the
    out-of-domain setting) or no untuned model is evaluated on them (`baselines=false`)."""
    return setting == "ood" or not prof.baselines


def plan(prof: Profile, setting: str, precision: str | None = None) -> list[dict]:
    """The stages of a run that train, extract or calibrate, as dicts {stage, key, params_b,
    train?, variant?}, computable without loading any model."""
    return [n.as_step() for n in stage_graph(prof, setting, precision) if n.kind in STAGE_KINDS]


STAGE_KINDS = ("train", "extract", "calibrate")


def evaluations(prof: Profile, setting: str, precision: str | None = None):
    """(model name, test, key) of every evaluation of a run: the five variants and, with
    baselines, the untuned teacher and student, on each test set; and the students that post-hoc
    TS re-calibrates on the validation questions (test "validation")."""
    return [
        (n.variant, n.reads[0], n.key)
        for n in stage_graph(prof, setting, precision)
        if n.kind == "evaluate"
    ]


def missing(prof: Profile, setting: str, precision: str | None = None) -> list[str]:
    """What a run would still compute: stage names, and `evaluate <model> on <test>`, from the
    keys alone (nothing is loaded)."""
    return [
        n.name
        for n in stage_graph(prof, setting, precision)
        if n.kind != "tiny-models" and not n.done()
    ]


def run_artefacts(prof: Profile, setting: str, precision: str) -> set[str]:
    """Names of every artefact folder a run of `prof` x `setting` at `precision` uses."""
    return {n.path.name for n in stage_graph(prof, setting, precision)}
