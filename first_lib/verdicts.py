"""The claims the book tests, named once, decided with `first_lib.stats`, and the sentences that
state them.

- **Primary claims** are named here, before any number is seen (`primary_names`): on each
  in-domain task (`IN_DOMAIN`), FIRST against Fine-tune, against Distill and against Fine-tune
  with post-hoc temperature scaling (when that variant was run), on ECE and on accuracy; and
  "tuning makes the model over-confident" (ECE up after tuning) for the teacher and the student.
  Holm corrects this family (`stats.decide_all`); every other claim is secondary and keeps its
  own p-value.
- **Did training work?** (`training_checks`): each tuned model against its untuned base on the
  same questions (`stats.learned`), or, where the run checked it on held-out data of its own
  task (the out-of-domain setting, a run without baselines: `first_lib.heldout`), its training
  loss there against its untuned start's (`held_out_check`). A claim that depends on a model
  that did not learn is "not testable here" (`testability`). Where neither check could be made
  the claim says so.
- **Not counted**: claims whose verdict follows from others (identities, e.g. with renormalised
  candidate probabilities the mean rank 2..C gap is minus the rank-1 gap over C - 1;
  conjunctions of counted claims) and pure arithmetic (a storage ratio) are shown as
  illustrations and kept out of the verdict counts.
- **Sentences** (`sentence`): every sentence of the book that states a conclusion is generated
  from a verdict, never written by hand; tests/test_book.py checks that no hand-written prose
  uses the verdict words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from first_lib import metrics, stats
from first_lib.errors import FirstError

IN_DOMAIN = ("csqa", "boolq")
PRIMARY_COMPETITORS = ("finetune", "distill", "finetune_posthoc_ts")
PRIMARY_METRICS = ("ece", "acc")
TUNED = ("teacher", "student")

# Each trained model and the untuned model it starts from.
BASE_OF = {
    "teacher": "teacher_base",
    "finetune": "student_base",
    "distill": "student_base",
    "distill_ls": "student_base",
    "first_ts": "student_base",
    "finetune_posthoc_ts": "student_base",
    "distill_posthoc_ts": "student_base",
}
# Students distilled from the teacher: their claims also need a teacher that learned.
DISTILLED = ("distill", "distill_ls", "first_ts", "distill_posthoc_ts")
# The models a post-hoc variant is built from (it is not trained itself).
POSTHOC_OF = {"finetune_posthoc_ts": "finetune", "distill_posthoc_ts": "distill"}


def first_vs_name(other: str, metric: str, test: str) -> str:
    """The name of the claim "FIRST beats `other` on `metric`" on `test`."""
    return f"first_vs_{other}_{metric}_{test}"


def tuning_name(who: str, test: str) -> str:
    """The name of the claim "tuning makes `who` (teacher | student) over-confident"."""
    return f"tuning_overconfident_{who}_{test}"


def primary_names(
    tests: Sequence[str] = IN_DOMAIN, variants: Iterable[str] | None = None
) -> list[str]:
    """The primary family: its names for the given in-domain tests, competitors restricted to
    ``variants`` (those the run has; all of `PRIMARY_COMPETITORS` when None)."""
    have = set(PRIMARY_COMPETITORS if variants is None else variants)
    names = []
    for test in tests:
        for other in PRIMARY_COMPETITORS:
            if other in have:
                names += [
                    first_vs_name(other, m, test)
                    for m in PRIMARY_METRICS
                    if not is_identity(other, m)
                ]
        names += [tuning_name(who, test) for who in TUNED]
    return names


def is_identity(other: str, metric: str) -> bool:
    """Whether "FIRST against `other` on `metric`" repeats another claim: post-hoc temperature
    scaling keeps every answer (the arg max of the candidates), so its accuracy is its base
    model's and FIRST's accuracy gap to it is the gap to that base model."""
    return other in POSTHOC_OF and metric == "acc"


def is_primary(name: str) -> bool:
    """Whether a claim's name is in the primary family (decided before the numbers)."""
    return name in set(primary_names())


# --------------------------------------------------------------------------- training checks


