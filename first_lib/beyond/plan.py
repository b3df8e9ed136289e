"""What the beyond-k study (`first_lib.beyond.study`) makes on top of a run, named and keyed
without loading or computing anything: its artefacts in order (`plan`) and their folder names
(`artefact_names`, which `first clean` keeps). Apart from `study` so that the pipeline can ask for
these names without importing the code that computes them (which imports the pipeline), and the
rows that price them and their sum (`priced_rows`, `minutes`: for `study.costs` and the clock's
`study_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from first_lib.errors import FirstError

CODE = ("first_lib.beyond",)  # the study's own code: enters the keys of the stores it writes
# The chapter's defaults (its parameters cell holds the same lists): the top-k stores studied and
# the sampled stores' draws per position. `first clean` keeps the study's artefacts at these.
KS = (1, 2, 3, 5, 10, 20, 50)
DRAWS = (5, 20)


@dataclass
class _Item:
    """One artefact of the study: its stage name, key, folder and what it reuses."""

    name: str  # e.g. "store top-10", "student sampled-5", "evaluate sampled-5"
    stage: str
    key: dict
    estimate_kind: str  # extract | store | train | evaluate

    @property
    def path(self) -> Path:
        from first_lib.artefacts import artefact_dir

        return artefact_dir(self.stage, self.key)

    def done(self) -> bool:
        from first_lib.artefacts import is_done

        return is_done(self.path, self.key)


def _profile(profile: str, setting: str, seed: int, overrides: dict):
    from first_lib.profiles import for_setting, get_profile

    return for_setting(get_profile(profile, **{**overrides, "seed": seed}), setting)


def _base(prof, setting: str, require_run: bool = True) -> dict:
    """The run's nodes the study reads: teacher, store, plain-distillation student and its
    evaluation on the first test set (FirstError when they are not computed, unless
    `require_run` is false)."""
    from first_lib.pipeline.data import test_tasks
    from first_lib.pipeline.graph import run_precision, stage_graph

    precision = run_precision(prof)
    nodes = stage_graph(prof, setting, precision)
    test = test_tasks(prof, setting)[0]
    by = {n.name: n for n in nodes}
    base = {
        "precision": precision,
        "test": test,
        "teacher": by["teacher"],
        "extract": by["extract"],
        "distill": by["distill-none"],
        "evaluate": by[f"evaluate distill on {test}"],
        "data": {k: v for k, v in by["teacher"].key.items() if k in ("data", "tests")},
    }
    missing = [n for n in ("teacher", "extract", "distill", "evaluate") if not base[n].done()]
    if missing and require_run:
        raise FirstError(
            f"the study builds on a finished run of profile {prof.name}, setting {setting} "
            f"(seed {prof.seed}); missing: {', '.join(base[n].name for n in missing)}. Run it "
            "first (book.run_setting, or `first run`)"
        )
    return base


def _student_cfg(prof, kind: str):
    cfg = replace(prof.student_train, loss="kd", transform="none", coef=1.0)
    return replace(cfg, kd_normalize="full") if kind == "sampled" else cfg


def plan(
    prof, setting: str, ks, draws, sample_seed: int = 0, require_run: bool = True
) -> tuple[dict, list[_Item], dict]:
    """(the run's base nodes, the study's artefacts in order, {label: (store item or None,
    student item or None, evaluation key)}) for one training seed; nothing is loaded."""
    from first_lib.artefacts import code_version
    from first_lib.pipeline.graph import CODE_OF, eval_key, prefix_top_layers

    base = _base(prof, setting, require_run)
    precision = base["precision"]
    k_max = max(ks)
    code = code_version(CODE)
    extract_key = {
        **base["extract"].key,
        "k": k_max,
        "splits": ["train"],  # the study needs the training store only
    }
    items = []
    extract = _Item(f"extract top-{k_max}", "extract", extract_key, "extract")
    if k_max != prof.k:
        items.append(extract)
    samples = None
    if draws:
        key = {
            "teacher": base["teacher"].key,
            "draws": sorted(int(n) for n in draws),
            "proposal": "teacher",
            "seed": sample_seed,
            "batch": prof.extract_batch,
            "precision": precision,
            "code": code_version(CODE + ("first_lib.models",)),
        }
        samples = _Item("sample the teacher", "beyond-sampled", key, "extract")
        items.append(samples)
    labels = {}
    train_code = code_version(CODE_OF["train"])
    top = prefix_top_layers(prof, "distill")
    for kind, values in (("top", sorted(set(ks))), ("sampled", sorted(set(draws)))):
        for v in values:
            label = f"{kind}-{v}"
            if kind == "top" and v == prof.k:  # the run's own store and student
                labels[label] = (None, None, base["evaluate"].key)
                continue
            if kind == "top":
                store_key = {"extract": extract_key, "k": v, "code": code}
                store = _Item(f"store {label}", "beyond-topk", store_key, "store")
                items.append(store)
            else:
                store_key = {"samples": samples.key, "draws": v}
                store = _Item(f"store {label}", "beyond-store", store_key, "store")
            cfg = _student_cfg(prof, kind)
            key = {
                "source": prof.student,
                **base["data"],
                "train": cfg.key(),
                "precision": precision,
                "store": {"stage": store.stage, **store.key},
                "code": train_code,
            }
            student = _Item(f"student {label}", "beyond-distill", key, "train")
            ekey = eval_key(prof, base["test"], student.path, precision, top)
            items += [student, _Item(f"evaluate {label}", "evaluate", ekey, "evaluate")]
            labels[label] = (store, student, ekey)
    return base, items, labels


def artefact_names(prof, setting: str) -> set[str]:
    """Folder names of the artefacts the study makes on top of the run `prof` (one training seed,
    its precision) at the default `KS` and `DRAWS`, computed or not: what `first clean` keeps."""
    _, items, _ = plan(prof, setting, KS, DRAWS, require_run=False)
    return {item.path.name for item in items}


def priced_rows(
    seed: int, items: list[_Item], price: dict, here: bool = True, work: dict | None = None
) -> list[dict]:
    """Rows of `costs`: each artefact's estimate (`price` by its kind), whether it is done here
    and the time it took (`wall_seconds` of its meta.json) where it is (`here` false: priced for
    another machine, nothing counts as done); with `work` (GFLOP by kind), its `gflop` too."""
    from first_lib.artefacts import read_meta

    rows = []
    for item in items:
        done = here and item.done()
        rows.append(
            {
                "seed": seed,
                "artefact": item.name,
                "estimate_s": price[item.estimate_kind],
                "done": done,
                "actual_s": read_meta(item.path).get("wall_seconds") if done else None,
                **({"gflop": work[item.estimate_kind]} if work is not None else {}),
            }
        )
    return rows


def minutes(rows: list[dict], only_missing: bool = True) -> float:
    """Estimated minutes of the rows (those not done, by default); unknown prices count 0."""
    return sum((r["estimate_s"] or 0.0) for r in rows if not (only_missing and r["done"])) / 60
