"""Prompts in the zero-shot format of Shum et al. (2023), which FIRST follows, and tokenization.

Multiple choice (CSQA, OBQA, ARC, PIQA, SocialIQA, HellaSwag, WinoGrande)::

    Q: {context} {question}
    Answer Choices: (a) {choice 1} (b) {choice 2} ... (e) {choice 5}
    A: The answer is (

and the answer is the next token, one of the lowercase letters ``a``, ``b``, ... BoolQ::

    {passage}
    Q: {question}?
    A: The answer is

and the answer is the next token, `` yes`` or `` no`` (with its leading space).

Two styles: ``"plain"`` is the text above; ``"chat"`` puts everything before the ``A:`` line in a
user turn of the tokenizer's chat template and starts the assistant turn with the cue without
its ``A:`` (the assistant turn is the answer): ``The answer is (``, or ``The answer is`` for
BoolQ, so the answer is still the next token. Measured on the 0.5B student (24 CSQA questions):
with ``A: The answer is (`` in the assistant turn it answered "a" 24 times out of 24 (mean
confidence 0.99), with ``The answer is (`` its answers spread over the letters (accuracy 0.38,
mean confidence 0.31). ``"chat-nosys"`` is the chat style with an empty system turn instead of
the template's default one (Qwen2.5's "You are Qwen, created by Alibaba Cloud. You are a helpful
assistant.", 16 tokens of every prompt). ``"auto"`` is chat when the tokenizer has a
chat template, else plain. Instruction data uses Alpaca's prompt in the plain style and the
chat template in the chat style.

Answer candidates are checked in context: ``prompt + candidate`` must encode to the prompt's
tokens plus exactly one more; otherwise `FirstError` names the candidate and its tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from first_lib.errors import FirstError
from first_lib.tasks.sources import InstructionExample, MCQuestion, task_spec

LETTERS = "abcdefghij"
MC_CUE = "A: The answer is ("
YES_NO_CUE = "A: The answer is"
CHAT_PREFIX = "A: "  # dropped from the cue in the chat style, where the assistant turn answers
YES_NO = (" yes", " no")
STYLES = ("plain", "chat", "chat-nosys", "auto")
CHAT_STYLES = ("chat", "chat-nosys")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# --------------------------------------------------------------------------- text


def is_yes_no(question: MCQuestion) -> bool:
    """True for BoolQ-style questions answered with `` yes`` / `` no``."""
    return question.task == "boolq"


def answer_candidates(question: MCQuestion) -> list[str]:
    """The answer strings, one per choice: ``["a", "b", ...]`` or ``[" yes", " no"]``."""
    if is_yes_no(question):
        return list(YES_NO)
    if len(question.choices) > len(LETTERS):
        raise FirstError(f"question {question.id}: more than {len(LETTERS)} choices")
    return list(LETTERS[: len(question.choices)])


def prompt_body(question: MCQuestion) -> str:
    """Everything before the answer cue (the user turn in the chat style)."""
    if is_yes_no(question):
        head = f"{question.context}\n" if question.context else ""
        return f"{head}Q: {question.question}"
    stem = f"{question.context} {question.question}" if question.context else question.question
    letters = answer_candidates(question)
    options = " ".join(f"({x}) {c}" for x, c in zip(letters, question.choices, strict=True))
    return f"Q: {stem}\nAnswer Choices: {options}"


def answer_cue(question: MCQuestion, style: str = "plain") -> str:
    """The text that ends the prompt, after which the answer is the next token.

    ``"A: The answer is ("`` (``"A: The answer is"`` for yes/no) in the plain style; the same
    without ``"A: "`` at the start of the assistant turn in the chat style.
    """
    cue = YES_NO_CUE if is_yes_no(question) else MC_CUE
    return cue.removeprefix(CHAT_PREFIX) if style in CHAT_STYLES else cue


def resolve_style(tokenizer: Any, style: str) -> str:
    """``"plain"``, ``"chat"`` or ``"chat-nosys"``; ``"auto"`` picks chat when the tokenizer has
    a chat template."""
    if style not in STYLES:
        raise FirstError(f"unknown prompt style {style!r}; use one of {STYLES}")
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "chat" if has_template else "plain"
    if style in CHAT_STYLES and not has_template:
        raise FirstError("prompt style 'chat' needs a tokenizer with a chat template")
    return style


def _wrap(user_text: str, assistant_prefix: str, tokenizer: Any, style: str) -> str:
    if style == "plain":
        return f"{user_text}\n{assistant_prefix}" if assistant_prefix else f"{user_text}\n"
    turns = [{"role": "user", "content": user_text}]
    if style == "chat-nosys":  # an empty system turn replaces the template's default one
        turns.insert(0, {"role": "system", "content": ""})
    head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return head + assistant_prefix


def render_prompt(question: MCQuestion, tokenizer: Any = None, style: str = "plain") -> str:
    """The full prompt text, ending with the answer cue (the answer token comes next)."""
    style = resolve_style(tokenizer, style)
    return _wrap(prompt_body(question), answer_cue(question, style), tokenizer, style)


def render_instruction(example: InstructionExample, tokenizer: Any = None, style: str = "plain"):
    """The prompt of an instruction example, up to where the response starts."""
    style = resolve_style(tokenizer, style)
    if style == "plain":
        template = ALPACA_PROMPT_INPUT if example.input else ALPACA_PROMPT
        return template.format(instruction=example.instruction, input=example.input)
    user = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    return _wrap(user, "", tokenizer, style)


# --------------------------------------------------------------------------- tokens


def encode(tokenizer: Any, text: str, style: str) -> list[int]:
    """Token ids of a rendered prompt. Plain text gets the tokenizer's special tokens (a BOS
    where it has one); a chat-template string already holds them as text."""
    return list(tokenizer(text, add_special_tokens=(style == "plain"))["input_ids"])


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_candidates(
    tokenizer: Any, prompt: str, candidates: Sequence[str], style: str
) -> list[int]:
    """Token id of each candidate after ``prompt``; `FirstError` unless each is one token.

    A candidate passes when ``encode(prompt + candidate)`` is ``encode(prompt)`` plus exactly
    one token (so scoring the next token after the prompt scores that candidate).
    """
    prompt_ids = encode(tokenizer, prompt, style)
    ids = []
    for cand in candidates:
        full = encode(tokenizer, prompt + cand, style)
        common = 0
        while common < min(len(full), len(prompt_ids)) and full[common] == prompt_ids[common]:
            common += 1
        if common != len(prompt_ids) or len(full) != len(prompt_ids) + 1:
            start = max(0, min(common, len(prompt_ids) - 1))
            tail = full[start:]
            tokens = tokenizer.convert_ids_to_tokens(tail)
            raise FirstError(
                f"answer candidate {cand!r} is not a single token after the prompt with "
                f"tokenizer {_tokenizer_name(tokenizer)}: the end of the prompt plus the "
                f"candidate encodes to {tokens} (ids {tail}); every candidate must be one token"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise FirstError(f"answer candidates {list(candidates)} share a token: ids {ids}")
    return ids


def probe_question(task: str) -> MCQuestion:
    """A stand-in question of ``task`` with its largest number of choices."""
    n = task_spec(task).n_choices
    context = "A short passage about the probe." if task == "boolq" else None
    choices = ["yes", "no"] if task == "boolq" else [f"option {i + 1}" for i in range(n)]
    return MCQuestion(f"{task}-probe", task, "Which option is right?", choices, 0, context)


def candidate_token_ids(tokenizer: Any, item: MCQuestion | str, style: str = "auto") -> list[int]:
    """Token ids of the answer candidates of a question, or of a task's probe question.

    Raises `FirstError` naming the candidate and its tokens when one is not a single token.
    """
    question = item if isinstance(item, MCQuestion) else probe_question(item)
    style = resolve_style(tokenizer, style)
    prompt = render_prompt(question, tokenizer, style)
    return check_candidates(tokenizer, prompt, answer_candidates(question), style)


class CandidateIds:
    """Candidate ids per kind of question (yes/no, or the number of letters), checked once each
    on the first prompt of that kind. Call with a question and its rendered prompt."""

    def __init__(self, tokenizer: Any, style: str) -> None:
        self.tokenizer, self.style = tokenizer, style
        self._ids: dict[tuple[bool, int], list[int]] = {}

    def __call__(self, question: MCQuestion, prompt: str) -> list[int]:
        key = (is_yes_no(question), len(question.choices))
        if key not in self._ids:
            cands = answer_candidates(question)
            self._ids[key] = check_candidates(self.tokenizer, prompt, cands, self.style)
        return self._ids[key]


def tokenize_mc(
    tokenizer: Any,
    questions: Iterable[MCQuestion],
    style: str = "auto",
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Training examples of multiple-choice questions: prompt + gold answer token.

    Returns one dict per question: ``{"id": str, "input_ids": list[int] [T],
    "target_mask": list[bool] [T]}`` where ``target_mask[t]`` is True iff the logits at
    position t are trained to predict ``input_ids[t + 1]``: exactly one True, at the last prompt
    position (T - 2). A prompt longer than ``max_length - 1`` loses tokens from its start.
    """
    style = resolve_style(tokenizer, style)
    if max_length is not None and max_length < 2:
        raise FirstError(f"max_length must be at least 2, got {max_length}")
    cands = CandidateIds(tokenizer, style)
    out, truncated = [], 0
    for q in questions:
        prompt = render_prompt(q, tokenizer, style)
        ids = encode(tokenizer, prompt, style)
        ids.append(cands(q, prompt)[q.gold])
        if max_length is not None and len(ids) > max_length:
            ids, truncated = ids[-max_length:], truncated + 1
        mask = [False] * len(ids)
        mask[-2] = True
        out.append({"id": q.id, "input_ids": ids, "target_mask": mask})
    if truncated:
        warnings.warn(f"{truncated} prompts cut to {max_length} tokens from the left", stacklevel=2)
    return out


