"""The primary claims of one or more test sets, decided together: what `appendix_more_tasks`
shows for its tasks, and what `first evidence FILE...` prints from lab records files.

A run at the `cpu` profile takes hours and its cache lives on one machine; its lab file
(`first export-records`, `first_lib.lab_export`; read by `first_lib.lab`) is a few hundred kB in the repository and holds every
per-question answer the verdicts need. So the decision can be made, and remade by anyone, from
the files alone: `first evidence lab/records-cpu-csqa.json.gz lab/records-cpu-boolq.json.gz`
checks that each tuned model learned (`verdicts.training_checks`), forms the primary family of
each test (`verdicts.primary_estimates`), holds each claim to the paper's effect size (Table 1's
difference on that test, else on CSQA), corrects the whole family with Holm (`verdicts.decide`)
and sets a one-seed difference against how far the same difference moved between the training
seeds of a run that has several (`verdicts.seed_spread`).

Files of the paper's test sets (CSQA, BoolQ, and the out-of-domain setting's CSQA and OBQA,
`lab/records-P-ood-TEST.json.gz`) also give every other claim of the paper that per-question
answers decide (`first_lib.claims`, the code of the chapter paper_vs_reproduction): the
secondary claims, and the count over all claims; what needs a run's cache (the knowledge
store, the models) or a file not given is listed by name.

This module decides; `first_lib.evidence_text` turns its results into tables and sentences and
holds the `first evidence` command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from first_lib import claims as paper_claims
from first_lib import stats, verdicts
from first_lib.errors import FirstError

LABEL = paper_claims.LABEL

SUBJECT = {"ece": "better calibrated than", "acc": "more accurate than"}


def paper_points(test: str, a: str, b: str, metric: str) -> tuple[float | None, str | None]:
    """The paper's Table 1 difference metric(a) - metric(b) in points on `test` (on CSQA where
    the paper has no row for `test`) and the row it came from; (None, None) where the paper has
    no number (post-hoc TS, the tuning claims)."""
    from first_lib.book import PAPER_TABLE1_LLAMA2 as PAPER

    source = test if test in PAPER else "csqa"
    row = PAPER[source]
    if a not in row or b not in row:
        return None, None
    return round(row[a][metric] - row[b][metric], 1), source


def primary_family(
    recs_by_test: Mapping[str, Mapping[str, Any]],
    names: Mapping[str, str] | None = None,
    yardstick: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(claims, checks) of the primary family of every test in `recs_by_test` ({test: {variant:
    {seed: records}}}), Holm-corrected together. checks: {test: `verdicts.training_checks`}.
    claims: {name: {"task", "subject", "paper" (points or None), "paper_from", "estimate",
    "models", "a", "b", "metric", "claim" (`stats.Claim`), "testable", "note", "verdict", "p",
    "p_holm", "spread", "beyond_seed_spread", "by_seed"}}: for a test with one training seed,
    "spread" is `verdicts.seed_spread` of the same difference in `yardstick` (records of a run
    with several seeds), and "beyond_seed_spread" whether |difference| exceeds it; else both
    None. For a test with several seeds, "by_seed" is the difference on each seed's questions
    alone (`verdicts.seed_differences`, plug-in metrics), else None."""
    names = names or {}
    checks = {
        t: verdicts.training_checks(r, n_boot=n_boot, seed=seed) for t, r in recs_by_test.items()
    }
    claims: dict[str, dict[str, Any]] = {}
    for t, recs in recs_by_test.items():
        n_seeds = max(len(by_seed) for by_seed in recs.values())
        where = names.get(t, t)
        for name, c in verdicts.primary_estimates(recs, t, n_boot=n_boot, seed=seed).items():
            a, b, metric = c["a"], c["b"], c["metric"]
            if "first_ts" in (a, b):
                other = b if a == "first_ts" else a
                subject = f"FIRST is {SUBJECT[metric]} {LABEL[other]} on {where}"
                paper, source = paper_points(t, a, b, metric)
            else:
                who = "teacher" if a == "teacher" else "student"
                subject = f"tuning makes the {who} over-confident on {where}"
                paper, source = None, None  # the paper shows it in a figure, with no number
            claim = stats.Claim(
                "above" if not paper or paper > 0 else "below",
                None if not paper else paper / 100,
                primary=True,
            )
            ok, why = verdicts.testability(c["models"], checks[t])
            spread, by_seed = None, None
            if n_seeds == 1 and yardstick is not None:
                spread = verdicts.seed_spread(yardstick, a, b, metric)
            elif n_seeds > 1:
                by_seed = verdicts.seed_differences(recs, a, b, metric)
            claims[name] = {
                "task": t,
                "subject": subject,
                "paper": paper,
                "paper_from": source,
                "claim": claim,
                "testable": ok,
                "note": why,
                "spread": spread,
                "by_seed": by_seed,
                **c,
            }
    decided = verdicts.decide(
        {n: {"claim": c["claim"], "estimate": c["estimate"], "testable": c["testable"]}
         for n, c in claims.items()}
    )  # fmt: skip
    for name, c in claims.items():
        d = decided[name]
        beyond = None if c["spread"] is None else bool(abs(c["estimate"].point) > c["spread"])
        c.update(verdict=d["verdict"], p=d["p"], p_holm=d["p_holm"], beyond_seed_spread=beyond)
    return claims, checks


