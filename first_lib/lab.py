"""Lab records: a finished run's per-question answers in one small file, and its loader.
(`first_lib.lab_export` writes and merges the files: `first export-records`.)

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

import gzip
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from first_lib.errors import FirstError

FORMAT = "first-lab-records"
VERSION = 1
DIGITS = 4  # decimals of log(sum(raw_probs))
# largest relative |recomputed - written| that export accepts: probs are kept exactly, raw_probs
# to the rounding of DIGITS decimals in log space
TOLERANCE = {"probs": 0.0, "raw_probs": 1e-4}
REPO = Path(__file__).resolve().parents[1]
LAB_DIR = "lab"
KNOWLEDGE_PREFIX = "knowledge-"  # lab/knowledge-<profile>-<setting>.json.gz
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


def knowledge_file(profile: str, setting: str = "csqa") -> str:
    """Where the knowledge file of `profile`'s teacher on `setting` lives in the repository
    (`first export-knowledge`, first_lib.lab_knowledge)."""
    return f"{LAB_DIR}/{KNOWLEDGE_PREFIX}{profile}-{setting}.json.gz"


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
    (`knowledge_file`) where the repository has one; `path` (a file read from
    elsewhere) takes the place of the one of its own test set."""
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
    known = REPO / knowledge_file(profile)
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
