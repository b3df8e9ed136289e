"""How much memory does a LoRA training step hold? Measured on the real models, for the memory
estimate of `first run --dry-run` (`first_lib/pipeline/memory.py`).

Each probe loads a model at a precision, then runs two optimizer steps of the pipeline's own
`train.train` (LoRA rank 16 on every linear map of the top `layers` decoder layers, the cpu
profile's recipe) on 8 examples of exactly `tokens` tokens (OpenBookQA training prompts repeated
to that length), and reads the stage's peak memory as every stage records it
(`perf.peak_memory_gb`, `flops.PeakMemory`). Each probe runs in a process of its own, so one
probe's freed memory does not count in the next. Beside each measurement it writes the estimate
`memory.stage_gb` gives for the same step.

    python -m scripts.memory_probe --out bench/stage-memory-cpu.json \\
        --probe qwen2.5-coder-0.5b-instruct:61:0 --probe qwen2.5-coder-0.5b-instruct:122:0 ...

A probe is MODEL:TOKENS_PER_EXAMPLE:LAYERS (0: all). Runs one probe at a time; a probe that the
machine cannot hold is killed by the kernel and recorded as such, not retried.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BATCH = 8


def probe(model: str, tokens: int, layers: int, precision: str) -> dict:
    """One probe, in this process."""

    from first_lib import device, flops, models, pipeline, train
    from first_lib.config import TrainConfig
    from first_lib.pipeline import memory
    from first_lib.profiles import for_setting, get_profile

    prof = for_setting(get_profile("cpu"), "obqa")
    tok = models.load_tokenizer(model)
    rows = pipeline.load_questions(prof, "obqa")["train"][:BATCH]
    examples = pipeline.tokenize(tok, rows, prof, "obqa")
    for ex in examples:  # real text, every example exactly `tokens` long, one target near the end
        ids = ex["input_ids"]
        ex["input_ids"] = (ids * (tokens // len(ids) + 1))[-tokens:]
        ex["target_mask"] = [False] * tokens
        ex["target_mask"][-2] = True
    dtype = device.torch_dtype(precision)
    model_obj = models.load_model(model, dtype=dtype, device="cpu")
    params_b = sum(p.numel() for p in model_obj.parameters()) / 1e9
    loaded = flops.PeakMemory()  # resets the peak: what the loaded model holds at rest
    loaded_gb = loaded.gb("cpu")
    cfg = TrainConfig(loss="ce", lr=1e-4, epochs=1, batch_size=BATCH, lora_r=16, lora_alpha=32,
                      lora_layers=layers, max_steps=2, save_every=1000)  # fmt: skip
    t0 = time.perf_counter()
    _, log = train.train(model_obj, examples, cfg, tok.pad_token_id or 0, progress=False,
                         precision=precision, prefix_reuse=False)  # fmt: skip
    peak = log["perf"].get("peak_memory_gb")
    del model_obj, log, _  # the stage is over: what does the process keep, before and after
    rss_kept = flops._status_kb("VmRSS") / 1e6  # `memory.release` (as the runner calls it)?
    memory.release()
    rss_released = flops._status_kb("VmRSS") / 1e6
    shape = flops.shape_of(model)
    estimate = memory.stage_gb(shape, params_b, "train", precision, BATCH * tokens,
                               {"lora_r": 16, "lora_layers": layers})  # fmt: skip
    return {
        "model": model,
        "precision": precision,
        "tokens_per_example": tokens,
        "batch_tokens": BATCH * tokens,
        "layers": layers or shape.layers,
        "params_b": round(params_b, 4),
        "shape": shape.to_dict(),
        "loaded_gb": loaded_gb,
        "peak_memory_gb": peak,
        "kept_after_stage_gb": round(rss_kept, 3),
        "kept_after_release_gb": round(rss_released, 3),
        "estimate_gb": round(estimate, 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", action="append", default=[], help="MODEL:TOKENS:LAYERS")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--out", default=None, help="JSON file to write (and to add to)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process's probe
    args = p.parse_args(argv)
    if args.one:
        model, tokens, layers = args.one.split(":")
        print(json.dumps(probe(model, int(tokens), int(layers), args.precision)))
        return 0
    from first_lib import device, fsio
    from first_lib.provenance import git_commit

    out = Path(args.out) if args.out else None
    done = json.loads(out.read_text()) if out and out.is_file() else {"probes": []}
    for spec in args.probe:
        cmd = [sys.executable, "-m", "scripts.memory_probe", "--one", spec,
               "--precision", args.precision]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            line = {"probe": spec, "precision": args.precision, "returncode": proc.returncode,
                    "error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}  # fmt: skip
        else:
            line = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(line), flush=True)
        done["probes"].append(line)
    done.update(
        machine=device.cpu_model(),
        code=git_commit(),
        method=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    if out:
        fsio.atomic_write_json(out, done, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
