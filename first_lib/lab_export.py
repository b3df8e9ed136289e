"""`first export-records`: a finished run's per-question records of one test set packed into
one lab file (the format `first_lib.lab` describes and loads), checked record by record against
what the loader gives back; and `--add-to`, which merges a run of other training seeds into a
file of the same design made earlier, maybe on another machine."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from first_lib import fsio
from first_lib.errors import FirstError
from first_lib.lab import (
    DIGITS,
    FORMAT,
    ROUNDING,
    TOLERANCE,
    VERSION,
    _locate,
    _read_json_gz,
    _unpack,
    default_file,
    export_command,
    load_lab_records,
    resolve,
)
from first_lib.pipeline.graph import BASELINES, POSTHOC
from first_lib.provenance import git_commit, iso

# ----------------------------------------------------------------------------- exporting


def _read_results(run: Path) -> dict:
    """A run's results.json; for a `--seeds` run that has not finished every seed (still going,
    or stopped), its finished seeds, combined as the run will combine them."""
    path = run / "results.json" if run.is_dir() else run
    if not path.is_file() and run.is_dir() and any(run.glob("seed-*/results.json")):
        from first_lib.pipeline.runner import finished_seeds

        return finished_seeds(run)
    if not path.is_file():
        raise FirstError(
            f"no results.json at {path}: give the --out folder of a finished `first run`"
        )
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FirstError(f"no evaluation records at {path} (the run's artefacts were cleaned?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: str(r["id"]))


def _meta(folder: Path) -> dict:
    path = folder / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _pack(records: Sequence[dict], raw_from: str | None, where: str) -> dict:
    """One variant and seed: probabilities (float32 where they all are), predictions and the
    candidates' mass (`raw_from`: the variant whose raw_probs these records share instead)."""
    rows = [np.asarray(r["probs"], dtype=np.float64) for r in records]
    exact32 = all(np.array_equal(row.astype(np.float32), row) for row in rows)
    # float(str(float32)): a float whose repr is float32's shortest decimals (short JSON)
    probs = (
        [[float(str(x)) for x in row.astype(np.float32)] for row in rows]
        if exact32
        else [row.tolist() for row in rows]
    )
    pred, mass = [], []
    for r in records:
        if r.get("raw_probs") is None:
            raise FirstError(f"{where}: records without raw_probs (made by an older version?)")
        pred.append(int(r["pred"]))
        mass.append(round(float(np.log(np.sum(r["raw_probs"]))), DIGITS))
    extra = {"raw_from": raw_from} if raw_from else {"log_mass": mass}
    return {"dtype": "float32" if exact32 else "float64", "probs": probs, "pred": pred, **extra}


def _relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _check(written: Sequence[dict], back: Sequence[dict], where: str) -> None:
    """Refuse a block whose records, as the loader recomputes them, are not the run's."""
    for r, b in zip(written, back, strict=True):
        for field, tolerance in TOLERANCE.items():
            err = _relative(b[field], r[field])
            if err > tolerance or (field == "probs" and b["confidence"] != r["confidence"]):
                raise FirstError(
                    f"{where}, question {r['id']}: {field} recomputed from the file differ from "
                    f"the record's by a relative {err:.2g} (more than {tolerance})"
                )
        if b["pred"] != r["pred"] or b["correct"] != bool(r["correct"]):
            raise FirstError(f"{where}, question {r['id']}: prediction not kept")


def _machine(results: Mapping[str, Any]) -> dict:
    """Where the run computed, as its teacher's training recorded it (`perf` in meta.json)."""
    meta = _meta(Path(results["artefacts"]["teacher"]))
    perf = meta.get("perf") or {}
    return {
        "hardware": perf.get("hardware"),
        "device": perf.get("device"),
        "processes": meta.get("num_processes"),
        "precision": results.get("precision"),
    }


def _evaluations(results: Mapping[str, Any], test: str):
    """(seed, variant, records path, seed's block of results.json) of every evaluation of a run
    on `test`, each once: an untuned baseline is one evaluation shared by every seed."""
    seeds = [str(s) for s in results.get("seeds") or [results["config"]["seed"]]]
    by_seed = results.get("by_seed") or {seeds[0]: results}
    seen: set[str] = set()
    for seed in seeds:
        for variant, path in by_seed[seed]["by_test"][test]["records"].items():
            if path not in seen:
                seen.add(path)
                yield seed, variant, Path(path), by_seed[seed]


