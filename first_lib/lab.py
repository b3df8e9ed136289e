"""Lab records: a finished run's per-question answers in one small file, and its loader.

A run's evaluation records (`first_lib.evaluate`: one JSON object a question) sit in hashed
folders under $FIRST_HOME, next to models that took hours to train. `first export-records` packs
the records of one test set, every variant and training seed, with the run's config, machine and
code versions, into one gzip-compressed JSON file (`lab/records-<profile>-<test>.json.gz`);
`load_lab_records` gives them back as {variant: {seed: records}}, the shape `stats.estimate`,
`stats.compare`, `metrics` and `posthoc` take. The lab chapter reads nothing else, so it runs on
a laptop without a model, a GPU or $FIRST_HOME.

What is stored, and why it is enough. A record of the pipeline (`evaluate._record`) holds the
C answer candidates' probabilities renormalised over the candidates (`probs`, float32 values) and
over the whole vocabulary (`raw_probs`), the prediction, `confidence = probs[pred]` and
`correct = pred == gold`. The file keeps, per question, `probs` exactly: written as the shortest
decimals that give back the same float32 where every probability of the variant is a float32 (a
plain evaluation), else as float64 (a post-hoc one, computed in float64), and the prediction;
per plain evaluation also `log(sum(raw_probs))` rounded to `DIGITS` decimals, the candidates'
share of the vocabulary, so that `raw_probs = probs * sum(raw_probs)` (a relative 5e-5 at most;
what `posthoc` reads of them, their ratios, is exact to float32); a post-hoc temperature-scaled
variant (`posthoc.apply_temperature` keeps the model's `raw_probs`) names the variant whose
`raw_probs` it shares. Ids and gold answers are stored once. The loader recomputes the rest, so every
metric is the one the run computed from the same records, ties between equal confidences
included (they decide equal-mass bins and the order of AURC). `export_records` checks, record by
record, that what the loader recomputes is what the run wrote, and refuses a file that is not.
The run's own metrics (`results.json`) travel with the file, so a reader can check that too.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import subprocess
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from first_lib import fsio
from first_lib.errors import FirstError
from first_lib.pipeline.graph import BASELINES, POSTHOC

FORMAT = "first-lab-records"
VERSION = 1
DIGITS = 4  # decimals of log(sum(raw_probs))
# largest relative |recomputed - written| that export accepts: probs are kept exactly, raw_probs
# to the rounding of DIGITS decimals in log space
TOLERANCE = {"probs": 0.0, "raw_probs": 1e-4}
REPO = Path(__file__).resolve().parents[1]
LAB_DIR = "lab"
ROUNDING = (
    "probs: each record's probs exactly (dtype float32: the shortest decimals that give back the "
    "float32, to be read as float32; float64: as they are); "
    f"log_mass: log of the sum of its raw_probs rounded to {DIGITS} decimals; "
    "first_lib.lab.load_lab_records recomputes raw_probs = probs * exp(log_mass) (post-hoc "
    "variants: the raw_probs of the variant raw_from names), confidence = probs[pred], "
    "correct = pred == gold"
)


def default_file(profile: str, test: str = "csqa", setting: str | None = None) -> str:
    """Where the records of `profile`'s run on `test` live in the repository: an in-domain run
    (`setting` is the test set, or not given) as records-<profile>-<test>; a run tested on
    another task's split (the out-of-domain setting) as records-<profile>-<setting>-<test>."""
    if setting and setting != test:
        return f"{LAB_DIR}/records-{profile}-{setting}-{test}.json.gz"
    return f"{LAB_DIR}/records-{profile}-{test}.json.gz"


def export_command(run: str, test: str, out: str, add_to: str | None = None) -> str:
    tail = f" --add-to {add_to}" if add_to else ""
    return f"first export-records --run {run} --test {test} --out {out}{tail}"


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LabRecords:
    """A loaded lab file. ``records`` is {variant: {seed: records}} (records sorted by question
    id, each a dict like the pipeline's: id, gold, pred, probs, raw_probs, confidence, correct;
    an untuned baseline, shared by every seed, appears under the first seed only); ``meta`` is
    everything else the file holds (format, version, profile, setting, test, config, machine,
    code, made, seeds, ...); ``path`` and ``size`` (bytes) are the file's."""

    path: Path
    size: int
    meta: dict
    records: dict[str, dict[int, list[dict]]]

    @property
    def profile(self) -> str:
        return self.meta["profile"]

    @property
    def test(self) -> str:
        return self.meta["test"]

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.meta["seeds"]]

    @property
    def n_test(self) -> int:
        return len(self.meta["ids"])

    def first_seed(self) -> dict[str, list[dict]]:
        """{variant: records} of the first training seed (figures of one model)."""
        return {v: by_seed[min(by_seed)] for v, by_seed in self.records.items()}


