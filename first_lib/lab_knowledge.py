"""The teacher's knowledge in one small file: what the paper's Figure 2 and 3 claims need.

Five claims of the paper are about the teacher's distributions, not about its answers, so no
records file decides them (`claims.NEED_CACHE`): the top-5 tokens hold more than 95% of the
mass over plain text (the pretrained teacher), over task prompts and at the stored answer
positions (the fine-tuned teacher), and the fine-tuned teacher is over-confident at rank 1 and
under-confident at ranks 2-5 over the whole vocabulary (its stored top-5 at the validation
answer positions). Until now only a build whose cache held the run's teacher and store could
count them. `first export-knowledge --profile P --setting csqa` computes those inputs once from
the cached teacher and knowledge store (`first extract` makes both: the whole run is not
needed) and writes them, with the run's config, machine and code versions, to
`lab/knowledge-<profile>-<setting>.json.gz`; `first evidence` and the lab chapter then decide the
five claims from the file, as paper_vs_reproduction decides them from the cache
(`claims.knowledge_claims`, `claims.token_claims`).

What is stored: per passage or example, the mean top-5 mass (`topk_mass_by_example`, the
bootstrap's unit), and at every validation answer position the stored top-5 probabilities in
rank order and the rank of the true token among them (-1 outside), as float32 decimals. The
sizes are paper_vs_reproduction's defaults (`N_PASSAGES` windows of `TOKENS_PER_PASSAGE` tokens
of plain text, `N_TASK_EXAMPLES` training prompts).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import zlib
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from first_lib import fsio, lab
from first_lib.errors import FirstError
from first_lib.lab import KNOWLEDGE_PREFIX as PREFIX

FORMAT = "first-lab-knowledge"
VERSION = 1
# paper_vs_reproduction's defaults: the same inputs as the chapter's Fig. 2 and 3 claims
N_PASSAGES, TOKENS_PER_PASSAGE, N_TASK_EXAMPLES, K_MAX = 8, 256, 24, 100
# The setting whose teacher the paper's Fig. 2 and 3 claims are about (claims.token_claims).
SETTING = "csqa"


def default_file(profile: str, setting: str = SETTING) -> str:
    return lab.knowledge_file(profile, setting)


def is_knowledge_file(path: str | os.PathLike) -> bool:
    """Whether `path` names a knowledge file (lab/knowledge-*.json.gz), not a records file."""
    return Path(path).name.startswith(PREFIX)


@dataclass(frozen=True)
class Knowledge:
    """A loaded knowledge file: ``coverage`` {key: (what, {"by_example_mean": [...], ...})}
    as `claims.knowledge_claims` takes it, ``tokens`` (probs [N, 5], ranks [N]) as
    `claims.token_claims` takes it, ``meta`` the rest (profile, setting, precision, config,
    machine, code, ...)."""

    path: Path
    meta: dict
    coverage: dict[str, tuple[str, dict]]
    tokens: tuple[np.ndarray, np.ndarray]

    @property
    def profile(self) -> str:
        return self.meta["profile"]

    @property
    def setting(self) -> str:
        return self.meta["setting"]


# ----------------------------------------------------------------------------- computing


@contextmanager
def _precision(value: str):
    """Run the book's coverage helpers (which read $FIRST_PRECISION) at the run's precision."""
    old = os.environ.get("FIRST_PRECISION")
    os.environ["FIRST_PRECISION"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FIRST_PRECISION", None)
        else:
            os.environ["FIRST_PRECISION"] = old


def cached_artefacts(profile: str, setting: str = SETTING, **overrides):
    """(resolved profile, precision, teacher node, extract node) of the run `first run
    --profile P --setting S` would make here; one line naming the command when the teacher or
    the store is not in the cache yet."""
    from first_lib.pipeline.graph import run_precision, stage_graph
    from first_lib.profiles import for_setting, get_profile

    if setting == "ood":
        raise FirstError("the knowledge claims are about an in-domain teacher (its task prompts "
                         "and answer positions), not the out-of-domain setting's")  # fmt: skip
    prof = for_setting(get_profile(profile, **overrides), setting)
    precision = run_precision(prof)
    nodes = {n.stage: n for n in stage_graph(prof, setting, precision)}
    teacher, extract = nodes["teacher"], nodes["extract"]
    missing = [n.stage for n in (teacher, extract) if not n.done()]
    if missing:
        sets = "".join(f" --set {k}={v}" for k, v in overrides.items())
        raise FirstError(
            f"the {' and the '.join(missing)} of profile {profile}, setting {setting} at "
            f"{precision} are not in the cache ({teacher.path.parent}); make them with: first "
            f"extract --profile {profile} --setting {setting}{sets}"
        )
    return prof, precision, teacher, extract


def compute(profile: str, setting: str = SETTING, **overrides) -> dict[str, Any]:
    """The inputs of the five knowledge claims from the cached teacher and store of the run of
    `profile` x `setting`: {"coverage": {key: {"what", "k", "by_example_mean", "n_positions",
    "share_at_least_95"}}, "tokens": {"split", "probs", "ranks"}, "vocab_size"} and provenance.
    The text coverage is the pretrained teacher's (at `tiny`, which has none, the fine-tuned
    tiny teacher's, and the label says so), as in paper_vs_reproduction."""
    from first_lib import book, models, pipeline

    prof, precision, teacher, extract = cached_artefacts(profile, setting, **overrides)
    tiny = prof.name == "tiny"
    text_model = str(teacher.path) if tiny else prof.teacher
    with _precision(precision):
        tok = models.load_tokenizer(text_model)
        text = book.model_coverage(
            text_model,
            book.text_examples(tok, book.plain_text(), N_PASSAGES, TOKENS_PER_PASSAGE),
            k_max=K_MAX,
        )
        ttok = models.load_tokenizer(str(teacher.path))
        rows = pipeline.load_questions(prof, setting)
        task = book.model_coverage(
            str(teacher.path),
            pipeline.tokenize(ttok, rows["train"][:N_TASK_EXAMPLES], prof, setting),
            k_max=K_MAX,
        )
        answer = book.topk_mass_by_example(extract.path / "train", 5)
        val = pipeline.tokenize(ttok, rows["validation"], prof, setting)
        probs, ranks = pipeline.calibration_data(extract.path / "validation", val)
    what = {
        "text": f"plain English text, {'tiny' if tiny else 'pretrained'} teacher",
        "task": "task prompts + answers (all positions), fine-tuned teacher",
        "answer": "answer position (the distillation store), fine-tuned teacher",
    }
    coverage = {
        "text": {"what": what["text"], **text["top5"]},
        "task": {"what": what["task"], **task["top5"]},
        "answer": {"what": what["answer"], **answer},
    }
    probs = np.asarray(probs, dtype=np.float32)[:, :5]
    return {
        "profile": prof.name,
        "setting": setting,
        "note": prof.note,
        "precision": precision,
        "config": prof.to_dict(),
        "teacher": prof.teacher,
        "text_model": "the fine-tuned tiny teacher" if tiny else prof.teacher,
        "artefacts": {"teacher": teacher.stage, "extract": extract.stage},
        "stage_versions": {
            "teacher": teacher.key.get("code"),
            "extract": extract.key.get("code"),
        },
        "sizes": {
            "n_passages": N_PASSAGES,
            "tokens_per_passage": TOKENS_PER_PASSAGE,
            "n_task_examples": N_TASK_EXAMPLES,
            "k_max": K_MAX,
        },
        "vocab_size": task["coverage"]["vocab_size"],
        "coverage": coverage,
        "tokens": {
            "split": "validation",
            "probs": [[float(str(x)) for x in row] for row in probs],
            "ranks": [int(r) for r in ranks],
        },
    }


