"""The evidence as a reader sees it: the claims, training checks and decidability analysis of
`first_lib.evidence` as rows of text for tables and as sentences (what the lab chapter and
`appendix_more_tasks` display), and the `first evidence FILE...` command that prints them.

Every sentence here is made from the numbers it is given; none holds a conclusion of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from first_lib import claims as paper_claims
from first_lib import verdicts
from first_lib.evidence import LABEL, from_files, seeds_disagree


def _diff(est) -> str:
    from first_lib.book import diff_text

    return f"{diff_text(est)} points"


def claim_rows(
    claims: Mapping[str, Mapping[str, Any]], names: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """One row of text a claim, for a table: task, claim, difference with its 95% interval,
    MDE, the paper's difference (and the test it is from where that is another), Holm's p,
    verdict (with why a claim is not testable), the seed spread where one was computed, and
    each seed's difference where the test has several."""
    names = names or {}
    rows = []
    for c in claims.values():
        where = names.get(c["task"], c["task"])
        est, paper = c["estimate"], c["paper"]
        from_other = paper is not None and c["paper_from"] != c["task"]
        row = {
            "task": where,
            "claim": c["subject"][0].upper() + c["subject"][1:].replace(f" on {where}", ""),
            "difference [95% CI]": _diff(est),
            "MDE": f"{100 * est.mde:.1f}",
            "paper": "—"
            if paper is None
            else f"{paper:+.1f}"
            + (f" ({names.get(c['paper_from'], c['paper_from'])})" if from_other else ""),
            "p (Holm)": "—" if c["p_holm"] is None else f"{c['p_holm']:.3g}",
            "verdict": verdicts.SHORT[c["verdict"]] + (f" ({c['note']})" if c["note"] else ""),
        }
        if any(x["spread"] is not None for x in claims.values()):
            row["seed spread"] = (
                "—"
                if c["spread"] is None
                else f"{100 * c['spread']:.1f} ({'beyond' if c['beyond_seed_spread'] else 'within'})"
            )
        if any(x.get("by_seed") for x in claims.values()):
            row["by seed"] = (
                " / ".join(f"{100 * d:+.1f}" for d in c["by_seed"].values())
                if c.get("by_seed")
                else "—"
            )
        rows.append(row)
    return rows


def _count(x: float) -> str:
    return "never" if x == float("inf") else f"{int(x):,}"