def what_decides(
    claims: Mapping[str, Mapping[str, Any]],
    recs_by_test: Mapping[str, Mapping[str, Any]],
    split_of: Mapping[str, int] | None = None,
    n_seeds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """For each claim of `claims` (a `primary_family`) that is too noisy to tell: what design
    would decide it. The difference's variance is split into its question and seed parts
    (`stats.variance_split`, same pairing as the claim's interval) and scaled as a design grows
    (`stats.planned_mde`, `stats.design_for`): {name: {"mde" (now), "split" (the test split's
    questions, `split_of` or the questions tested), "mde_split" (the whole split at `n_seeds`
    seeds, or at the seeds there are where they are more), "floor" (the whole split with
    unlimited seeds), "questions" (questions needed at today's seeds to detect the paper's size,
    inf where the seeds' part alone is too large), "questions_unlimited" (the same with
    unlimited seeds), "seeds" (seeds needed on the whole split, inf
    where the split's questions alone are too noisy), "decidable" (the paper's size is above
    the floor: the split can rule it out), "one_seed" (the seed part is unknown: a test with one
    training seed shows no seed-to-seed spread, and its numbers count the questions only)}.
    None of "questions", "seeds", "decidable" where the paper gives no size."""
    split_of = split_of or {}
    out: dict[str, dict[str, Any]] = {}
    for name, c in claims.items():
        if c["verdict"] != stats.TOO_NOISY:
            continue
        recs = recs_by_test[c["task"]]
        split = stats.variance_split(
            recs[c["a"]], recs[c["b"]], c["metric"], n_boot=n_boot, seed=seed
        )
        n_split = max(split_of.get(c["task"], 0), split["n_questions"])
        s_now = split["n_seeds"]
        size = None if c["paper"] is None else abs(c["paper"]) / 100
        row: dict[str, Any] = {
            "mde": c["estimate"].mde,
            "n_questions": split["n_questions"],
            "n_seeds": s_now,
            "split": n_split,
            "design_seeds": max(n_seeds, s_now),
            "mde_split": stats.planned_mde(split, n_questions=n_split, n_seeds=max(n_seeds, s_now)),
            "floor": stats.planned_mde({**split, "seeds": 0.0}, n_questions=n_split),
            "paper_size": size,
            "questions": None,
            "questions_unlimited": None,
            "seeds": None,
            "decidable": None,
            "one_seed": s_now == 1,
        }
        if size is not None:
            row["questions_unlimited"] = stats.design_for(
                {**split, "seeds": 0.0}, size, n_seeds=s_now
            )
            row["questions"] = stats.design_for(split, size, n_seeds=s_now)
            row["seeds"] = stats.design_for(split, size, n_questions=n_split)
            row["decidable"] = bool(row["floor"] <= size)
        out[name] = row
    return out


def split_sizes(tests: Sequence[str]) -> dict[str, int]:
    """The test split's questions of each test, from the data wheel; {} for a test whose data
    this machine lacks (the tables then take the questions tested as the split)."""
    from first_lib import tasks

    out = {}
    for t in tests:
        try:
            out[t] = len(tasks.load_task(t, "test"))
        except (FirstError, OSError):
            continue
    return out


def seeds_disagree(claims: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Names of the claims whose training seeds, taken one at a time, fall on both sides of 0
    (a per-seed difference above 0 and another below)."""
    return [
        n
        for n, c in claims.items()
        if c.get("by_seed") and max(c["by_seed"].values()) > 0 > min(c["by_seed"].values())
    ]


# --------------------------------------------------------------------------- from lab files


def from_files(paths: Sequence[str | Path], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The primary family decided from lab records files (one test set each, one profile), and
    with them the paper's other claims (`all_claims`), those about the teacher's distributions
    from a knowledge file among `paths` (`lab_knowledge`, lab/knowledge-P-csqa.json.gz):
    {"files": [{path, profile, test, seeds, n_test, precision, machines (one a part of a merged
    file)}], "knowledge" (None, or {path, profile, setting, seed, n_positions, precision,
    machine}), "claims", "checks" (the primary family: the paper's in-domain tests among the
    files, else every in-domain file), "more_tasks" (None, or the family of the other tasks'
    files given beside the paper's, Holm-corrected apart as appendix_more_tasks does: {tests,
    claims, checks, counts, sentences}),
    "counts", "sentences", "yardstick" (the test whose seed spread one-seed tests are set
    against, or None)}."""
    from first_lib import lab, lab_knowledge, tasks

    known = [lab_knowledge.load_knowledge(p) for p in paths if lab_knowledge.is_knowledge_file(p)]
    loaded = [
        lab.load_lab_records(lab.resolve(p, None))
        for p in paths
        if not lab_knowledge.is_knowledge_file(p)
    ]
    if not loaded:
        raise FirstError("give at least one lab records file (lab/records-PROFILE-TEST.json.gz)")
    if len(known) > 1:
        raise FirstError(f"{len(known)} knowledge files: the paper's Fig. 2 and 3 claims are "
                         "about one teacher, give one")  # fmt: skip
    knowledge = known[0] if known else None
    if knowledge is not None and knowledge.setting != lab_knowledge.SETTING:
        raise FirstError(f"{knowledge.path}: the teacher of {knowledge.setting}; the paper's Fig. 2 "
                         f"and 3 claims are about the {lab_knowledge.SETTING} teacher's")  # fmt: skip
    other = [str(d.path) for d in loaded if d.meta.get("setting") not in (None, d.test, "ood")]
    if other:
        raise FirstError(f"{', '.join(other)}: a run tested on another task's split that is not "
                         "the out-of-domain setting")  # fmt: skip
    keys = [key_of(d) for d in loaded]
    if len(set(keys)) != len(keys):
        raise FirstError(f"two files of one test set ({', '.join(keys)}): merge them first "
                         "(first export-records --add-to)")  # fmt: skip
    profiles = sorted({d.profile for d in loaded} | ({knowledge.profile} if knowledge else set()))
    if len(profiles) > 1:
        raise FirstError(f"files of different profiles ({', '.join(profiles)}) are not one design")
    in_domain = [d for d, k in zip(loaded, keys, strict=True) if k == d.test]
    if not in_domain:
        raise FirstError("no in-domain file: the primary claims are on in-domain test sets "
                         "(lab/records-PROFILE-TEST.json.gz)")  # fmt: skip
    # The book's primary family is named on the paper's in-domain tests; files of other tasks
    # (appendix_more_tasks) form a family of their own, Holm-corrected apart, as the appendix
    # does; given alone, they are the family.
    paper = [d for d in in_domain if d.test in verdicts.IN_DOMAIN]
    more = [d for d in in_domain if d.test not in verdicts.IN_DOMAIN] if paper else []
    family = paper or in_domain
    tests = [d.test for d in family]
    recs = {d.test: d.records for d in family}
    several = [d for d in in_domain if len(d.seeds) > 1]
    yard = max(several, key=lambda d: len(d.seeds)) if several else None
    names = {}
    for t in [*tests, "csqa", *(d.test for d in loaded)]:
        try:
            names[t] = tasks.task_spec(t).description
        except FirstError:
            names[t] = t
    for d, k in zip(loaded, keys, strict=True):
        if k != d.test:
            names[k] = f"{names[d.test]} (out of domain)"
    claims, checks = primary_family(
        recs, names, yard.records if yard else None, n_boot=n_boot, seed=seed
    )
    counts = {v: sum(c["verdict"] == v for c in claims.values()) for v in stats.VERDICTS}
    sizes = split_sizes([d.test for d in in_domain])
    decides = what_decides(claims, recs, sizes, n_boot=n_boot, seed=seed)
    more_family = None
    if more:
        m_claims, m_checks = primary_family(
            {d.test: d.records for d in more}, names, yard.records if yard else None,
            n_boot=n_boot, seed=seed,
        )  # fmt: skip
        more_family = {
            "tests": [d.test for d in more],
            "claims": m_claims,
            "checks": m_checks,
            "counts": {
                v: sum(c["verdict"] == v for c in m_claims.values()) for v in stats.VERDICTS
            },
            "decides": what_decides(
                m_claims, {d.test: d.records for d in more}, sizes, n_boot=n_boot, seed=seed
            ),
            "sentences": {
                n: verdicts.sentence(c["subject"], c["verdict"]) for n, c in m_claims.items()
            },
        }
    files = [
        {
            "path": str(d.path),
            "profile": d.profile,
            "test": d.test,
            "key": key_of(d),
            "seeds": d.seeds,
            "n_test": d.n_test,
            "precision": d.meta.get("precision"),
            "machines": [s.get("machine") for s in d.meta.get("sources") or [d.meta]],
        }
        for d in loaded
    ]
    known = None
    if knowledge is not None:
        known = {
            "path": str(knowledge.path),
            "profile": knowledge.profile,
            "setting": knowledge.setting,
            "seed": (knowledge.meta.get("config") or {}).get("seed"),
            "n_positions": len(knowledge.tokens[1]),
            "precision": knowledge.meta.get("precision"),
            "machine": knowledge.meta.get("machine"),
        }
    csqa_meta = next((d.meta for d, k in zip(loaded, keys, strict=True) if k == "csqa"), None)
    return {
        "files": files,
        "knowledge": known,
        "names": names,
        "claims": claims,
        "checks": checks,
        "counts": counts,
        "decides": decides,
        "split_sizes": sizes,
        "sentences": {n: verdicts.sentence(c["subject"], c["verdict"]) for n, c in claims.items()},
        "yardstick": yard.test if yard else None,
        "more_tasks": more_family,
        "n_boot": n_boot,
        "all": all_claims(
            {k: d.records for d, k in zip(loaded, keys, strict=True)},
            n_boot=n_boot,
            seed=seed,
            checks=checks,
            held_out={k: d.meta.get("held_out") or {} for d, k in zip(loaded, keys, strict=True)},
            precisions={k: d.meta.get("precision") for d, k in zip(loaded, keys, strict=True)},
            knowledge=knowledge,
            knowledge_note=lab_knowledge.note(knowledge, csqa_meta) if knowledge else "",
        ),
    }


def key_of(data) -> str:
    """A lab file's test set as the paper's tables name it: the test ("csqa"), or "ood_TEST"
    for the out-of-domain setting's file of TEST."""
    setting = data.meta.get("setting")
    return data.test if setting in (None, data.test) else f"{setting}_{data.test}"


def all_claims(
    recs_by_key: Mapping[str, Any],
    n_boot: int = 1000,
    seed: int = 0,
    checks: Mapping[str, Any] | None = None,
    knowledge=None,
    knowledge_note: str = "",
    held_out: Mapping[str, Any] | None = None,
    precisions: Mapping[str, str | None] | None = None,
) -> dict | None:
    """Every claim of the paper that the records of its test sets decide (`claims.build`,
    `claims.decide`: Holm over the primary ones, as in paper_vs_reproduction): {"claims",
    "counts" ({"primary", "secondary"}: {verdict: n}), "missing" ({name: what it needs}),
    "n_counted", "n_too_noisy", "too_noisy" (their share), "tests"}; None when no file is of
    the paper's. `checks`: training checks already made ({test: `verdicts.training_checks`}),
    reused; the other tests are checked here (with a file's held-out check, ``held_out``: {key:
    {model: {seed: record}}}, where it has one). `knowledge`: a `lab_knowledge.Knowledge` (the
    teacher's top-5 mass and stored ranks), which adds the five claims `claims.NEED_CACHE`
    names (the two token-level ones only beside CSQA's records); `knowledge_note` is added to
    the note of each (how its teacher relates to the records'). `precisions` ({key: "bf16" |
    "fp32"}, the files'): a claim pairing two files run at different precisions says so."""
    recs = {k: r for k, r in recs_by_key.items() if k in paper_claims.TEST_NAMES}
    if not recs:
        return None
    held_out = held_out or {}
    checks = {
        t: (checks or {}).get(t)
        or verdicts.training_checks(r, n_boot=n_boot, seed=seed, held_out=held_out.get(t))
        for t, r in recs.items()
    }
    claims = paper_claims.build(
        recs,
        checks,
        coverage=knowledge.coverage if knowledge is not None else None,
        tokens=knowledge.tokens if knowledge is not None else None,
        n_boot=n_boot,
        seed=seed,
    )
    for name, c in claims.items():
        extra = paper_claims.precision_note(name, precisions or {})
        c["note"] = "; ".join(x for x in (c["note"], extra) if x)
    if knowledge is not None and knowledge_note:
        for name in paper_claims.NEED_CACHE:
            if name in claims:
                c = claims[name]
                c["note"] = "; ".join(x for x in (c["note"], knowledge_note) if x)
    counts = paper_claims.decide(claims)
    n = sum(sum(by.values()) for by in counts.values())
    noisy = sum(by[stats.TOO_NOISY] for by in counts.values())
    return {
        "tests": list(recs),
        "claims": claims,
        "checks": checks,
        "counts": counts,
        "missing": paper_claims.missing(claims, list(recs)),
        "n_counted": n,
        "n_too_noisy": noisy,
        "too_noisy": noisy / n if n else None,
    }