def _run_metrics(block: Mapping[str, Any], test: str, variant: str) -> dict | None:
    """The metrics results.json gives a variant (numbers only: intervals are recomputed)."""
    tested = block["by_test"][test]
    found = {**tested.get("variants", {}), **tested.get("baselines", {})}.get(variant)
    return None if found is None else {k: v for k, v in found.items() if type(v) in (int, float)}


def _held_out(results: Mapping[str, Any]) -> dict:
    """{model: {seed: record}}: each trained model's training loss on held-out data of its task,
    tuned and untuned (`first_lib.heldout`), where the run made that check (else empty)."""
    seeds = [str(s) for s in results.get("seeds") or [results["config"]["seed"]]]
    by_seed = results.get("by_seed") or {seeds[0]: results}
    out: dict = {}
    for seed in seeds:
        for model, record in (by_seed[seed].get("held_out") or {}).items():
            out.setdefault(model, {})[seed] = record
    return out


def _provenance(results: Mapping[str, Any], stage_code: dict, finished: float) -> dict:
    """What made the records: the run's config and seeds, its machine, the code's versions."""
    seeds = [int(s) for s in results.get("seeds") or [results["config"]["seed"]]]
    by_seed = results.get("by_seed") or {str(seeds[0]): results}
    for name, folder in results["artefacts"].items():
        stage_code[name] = (_meta(Path(folder)).get("key") or {}).get("code")
    return {
        **{k: results.get(k) for k in ("profile", "setting", "note", "precision")},
        **{k: results.get(k) for k in ("teacher", "student", "n_train", "n_validation")},
        "seeds": seeds,
        "calibration": {
            s: {"c_star": b.get("c_star"), "delta": b.get("delta")} for s, b in by_seed.items()
        },
        "config": results["config"],
        "machine": _machine(results),
        "code": {**git_commit(), "stage_versions": dict(sorted(stage_code.items()))},
        "run_finished": iso(finished) if finished else None,
    }


def export_records(
    run: str | os.PathLike,
    test: str | None = None,
    out: str | os.PathLike | None = None,
    add_to: str | os.PathLike | None = None,
) -> Path:
    """Write the lab file of a finished run (`first run --out DIR`, with or without `--seeds`;
    of a `--seeds` run not yet finished, its finished seeds): the records of every variant and
    seed on `test` (default: the run's first test set), the run's config, machine and code
    versions. Default `out`: `add_to`, else `default_file(profile, test)`. With `add_to` (a lab
    file of other training seeds of the same design, made earlier, maybe on another machine),
    the file written holds the seeds of both (`merge_lab_data`)."""
    run = Path(run)
    results = _read_results(run)
    test = test or next(iter(results["by_test"]))
    if test not in results["by_test"]:
        raise FirstError(
            f"the run has no test set {test!r}; it has {', '.join(results['by_test'])}"
        )
    earlier = _read_json_gz(_locate(add_to)) if add_to is not None else None
    out = Path(out or add_to or default_file(results["profile"], test, results.get("setting")))
    blocks, written, run_metrics, temperatures = {}, {}, {}, {}
    ids = gold = None
    stage_code, finished = {}, 0.0
    for seed, variant, path, block in _evaluations(results, test):
        records, meta = _jsonl(path), _meta(path.parent)
        if ids is None:
            ids, gold = [str(r["id"]) for r in records], [int(r["gold"]) for r in records]
        if [str(r["id"]) for r in records] != ids or [int(r["gold"]) for r in records] != gold:
            raise FirstError(f"{variant}, seed {seed}: evaluated on other questions")
        raw_from = POSTHOC.get(variant)  # a post-hoc variant keeps its model's raw_probs
        blocks.setdefault(variant, {})[seed] = _pack(records, raw_from, f"{variant}, seed {seed}")
        written.setdefault(variant, {})[seed] = records
        run_metrics.setdefault(variant, {})[seed] = _run_metrics(block, test, variant)
        if raw_from is not None:
            temperatures.setdefault(variant, {})[seed] = meta.get("temperature")
        stage_code[meta.get("stage", "evaluate")] = (meta.get("key") or {}).get("code")
        finished = max(finished, (path.parent / "meta.json").stat().st_mtime if meta else 0.0)
    for variant, by_seed in _unpack(ids, gold, blocks, "export").items():
        for seed, back in by_seed.items():
            _check(written[variant][str(seed)], back, f"{variant}, seed {seed}")
    data = {
        "format": FORMAT,
        "version": VERSION,
        "rounding": ROUNDING,
        "test": test,
        **_provenance(results, stage_code, finished),
        "exported": iso(dt.datetime.now(dt.UTC).timestamp()),
        "command": export_command(str(run), test, str(out), add_to and str(add_to)),
        "posthoc_temperatures": temperatures,
        "run_metrics": run_metrics,
        "held_out": _held_out(results),
        "ids": ids,
        "gold": gold,
        "records": blocks,
    }
    if earlier is not None:
        data = merge_lab_data(earlier, data, str(add_to))
    text = json.dumps(data, separators=(",", ":"))
    out.parent.mkdir(parents=True, exist_ok=True)
    return fsio.atomic_write_bytes(out, gzip.compress(text.encode(), compresslevel=9, mtime=0))


