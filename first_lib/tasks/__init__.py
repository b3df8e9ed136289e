"""Tasks: CommonsenseQA, BoolQ, OpenBookQA and the instruction mix; prompts; tokenization.

- `sources`: the rows (`MCQuestion`, `InstructionExample`) from the data wheel, the hub or a
  local file, and the paper's splits (train minus a seeded 10% validation; test).
- `prompts`: the zero-shot prompt format of Shum et al. (2023), plain or chat; answer
  candidates checked to be single tokens; training examples as token ids + target mask.
- `mix`: the offline out-of-domain training set that stands in for Alpaca.
- `cli`: `first data stats` and `first data show`.
"""

from __future__ import annotations

from first_lib.tasks.cli import add_cli, load_tokenizer
from first_lib.tasks.mix import MIX_TASKS, instruction_mix, to_instruction
from first_lib.tasks.prompts import (
    LETTERS,
    STYLES,
    CandidateIds,
    answer_candidates,
    answer_cue,
    candidate_token_ids,
    check_candidates,
    encode,
    is_yes_no,
    probe_question,
    prompt_body,
    render_instruction,
    render_prompt,
    resolve_style,
    tokenize_instruction,
    tokenize_mc,
)
from first_lib.tasks.sources import (
    SPLIT_SEED,
    SPLITS,
    TASKS,
    VALIDATION_FRACTION,
    InstructionExample,
    MCQuestion,
    TaskSpec,
    data_wheel,
    example_from_row,
    load_alpaca,
    load_file,
    load_task,
    official_rows,
    question_from_row,
    question_from_wheel_doc,
    read_wheel_docs,
    split_boolq_query,
    split_sizes,
    subset,
    task_spec,
    validation_mask,
)

__all__ = [
    "LETTERS",
    "MIX_TASKS",
    "SPLITS",
    "SPLIT_SEED",
    "STYLES",
    "TASKS",
    "VALIDATION_FRACTION",
    "CandidateIds",
    "InstructionExample",
    "MCQuestion",
    "TaskSpec",
    "add_cli",
    "answer_candidates",
    "answer_cue",
    "candidate_token_ids",
    "check_candidates",
    "data_wheel",
    "encode",
    "example_from_row",
    "instruction_mix",
    "is_yes_no",
    "load_alpaca",
    "load_file",
    "load_task",
    "load_tokenizer",
    "official_rows",
    "probe_question",
    "prompt_body",
    "question_from_row",
    "question_from_wheel_doc",
    "read_wheel_docs",
    "render_instruction",
    "render_prompt",
    "resolve_style",
    "split_boolq_query",
    "split_sizes",
    "subset",
    "task_spec",
    "to_instruction",
    "tokenize_instruction",
    "tokenize_mc",
    "validation_mask",
]
