"""Labels and number formatting for the book's tables and prose (variants, percent, bytes)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from first_lib.pipeline import VARIANTS

VARIANT_LABELS: dict[str, str] = {
    "teacher": "Teacher",
    "finetune": "Fine-tune",
    "distill": "Distill",
    "distill_ls": "Distill w/ LS",
    "first_ts": "FIRST w/ TS",
    "finetune_posthoc_ts": "Fine-tune + TS",
    "distill_posthoc_ts": "Distill + TS",
    "teacher_base": "Teacher (untuned)",
    "student_base": "Student (untuned)",
}
STUDENT_VARIANTS = tuple(v for v in VARIANTS if v != "teacher")
TABLE_ORDER = VARIANTS
TEST_LABELS = {"csqa": "CSQA", "boolq": "BoolQ", "obqa": "OBQA"}


def size_label(model_name: str) -> str:
    """A short size tag from a model name: 'qwen2.5-coder-1.5b-instruct' -> '1.5B'; else ''."""
    if model_name.startswith("tiny:") or "tiny" in model_name.lower():
        return "tiny"
    m = re.search(r"(\d+(?:\.\d+)?)([bm])(?![a-z])", model_name.lower())
    return f"{m.group(1)}{m.group(2).upper()}" if m else ""


def variant_label(variant: str, results: Mapping[str, Any] | None = None) -> str:
    """'FIRST w/ TS 0.5B' style labels, with the model size when `results` is given."""
    label = VARIANT_LABELS.get(variant, variant)
    if results is None:
        return label
    model = results["teacher"] if variant.startswith("teacher") else results["student"]
    size = size_label(str(model))
    return f"{label} {size}".strip()


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage without the sign: 0.1234 -> '12.3'."""
    return f"{100 * float(x):.{digits}f}"


def pct_ci(point: float, lo: float, hi: float, digits: int = 1) -> str:
    """'12.3 [10.1, 14.5]' (percentages)."""
    return f"{pct(point, digits)} [{pct(lo, digits)}, {pct(hi, digits)}]"


def signed(x: float, digits: int = 1, scale: float = 100.0) -> str:
    """'+1.2' / '-3.4' (percentage points by default)."""
    return f"{scale * float(x):+.{digits}f}"


def human_bytes(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def metrics_row(m: Mapping[str, Any]) -> dict[str, str]:
    """ECE, Acc and Trust of a `summarize` dict as 'value [lo, hi]' strings (percent)."""
    row = {
        "ECE ↓": pct_ci(m["ece"], *m["ece_ci"]),
        "Acc ↑": pct_ci(m["acc"], *m["acc_ci"]),
    }
    trust_ci = m.get("trust_ci")
    row["Trust ↑"] = pct_ci(m["trust"], *trust_ci) if trust_ci else pct(m["trust"])
    return row