# The untuned models: one evaluation shared by every training seed (kept once in a file).
SHARED = tuple(BASELINES)
_SOURCE_KEYS = ("seeds", "machine", "code", "run_finished", "exported", "command")


def _blocks_agreement(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    """How closely two evaluations of one model agree (an untuned baseline evaluated again by a
    later run, maybe on another CPU): the share of questions with the same prediction and the
    largest difference of a candidate probability."""
    pa, pb = np.asarray(a["probs"], dtype=np.float64), np.asarray(b["probs"], dtype=np.float64)
    same = float(np.mean(np.asarray(a["pred"]) == np.asarray(b["pred"])))
    return {"same_prediction": same, "max_prob_difference": float(np.max(np.abs(pa - pb)))}


def merge_lab_data(earlier: Mapping[str, Any], new: Mapping[str, Any], where: str) -> dict:
    """One lab file's data from two of the same design with different training seeds: a run of
    seeds 1 and 2 added to a file of seed 0, made in another session. Refused, in one line, when
    they differ in profile, test set, precision, questions, configuration (the seed aside,
    `runner.config_differences`) or any stage's code version, share a seed, or hold other
    variants. A trained variant keeps every seed of both; an untuned baseline (`SHARED`) keeps
    the earlier evaluation, and `baseline_agreement` says how closely the new one agreed with
    it (a run made with `--set baselines=false` has none to compare, and is accepted for it). `sources` lists what made each part (seeds, machine, code, commands)."""
    from first_lib.pipeline.runner import config_differences

    def refuse(why: str):
        raise FirstError(f"cannot add the run to {where}: {why}")

    for key in ("profile", "setting", "test", "precision"):
        if earlier.get(key) != new.get(key):
            refuse(f"it holds {key} {earlier.get(key)!r}, the run {new.get(key)!r}")
    if earlier["ids"] != new["ids"] or earlier["gold"] != new["gold"]:
        refuse("the run was tested on other questions")
    keys = config_differences(earlier["config"], new["config"])
    # a run of more seeds may skip the untuned baselines the file already holds
    # (`--set baselines=false`: no second evaluation of the same untuned models)
    reused = (
        keys == ["baselines"]
        and earlier["config"].get("baselines")
        and not any(v in new["records"] for v in SHARED)
    )
    if keys and not reused:
        refuse(f"the run was made with another configuration (differs in {', '.join(keys)})")
    old_code = earlier["code"]["stage_versions"]
    new_code = new["code"]["stage_versions"]
    stale = sorted(k for k in old_code.keys() & new_code.keys() if old_code[k] != new_code[k])
    if stale:
        refuse(f"other code for the stages {', '.join(stale)}; rerun every seed with one version")
    both = sorted(set(earlier["seeds"]) & set(new["seeds"]))
    if both:
        refuse(f"both hold seed {', '.join(map(str, both))}")
    trained = set(earlier["records"]) - set(SHARED), set(new["records"]) - set(SHARED)
    if trained[0] != trained[1]:
        refuse(f"other variants ({', '.join(sorted(trained[0] ^ trained[1]))})")

    def by_seed(old: Mapping, add: Mapping, variant: str | None = None) -> dict:
        if variant in SHARED:
            return dict(old)
        return dict(sorted({**old, **add}.items(), key=lambda kv: int(kv[0])))

    records = {
        v: by_seed(earlier["records"][v], new["records"].get(v, {}), v) for v in earlier["records"]
    }
    agreement = {
        v: _blocks_agreement(
            next(iter(earlier["records"][v].values())), next(iter(new["records"][v].values()))
        )
        for v in SHARED
        if v in earlier["records"] and v in new["records"]
    }
    metrics = {
        v: by_seed(earlier["run_metrics"].get(v, {}), new["run_metrics"].get(v, {}), v)
        for v in earlier["run_metrics"].keys() | new["run_metrics"].keys()
    }
    temps = {
        v: by_seed(
            earlier["posthoc_temperatures"].get(v, {}), new["posthoc_temperatures"].get(v, {})
        )
        for v in earlier["posthoc_temperatures"].keys() | new["posthoc_temperatures"].keys()
    }
    held = {
        v: by_seed(earlier.get("held_out", {}).get(v, {}), new.get("held_out", {}).get(v, {}))
        for v in earlier.get("held_out", {}).keys() | new.get("held_out", {}).keys()
    }
    sources = list(earlier.get("sources") or [{k: earlier.get(k) for k in _SOURCE_KEYS}])
    return {
        **earlier,
        "seeds": sorted([*earlier["seeds"], *new["seeds"]]),
        "calibration": by_seed(earlier["calibration"], new["calibration"]),
        "run_metrics": metrics,
        "posthoc_temperatures": temps,
        "held_out": held,
        "records": records,
        "exported": new["exported"],
        "command": new["command"],
        "sources": [*sources, {k: new.get(k) for k in _SOURCE_KEYS}],
        "baseline_agreement": [*earlier.get("baseline_agreement", []), agreement],
    }


# ----------------------------------------------------------------------------- the command


def records_for(
    profile: str | None,
    records_file: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    allow_compute: bool | None = None,
) -> Path:
    """The file the lab chapter reads: `resolve`'s; or, when a profile was given and the
    repository has no file for it, an export of the profile's own CSQA run (`book.run_setting`,
    so cached runs are reused and missing ones are computed only as that function allows) into
    `out_dir`, so that the book builds at every profile."""
    path = resolve(records_file, profile)
    if path.is_file() or records_file is not None or profile is None:
        return path
    from first_lib import book

    book.run_setting(profile, "csqa", out_dir, allow_compute)
    out = Path(out_dir) / Path(default_file(profile)).name
    return export_records(Path(out_dir) / "runs" / "csqa", "csqa", out)


def _cmd_export(args) -> int:
    path = export_records(args.run, args.test, args.out, args.add_to)
    lab = load_lab_records(path)  # what a reader will see: it loads, and says how big it is
    n = sum(len(by_seed) for by_seed in lab.records.values())
    print(
        f"wrote {path}: {lab.size / 1e6:.2f} MB, {lab.n_test} questions x {n} evaluations "
        f"({len(lab.records)} variants, seeds {', '.join(map(str, lab.seeds))}), profile "
        f"{lab.profile}"
    )
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "export-records",
        help="pack a finished run's per-question records of one test set into one small file",
        description="Write one gzip-compressed JSON file with the run's per-question records of "
        "every variant and training seed on one test set, its config, machine and code versions: "
        "what the lab chapter reads (no model, no training).",
    )
    p.add_argument("--run", required=True, help="the --out folder of `first run` (results.json)")
    p.add_argument("--test", default=None, help="test set (default: the run's first)")
    p.add_argument(
        "--out", default=None, help="file to write (default: lab/records-<profile>-<test>.json.gz)"
    )
    p.add_argument(
        "--add-to",
        default=None,
        metavar="FILE",
        help="a lab file of other training seeds of the same design (same config and code): "
        "write both seeds' records (to FILE unless --out is given)",
    )
    p.set_defaults(func=_cmd_export)
