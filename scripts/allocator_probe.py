"""Training steps under each memory allocator this machine has: glibc's own, jemalloc, tcmalloc.

A tensor larger than glibc's mmap threshold (at most 32 MB; any size in a thread's own arena
above 64 MB) is mapped fresh from the kernel on every allocation and unmapped when freed, so
every step pays a page fault (and the kernel's zeroing) for each 4 KB of it: the logits of a
run whose every answer token is a target (the out-of-domain setting: hundreds of rows x 151,936
tokens), the MLP activations of long BoolQ passages. That is system time, not model work, and
it does not shrink when the matrix products get faster, so it weighs most where bf16 runs fast.
jemalloc and tcmalloc keep freed memory for reuse. This measures, for one role's training
steps on one setting's questions (`train.train`, what a run does, no checkpoint, no prefix
cache), the steps' seconds, the process's system time and minor page faults during them, and
its peak resident memory, each allocator in its own process (``LD_PRELOAD``), alternated round
by round so that a slower phase of the machine hits all of them.

    python -m scripts.allocator_probe [--setting ood] [--role student] [--steps 4]
        [--rounds 2] [--precision auto|fp32|bf16] [--json FILE]

Allocators are looked for under their Debian names (``apt-get install libjemalloc2
libtcmalloc-minimal4``); those not found are left out. jemalloc runs with its decay off
(``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``: freed pages stay with the process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

LIBS = {
    "jemalloc": ("libjemalloc.so.2",),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
ENV = {"jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}}


def allocators() -> dict[str, str | None]:
    """{name: library path} of the allocators found (glibc: None, always there)."""
    found: dict[str, str | None] = {"glibc": None}
    for name, files in LIBS.items():
        for folder in LIB_DIRS:
            hit = next((Path(folder, f) for f in files if Path(folder, f).exists()), None)
            if hit is not None:
                found[name] = str(hit)
                break
    return found


def _steps(setting: str, role: str, steps: int, precision: str) -> dict:
    """In this process: `steps` optimizer steps of the cpu profile's `role` on `setting`, and
    this process's system time, page faults and peak memory over them."""
    import resource

    from first_lib import device, models
    from scripts.train_step_probe import probe_inputs, train_steps

    precision, cfg, source, tokenizer, examples = probe_inputs(
        "cpu", setting, role, steps, precision
    )
    model = models.load_model(source, dtype=device.torch_dtype(precision))
    before = resource.getrusage(resource.RUSAGE_SELF)
    log = train_steps(model, examples, cfg, tokenizer, precision)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "precision": precision,
        "seconds": round(log["perf"]["seconds"], 2),
        "mfu": log["perf"]["mfu"],
        "system_seconds": round(after.ru_stime - before.ru_stime, 2),
        "user_seconds": round(after.ru_utime - before.ru_utime, 2),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "peak_rss_gb": round(after.ru_maxrss / 1e6, 2),  # ru_maxrss is in KB on Linux
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="ood")
    p.add_argument("--role", choices=("student", "teacher"), default="student")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one measurement, in the process the parent started with its allocator
        print("RESULT " + json.dumps(_steps(args.setting, args.role, args.steps, args.precision)))
        return {}

    from first_lib import device

    found = allocators()
    names = list(found)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            env = dict(os.environ)
            if found[name]:
                env["LD_PRELOAD"] = found[name]
                env.update(ENV.get(name, {}))
            cmd = [sys.executable, "-m", "scripts.allocator_probe", "--child"]
            cmd += ["--setting", args.setting, "--role", args.role, "--steps", str(args.steps)]
            cmd += ["--precision", args.precision]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"allocator_probe: the {name} run failed:\n{out.stderr[-2000:]}")
            got = json.loads(line[len("RESULT ") :])
            runs[name].append(got)
            print(
                f"round {r} {name:8s} {got['seconds']:6.1f} s of steps, system "
                f"{got['system_seconds']:5.1f} s, {got['minor_faults']:9d} page faults, "
                f"peak {got['peak_rss_gb']:.1f} GB",
                flush=True,
            )
    best = {n: min(x["seconds"] for x in runs[n]) for n in names}
    result = {
        "setting": args.setting,
        "role": args.role,
        "steps": args.steps,
        "precision": runs[names[0]][0]["precision"],
        "machine": device.cpu_model(),
        "bf16_features": device.cpu_bf16_features(),
        "allocators": {n: found[n] or "glibc malloc" for n in names},
        "runs": runs,
        "best_seconds": best,
        "speedup_over_glibc": {n: best["glibc"] / best[n] for n in names if n != "glibc"},
    }
    for n, s in result["speedup_over_glibc"].items():
        print(f"{n} over glibc: {s:.2f}x (best of {args.rounds} each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
