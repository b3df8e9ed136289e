"""first_lib: FIRST (Efficient Trustworthy Distillation, EMNLP 2024) as a small, readable library."""

__version__ = "0.1.0"
