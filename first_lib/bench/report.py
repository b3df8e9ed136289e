"""The results as a text table, and as a JSON file (atomic write, default path)."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from first_lib import fsio
from first_lib.bench.config import PREFIX_LAYERS, BenchConfig
from first_lib.paths import first_home


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def format_table(results: dict[str, Any]) -> str:
    """The targets table (metric, value, target, ok) and the main absolute numbers, as text."""
    rows = [("metric", "value", "target", "ok")]
    for key, t in results["targets"].items():
        rows.append(
            (key, _fmt(t["value"]), f"{t['op']} {t['target']:g}", "yes" if t["holds"] else "NO")
        )
    d = results["details"]
    extra = [
        ("kd_over_ce_memory_growth", d.get("kd_over_ce_memory_growth")),
        ("coefficient_search_seconds_ls", d.get("coefficient_search_seconds_ls")),
        ("coefficient_search_cpu_seconds", d.get("coefficient_search_cpu_seconds")),
        ("store_bytes_on_disk_per_token", d.get("store_bytes_on_disk_per_token")),
        ("jsonl_bytes_per_token", d.get("jsonl_bytes_per_token")),
        ("full_fp16_bytes_per_token", d.get("full_fp16_bytes_per_token")),
        ("extract_all_over_forward_throughput", d.get("extract_all_over_forward_throughput")),
        (
            "extract_over_full_logits_forward",
            d.get("extract_over_full_logits_forward_throughput"),
        ),
        ("extract_tokens_per_s", d.get("extract_tokens_per_s")),
        ("forward_tokens_per_s", d.get("forward_tokens_per_s")),
        ("extract_mfu", d.get("extract_mfu")),
        ("forward_mfu", d.get("forward_mfu")),
    ]
    for p, gflops in (results.get("matmul_peak_gflops") or {}).items():
        extra.append((f"matmul_peak_gflops[{p}]", gflops))
    for v, x in (d.get("train_mfu") or {}).items():
        extra.append((f"train_mfu[{v}]", x))
    reuse = d.get("prefix_reuse") or {}
    for top in PREFIX_LAYERS if reuse else ():
        for what in ("train", "eval"):
            r = reuse[f"L{top}"][what]
            if top != PREFIX_LAYERS[0]:
                extra.append((f"prefix_reuse_{what}_speedup_L{top}", r["speedup"]))
            extra.append(
                (f"prefix_reuse_{what}_build_in_plain_runs[L{top}]", r["build_in_plain_runs"])
            )
    for impl, ratio in (d.get("offline_over_online_step_time_by_impl") or {}).items():
        extra.append((f"offline_over_online[{impl}]", ratio))
    for v, tps in (d.get("train_tokens_per_s") or {}).items():
        extra.append((f"train_tokens_per_s[{v}]", tps))
    for v, s in (d.get("step_seconds") or {}).items():
        extra.append((f"step_seconds[{v}]", s))
    rows += [(k, _fmt(v), "", "") for k, v in extra if v is not None]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    m = results["machine"]
    lines.append("")
    lines.append(
        f"machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads)"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; {m['precision']}; torch {m['torch']}; {m['date']}"
    )
    lines.append(f"online step: {results.get('online_impl')}")
    la = results["load_average"]
    lines.append(f"load average: start {la['start'][0]:.2f}, end {la['end'][0]:.2f}")
    return "\n".join(lines)


def default_out(cfg: BenchConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return first_home() / "bench" / f"bench-{cfg.device}-{cfg.preset}-{stamp}.json"


def write_json(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write `results` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return fsio.atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
