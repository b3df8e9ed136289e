"""The data of a run: which questions (train, validation, test sets) a profile and setting use,
their tokenization, and the key that names them without reading them."""

from __future__ import annotations

import hashlib

from first_lib.config import Profile
from first_lib.errors import FirstError


def prompt_fingerprint() -> str:
    """A hash of the prompt format (rendered probe prompts and answer cues, both styles), so an
    edit to the templates can never reuse artefacts made with the old ones."""
    from first_lib import tasks

    parts = []
    for task in ("csqa", "boolq", "obqa"):
        q = tasks.probe_question(task)
        parts += [tasks.render_prompt(q, None, "plain"), tasks.answer_cue(q, "chat")]
    example = tasks.InstructionExample("probe", "mix", "Say hi.", "to me", "Hi.")
    parts.append(tasks.render_instruction(example, None, "plain"))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


def data_key(prof: Profile, setting: str) -> dict:
    """What determines the data of a run, without reading it (so --dry-run stays cheap)."""
    return {
        "prompts": prompt_fingerprint(),
        "setting": setting,
        "n": [prof.n_train, prof.n_val],  # training data only: test sizes never retrain
        "data_seed": prof.data_seed,
        "style": prof.style,
        "max_length": prof.max_length,
        "tokenizer": prof.teacher if not prof.teacher.startswith("tiny:") else "tiny",
    }


def test_tasks(prof: Profile, setting: str) -> list[str]:
    """The test sets of a run: the profile's `ood_tests` out of domain, else the setting's task."""
    return list(prof.ood_tests) if setting == "ood" else [setting]


def load_questions(prof: Profile, setting: str) -> dict:
    """Rows of the run: train / validation (questions or instruction examples) and test sets."""
    from first_lib import tasks

    if setting == "ood":
        train = tasks.instruction_mix(prof.n_train, seed=prof.data_seed, split="train")
        val = tasks.instruction_mix(prof.n_val, seed=prof.data_seed, split="validation")
    else:
        train = tasks.subset(tasks.load_task(setting, "train"), prof.n_train, prof.data_seed)
        val = tasks.subset(tasks.load_task(setting, "validation"), prof.n_val, prof.data_seed)
    tests = {
        t: tasks.subset(tasks.load_task(t, "test"), prof.n_test, prof.data_seed)
        for t in test_tasks(prof, setting)
    }
    for name, rows in [("train", train), ("validation", val), *tests.items()]:
        if not rows:
            raise FirstError(f"the {name} split of setting {setting!r} is empty")
    return {"train": train, "validation": val, "tests": tests}


def tokenize(tokenizer, rows, prof: Profile, setting: str) -> list[dict]:
    from first_lib import tasks

    if setting == "ood":
        return tasks.tokenize_instruction(tokenizer, rows, prof.style, prof.max_length)
    return tasks.tokenize_mc(tokenizer, rows, prof.style, prof.max_length)


def corpus_text(groups) -> list[str]:
    """Every rendered prompt and answer of the run's rows (the tiny tokenizer's training text)."""
    from first_lib import tasks

    texts = []
    for rows in groups:
        for row in rows:
            if isinstance(row, tasks.MCQuestion):
                texts.append(tasks.render_prompt(row, None, "plain"))
                texts.extend(row.choices)
            else:
                texts.append(tasks.render_instruction(row, None, "plain") + row.output)
    return texts