def tokenize_instruction(
    tokenizer: Any,
    examples: Iterable[InstructionExample],
    style: str = "auto",
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Training examples of instruction data: prompt + response tokens + EOS.

    Same dict format as `tokenize_mc`; ``target_mask`` is True from the last prompt position to
    the position before the last token, so the response tokens and the EOS are the targets.
    Too long: the response is cut at its end and, if the prompt alone is too long, the prompt
    loses tokens from its start, always keeping at least one target.
    """
    style = resolve_style(tokenizer, style)
    if max_length is not None and max_length < 2:
        raise FirstError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FirstError(f"tokenizer {_tokenizer_name(tokenizer)} has no EOS token")
    out, truncated = [], 0
    for ex in examples:
        prompt = encode(tokenizer, render_instruction(ex, tokenizer, style), style)
        response = list(tokenizer(ex.output, add_special_tokens=False)["input_ids"]) + [eos]
        if max_length is not None and len(prompt) + len(response) > max_length:
            truncated += 1
            if len(prompt) > max_length - 1:
                prompt = prompt[-(max_length - 1) :]
            response = response[: max_length - len(prompt)]
        ids = prompt + response
        mask = [False] * len(ids)
        for t in range(len(prompt) - 1, len(ids) - 1):
            mask[t] = True
        out.append({"id": ex.id, "input_ids": ids, "target_mask": mask})
    if truncated:
        warnings.warn(f"{truncated} examples cut to {max_length} tokens", stacklevel=2)
    return out
