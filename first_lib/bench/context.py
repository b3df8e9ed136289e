"""Where the numbers came from: the machine, the commit, and the book build's chapter timings."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from first_lib import device as device_mod
from first_lib.bench.config import REPO


def summarize_timings(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per chapter: the first recorded execution ("cold": it paid for the pipeline runs it asked
    for) and the last ("cached": a re-execution that read them from the cache; None when the
    chapter ran once). Accepts the build's ``{"chapter": {"executions": [{"seconds": ...}]}}``
    and a plain ``{"chapter": seconds}``."""
    out = {}
    for chapter, entry in data.items():
        if isinstance(entry, (int, float)):
            runs = [float(entry)]
        else:
            runs = [float(e["seconds"]) for e in entry.get("executions", [])]
        if runs:
            out[chapter] = {
                "cold": runs[0],
                "cached": runs[-1] if len(runs) > 1 else None,
                "executions": len(runs),
            }
    return out


def chapter_timings(profile: str, root: Path = REPO) -> dict[str, Any]:
    """Per-chapter wall times recorded by the book build (`scripts.build_book`) in
    ``_build/results/<profile>/timings.json``, summarised by `summarize_timings`; None if absent."""
    path = root / "_build" / "results" / profile / "timings.json"
    if not path.is_file():
        return {"chapter_seconds": None, "chapter_seconds_source": f"absent: {path}"}
    try:
        data = summarize_timings(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError):
        return {"chapter_seconds": None, "chapter_seconds_source": f"unreadable: {path}"}
    return {"chapter_seconds": data, "chapter_seconds_source": str(path)}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    if os.environ.get("FIRST_GIT_COMMIT"):
        return os.environ["FIRST_GIT_COMMIT"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    return None


def machine_info(device: str, precision: str) -> dict[str, Any]:
    """Where the numbers came from: CPU, cores, GPU, library versions, precision, date, commit."""
    import torch
    import transformers

    bf16 = precision == "bf16"
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "precision": precision,
        "precision_detail": "bf16 autocast, fp32 master weights (teacher weights bf16)"
        if bf16
        else "fp32 weights and compute",
        "precision_auto_would_pick": "bf16" if device_mod.bf16_is_fast(device) else "fp32",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info