def resolve(records_file: str | os.PathLike | None, profile: str | None, test: str = "csqa"):
    """The lab file a chapter reads: `records_file` when given, else the profile's file
    (`default_file`), else (no profile) the cpu file when the repository has it and the tiny one
    otherwise. A relative path is taken from the working directory, else from the repository
    root (so the chapter also runs from chapters/ in Jupyter)."""
    if records_file is None:
        if profile is None:
            cpu = default_file("cpu", test)
            profile = "cpu" if _locate(cpu).is_file() else "tiny"
        records_file = default_file(profile, test)
    return _locate(records_file)


def profile_files(
    profile: str,
    path: str | os.PathLike | None = None,
    ood: bool = False,
    knowledge: bool = False,
) -> list[Path]:
    """The repository's in-domain lab files of `profile` (`lab/records-<profile>-<task>.json.gz`,
    one a task), and with `ood` the out-of-domain setting's after them
    (records-<profile>-ood-<test>), and with `knowledge` the teacher's knowledge file last
    (`lab_knowledge.default_file`) where the repository has one; `path` (a file read from
    elsewhere) takes the place of the one of its own test set."""
    from first_lib import lab_knowledge
    from first_lib.profiles import all_settings, book_settings

    files, other = {}, {}
    for f in sorted((REPO / LAB_DIR).glob(f"records-{profile}-*.json.gz")):
        test = f.name.removeprefix(f"records-{profile}-").removesuffix(".json.gz")
        if test in all_settings():
            files[test] = f
        elif ood and test.startswith("ood-") and test.removeprefix("ood-") in all_settings():
            other[test] = f
    if path is not None:
        path = Path(path)
        files[_read_json_gz(path)["test"]] = path
    order = [*book_settings(), *sorted(files)]  # the book's order: CSQA, BoolQ, ...
    known = REPO / lab_knowledge.default_file(profile)
    extra = [known] if knowledge and known.is_file() else []
    return (
        [files[t] for t in sorted(files, key=order.index)]
        + [other[t] for t in sorted(other)]
        + extra
    )


def profile_of(profile: str | None, records_file: str | os.PathLike | None) -> str:
    """The profile the lab chapter shows its records at: `profile` when given, else the one the
    records file names (read from the file), else the profile of `resolve`'s default file."""
    if profile is not None:
        return profile
    if records_file is not None:
        return _read_json_gz(_locate(records_file))["profile"]
    return "cpu" if _locate(default_file("cpu")).is_file() else "tiny"


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


def _locate(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPO / path).exists():
        return path
    return REPO / path


