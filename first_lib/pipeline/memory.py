"""How much memory a stage will hold, priced before it runs (as `clock` prices its time).

A stage holds its model's weights at the run's precision, the activations its largest
micro-batch keeps for the backward pass (training) or passes through one layer at a time
(extraction, evaluation), and what the process holds anyway (Python, torch, the data). The
activations grow with the tokens of the largest batch (batch size x its longest example: the
batches are length-bucketed, so the longest examples are padded to each other), with the
layers the gradient flows through and with the layer's widths. How many values a token keeps
per layer is measured, not derived (autograd's saved tensors depend on the attention kernel and
on peft's LoRA layers): `ACT_VALUES["train"]` is fitted to LoRA training steps of the real models
(`scripts/memory_probe.py`: two steps of `train.train` on 8 examples of a fixed length, each
probe in a process of its own, on the 2-core AVX2 EPYC at fp32, and once at bf16 (emulated
there, the same tensors); `bench/stage-memory-cpu.json`, which tests/test_memory.py holds the
constants to: every probe's estimate is at least its measured peak and at most 30% above it) and to the `cpu`-profile OpenBookQA teacher's training
in the pipeline (peak resident memory sampled every 3 s: 18.35 GB). The inference constant
(`ACT_VALUES["forward"]`: one layer's activations at a time) is not fitted; the weights dominate.
Every stage now records its own peak (`perf.peak_memory_gb`, `flops.PeakMemory`), and the
appendix sets estimate against measurement.

Before, the estimate was the weights plus a fixed 50% (LoRA) or 25% (inference): at fp32 it
priced the 1.5B teacher's LoRA training at 10.7 GB, which held 18.4 GB, so a 16 GB machine
passed the check and was then killed by the kernel. And a finished stage's memory stayed with
the process (freed heap pages, and objects in reference cycles until the collector ran), so
each later stage started several GB higher: `release` between stages gives it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

from first_lib import flops

# Python, torch and the run's data, before any model (measured: 0.3 GB after importing torch
# and transformers; the tokenised data sets and the process's other buffers add the rest).
BASE_GB = 0.6
# What a run's process holds at a stage's peak beyond what the same stage holds in a process of
# its own (the probes above): the libraries of every kind of stage, the data, the heap that
# earlier and larger stages leave fragmented. The largest such gap measured, rounded up: fp32,
# 0.64 GB (a distilled student; `bench/stage-memory-pipeline-cpu-fp32.json`, every stage of a
# reduced `cpu` OpenBookQA run on the 2-core AVX2 EPYC, which tests/test_memory.py holds this
# to); bf16, 2.0 GB (the `cpu` OpenBookQA run on the 2-core AMX Xeon: extraction 6.2 GB and
# the students 6.35-6.39 GB against 4.2 and 4.4 GB priced without it).
RUN_GB = {"fp32": 0.7, "bf16": 2.1}
# Values kept per token for the backward pass of one decoder layer trained with LoRA on every
# linear map (no recomputation), in units of (hidden + intermediate) width: fitted (see the
# module docstring). bf16 autocast keeps most of them in 2 bytes instead of 4.
ACT_VALUES = {"train": 9.5, "forward": 3.0}
ACT_BYTES = {"fp32": 4, "bf16": 2}


def stage_gb(
    shape: flops.Shape,
    params_b: float,
    kind: str,
    precision: str,
    batch_tokens: int,
    train: dict | None = None,
) -> float:
    """Peak memory (GB) of one stage: `kind` train | extract | evaluate of a model of `shape`
    with `params_b` billion parameters at `precision`, whose largest micro-batch computes
    `batch_tokens` positions; `train`: the stage's `TrainConfig` as a dict."""
    wbytes = ACT_BYTES[precision]
    width = shape.hidden + shape.intermediate
    per_layer = batch_tokens * width * ACT_BYTES[precision] / 1e9
    if kind != "train" or not train:  # one layer's activations at a time (the LM head runs
        # at a few rows a question: a few MB)
        return BASE_GB + params_b * wbytes + ACT_VALUES["forward"] * per_layer
    if train.get("lora_r", 0) > 0:
        layers = train.get("lora_layers") or shape.layers
        weights = params_b * wbytes  # the frozen base; the adapters are a few MB
    else:
        layers = shape.layers
        weights = params_b * 16  # fp32 weights, gradients and AdamW's two moments
    return BASE_GB + weights + ACT_VALUES["train"] * per_layer * min(layers, shape.layers)


