"""What `first bench` measures, its targets, and at which scale (`BenchConfig`, `preset`).

Each ratio is measured side by side in one process, with the variants interleaved repetition by
repetition (the order rotates) and the median taken after warm-up, so that a machine busy with
other work slows every variant alike. What is measured, and through which code:

- ``kd_over_ce_step_time``: one FIRST distillation step (KL on the stored top-5, re-calibrated
  with eq. 4) against one cross-entropy fine-tuning step, same student, same batches. Both run
  through `first_lib.train.train` itself (the pipeline's loop: collate from the store, LM head at
  the target rows only, AdamW); a step's time is the loop's own clock over `steps` optimizer
  steps. Target <= 1.05.
- ``kd_over_ce_peak_memory``: peak memory of those two training runs, each in a fresh
  subprocess that holds only the student and the store: on CPU the resident-set high-water mark
  (``/proc/self/status`` VmHWM, reset just before training), on CUDA
  ``torch.cuda.max_memory_allocated``. Target <= 1.10.
- ``extract_over_forward_throughput``: `first_lib.knowledge.extract_topk` (top-k, copies to the
  host, packing and fsync'd writes included) against `knowledge.forward_throughput`, the forward
  pass it rides on: same batches, same dtype, the LM head at the same (stored) positions, in
  tokens/s. Target >= 0.90. (Until issue 17 the reference was the plain forward with full logits
  at every position, twice the LM-head rows of an extraction of the targets at the default
  `target_frac`; that ratio is kept as ``extract_over_full_logits_forward_throughput``.) The
  quick preset's teacher is two thin layers under the real vocabulary, so its forward is
  almost all LM head: the worst case for top-k. There the head costs 384 FLOPs a logit and the
  normaliser one exp a logit: on a 2-core AVX2 CPU at fp32, 128 rows of 151,936 logits take
  98 ms of head, 11 ms for the one compiled pass that gives each row's normaliser and group
  maxima, ~5 ms for the top-k over the candidate groups (`first_lib.knowledge.topk`), so the
  ratio there stays near 0.8 on such a CPU. ``extract_over_forward_throughput_real`` is the
  same ratio with the `cpu` profile's teacher architecture (`extract_model`, randomly
  initialised, a few examples), what a real extraction pays; target >= 0.90 for both.
- ``store_bytes_per_token``: bytes on disk of the store's payload files per stored position at
  k = 5 and the real 151,936-token vocabulary. Target <= 22. On the same positions the teacher's
  top-5 is also written as JSON lines (the authors' layout, see `write_jsonl_topk`) and the full
  distribution as float16, and the files are measured.
- ``offline_over_online_step_time``: a FIRST step against an online distillation step with the
  teacher (3x the student's parameters) in memory: TRL's ``GKDTrainer`` with forward KL
  (``lmbda=0, beta=0``) when `trl` can be imported, else `online_step_equivalent`, the same
  computation written out. `online_step_lean` (LM heads only at the target rows) is the cheapest
  online step we could write and is reported beside it. Target <= 0.5.
- ``coefficient_search_seconds``: `first_lib.calibration.search_coefficient` (TS; LS as an
  extra key) on 10^6 stored positions x k = 5. Target < 1 s.
- ``prefix_reuse_train_speedup`` and ``prefix_reuse_eval_speedup``: frozen-prefix reuse
  (`first_lib.prefix`) against the plain path, at the `cpu` profile's student architecture
  (Qwen2.5-Coder 0.5B, randomly initialised; `prefix_model`), LoRA
  on the top L = 8 (the targets) and L = 12 (``..._L12``) of the 24 layers. Training: seconds
  per optimizer step of `train.train` with and without reuse (same examples, same steps; the
  loop's own clock, which starts after the bottom states are built). Evaluation:
  `evaluate.batched_logprobs` over the same prompts, whole model against the top L layers from
  a disk-cache entry that exists (what every variant after the first pays: the bottom-weights
  hash, the entry's sha256 check, loading, the top layers). The one-off cost of building the
  entry (bottom pass, hashing, writing) is reported separately, in seconds and in plain
  steps (or plain evaluations) it costs: ``details.prefix_reuse``. Examples are MC-shaped
  (about 96 tokens, a few answer targets), as in the book's runs. Targets >= 1.8 and >= 2 at
  L = 8.
- Per-chapter wall times of the book build, read from ``_build/results/<profile>/timings.json``
  when the build wrote one.

Models are randomly initialised from configs shipped in ``first_lib/configs/`` (the real
Qwen2.5-Coder 0.5B student and 1.5B teacher), or from small configs derived from them with the
real vocabulary (``--quick``), so no weights are needed anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from first_lib import device as device_mod
from first_lib.bench.models import _QWEN_05, _QWEN_15
from first_lib.errors import FirstError

REPO = Path(__file__).resolve().parents[2]

# metric -> (comparison, target). "holds" in the JSON is `value <op> target`.
TARGETS: dict[str, tuple[str, float]] = {
    "kd_over_ce_step_time": ("<=", 1.05),
    "kd_over_ce_peak_memory": ("<=", 1.10),
    "extract_over_forward_throughput": (">=", 0.90),
    "extract_over_forward_throughput_real": (">=", 0.90),
    "store_bytes_per_token": ("<=", 22.0),
    "offline_over_online_step_time": ("<=", 0.5),
    "coefficient_search_seconds": ("<", 1.0),
    "prefix_reuse_train_speedup": (">=", 1.8),
    "prefix_reuse_eval_speedup": (">=", 2.0),
}
PREFIX_LAYERS = (8, 12)  # top layers adapted, of the 24 of the `cpu` profile's student

ONLINE_IMPLS = ("auto", "trl", "equivalent", "lean")
FULL_CPU_RAM_GB = 48  # the full preset in fp32: both models, two AdamW states, full logits


@dataclass
class BenchConfig:
    """What `run_bench` measures and at which scale (see `preset`)."""

    preset: str = field(default="quick", metadata={"help": "tiny | quick | full"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})
    student: str = field(default="quick-student", metadata={"help": "config name or path"})
    teacher: str = field(default="quick-teacher", metadata={"help": "config name or path"})
    # The `cpu` profile's student itself (random weights): at 1/3.5 of its width
    # (`prefix-student`) fixed per-step costs weigh more and the training speed-up read 1.41
    # where the real width gives ~1.7 (issue 17's notes), so the number would describe a model
    # nobody trains.
    prefix_model: str = field(
        default=_QWEN_05, metadata={"help": "24-layer config for prefix reuse"}
    )
    prefix_seq_len: int = field(default=96, metadata={"help": "tokens per prefix-reuse example"})
    prefix_examples: int = field(
        default=32, metadata={"help": "examples (training) and prompts (evaluation)"}
    )
    prefix_steps: int = field(default=3, metadata={"help": "optimizer steps per training run"})
    batch_size: int = field(default=4, metadata={"help": "examples per training step"})
    seq_len: int = field(default=64, metadata={"help": "tokens per example"})
    target_frac: float = field(
        default=0.5, metadata={"help": "share of positions that are trained / stored"}
    )
    n_examples: int = field(default=8, metadata={"help": "examples for extraction and training"})
    extract_examples: int = field(
        default=0,
        metadata={
            "help": "examples for the extraction measurement (0: n_examples); enough to reach "
            "the steady state of a real extraction, not its fixed per-call cost (~45 ms)"
        },
    )
    extract_batch: int = field(default=4, metadata={"help": "examples per teacher forward"})
    # The teacher above is two layers under the real 151,936-token LM head, so its forward is
    # almost all head and top-k weighs on it as on no real model (the worst case). The same
    # measurement at the `cpu` profile's teacher architecture says what a real extraction pays.
    extract_model: str = field(
        default=_QWEN_15,
        metadata={"help": "teacher config of the extraction measured at real width ('': skip)"},
    )
    extract_model_examples: int = field(
        default=8, metadata={"help": "examples of that measurement"}
    )
    bytes_examples: int = field(default=4, metadata={"help": "examples for the disk-use files"})
    k: int = 5
    steps: int = field(default=1, metadata={"help": "optimizer steps per timed training run"})
    reps: int = field(default=3, metadata={"help": "timed repetitions (after warm-up)"})
    extract_reps: int = field(
        default=0, metadata={"help": "timed repetitions of the extraction measurements (0: reps)"}
    )
    warmup: int = field(default=1, metadata={"help": "untimed repetitions first"})
    coef_positions: int = field(default=1_000_000, metadata={"help": "positions for the search"})
    coef: float = field(default=0.28, metadata={"help": "TS c of the FIRST step (paper's 0.28)"})
    online: tuple[str, ...] = field(
        default=("auto", "lean"),
        metadata={
            "help": "online steps: auto (trl if importable, else equivalent) | trl | "
            "equivalent | lean; the first is the one the target is judged on"
        },
    )
    memory: bool = field(default=True, metadata={"help": "measure peak memory (subprocesses)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    seed: int = 0
    profile: str = field(default="cpu", metadata={"help": "book profile whose timings to read"})
    precision: str | None = field(
        default=None,
        metadata={
            "help": "auto | fp32 | bf16 (None: $FIRST_PRECISION, else auto); resolved to fp32 "
            "or bf16 when the config is made, and recorded with the results"
        },
    )

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise FirstError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise FirstError("--device cuda: no CUDA device is visible")
        if not 0.0 < self.target_frac <= 1.0:
            raise FirstError(f"target_frac must be in (0, 1], got {self.target_frac}")
        if self.seq_len < 3 or self.batch_size < 1 or self.n_examples < self.batch_size:
            raise FirstError("need seq_len >= 3, batch_size >= 1 and n_examples >= batch_size")
        if self.steps < 1 or self.reps < 1 or self.warmup < 0 or self.bytes_examples < 1:
            raise FirstError("steps, reps and bytes_examples must be >= 1, warmup >= 0")
        if self.extract_reps < 0:
            raise FirstError("extract_reps must be >= 0 (0: reps)")
        self.precision = device_mod.resolve_precision(self.precision, self.device)
        self.online = tuple(self.online)
        bad = [o for o in self.online if o not in ONLINE_IMPLS]
        if bad or not self.online:
            raise FirstError(f"online must list some of {ONLINE_IMPLS}, got {self.online}")


def preset(name: str, device: str = "cpu", **overrides) -> BenchConfig:
    """`tiny` (tests, seconds), `quick` (about six minutes on a 2-core CPU) or `full` (the real
    0.5B/1.5B architectures, randomly initialised; meant for a GPU)."""
    base: dict[str, Any]
    if name == "tiny":
        base = dict(
            student="tiny-student",
            teacher="tiny-teacher",
            prefix_model="tiny-prefix-student",
            extract_model="tiny-student",  # another model than the teacher: its own path
            extract_model_examples=4,
            prefix_seq_len=16,
            prefix_examples=8,
            prefix_steps=2,
            batch_size=2,
            seq_len=16,
            n_examples=4,
            extract_batch=2,
            bytes_examples=2,
            steps=1,
            reps=2,
            coef_positions=20_000,
            online=("equivalent", "lean"),
            threads=1,
        )
    elif name == "quick":
        # 32 examples for the extraction: with 8 (two batches) the fixed cost of a call (hashes,
        # locks, fsync'd shard and manifest: 250 of 1,130 ms on a 2-core AMX CPU at bf16) was a
        # quarter of the extraction's time, which a real store of 10^4 examples never sees.
        # Four optimizer steps per timed training run: a step of the quick student is ~0.13 s
        # on 2 cores, and with one step a single hiccup moved KD / CE from 0.91 to 1.15 between
        # two runs on the same machine (samples 0.11-0.19 s against CE's 0.12-0.13).
        # Nine extraction repetitions: a repetition is about a second, and on a shared 2-core
        # VM single extract / forward ratios spread from 0.67 to 1.16 around a median of 0.86
        # (three repetitions' medians of the same code read 0.71 to 0.98).
        base = dict(extract_examples=32, steps=4, extract_reps=9)
    elif name == "full":
        base = dict(
            student=_QWEN_05,
            teacher=_QWEN_15,
            batch_size=8,
            seq_len=512,
            n_examples=128,
            extract_examples=1024,
            extract_batch=32,
            bytes_examples=2,
            steps=10,
            reps=8,
            online=("auto", "equivalent", "lean"),
        )
    else:
        raise FirstError(f"unknown bench preset {name!r}; choose tiny, quick or full")
    return BenchConfig(preset=name, device=device, **{**base, **overrides})