def _read_json_gz(path: Path) -> dict:
    """The JSON object of a gzip file, or one line saying what is wrong with it."""
    if not path.is_file():
        raise FirstError(
            f"no lab records file at {path}; make one from a finished run (first run --profile P "
            "--setting csqa --seeds 0,1,2 --out DIR) with: "
            + export_command("DIR", "csqa", str(path))
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, EOFError, zlib.error) as err:
        raise FirstError(f"{path} is not a complete gzip file ({err}); export it again") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FirstError(f"{path} does not hold JSON ({err}); export it again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FirstError(f"{path} is not a lab records file (no format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise FirstError(
            f"{path} has format version {data.get('version')!r}; this code reads version "
            f"{VERSION}: export it again with `first export-records`"
        )
    return data


def _block_records(ids, gold, block: Mapping[str, Any], raw, where: str) -> list[dict]:
    """The pipeline-shaped records of one variant and seed (see the module docstring). `raw`:
    the raw_probs of the variant named by the block's `raw_from`, if it has one."""
    try:
        dtype = {"float32": np.float32, "float64": np.float64}[block["dtype"]]
        probs = [np.asarray(row, dtype=dtype).astype(np.float64) for row in block["probs"]]
        pred = [int(k) for k in block["pred"]]
        mass = block["log_mass"] if raw is None else [0.0] * len(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise FirstError(f"{where}: missing or bad field ({err}); export it again") from None
    if not len(probs) == len(pred) == len(mass) == len(ids):
        raise FirstError(
            f"{where}: {len(probs)} rows of probs, {len(pred)} predictions and {len(mass)} masses "
            f"for {len(ids)} questions; export it again"
        )
    if raw is None:
        raw = [p * np.exp(m) for p, m in zip(probs, mass, strict=True)]
    out = []
    for qid, g, p, k, r in zip(ids, gold, probs, pred, raw, strict=True):
        if not (0 <= k < len(p) and 0 <= g < len(p) and len(r) == len(p)):
            raise FirstError(f"{where}, question {qid}: an answer index out of range")
        out.append(
            {
                "id": qid,
                "gold": int(g),
                "pred": k,
                "probs": p.tolist(),
                "raw_probs": [float(x) for x in r],
                "confidence": float(p[k]),
                "correct": k == int(g),
            }
        )
    return out


def _unpack(ids, gold, blocks: Mapping[str, Mapping[str, Any]], where: str) -> dict:
    """{variant: {seed: records}} of the file's blocks; a post-hoc block after its `raw_from`."""
    out: dict[str, dict[int, list[dict]]] = {}
    order = sorted(blocks, key=lambda v: any("raw_from" in b for b in blocks[v].values()))
    for variant in order:
        for seed, block in blocks[variant].items():
            here = f"{where}: {variant}, seed {seed}"
            raw = None
            if "raw_from" in block:
                base = out.get(block["raw_from"], {}).get(int(seed))
                if base is None:
                    raise FirstError(f"{here}: shares the raw_probs of a variant not in the file")
                raw = [r["raw_probs"] for r in base]
            out.setdefault(variant, {})[int(seed)] = _block_records(ids, gold, block, raw, here)
    return {v: out[v] for v in blocks}


def load_lab_records(path: str | os.PathLike) -> LabRecords:
    """A lab file as `LabRecords`; a missing, truncated, corrupt, foreign or other-version file
    raises `FirstError` with one line saying which."""
    path = Path(path)
    data = _read_json_gz(path)
    try:
        ids, gold, blocks = data["ids"], data["gold"], data.pop("records")
    except KeyError as err:
        raise FirstError(f"{path}: no {err} in the file; export it again") from None
    if len(ids) != len(gold) or len(set(ids)) != len(ids):
        raise FirstError(
            f"{path}: {len(ids)} question ids ({len(set(ids))} distinct) and "
            f"{len(gold)} gold answers"
        )
    records = _unpack(ids, gold, blocks, str(path))
    return LabRecords(path=path, size=path.stat().st_size, meta=data, records=records)


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


def _git_commit() -> dict:
    """The repository's commit, and whether first_lib/ had uncommitted changes (None outside a
    git checkout)."""

    def git(*args):
        proc = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "first_lib")
    return {"commit": commit, "first_lib_changed": bool(dirty) if commit else None}


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


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        "code": {**_git_commit(), "stage_versions": dict(sorted(stage_code.items()))},
        "run_finished": _iso(finished) if finished else None,
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
        "exported": _iso(dt.datetime.now(dt.UTC).timestamp()),
        "command": export_command(str(run), test, str(out), add_to and str(add_to)),
        "posthoc_temperatures": temperatures,
        "run_metrics": run_metrics,
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
    sources = list(earlier.get("sources") or [{k: earlier.get(k) for k in _SOURCE_KEYS}])
    return {
        **earlier,
        "seeds": sorted([*earlier["seeds"], *new["seeds"]]),
        "calibration": by_seed(earlier["calibration"], new["calibration"]),
        "run_metrics": metrics,
        "posthoc_temperatures": temps,
        "records": records,
        "exported": new["exported"],
        "command": new["command"],
        "sources": [*sources, {k: new.get(k) for k in _SOURCE_KEYS}],
        "baseline_agreement": [*earlier.get("baseline_agreement", []), agreement],
    }


# Metrics whose value does not depend on the order of the records (equal-mass ECE and AURC break
# ties between equal confidences by position, and the run's records are in evaluation order).
ORDER_FREE = ("acc", "ece", "smece", "brier", "nll")


def run_differences(data: LabRecords, metrics: Sequence[str] = ORDER_FREE) -> list[float]:
    """|metric recomputed from the file - the run's own (results.json)| for every variant, seed
    and metric the file carries both of: all 0 up to float round-off when the file holds the
    run's records."""
    from first_lib import stats

    out = []
    for variant, by_seed in (data.meta.get("run_metrics") or {}).items():
        for seed, ran in by_seed.items():
            table = stats.runs_of({int(seed): data.records[variant][int(seed)]})
            out += [
                abs(float(stats.metric_rows(m, table.columns).mean()) - ran[m])
                for m in metrics
                if ran and m in ran
            ]
    return out


# ----------------------------------------------------------------------------- the lab's exercises


def split_questions(ids: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """The question ids in two halves drawn at random (seeded): one to fit on, one held out.
    Fitting and measuring on the same questions would flatter any re-calibration."""
    order = np.random.default_rng(seed).permutation(len(ids))
    half = len(ids) // 2
    return sorted(ids[i] for i in order[:half]), sorted(ids[i] for i in order[half:])


def refit_temperature(
    by_seed: Mapping[int, Sequence[dict]], fit_ids: Sequence[str], held_ids: Sequence[str]
) -> tuple[dict[int, float], dict[int, list[dict]]]:
    """Per seed, the temperature `posthoc.fit_temperature` fits on the `fit_ids` questions, and
    the `held_ids` records re-calibrated with it: ({seed: T}, {seed: records})."""
    from first_lib import posthoc

    fit, held = set(fit_ids), set(held_ids)
    temps, scaled = {}, {}
    for seed, records in by_seed.items():
        temps[seed] = posthoc.fit_temperature([r for r in records if r["id"] in fit])
        scaled[seed] = posthoc.apply_temperature(
            [r for r in records if r["id"] in held], temps[seed]
        )
    return temps, scaled


def subset(by_seed: Mapping[int, Sequence[dict]], ids: Sequence[str]) -> dict[int, list[dict]]:
    """{seed: records} of the questions `ids` only."""
    keep = set(ids)
    return {s: [r for r in recs if r["id"] in keep] for s, recs in by_seed.items()}


# ----------------------------------------------------------------------------- the command


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
