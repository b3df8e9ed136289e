"""Runs as a chapter sees them: a setting's results, its stages' costs, its records."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from first_lib.book.labels import (
    STUDENT_VARIANTS,
    TABLE_ORDER,
    VARIANT_LABELS,
    metrics_row,
    pct_ci,
    variant_label,
)
from first_lib.errors import FirstError
from first_lib.pipeline import TRANSFORM_OF

ALLOW_COMPUTE = "FIRST_ALLOW_COMPUTE"


def missing_work(profile: str, setting: str, **overrides) -> list[str]:
    """The artefacts a run of `profile` x `setting` would still compute (stage names, and
    `evaluate <model> on <test>`), from the keys alone: nothing is loaded."""
    from first_lib import pipeline
    from first_lib.profiles import for_setting, get_profile

    prof = for_setting(get_profile(profile, **overrides), setting)
    todo: list[str] = []
    for seed in prof.seeds:  # the untuned baselines are shared: listed once
        one = for_setting(get_profile(profile, **{**overrides, "seed": seed}), setting)
        todo += [name for name in pipeline.missing(one, setting) if name not in todo]
    return todo


def compute_time(profile: str, setting: str, **overrides) -> str:
    """How long the missing work of a run would take here, as a phrase."""
    from first_lib.pipeline import clock
    from first_lib.profiles import for_setting, get_profile

    prof = for_setting(get_profile(profile, **overrides), setting)
    rows = []
    for seed in prof.seeds:
        rows += clock.estimate(
            for_setting(get_profile(profile, **overrides, seed=seed), setting), setting
        )
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
    """Results of `first run --profile P --setting S` (cached stages), written under out_dir;
    one run per training seed of the profile's `seeds` (`first run --seeds`), pooled by
    `seed_records`.

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
    from first_lib.profiles import for_setting, get_profile

    seeds = for_setting(get_profile(profile, **overrides), setting).seeds
    if len(seeds) > 1:
        results = pipeline.run_seeds(profile, setting, out, seeds, log=messages.append, **overrides)
    else:
        results = pipeline.run(profile, setting, out=out, log=messages.append, **overrides)
    results = dict(results)
    # the estimates, kept apart from results.json (machine-specific): one clock.json per seed
    results["_clocks"] = {
        seed: json.loads(path.read_text()) if (path := folder / "clock.json").is_file() else {}
        for seed, folder in _seed_folders(out, results)
    }
    results["_clock"] = next(iter(results["_clocks"].values()), {})
    results["_log"] = messages
    results["_seconds"] = round(time.perf_counter() - t0, 2)
    return results


def _seed_folders(out: Path, results: Mapping[str, Any]) -> list[tuple[int, Path]]:
    """(seed, run folder) of each training seed of a run written under `out`."""
    if results.get("by_seed"):
        return [(int(s), out / f"seed-{s}") for s in results["by_seed"]]
    return [(int(results.get("config", {}).get("seed", 0)), out)]