def training_checks(
    records: Mapping[str, Sequence[Mapping]],
    n_boot: int = 1000,
    seed: int = 0,
    held_out: Mapping[str, Mapping] | None = None,
) -> dict[str, dict[str, Any]]:
    """Did each tuned model of one test set learn? {model: {"base", "check" ("accuracy",
    "held-out loss" or None), "learned" (True, False, or None when no check could be made),
    "estimate" (`stats.Estimate`) or None}} for the models of `BASE_OF` present in ``records``.

    ``held_out``: {model: {seed: record}} of a run that checked its models on held-out data of
    their training task (`first_lib.book.seed_held_out`); where given for a model, that check is
    its check (`held_out_check`: the test then is not its training task, or has no untuned
    model), else accuracy against the untuned base on the test (`stats.learned`). A post-hoc
    variant is checked through the model it rescales."""
    held_out = held_out or {}
    out: dict[str, dict[str, Any]] = {}
    for model, base in BASE_OF.items():
        if model not in records or model in POSTHOC_OF:
            continue
        if held_out.get(model):
            ok, est = held_out_check(held_out[model], n_boot=n_boot, seed=seed)
            out[model] = {"base": base, "check": HELD_OUT, "learned": ok, "estimate": est}
        elif base in records:
            ok, est = stats.learned(records[model], records[base], n_boot=n_boot, seed=seed)
            out[model] = {"base": base, "check": "accuracy", "learned": bool(ok), "estimate": est}
        else:
            out[model] = {"base": base, "check": None, "learned": None, "estimate": None}
    return out


HELD_OUT = "held-out loss"