def _machine(teacher_dir: Path) -> dict:
    meta_path = teacher_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    perf = meta.get("perf") or {}
    return {"hardware": perf.get("hardware"), "device": perf.get("device")}


def export_knowledge(
    profile: str,
    setting: str = SETTING,
    out: str | os.PathLike | None = None,
    **overrides,
) -> Path:
    """Write the knowledge file of the cached run of `profile` x `setting` (default out:
    `default_file(profile, setting)`)."""
    from first_lib.provenance import git_commit, iso

    body = compute(profile, setting, **overrides)
    _, _, teacher, _ = cached_artefacts(profile, setting, **overrides)
    sets = "".join(f" --set {k}={v}" for k, v in overrides.items())
    out = Path(out or default_file(profile, setting))
    data = {
        "format": FORMAT,
        "version": VERSION,
        **body,
        "machine": _machine(teacher.path),
        "code": git_commit(),
        "exported": iso(dt.datetime.now(dt.UTC).timestamp()),
        "command": f"first export-knowledge --profile {profile} --setting {setting}{sets} "
        f"--out {out}",
    }
    text = json.dumps(data, separators=(",", ":"))
    out.parent.mkdir(parents=True, exist_ok=True)
    return fsio.atomic_write_bytes(out, gzip.compress(text.encode(), compresslevel=9, mtime=0))