def decides_rows(
    decides: Mapping[str, Mapping[str, Any]],
    claims: Mapping[str, Mapping[str, Any]],
    names: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """One row of text a `what_decides` entry, for a table."""
    names = names or {}
    rows = []
    for n, d in decides.items():
        c = claims[n]
        where = names.get(c["task"], c["task"])
        size = d["paper_size"]
        if size is None:
            verdict = "no size in the paper to rule out"
        elif d["decidable"] and d["one_seed"]:
            verdict = "the whole split, if the seeds vary little (one seed: unknown)"
        elif d["decidable"]:
            verdict = f"decidable: the whole split and {_count(d['seeds'])} seeds"
        else:
            verdict = (
                f"not on this test set: {_count(d['questions_unlimited'])} questions with "
                f"unlimited seeds, {_count(d['questions'])} at {d['n_seeds']}"
            )
        rows.append(
            {
                "task": where,
                "claim": c["subject"][0].upper() + c["subject"][1:].replace(f" on {where}", ""),
                "paper": "—" if size is None else f"{100 * size:.1f}",
                "MDE now": f"{100 * d['mde']:.1f} ({d['n_questions']:,} q x {d['n_seeds']} s)",
                "MDE split": f"{100 * d['mde_split']:.1f} ({d['split']:,} q x "
                f"{d['design_seeds']} s)",
                "floor": f"{100 * d['floor']:.1f}"
                + (" (one seed: questions only)" if d["one_seed"] else ""),
                "to rule out the paper's size": verdict,
            }
        )
    return rows


def decides_sentence(
    decides: Mapping[str, Mapping[str, Any]],
    claims: Mapping[str, Mapping[str, Any]],
) -> str:
    """A sentence from `what_decides`: which too-noisy claims no number of seeds decides on
    their test set, which more seeds would, and which have no size to rule out."""
    if not decides:
        return "No claim of this family is too noisy to tell."

    def subj(n):
        return claims[n]["subject"]

    never = [n for n, d in decides.items() if d["decidable"] is False]
    seeds = [n for n, d in decides.items() if d["decidable"] and not d["one_seed"]]
    split = [n for n, d in decides.items() if d["decidable"] and d["one_seed"]]
    nosize = [n for n, d in decides.items() if d["decidable"] is None]
    parts = []
    if never:
        parts.append(
            "No number of training seeds decides whether "
            + "; or whether ".join(
                f"{subj(n)} (paper {100 * decides[n]['paper_size']:.1f} points, below the "
                f"{decides[n]['split']:,}-question split's floor of "
                f"{100 * decides[n]['floor']:.1f}: ruling it out needs about "
                f"{_count(decides[n]['questions_unlimited'])} questions)"
                for n in never
            )
            + "."
        )
    if seeds:
        parts.append(
            "More seeds on the whole split would decide whether "
            + "; or whether ".join(
                f"{subj(n)} ({_count(decides[n]['seeds'])} seeds)" for n in seeds
            )
            + "."
        )
    if split:
        parts.append(
            "The whole test split could decide whether "
            + "; or whether ".join(
                f"{subj(n)} (its floor {100 * decides[n]['floor']:.1f} against the paper's "
                f"{100 * decides[n]['paper_size']:.1f} points)"
                for n in split
            )
            + ", if its training seeds differ little: one seed cannot show how much they do."
        )
    if nosize:
        parts.append(
            "The paper gives no size to the claim that "
            + "; nor to the claim that ".join(
                f"{subj(n)}, where even the whole split with unlimited seeds would only detect "
                f"a difference of {100 * decides[n]['floor']:.1f} points or more"
                for n in nosize
            )
            + "."
        )
    if any(decides[n]["one_seed"] for n in decides):
        parts.append(
            "A test with one training seed shows no seed-to-seed variance, so its floor counts "
            "the questions only."
        )
    return " ".join(parts)


def seeds_sentence(claims: Mapping[str, Mapping[str, Any]]) -> str:
    """Sentences from the per-seed differences: the claims whose seeds fall on both sides of 0,
    and the claim whose difference moved most between seeds; empty where no test has several
    seeds."""
    ranged = {n: c["by_seed"] for n, c in claims.items() if c.get("by_seed")}
    if not ranged:
        return ""

    def seeds(n):
        return ", ".join(f"seed {s} {100 * d:+.1f}" for s, d in ranged[n].items())

    split = seeds_disagree(claims)
    first = (
        f"In {len(split)} of the {len(ranged)} claims with several training seeds the seeds, "
        "taken one at a time, fall on both sides of 0: "
        + "; ".join(f"{claims[n]['subject']} ({seeds(n)})" for n in split)
        + "."
        if split
        else f"In every one of the {len(ranged)} claims with several training seeds, each seed "
        "taken alone falls on the same side of 0."
    )
    widest = max(ranged, key=lambda n: max(ranged[n].values()) - min(ranged[n].values()))
    span = 100 * (max(ranged[widest].values()) - min(ranged[widest].values()))
    return (
        f"{first} The difference that moved most between seeds: {claims[widest]['subject']}, "
        f"{span:.1f} points ({seeds(widest)})."
    )


def check_rows(
    checks: Mapping[str, Mapping[str, Any]], names: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """One row of text a tuned model: did it beat its untuned start? On the test, accuracy
    (points, paired); on held-out data of its own task, its training loss (nats a target
    position, untuned - tuned; `verdicts.held_out_check`)."""
    names = names or {}
    rows = []
    for t, by_model in checks.items():
        for m, c in by_model.items():
            e, held = c["estimate"], c.get("check") == verdicts.HELD_OUT
            if e is None:
                gain = mde = "—"
            elif held:
                gain = f"{e.point:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}] nats"
                mde = f"{e.mde:.3f} nats"
            else:
                gain, mde = _diff(e), f"{100 * e.mde:.1f} points"
            rows.append(
                {
                    "task": names.get(t, t),
                    "model": LABEL[m],
                    "against": LABEL.get(c["base"], c["base"]),
                    "check": {
                        verdicts.HELD_OUT: "training loss on held-out data of its task",
                        "accuracy": "accuracy on the test",
                        None: "—",
                    }[c.get("check", "accuracy")],
                    "gain from tuning [95% CI]": gain,
                    "MDE": mde,
                    "learned?": {
                        True: "yes",
                        False: "no",
                        None: "not checked: no untuned baseline, no held-out check",
                    }[c["learned"]],
                }
            )
    return rows


def all_claim_rows(claims: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """One row of text a counted claim of `all_claims`: section, test, claim, this build's
    number, MDE, the paper's, p (Holm-adjusted in brackets), verdict and note."""
    rows = []
    for c in claims.values():
        if not c["counted"]:
            continue
        e, p = c["estimate"], c["p"]
        rows.append(
            {
                "": "primary" if c["primary"] else "secondary",
                "test": paper_claims.TEST_NAMES.get(c["test"], "") if c["test"] else "",
                "claim": c["claim"],
                "this build [95% CI]": paper_claims.ours(c),
                "MDE": f"{100 * e.mde:.1f}" if hasattr(e, "mde") else "—",
                "paper": c["paper"],
                "p (Holm)": "—"
                if p is None
                else f"{p:.3f}" + (f" ({c['p_holm']:.3f})" if c["p_holm"] is not None else ""),
                "verdict": verdicts.SHORT.get(c["verdict"], c["verdict"])
                + (f" ({c['note']})" if c["note"] else ""),
            }
        )
    return rows


def _print_table(rows: list[dict[str, str]]) -> None:
    """Rows of text as left-aligned columns (what the lab chapter shows as DataFrames)."""
    if not rows:
        return
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols}
    for r in ({c: c for c in cols}, *rows):
        print("  ".join(r.get(c, "").ljust(width[c]) for c in cols).rstrip())


DECIDES_HEADER = (
    "What would decide the claims too noisy to tell: the MDE now, on the whole test split with "
    "more seeds, and its floor (the whole split, unlimited seeds), from the difference's "
    "question and seed variances (stats.variance_split); to rule out the paper's size, the "
    "seeds the whole split needs, or, where the split's own questions are too few, the "
    "questions needed (normal approximation; 80% power at the 5% level)"
)


def _print_decides(decides, claims, names) -> None:
    if decides:
        print("\n" + DECIDES_HEADER)
        _print_table(decides_rows(decides, claims, names))
        print(decides_sentence(decides, claims))


def _cmd_evidence(args) -> int:
    out = from_files(args.files, n_boot=args.n_boot, seed=args.seed)
    names = out["names"]
    for f in out["files"]:
        print(
            f"{f['path']}: {names[f['key']]} ({f['key']}), profile {f['profile']}, "
            f"{f['precision']}, {f['n_test']} test questions, training seeds "
            f"{', '.join(map(str, f['seeds']))}"
        )
    k = out["knowledge"]
    if k is not None:
        print(
            f"{k['path']}: the {names.get(k['setting'], k['setting'])} teacher's top-5 mass and "
            f"stored ranks ({k['n_positions']} validation answer positions), profile "
            f"{k['profile']}, {k['precision']}, training seed {k['seed']}"
        )
    print("\nDid training work? (each tuned model against its untuned start, paired)")
    _print_table(check_rows(out["checks"], names))
    print(
        "\nThe primary family (Holm over its testable claims; positive: the claim's direction; "
        "MDE: smallest difference detected with 80% power)"
    )
    _print_table(claim_rows(out["claims"], names))
    if any(c.get("by_seed") for c in out["claims"].values()):
        print(
            "by seed: the difference on each training seed's models alone (plug-in metrics; "
            "the interval pools them)"
        )
        print(seeds_sentence(out["claims"]))
    if out["yardstick"]:
        print(
            f"seed spread: how far the same difference moved between the training seeds of "
            f"{names[out['yardstick']]} (max - min), for a test with one seed"
        )
    print("\n" + verdicts.counts_sentence(out["counts"], "primary claims"))
    _print_decides(out["decides"], out["claims"], names)
    more = out["more_tasks"]
    if more is not None:
        print(
            f"\nThe same comparisons on {', '.join(names[t] for t in more['tests'])}: a family of "
            "their own (Holm over it, as appendix_more_tasks), apart from the book's primary one"
        )
        _print_table(check_rows(more["checks"], names))
        _print_table(claim_rows(more["claims"], names))
        print("\n" + verdicts.counts_sentence(more["counts"], "claims on the other tasks"))
        _print_decides(more["decides"], more["claims"], names)
    every = out["all"]
    if every is not None:
        names_all = ", ".join(paper_claims.TEST_NAMES[t] for t in every["tests"])
        print(
            f"\nEvery claim of the paper that these files decide ({names_all}; the code of "
            "paper_vs_reproduction; Holm over the primary ones; secondary claims uncorrected)"
        )
        _print_table(all_claim_rows(every["claims"]))
        print("\n" + verdicts.counts_sentence(every["counts"]["primary"], "primary claims"))
        print(verdicts.counts_sentence(every["counts"]["secondary"], "secondary claims"))
        print(
            f"too noisy to tell: {every['n_too_noisy']} of the {every['n_counted']} claims "
            f"decided here ({every['too_noisy']:.0%})"
        )
        if every["missing"]:
            print(
                f"{len(every['missing'])} more claims of the book are not decided from these files:"
            )
            for name, why in every["missing"].items():
                print(f"  {name}: {why}")
    if args.json:
        from first_lib.book.output import _jsonable

        Path(args.json).write_text(json.dumps(_jsonable(out), indent=1, sort_keys=True))
        print(f"wrote {args.json}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "evidence",
        help="decide the paper's claims from lab records files (no model, no training)",
        description="Check that each tuned model learned, then decide the primary family "
        "(FIRST against Fine-tune, Distill and Fine-tune + TS on ECE and accuracy; tuning makes "
        "the model over-confident) of every in-domain test set given, Holm-corrected together, "
        "and every other claim of the paper the files decide (as paper_vs_reproduction does), "
        "from the per-question records of lab files (first export-records).",
    )
    p.add_argument(
        "files",
        nargs="+",
        help="lab records files, one a test set (records-P-TEST; the out-of-domain setting's: "
        "records-P-ood-TEST)",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--json", default=None, help="also write everything as JSON to this file")
    p.set_defaults(func=_cmd_evidence)
