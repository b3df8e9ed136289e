"""Every claim of the paper this book tests, built once from per-question records and decided
together: the table of the chapter paper_vs_reproduction, and what `first evidence` decides
from lab records files.

A claim is a dict: name, section, test, claim (its text), where (in the paper), paper (the
paper's number as text), estimate (a `stats.Estimate` or a `book.Difference`, positive in the
direction the text states), threshold, fmt, counted, stats_claim (`stats.Claim`: direction and
the paper's effect size), primary, testable, note; `decide` adds verdict, p and p_holm.

Most claims need only the answers of each model to each test question (`build` with the
records). Five need what only a run's cache holds (`NEED_CACHE`): the top-5 mass of the
teacher's distributions (text, task, stored answer positions) and the token-level rank gaps of
its stored top-5, which the chapter computes from the models and the store and passes in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from first_lib import stats, verdicts

# The paper's test sets ("ood_*": the out-of-domain setting, trained on a mix, tested there).
TEST_NAMES = {
    "csqa": "CSQA",
    "boolq": "BoolQ",
    "ood_csqa": "CSQA (out of domain)",
    "ood_obqa": "OBQA (out of domain)",
}
LABEL = {
    "teacher": "teacher",
    "teacher_base": "untuned teacher",
    "student_base": "untuned student",
    "finetune": "Fine-tune",
    "distill": "Distill",
    "distill_ls": "Distill w/ LS",
    "first_ts": "FIRST",
    "finetune_posthoc_ts": "Fine-tune + TS",
    "distill_posthoc_ts": "Distill + TS",
}
SECTIONS = ("knowledge", "tuning", "distill", "ls")
# FIRST against each other student: the metrics compared (Table 1's columns where the paper has
# the student; the post-hoc variants are this book's cheap competitor).
COMPARED = {
    "finetune": ("ece", "acc", "trust"),
    "distill": ("ece", "acc"),
    "distill_ls": ("ece",),
    "finetune_posthoc_ts": ("ece", "acc"),
    "distill_posthoc_ts": ("ece",),
}
WORD = {
    "ece": ("better calibrated than", "ECE"),
    "acc": ("more accurate than", "accuracy"),
    "trust": ("more trustworthy than", "Trust"),
}
# The counted claims that need a run's cache (models, knowledge store), not only its records.
NEED_CACHE = {
    "top5_mass_text": "the pretrained teacher's distributions over plain text",
    "top5_mass_task": "the fine-tuned teacher's distributions over task prompts",
    "top5_mass_answer": "the knowledge store (top-5 mass at the answer positions)",
    "token_rank1_overconfident_teacher": "the knowledge store's validation ranks",
    "token_rank2to5_underconfident_teacher": "the knowledge store's validation ranks",
}

TOKEN_CLAIMS = ("token_rank1_overconfident_teacher", "token_rank2to5_underconfident_teacher")
# Claims that pair two test sets' records (the same questions in two settings): {name: tests}.
CROSS_TEST = {"ood_worse_calibrated": ("ood_csqa", "csqa")}


def precision_note(name: str, precisions: Mapping[str, str | None]) -> str:
    """What a claim of `CROSS_TEST` must say when its two test sets' runs used different
    precisions ({test: "bf16" | "fp32"}): the paired difference then also holds the change of
    arithmetic, which the same-precision case does not. "" otherwise."""
    tests = CROSS_TEST.get(name, ())
    got = {t: precisions.get(t) for t in tests}
    if len(tests) < 2 or None in got.values() or len(set(got.values())) < 2:
        return ""
    return "runs at different precisions (" + ", ".join(f"{t} {p}" for t, p in got.items()) + ")"


def _paper():
    from first_lib.book.paper import PAPER_LS_BOOLQ_LLAMA1, PAPER_TABLE1_LLAMA2

    return PAPER_TABLE1_LLAMA2, PAPER_LS_BOOLQ_LLAMA1


def paper_claim(paper_points: float | None, primary: bool = False) -> stats.Claim:
    """The paper's claim from its difference (points; positive: the direction stated): its sign
    gives the direction, its size the effect; no number: 'above' with no effect size."""
    if paper_points is None or paper_points == 0:
        return stats.Claim("above", None, primary)
    return stats.Claim("above" if paper_points > 0 else "below", paper_points / 100, primary)


def add(
    claims: dict[str, dict[str, Any]],
    name: str,
    section: str,
    text: str,
    where: str,
    paper: str,
    est: Any,
    models: Sequence[str],
    checks: Any,
    claim: stats.Claim | None = None,
    test: str | None = None,
    threshold: float = 0.0,
    fmt: str = "points",
    counted: bool = True,
    note: str = "",
) -> None:
    """Add one claim to ``claims``. est: the difference (positive: the direction in `text`);
    models: the models it depends on; checks: the `verdicts.training_checks` of its test (a list
    of them for a claim over two settings, None for none); counted False: an illustration (an
    identity of other claims, a conjunction, arithmetic), shown but not decided."""
    tested = [
        verdicts.testability(models, c)
        for c in (checks if isinstance(checks, list) else [checks])
        if c is not None
    ]
    ok = all(t[0] for t in tested)
    why = "; ".join(dict.fromkeys(t[1] for t in tested if t[1]))
    claims[name] = {
        "name": name,
        "section": section,
        "test": test,
        "claim": text,
        "where": where,
        "paper": paper,
        "estimate": est,
        "threshold": threshold,
        "fmt": fmt,
        "counted": counted,
        "stats_claim": claim or paper_claim(None, verdicts.is_primary(name)),
        "primary": verdicts.is_primary(name) and counted,
        "testable": ok,
        "note": "; ".join(x for x in (why, note) if x),
    }


# --------------------------------------------------------------------------- the sections


def knowledge_claims(
    claims: dict,
    coverage: Mapping[str, tuple[str, Mapping[str, Any]]],
    storage: tuple[float, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> None:
    """Fig. 2 / sec. 3.1: the top-5 tokens hold > 95% of the mass. coverage: {key: (what,
    entry)} with entry["by_example_mean"] the mean top-5 mass of each passage or example;
    storage: (measured ratio of full distributions to a top-5 store, the paper's ratio)."""
    for key, (what, entry) in coverage.items():
        add(claims, f"top5_mass_{key}", "knowledge",
            f"Top-5 tokens hold > 95% of the mass: {what}", "Fig. 2, sec. 3.1", "> 95%",
            verdicts.mean_estimate(entry["by_example_mean"], 0.95, n_boot=n_boot, seed=seed),
            [], None, threshold=0.95, fmt="percent")  # fmt: skip
    if storage is not None:
        from first_lib.book import Difference

        ratio, paper_ratio = storage
        add(claims, "storage_ratio", "knowledge",
            "A top-5 store is at least 100x smaller than the full distributions", "sec. 4.1",
            f"120 TB → 1.2 GB ({paper_ratio:,.0f}x)", Difference(ratio, ratio, ratio), [], None,
            fmt="ratio", counted=False,
            note="arithmetic (vocabulary size / 5 kept entries), not a measurement: not counted")  # fmt: skip


def rank_claims(claims: dict, records: Any, checks: Mapping, n_boot: int = 1000, seed: int = 0):
    """Fig. 3 (a, b): the fine-tuned teacher and student are over-confident at rank 1 of the
    answer candidates on CSQA; the gap at the lower ranks is an identity of it (not counted)."""
    from first_lib.book import _sorted_candidates, rank_gaps

    for who in ("teacher", "finetune"):
        if who not in records:
            continue
        probs, hit = _sorted_candidates(records[who])
        name = "teacher" if who == "teacher" else "student"
        add(claims, f"rank1_overconfident_{name}", "tuning",
            f"Fine-tuned {name} is over-confident at rank 1 (accuracy - probability < 0), CSQA",
            "Fig. 3 (a, b), sec. 3.2", "over-confident (figure)",
            verdicts.mean_estimate(hit[:, 0] - probs[:, 0], n_boot=n_boot, seed=seed), [who],
            checks, claim=stats.Claim("below"))  # fmt: skip
        g = rank_gaps(records[who], n_boot=n_boot, seed=seed)
        add(claims, f"rank_rest_underconfident_{name}", "tuning",
            f"Fine-tuned {name} is under-confident at ranks 2-{probs.shape[1]} (accuracy - "
            "probability > 0), CSQA", "Fig. 3 (a, b), sec. 3.2", "under-confident (figure)",
            g["rest"], [who], checks, counted=False,
            note=f"identity: minus the rank-1 gap over {probs.shape[1] - 1} (renormalised "
            "candidates); not counted")  # fmt: skip


def token_claims(
    claims: dict,
    probs: np.ndarray,
    ranks: np.ndarray,
    checks: Mapping,
    n_boot: int = 1000,
    seed: int = 0,
) -> None:
    """Fig. 3 (a) at the level of tokens over the whole vocabulary: the fine-tuned teacher's
    stored top-5 at the validation answer positions (probs [N, 5], ranks [N]: the gold token's
    rank, 5 or more when outside the top 5), where the mass beyond rank 5 makes the ranks 2-5
    gap a quantity of its own."""
    hit = (ranks[:, None] == np.arange(probs.shape[1])[None, :]).astype(np.float64)
    note = f"{len(ranks)} validation positions, resampled as independent"
    add(claims, "token_rank1_overconfident_teacher", "tuning",
        "Fine-tuned teacher is over-confident at rank 1 over the vocabulary (top-5 tokens at the "
        "stored answer positions), CSQA", "Fig. 3 (a), sec. 3.2", "over-confident (figure)",
        verdicts.mean_estimate(hit[:, 0] - probs[:, 0], n_boot=n_boot, seed=seed), ["teacher"],
        checks, claim=stats.Claim("below"), note=note)  # fmt: skip
    add(claims, "token_rank2to5_underconfident_teacher", "tuning",
        f"Fine-tuned teacher is under-confident at ranks 2-{probs.shape[1]} over the vocabulary "
        "(stored answer positions), CSQA", "Fig. 3 (a), sec. 3.2", "under-confident (figure)",
        verdicts.mean_estimate((hit[:, 1:] - probs[:, 1:]).mean(axis=1), n_boot=n_boot, seed=seed),
        ["teacher"], checks, claim=stats.Claim("above"), note=note)  # fmt: skip


def tuning_claims(claims: dict, recs: Mapping, checks: Mapping, n_boot: int = 1000, seed: int = 0):
    """Tuning makes the teacher and the student over-confident (ECE up, each in-domain test with
    its untuned baseline), and fine-tuning is worse calibrated out of domain than in domain
    (paired: the same CSQA test questions answered by both settings' students)."""
    paper, _ = _paper()
    for test in verdicts.IN_DOMAIN:
        r = recs.get(test)
        if r is None:
            continue
        for who, tuned, base in (("teacher", "teacher", "teacher_base"),
                                 ("student", "finetune", "student_base")):  # fmt: skip
            if base not in r or tuned not in r:
                continue
            add(claims, verdicts.tuning_name(who, test), "tuning",
                f"Tuning makes the {who} over-confident (ECE up)", "Fig. 3, sec. 3.2",
                "ECE up (figure)", stats.compare(r[tuned], r[base], "ece", n_boot=n_boot, seed=seed),
                [tuned], checks[test], test=test)  # fmt: skip
    if "ood_csqa" in recs and "csqa" in recs:
        ood_ft, in_ft = verdicts.common_questions(
            recs["ood_csqa"]["finetune"], recs["csqa"]["finetune"]
        )
        ece = {t: paper[t]["finetune"]["ece"] for t in ("ood_csqa", "csqa")}
        paper_ood = ece["ood_csqa"] - ece["csqa"]
        add(claims, "ood_worse_calibrated", "tuning",
            "Fine-tuning is worse calibrated out of domain than in domain (ECE, CSQA)", "sec. 5.2",
            f"{ece['ood_csqa']} vs {ece['csqa']} ({paper_ood:+.1f})",
            stats.compare(ood_ft, in_ft, "ece", n_boot=n_boot, seed=seed), ["finetune"],
            [checks["ood_csqa"], checks["csqa"]], claim=paper_claim(paper_ood, False),
            note=f"paired: the same {_n_questions(in_ft)} CSQA test questions in both settings")  # fmt: skip


def _n_questions(records: Any) -> int:
    """How many questions one model's records cover (one run's list, or {seed: records})."""
    return len(next(iter(records.values())) if isinstance(records, Mapping) else records)


def paper_gain(test: str, other: str, metric: str) -> float | None:
    """FIRST's advantage over `other` in the paper's Table 1 on `test` (points; positive: FIRST
    better), None where the paper has no such student."""
    paper, _ = _paper()
    if other not in paper[test]:
        return None
    a, b = paper[test]["first_ts"][metric], paper[test][other][metric]
    return round(b - a, 1) if metric == "ece" else round(a - b, 1)


def first_gain(r: Mapping, other: str, metric: str, n_boot: int = 1000, seed: int = 0):
    """FIRST's advantage over `other`, positive when FIRST is better (lower ECE, higher Acc and
    Trust), paired over questions and seeds."""
    if metric == "ece":
        return stats.compare(r[other], r["first_ts"], "ece", n_boot=n_boot, seed=seed)
    return stats.compare(r["first_ts"], r[other], metric, n_boot=n_boot, seed=seed)


def same_model(r: Mapping, a: str, b: str) -> bool:
    """Whether variants `a` and `b` gave the same probabilities to every question of every seed:
    one model under two names (Distill w/ LS where the validation search chose no smoothing,
    delta* = 0, trains exactly as Distill)."""
    ra, rb = verdicts.by_seed(r, a), verdicts.by_seed(r, b)
    return set(ra) == set(rb) and all(
        len(ra[s]) == len(rb[s])
        and all(
            x["id"] == y["id"] and list(x["probs"]) == list(y["probs"])
            for x, y in zip(ra[s], rb[s], strict=True)
        )
        for s in ra
    )


LS_IS_DISTILL = (
    "Distill w/ LS is Distill here (the validation search chose delta* = 0: the same "
    "probabilities on every question)"
)
SAME_AS_DISTILL = f"{LS_IS_DISTILL}, so this is the comparison with Distill again; not counted"
NO_SMOOTHING = f"{LS_IS_DISTILL}, so no smoothing was applied; not counted"


def distill_names(test: str, variants: Sequence[str]) -> list[str]:
    """The counted claims `distill_claims` forms on ``test`` for a run with ``variants``."""
    names = [
        verdicts.first_vs_name(o, m, test)
        for o, mets in COMPARED.items()
        if o in variants and "first_ts" in variants
        for m in mets
        if not verdicts.is_identity(o, m)
    ]
    if {"teacher", "finetune"} <= set(variants):
        names.append(f"teacher_vs_finetune_acc_{test}")
    return names


def distill_claims(claims: dict, recs: Mapping, checks: Mapping, n_boot: int = 1000, seed: int = 0):
    """Table 1 on every test set of ``recs``: FIRST against each other student (`COMPARED`),
    "FIRST has the lowest ECE / highest Trust of the four students" (conjunctions, not
    counted) and the teacher against the fine-tuned student."""
    paper, _ = _paper()
    for test, r in recs.items():
        if "first_ts" not in r:
            continue
        c = checks[test]
        for other, mets in COMPARED.items():
            if other not in r:
                continue
            for metric in mets:
                pg = paper_gain(test, other, metric)
                rel, word = WORD[metric]
                if other == "distill_ls":
                    text = "Temperature scaling beats label smoothing (ECE)"
                elif pg is not None and pg < 0:
                    less = {"acc": "accurate", "trust": "trustworthy"}.get(
                        metric, "well calibrated"
                    )
                    text = f"FIRST is less {less} than {LABEL[other]} ({word})"
                else:
                    text = f"FIRST is {rel} {LABEL[other]} ({word})"
                name = verdicts.first_vs_name(other, metric, test)
                same = verdicts.is_identity(other, metric)
                base = verdicts.POSTHOC_OF.get(other)
                note = (f"identity: post-hoc TS keeps every answer, so this is the gap to "
                        f"{LABEL[base]}; not counted" if same else "")  # fmt: skip
                if other == "distill_ls" and "distill" in r and same_model(r, other, "distill"):
                    same, note = True, SAME_AS_DISTILL
                add(claims, name, "distill", text,
                    "Table 1" if pg is not None else "not in the paper (the cheap competitor)",
                    f"{pg:+.1f}" if pg is not None else "—",
                    first_gain(r, other, metric, n_boot, seed), ["first_ts", other], c,
                    claim=paper_claim(pg, verdicts.is_primary(name)), test=test, counted=not same,
                    note=note)  # fmt: skip
        parts = ("finetune", "distill", "distill_ls")
        if all(p in r for p in parts):
            for metric, word in (("ece", "the lowest ECE"), ("trust", "the highest Trust")):
                gains = {v: first_gain(r, v, metric, n_boot, seed) for v in parts}
                closest = min(gains.values(), key=lambda x: x.point)
                joint = verdicts.combine(
                    [verdicts.verdict_of(g, ["first_ts", v], c) for v, g in gains.items()]
                )
                add(claims, f"first_best_{metric}_{test}", "distill",
                    f"FIRST has {word} of the four students (smallest margin shown)", "Table 1",
                    f"{min(paper_gain(test, v, metric) for v in parts):+.1f}", closest,
                    ["first_ts", *parts], c, test=test, counted=False,
                    note=f"conjunction of three comparisons (unadjusted: {joint}): not counted")  # fmt: skip
        if "teacher" in r and "finetune" in r:
            pg = round(paper[test]["teacher"]["acc"] - paper[test]["finetune"]["acc"], 1)
            add(claims, f"teacher_vs_finetune_acc_{test}", "distill",
                "The teacher is more accurate than the fine-tuned student", "Table 1", f"{pg:+.1f}",
                stats.compare(r["teacher"], r["finetune"], "acc", n_boot=n_boot, seed=seed),
                ["teacher", "finetune"], c, claim=paper_claim(pg, False), test=test)  # fmt: skip


def ls_claim(claims: dict, recs: Mapping, checks: Mapping, n_boot: int = 1000, seed: int = 0):
    """The paper's Llama-1 BoolQ example: label smoothing can make calibration much worse."""
    r = recs.get("boolq")
    if r is None or not {"distill_ls", "distill"} <= set(r):
        return
    _, lsp = _paper()
    pg = lsp["distill_ls"]["ece"] - lsp["distill"]["ece"]
    unsmoothed = same_model(r, "distill_ls", "distill")  # delta* = 0: no smoothing to judge
    add(claims, "ls_can_hurt_boolq", "ls",
        "Label smoothing can make calibration much worse (ECE of Distill w/ LS - Distill, BoolQ)",
        "Table 1 (Llama-1), sec. 5.2", f"{pg:+.1f}",
        stats.compare(r["distill_ls"], r["distill"], "ece", n_boot=n_boot, seed=seed),
        ["distill_ls", "distill"], checks["boolq"], claim=paper_claim(pg, False),
        counted=not unsmoothed, note=NO_SMOOTHING if unsmoothed else "")  # fmt: skip


# --------------------------------------------------------------------------- all together


def build(
    recs: Mapping[str, Mapping[str, Any]],
    checks: Mapping[str, Mapping[str, Any]],
    coverage: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
    storage: tuple[float, float] | None = None,
    tokens: tuple[np.ndarray, np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Every claim the inputs allow, in the book's order (sections `SECTIONS`), not yet
    decided. recs: {test: {variant: {seed: records}}} for tests of `TEST_NAMES`; checks:
    {test: `verdicts.training_checks`}; coverage, storage, tokens: from a run's cache (see
    `knowledge_claims`, `token_claims`), None where only records are at hand."""
    unknown = sorted(set(recs) - set(TEST_NAMES))
    if unknown:
        from first_lib.errors import FirstError

        raise FirstError(f"not one of the paper's test sets: {', '.join(unknown)}")
    claims: dict[str, dict[str, Any]] = {}
    if coverage is not None or storage is not None:
        knowledge_claims(claims, coverage or {}, storage, n_boot, seed)
    if "csqa" in recs:
        rank_claims(claims, recs["csqa"], checks["csqa"], n_boot, seed)
        if tokens is not None:
            token_claims(claims, *tokens, checks["csqa"], n_boot, seed)
    tuning_claims(claims, recs, checks, n_boot, seed)
    distill_claims(claims, {t: recs[t] for t in TEST_NAMES if t in recs}, checks, n_boot, seed)
    ls_claim(claims, recs, checks, n_boot, seed)
    return claims


def decide(claims: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Decide the counted claims together (Holm over the primary ones, `verdicts.decide`),
    writing verdict, p and p_holm into each claim ("(not counted)" and None for illustrations);
    returns the counts {"primary": {verdict: n}, "secondary": {verdict: n}}."""
    counted = {k: c for k, c in claims.items() if c["counted"]}
    decided = verdicts.decide(
        {k: {"claim": c["stats_claim"], "estimate": c["estimate"], "testable": c["testable"]}
         for k, c in counted.items()}
    )  # fmt: skip
    for k, c in claims.items():
        d = decided.get(k, {"verdict": "(not counted)", "p": None, "p_holm": None})
        c.update(verdict=d["verdict"], p=d["p"], p_holm=d["p_holm"])
    return {
        kind: {
            v: sum(
                c["primary"] == (kind == "primary") and c["verdict"] == v for c in counted.values()
            )
            for v in stats.VERDICTS
        }
        for kind in ("primary", "secondary")
    }


def missing(claims: Mapping[str, Any], tests: Sequence[str]) -> dict[str, str]:
    """The counted claims a full build forms that ``claims`` lacks, with what each needs:
    the run's cache (`NEED_CACHE`), or a test set's records (out-of-domain setting, BoolQ)."""
    out = {
        k: f"needs {why} (a run's cache, or its knowledge file: first export-knowledge)"
        for k, why in NEED_CACHE.items()
    }
    variants = (*COMPARED, "first_ts", "teacher")
    for t in TEST_NAMES:
        if t in tests:
            continue
        for n in distill_names(t, variants):
            out[n] = f"needs the records of {TEST_NAMES[t]}"
    if not {"csqa", "ood_csqa"} <= set(tests):
        out["ood_worse_calibrated"] = "needs the records of CSQA and of CSQA (out of domain)"
    for t in verdicts.IN_DOMAIN:
        if t not in tests:
            for who in verdicts.TUNED:
                out[verdicts.tuning_name(who, t)] = f"needs the records of {TEST_NAMES[t]}"
    if "csqa" not in tests:
        for who in ("teacher", "student"):
            out[f"rank1_overconfident_{who}"] = "needs the records of CSQA"
        for name in TOKEN_CLAIMS:  # their training check is the CSQA teacher's
            out[name] = "needs the records of CSQA"
    if "boolq" not in tests:
        out["ls_can_hurt_boolq"] = "needs the records of BoolQ"
    return {k: v for k, v in out.items() if k not in claims}


def subject(c: Mapping[str, Any]) -> str:
    """The claim as a clause: "FIRST is better calibrated than Fine-tune (ECE) on CSQA"."""
    text = c["claim"] if c["claim"][1:2].isupper() else c["claim"][0].lower() + c["claim"][1:]
    return text + (f" on {TEST_NAMES[c['test']]}" if c["test"] else "")


def ours(c: Mapping[str, Any]) -> str:
    """This build's number of a claim as text (percent, ratio, or a difference in points)."""
    from first_lib.book import diff_text, pct_ci

    d, t = c["estimate"], c["threshold"]
    if c["fmt"] == "percent":
        return f"{pct_ci(d.point + t, d.lo + t, d.hi + t)}%"
    if c["fmt"] == "ratio":
        return f"{d.point:,.0f}x"
    return f"{diff_text(d)} points"
