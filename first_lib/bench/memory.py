"""Peak memory of a CE and a KD training run, each in a fresh worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from first_lib.bench.config import REPO, BenchConfig
from first_lib.bench.models import build_model, make_examples
from first_lib.bench.shared import _accelerator, _dtypes, _train_config
from first_lib.errors import FirstError


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: build the student, train `spec['loss']` for `steps` steps on the
    store, and return the peak memory of the training (see `measure_memory`)."""
    import torch

    from first_lib import train
    from first_lib.knowledge import TopKStore

    cfg = BenchConfig(**{**spec["cfg"], "online": tuple(spec["cfg"]["online"])})
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dtype, _ = _dtypes(cfg)
    student = build_model(cfg.student, cfg.device, dtype, cfg.seed + 1)
    vocab = student.get_input_embeddings().num_embeddings
    examples = make_examples(cfg.n_examples, cfg.seq_len, vocab, cfg.target_frac, cfg.seed)
    topk = TopKStore(spec["store"])
    acc = _accelerator(cfg)
    tcfg = _train_config(cfg, spec["loss"])
    teacher = topk.example if spec["loss"] == "kd" else None
    out: dict[str, Any] = {"loss": spec["loss"], "device": cfg.device}
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train.train(
            student, examples, tcfg, pad_id=0, teacher=teacher, accelerator=acc, progress=False
        )
        torch.cuda.synchronize()
        out.update(
            measure="torch.cuda.max_memory_allocated",
            peak_bytes=int(torch.cuda.max_memory_allocated()),
            before_bytes=int(before),
        )
    else:
        before = _rss_bytes("VmRSS")
        reset = _reset_hwm()
        train.train(
            student, examples, tcfg, pad_id=0, teacher=teacher, accelerator=acc, progress=False
        )
        out.update(
            measure="VmHWM (peak RSS) reset before training"
            if reset
            else "VmHWM (peak RSS of the whole process: reset not allowed)",
            peak_bytes=_rss_bytes("VmHWM"),
            before_bytes=before,
        )
    out["growth_bytes"] = out["peak_bytes"] - out["before_bytes"]
    return out


def measure_memory(cfg: BenchConfig, store: Path) -> dict[str, Any]:
    """Peak memory of a CE and of a KD training run (`memory_worker`), each in a fresh Python
    process, so that nothing else the benchmark built is counted."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    procs = {}
    for loss in ("ce", "kd"):  # both at once: peaks are per process
        spec = {"cfg": asdict(cfg), "store": str(store), "loss": loss}
        procs[loss] = subprocess.Popen(
            [sys.executable, "-m", "first_lib.bench", "--memory-worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO),
        )
    runs = {}
    for loss, proc in procs.items():
        stdout, stderr = proc.communicate()
        lines = stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise FirstError(f"memory worker ({loss}) failed:\n{stderr[-3000:]}")
        runs[loss] = json.loads(lines[-1])
    ce, kd = runs["ce"], runs["kd"]
    return {
        "kd_over_ce_peak_memory": kd["peak_bytes"] / ce["peak_bytes"],
        "kd_over_ce_memory_growth": kd["growth_bytes"] / max(ce["growth_bytes"], 1),
        "peak_memory_bytes": {"ce": ce["peak_bytes"], "kd": kd["peak_bytes"]},
        "memory_growth_bytes": {"ce": ce["growth_bytes"], "kd": kd["growth_bytes"]},
        "memory_measure": ce["measure"],
    }


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    print(json.dumps(memory_worker(spec)), flush=True)
    return 0