def _seed_blocks(results: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    """(seed, block with that seed's `artefacts` and `by_test`) of each training seed."""
    if results.get("by_seed"):
        return [(int(s), block) for s, block in results["by_seed"].items()]
    return [(int(results.get("config", {}).get("seed", 0)), results)]


STAGE_LABELS = {
    "teacher": "teacher fine-tuning",
    "store": "top-k extraction",
    **{v: VARIANT_LABELS[v] for v in STUDENT_VARIANTS},
}


def stage_seconds(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The wall time each stage of a run recorded in its artefact's meta.json (None when it
    recorded none), summed over the run's training seeds, plus one entry per test set for its
    evaluations; an artefact shared by seeds (an untuned model's evaluation) counts once. A stage
    that was interrupted and resumed records only the part after its last restart, so these are
    lower bounds."""

    from first_lib.pipeline import is_done, read_meta

    seen: set[str] = set()

    def wall(folder: Path) -> float | None:
        if str(folder) in seen:
            return 0.0
        seen.add(str(folder))
        return read_meta(folder).get("wall_seconds") if is_done(folder) else None

    out: dict[str, float | None] = {}
    for _, block in _seed_blocks(results):
        for key, label in STAGE_LABELS.items():
            if key in block["artefacts"]:
                w = wall(Path(block["artefacts"][key]))
                out[label] = None if w is None else (out.get(label) or 0.0) + w
        for test, tblock in block["by_test"].items():
            walls = [wall(Path(path).parent) for path in tblock["records"].values()]
            name = f"evaluation on {test}"
            out[name] = (out.get(name) or 0.0) + sum(w or 0.0 for w in walls)
    return out


# stage of the plan -> its key in results["artefacts"]
_ARTEFACT_OF = {
    "teacher": "teacher",
    "extract": "store",
    "finetune": "finetune",
    **{f"distill-{transform}": v for v, transform in TRANSFORM_OF.items()},
}


def stage_folder(results: Mapping[str, Any], stage: str) -> Path | None:
    """The artefact folder of a stage of the clock (`teacher`, `distill-ts`, `evaluate first_ts
    on csqa`, ...) in a run's results, or None (calibration keeps no folder in the results)."""
    if stage in _ARTEFACT_OF:
        return Path(results["artefacts"][_ARTEFACT_OF[stage]])
    if stage.startswith("check-"):  # a held-out check (`first_lib.heldout`), under its own name
        folder = results["artefacts"].get(stage)
        return Path(folder) if folder else None
    if stage.startswith("evaluate "):
        _, model, _, test = stage.split(" ")
        records = results["by_test"].get(test, {}).get("records", {})
        return Path(records[model]).parent if model in records else None
    return None


def stage_costs(results: Mapping[str, Any]) -> list[dict]:
    """Per training seed and stage of a run (as `run_setting` returns it, with each seed's
    `clock.json` under `_clocks`): the time estimated before it ran, the time it took
    (`wall_seconds` in its meta.json), and its utilisation (`perf.mfu`, `perf.pad_fraction`)
    where the stage recorded them, with the cores other processes kept busy while it ran
    (`perf.other_cores`: above `flops.CONTENDED_CORES` its mfu measured a shared machine), and
    its peak memory, estimated before (`memory_gb` of clock.json) and measured
    (`perf.peak_memory_gb`)."""
    from first_lib.pipeline import is_done, read_meta

    clocks = results.get("_clocks") or {None: results.get("_clock") or {}}
    blocks = dict(_seed_blocks(results))
    rows = []
    for seed, clock in clocks.items():
        block = blocks.get(seed, results)
        for stage, est in clock.items():
            folder = stage_folder(block, stage)
            meta = read_meta(folder) if folder is not None and is_done(folder) else {}
            perf = meta.get("perf") or {}
            rows.append(
                {
                    "seed": seed,
                    "stage": stage,
                    "estimate_s": est["seconds"],
                    "estimated": est.get("made", "before"),
                    "actual_s": meta.get("wall_seconds"),
                    "mfu": perf.get("mfu"),
                    "pad_fraction": perf.get("pad_fraction"),
                    # cores other processes kept busy meanwhile (None: not measured)
                    "other_cores": perf.get("other_cores"),
                    # peak memory: estimated before, measured by the stage (GB; None: not)
                    "memory_est_gb": est.get("memory_gb"),
                    "memory_gb": perf.get("peak_memory_gb"),
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
    """Records of every variant and baseline of one test set, sorted by question id: the first
    training seed's (figures of one model); `seed_records` has every seed's (statistics)."""
    test = test or next(iter(results["by_test"]))
    paths = results["by_test"][test]["records"]
    return {name: sorted(load_records(p), key=lambda r: str(r["id"])) for name, p in paths.items()}


def seeds_of(results: Mapping[str, Any]) -> list[int]:
    """The training seeds of a run (one, `[seed]`, for a run made without `--seeds`)."""
    return [int(s) for s in results.get("seeds") or [results["config"]["seed"]]]


def seed_records(results: Mapping[str, Any], test: str | None = None) -> dict[str, dict]:
    """{variant: {seed: records}} of one test set, every training seed of the run: the shape
    `stats.compare`, `stats.estimate` and `verdicts` pool (intervals over questions and seeds).
    A baseline (untuned) model is one evaluation shared by every seed: it appears once."""
    test = test or next(iter(results["by_test"]))
    by_seed = results.get("by_seed") or {str(seeds_of(results)[0]): results}
    out: dict[str, dict] = {}
    for seed, block in by_seed.items():
        for name, path in block["by_test"][test]["records"].items():
            if name in out and path in out[name]["_paths"]:
                continue  # a shared evaluation (an untuned baseline): once
            entry = out.setdefault(name, {"_paths": set()})
            entry["_paths"].add(path)
            entry[int(seed)] = sorted(load_records(path), key=lambda r: str(r["id"]))
    return {name: {s: r for s, r in e.items() if s != "_paths"} for name, e in out.items()}


def seed_held_out(results: Mapping[str, Any]) -> dict[str, dict]:
    """{variant: {seed: held-out record}} of a run that checked its models on held-out data
    (`first_lib.heldout`; results.json's `held_out`), every training seed: what
    `verdicts.training_checks` takes as ``held_out``. Empty for a run that made no such check."""
    by_seed = results.get("by_seed") or {str(seeds_of(results)[0]): results}
    out: dict[str, dict] = {}
    for seed, block in by_seed.items():
        for name, record in (block.get("held_out") or {}).items():
            out.setdefault(name, {})[int(seed)] = record
    return out


def metrics_table(
    results: Mapping[str, Any],
    test: str | None = None,
    with_base: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
):
    """Table 1 for one test set: a pandas DataFrame of 'value [95% CI]' strings (percent). A run
    of several training seeds shows each metric's mean over the seeds, its interval resampling
    questions and seeds together (`stats.estimate`); one seed: the run's stored metrics."""
    import pandas as pd

    test = test or next(iter(results["by_test"]))
    block = results["by_test"][test]
    names = [
        b for b in ("teacher_base", "student_base") if with_base and b in block.get("baselines", {})
    ]
    names += list(TABLE_ORDER)
    if len(results.get("seeds") or []) > 1:
        from first_lib import stats

        recs = seed_records(results, test)

        def row(v):
            est = {
                m: stats.estimate(recs[v], m, n_boot=n_boot, seed=seed)
                for m in ("ece", "acc", "trust")
            }
            return {
                f"{name} {arrow}": pct_ci(e.point, e.lo, e.hi)
                for (name, arrow), e in zip(
                    (("ECE", "↓"), ("Acc", "↑"), ("Trust", "↑")), est.values(), strict=True
                )
            }
    else:

        def row(v):
            return metrics_row(
                block["baselines"][v] if v.endswith("_base") else block["variants"][v]
            )

    return pd.DataFrame.from_dict(
        {variant_label(v, results): row(v) for v in names}, orient="index"
    )