# ----------------------------------------------------------------------------- loading


def load_knowledge(path: str | os.PathLike) -> Knowledge:
    """A knowledge file, or one line saying what is wrong with it."""
    path = lab._locate(path)
    if not path.is_file():
        raise FirstError(
            f"no knowledge file at {path}; make one from a run's cached teacher and store with: "
            "first export-knowledge --profile P --setting csqa"
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FirstError(
            f"{path} is not a complete knowledge file ({err}); export it again"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FirstError(f"{path} is not a knowledge file (no format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise FirstError(f"{path} has format version {data.get('version')!r}; this code reads "
                         f"version {VERSION}: export it again")  # fmt: skip
    cov = {k: (e["what"], e) for k, e in data["coverage"].items()}
    tok = data["tokens"]
    tokens = (np.asarray(tok["probs"], dtype=np.float64), np.asarray(tok["ranks"], dtype=np.int64))
    meta = {k: v for k, v in data.items() if k not in ("coverage", "tokens")}
    return Knowledge(path=path, meta=meta, coverage=cov, tokens=tokens)


def note(knowledge: Knowledge, records_meta: Mapping[str, Any] | None) -> str:
    """How the knowledge file's teacher relates to the records' (the token claims read the
    records' training check of the teacher): "" when they are one design at one precision."""
    if records_meta is None:
        return ""
    parts = []
    if knowledge.meta.get("precision") != records_meta.get("precision"):
        parts.append(
            f"teacher's store at {knowledge.meta.get('precision')}, the records' models at "
            f"{records_meta.get('precision')}"
        )
    seed = (knowledge.meta.get("config") or {}).get("seed")
    if seed is not None and seed not in [int(s) for s in records_meta.get("seeds") or []]:
        parts.append(f"store of training seed {seed}, not one of the records'")
    return "; ".join(parts)


def _cmd_export(args) -> int:
    from first_lib.pipeline.cli import _overrides

    overrides = _overrides(args.set)
    if args.precision is not None:
        overrides["precision"] = args.precision
    path = export_knowledge(args.profile, args.setting, args.out, **overrides)
    k = load_knowledge(path)
    means = ", ".join(
        f"{key} {100 * float(np.mean(e['by_example_mean'])):.1f}%"
        for key, (_, e) in k.coverage.items()
    )
    print(
        f"wrote {path}: {path.stat().st_size / 1e3:.1f} kB; profile {k.profile}, setting "
        f"{k.setting}, {k.meta['precision']}; mean top-5 mass: {means}; "
        f"{len(k.tokens[1])} validation answer positions"
    )
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "export-knowledge",
        help="pack the top-5 mass and stored ranks of a run's cached teacher into one small file",
        description="Compute, from the cached teacher and knowledge store of a run (first extract "
        "makes both), what the paper's Figure 2 and 3 claims need (top-5 mass over plain text, "
        "task prompts and answer positions; the stored top-5 and the true token's rank at the "
        "validation answer positions) and write it with the run's config, machine and code to "
        "lab/knowledge-<profile>-<setting>.json.gz, which first evidence reads.",
    )
    from first_lib.pipeline.cli import _common

    _common(p)  # the options of `first extract`, so one line names the same run
    p.add_argument("--out", default=None, help="file to write (default lab/knowledge-P-S.json.gz)")
    p.set_defaults(func=_cmd_export)