def held_out_check(
    by_seed: Mapping[Any, Mapping], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[bool, stats.Estimate]:
    """Did training work, judged on held-out data of the model's own task? ``by_seed``: {seed:
    record of `first_lib.heldout.compare_models`} (the same examples in every seed). The
    estimate is the mean over examples and seeds of the untuned model's training loss minus the
    tuned model's (nats per target position: positive when the tuned model fits held-out data
    of its task better than its start), with a percentile bootstrap that resamples examples and seeds together; the
    model learned when the interval lies above 0."""
    metrics._check_boot(n_boot, alpha)
    records = list(by_seed.values())
    if not records:
        raise FirstError("no held-out record to check")
    ids = list(records[0]["ids"])
    if any(list(r["ids"]) != ids for r in records):
        raise FirstError("the seeds' held-out records are over different examples")
    drop = np.array([np.subtract(r["untuned"], r["tuned"], dtype=float) for r in records])
    if drop.size == 0 or not np.isfinite(drop).all():
        raise FirstError("a held-out record has no examples or a loss that is not finite")
    n_seeds, n = drop.shape
    seed_rng = np.random.default_rng([seed, 1])
    reps = []
    for qidx in metrics.resample_indices(n, n_boot, seed, n_seeds):
        sidx = seed_rng.integers(0, n_seeds, size=(qidx.shape[0], n_seeds))
        reps.append(drop[sidx[:, :, None], qidx[:, None, :]].mean(axis=(1, 2)))
    est = stats.from_replicates(
        float(drop.mean()), np.concatenate(reps), "held_out_loss_drop", "percentile", alpha,
        0.8, "single", n, (n_seeds,),
    )  # fmt: skip
    return est.lo > 0.0, est


def depends_on(models: Iterable[str]) -> list[str]:
    """The trained models a claim about ``models`` needs to have learned: the models
    themselves (a post-hoc variant: the model it rescales) and the teacher for a distilled one."""
    need: list[str] = []
    for m in models:
        m = POSTHOC_OF.get(m, m)
        if m in BASE_OF and m not in need:
            need.append(m)
        if m in DISTILLED and "teacher" not in need:
            need.append("teacher")
    return need


def testability(models: Iterable[str], checks: Mapping[str, Mapping[str, Any]]) -> tuple[bool, str]:
    """(testable, note) of a claim about ``models`` given `training_checks`: not testable when a
    model it depends on did not learn; testable, with a note, when a check could not be made."""
    failed = [m for m in depends_on(models) if checks.get(m, {}).get("learned") is False]
    if failed:
        return False, f"did not learn: {', '.join(failed)}"
    unchecked = [m for m in depends_on(models) if checks.get(m, {}).get("learned") is None]
    if unchecked:
        why = "no untuned baseline on the test, no held-out check"
        return True, f"training not checked ({why}): {', '.join(unchecked)}"
    return True, ""


# --------------------------------------------------------------------------- estimates


def mean_estimate(
    values: Sequence[float],
    threshold: float = 0.0,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    metric: str = "mean",
) -> stats.Estimate:
    """mean(values) - threshold with a percentile bootstrap over the values (questions,
    passages), as a `stats.Estimate` (p-value of 0 and mde included)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise FirstError("no values to average")
    metrics._check_boot(n_boot, alpha)
    reps = np.concatenate(
        [x[idx].mean(axis=1) for idx in metrics.resample_indices(x.size, n_boot, seed, 1)]
    )
    point = float(x.mean()) - threshold
    lo, hi, p = stats.interval(point, reps - threshold, "percentile", alpha)
    se = float(np.std(reps, ddof=1)) if n_boot > 1 else 0.0
    return stats.Estimate(
        metric=metric,
        point=point,
        lo=lo,
        hi=hi,
        corrected=point,
        p=p,
        se=se,
        mde=stats.mde(se, alpha),
        method="percentile",
        seeds="single",
        n_questions=int(x.size),
        n_seeds=(1,),
        alpha=alpha,
    )


def common_questions(a: Any, b: Any) -> tuple[Any, Any]:
    """The records of ``a`` and ``b`` restricted to the questions both answered (by id), in the
    same order: what a paired comparison of two settings on one test set needs. Each side is
    one run's records or {seed: records} (every seed restricted to the same questions)."""
    runs_a = a if isinstance(a, Mapping) else {None: a}
    runs_b = b if isinstance(b, Mapping) else {None: b}
    id_sets = [{str(r["id"]) for r in recs} for recs in [*runs_a.values(), *runs_b.values()]]
    ids = sorted(set.intersection(*id_sets))
    if not ids:
        raise FirstError("the two record sets share no question")

    def keep(runs):
        out = {}
        for s, recs in runs.items():
            by_id = {str(r["id"]): r for r in recs}
            out[s] = [by_id[i] for i in ids]
        return out if None not in out else out[None]

    return keep(runs_a), keep(runs_b)


def interval_method(est: Any) -> str:
    """A short name of the interval behind an estimate."""
    method = getattr(est, "method", "percentile")
    return "bias-corrected basic bootstrap" if method == "basic" else "percentile bootstrap"


def primary_estimates(
    records: Mapping[str, Any], test: str, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """The primary family's comparisons on one test set (`primary_names` for ``test``, with the
    competitors ``records`` has), each oriented as its claim states it: {name: {"estimate":
    `stats.Estimate`, "models": the models it is about, "a", "b", "metric"}}, the estimate being
    metric(a) - metric(b) paired over questions and seeds. "FIRST beats X" is positive when FIRST
    is better (ECE: X - FIRST; accuracy: FIRST - X); "tuning makes the model over-confident" is
    ECE(tuned) - ECE(untuned), present only where the untuned model was evaluated."""
    out: dict[str, dict[str, Any]] = {}
    tuned_of = {"teacher": ("teacher", "teacher_base"), "student": ("finetune", "student_base")}
    for name in primary_names((test,), [v for v in PRIMARY_COMPETITORS if v in records]):
        who = next((w for w in TUNED if name == tuning_name(w, test)), None)
        if who is not None:
            a, b = tuned_of[who]
            metric, models = "ece", [a]
            if b not in records or a not in records:
                continue
        else:
            other, metric = next(
                (o, m)
                for o in PRIMARY_COMPETITORS
                for m in PRIMARY_METRICS
                if name == first_vs_name(o, m, test)
            )
            a, b = (other, "first_ts") if metric == "ece" else ("first_ts", other)
            models = ["first_ts", other]
        est = stats.compare(records[a], records[b], metric, n_boot=n_boot, seed=seed)
        out[name] = {"estimate": est, "models": models, "a": a, "b": b, "metric": metric}
    return out


def seed_spread(records: Mapping[str, Any], a: str, b: str, metric: str) -> float | None:
    """How far metric(a) - metric(b) moves between the training seeds of one run: max - min
    over the seeds of the per-seed difference (`seed_differences`); None with fewer than two
    seeds. A yardstick for a comparison made with one training seed, whose interval covers the
    questions only."""
    diffs = seed_differences(records, a, b, metric)
    if diffs is None:
        return None
    return float(max(diffs.values()) - min(diffs.values()))


def by_seed(records: Mapping[str, Any], model: str) -> Mapping[int, Any]:
    """{training seed: records} of `model`; records given without seeds count as seed 0."""
    runs = records[model]
    return runs if isinstance(runs, Mapping) else {0: runs}


def seed_differences(
    records: Mapping[str, Any], a: str, b: str, metric: str
) -> dict[int, float] | None:
    """{training seed: metric(a) - metric(b) on that seed's test records}, a model with one
    evaluation (an untuned baseline) entering every seed with it; None with fewer than two
    seeds."""
    from first_lib.book import conf_correct, metric_value

    seeds = sorted(set(by_seed(records, a)) | set(by_seed(records, b)))
    if len(seeds) < 2:
        return None

    def value(m, s):
        runs = by_seed(records, m)
        return metric_value(metric, *conf_correct(runs.get(s, next(iter(runs.values())))))

    return {s: float(value(a, s) - value(b, s)) for s in seeds}


# --------------------------------------------------------------------------- deciding


def decide(items: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Verdicts of named claims {name: {"claim": stats.Claim, "estimate", "testable"}}: Holm
    over the testable primary claims (`stats.decide_all`), the five verdicts of `stats`."""
    return stats.decide_all(
        {k: (v["claim"], v["estimate"]) for k, v in items.items()},
        testable={k: bool(v.get("testable", True)) for k, v in items.items()},
    )


def combine(verdicts: Sequence[str]) -> str:
    """The verdict of a conjunction ("FIRST beats all three"): not testable if any part is; all
    reproduced: reproduced; any contradicted: contradicted; all ruling out: rules out; else too
    noisy to tell."""
    if not verdicts:
        raise FirstError("no verdicts to combine")
    if any(v == stats.NOT_TESTABLE for v in verdicts):
        return stats.NOT_TESTABLE
    if all(v == stats.REPRODUCED for v in verdicts):
        return stats.REPRODUCED
    if any(v == stats.CONTRADICTED for v in verdicts):
        return stats.CONTRADICTED
    if all(v == stats.RULES_OUT for v in verdicts):
        return stats.RULES_OUT
    return stats.TOO_NOISY


# --------------------------------------------------------------------------- sentences

_TEMPLATES = {
    stats.REPRODUCED: "This build reproduces the claim that {subject}.",
    stats.CONTRADICTED: "This build contradicts the claim that {subject}: the difference goes the "
    "other way.",
    stats.RULES_OUT: "This build rules out the paper's effect size for the claim that {subject}: "
    "the effect, if any, is smaller than the paper's.",
    stats.TOO_NOISY: "This build is too noisy to tell whether {subject}.",
    stats.NOT_TESTABLE: "This build finds the claim that {subject} not testable here: a model it "
    "depends on did not learn.",
}
SHORT = {
    stats.REPRODUCED: "reproduced",
    stats.CONTRADICTED: "contradicted",
    stats.RULES_OUT: "rules out the paper's size",
    stats.TOO_NOISY: "too noisy to tell",
    stats.NOT_TESTABLE: "not testable here",
}
# Words that state a conclusion: hand-written prose must not use them (tests/test_book.py).
VERDICT_WORDS = (
    r"reproduc(?:es|ed)",
    r"contradict(?:s|ed)",
    r"confirm(?:s|ed|ing)?",
    r"rules? out",
    r"too noisy",
    r"not testable",
    r"inconclusive",
    r"refut(?:es|ed)",
)


def sentence(subject: str, verdict: str) -> str:
    """The sentence stating ``verdict`` on the claim that ``subject`` (a clause: "FIRST is better
    calibrated than Fine-tune on CSQA")."""
    if verdict not in _TEMPLATES:
        raise FirstError(f"unknown verdict {verdict!r}; use one of {', '.join(stats.VERDICTS)}")
    return _TEMPLATES[verdict].format(subject=subject)


# The verdicts after a count of claims ("4 ruling out ...", not "4 rules out ...").
COUNTED = {**{v: v for v in stats.VERDICTS}, stats.RULES_OUT: "ruling out the paper's effect size"}


def counts_sentence(counts: Mapping[str, int], what: str = "claims") -> str:
    """'Of the 12 claims: 3 reproduced, 1 contradicted, 4 ruling out the paper's effect size,
    ...' (every verdict, zeros included)."""
    n = sum(int(counts.get(v, 0)) for v in stats.VERDICTS)
    parts = ", ".join(f"{int(counts.get(v, 0))} {COUNTED[v]}" for v in stats.VERDICTS)
    return f"Of the {n} {what}: {parts}."


# --------------------------------------------------------------------------- chapters


def first_gains(
    records: Mapping[str, Sequence[Mapping]],
    others: Sequence[str] = ("finetune", "distill", "distill_ls"),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, stats.Estimate]]:
    """FIRST's paired advantage over each other student present in ``records``, as
    `stats.Estimate` (bias-corrected interval for ECE): {other: {"ece": ECE(other) -
    ECE(FIRST), "acc": Acc(FIRST) - Acc(other), "trust": Trust(FIRST) - Trust(other)}}.
    Positive is better for FIRST throughout."""
    first = records["first_ts"]
    out = {}
    for v in others:
        if v not in records:
            continue
        out[v] = {
            "ece": stats.compare(records[v], first, "ece", n_boot=n_boot, seed=seed),
            "acc": stats.compare(first, records[v], "acc", n_boot=n_boot, seed=seed),
            "trust": stats.compare(first, records[v], "trust", n_boot=n_boot, seed=seed),
        }
    return out


def verdict_of(
    est: Any,
    models: Iterable[str] = (),
    checks: Mapping[str, Mapping[str, Any]] | None = None,
    direction: str = "above",
    effect: float | None = None,
    threshold: float = 0.0,
) -> str:
    """The verdict of one secondary claim as the chapters state it (`stats.decide`, no
    multiplicity correction: the primary family is decided in paper_vs_reproduction): the
    difference ``est`` (minus ``threshold``) against 0 on ``direction``, not testable when one
    of ``models`` did not learn (`training_checks` ``checks``)."""
    ok = testability(models, checks)[0] if checks is not None else True
    shifted = SimpleNamespace(lo=est.lo - threshold, hi=est.hi - threshold)
    return stats.decide(shifted, stats.Claim(direction, effect), testable=ok)