def fallback_gb(params_b: float, train: dict | None, precision: str = "bf16") -> float:
    """Where the model's shape or the data is not known here (a fresh machine before
    `first assets fetch`): the weights, plus a fixed share for everything else."""
    weight_bytes = ACT_BYTES.get(precision, 2)
    if not train:
        return params_b * weight_bytes * 1.25
    if train.get("lora_r", 0) > 0:
        return params_b * weight_bytes * 2.5
    return params_b * 16 * 1.25


def release(acc=None) -> None:
    """Give back to the system what a finished stage freed, so that the next stage's peak is its
    own: the models and optimizers the stage handed to the run's `Accelerator` (`acc`:
    `prepare` keeps a reference to each until `free_memory`, so without it every trained model
    of a run stayed resident to its end: the cpu out-of-domain run's students peaked at 20-21.6
    GB against ~10 GB in a process of their own), Python's reference cycles, then glibc's free
    heap pages (`malloc_trim`; tensors under glibc's mmap threshold are carved from the heap,
    whose freed pages otherwise stay resident). The heap part is a no-op where the C library is
    not glibc."""
    if acc is not None:
        acc.free_memory()
    gc.collect()  # after: free_memory's own collection runs before it drops its lists
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def frozen_heap():
    """Within: the objects that existed before (imported modules, classes, a notebook's state)
    left out of the cyclic garbage collector's passes (`gc.freeze`), so that the collection
    `release` runs after every stage visits only what the run itself made. A full collection on
    a heap that holds torch, transformers, accelerate and peft took 0.15 s on the 2-core AVX2
    EPYC, and a run collects after each of its ~20 stages: 6.4 of the 27 s of a tiny OpenBookQA
    run (cProfile). Frozen objects are still freed by reference counting; those that die in a
    cycle during the run are collected after it (`gc.unfreeze` returns them to the oldest
    generation)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def smaller_batches(
    need: float, fixed: float, have: float, batch_size: int, grad_accum: int
) -> tuple[int, int] | None:
    """(batch_size, grad_accum) with the same examples per optimizer step whose peak fits in
    `have` GB: the micro-batch divided by the smallest power of two that fits (the activations
    shrink with it, the `fixed` part does not); None when one example a micro-batch does not fit."""
    f = 1
    while f <= batch_size:
        if batch_size % f == 0 and fixed + (need - fixed) / f <= have:
            return batch_size // f, grad_accum * f
        f *= 2
    return None


def advice(node, source: str, params_b: float, precision: str, need: float, have: float) -> str:
    """What to change when the stage `node` (a `graph.Node` of the model `source`) needs `need`
    GB on a machine of `have`: for training, the micro-batch that fits with the same optimizer
    steps; always the precision, the profile or the machine."""
    rest = "use --precision bf16 where the hardware has it, a smaller profile or a bigger machine"
    shape = flops.shape_of(source)
    cfg = node.train
    if node.kind != "train" or cfg is None or shape is None:
        return rest
    fixed = stage_gb(shape, params_b, "train", precision, 0, node.key.get("train"))
    fits = smaller_batches(need, fixed, have, cfg.batch_size, cfg.grad_accum)
    if fits is None:
        return rest
    role = node.role or "teacher"
    return (
        f"--set {role}_train.batch_size={fits[0]} --set {role}_train.grad_accum={fits[1]} fits "
        f"with the same examples per optimizer step (about {fixed + (need - fixed) * fits[0] / cfg.batch_size:.0f} GB), or "
        + rest
    )
