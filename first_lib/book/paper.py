"""The paper's own numbers the book compares with (Table 1, the storage example of sec. 4.1)."""

from __future__ import annotations

# Table 1 of Shum et al. (2024), Llama-2 13B -> 7B block (ECE, Acc and Trust in percent), the
# block the book compares with. Facts cited from the paper; our numbers always come from the runs.
# One row a test set; per model the three numbers ECE Acc Trust, in the columns of the header.
_TABLE1_LLAMA2 = """
test      teacher          finetune         distill          distill_ls       first_ts
csqa      12.0 81.6 69.6   14.0 76.8 62.8   10.9 80.0 69.1   10.3 80.4 70.1   6.3 80.3 74.0
boolq     6.8 89.7 82.9    8.4 87.5 79.1    4.0 85.3 81.3    3.9 87.5 83.6    1.4 87.9 86.5
ood_csqa  20.8 65.7 44.9   21.2 50.0 28.8   7.7 50.9 43.2    7.5 51.1 43.6    5.5 51.4 45.9
ood_obqa  28.7 58.3 29.9   30.1 45.6 15.5   12.5 46.6 34.1   16.2 47.6 31.4   8.1 49.5 41.4
"""


def _read_table(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """{test: {model: {"ece", "acc", "trust"}}} of a table written as above."""
    header, *rows = (line.split() for line in text.strip().splitlines())
    models = header[1:]
    out = {}
    for test, *numbers in rows:
        if len(numbers) != 3 * len(models):
            raise ValueError(f"row {test!r} has {len(numbers)} numbers, not 3 per model")
        values = [float(x) for x in numbers]
        out[test] = {
            m: dict(zip(("ece", "acc", "trust"), values[3 * i : 3 * i + 3], strict=True))
            for i, m in enumerate(models)
        }
    return out


PAPER_TABLE1_LLAMA2: dict[str, dict[str, dict[str, float]]] = _read_table(_TABLE1_LLAMA2)


# Table 1, Llama-1 33B -> 7B, BoolQ: the label-smoothing instability the paper points at (sec. 5.2).
PAPER_LS_BOOLQ_LLAMA1 = {"distill": {"ece": 4.0}, "distill_ls": {"ece": 19.0}}

# The storage example of sec. 4.1: 100,000 samples of average length 2,048 tokens, a 50,000-token
# vocabulary, "120 TB" for the full distributions and "1.2 GB" for the top-5.
PAPER_STORAGE = {
    "samples": 100_000,
    "tokens_per_sample": 2_048,
    "vocab": 50_000,
    "full_bytes": 120e12,
    "top5_bytes": 1.2e9,
}
