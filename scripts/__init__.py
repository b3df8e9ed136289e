"""Scripts run as `python -m scripts.NAME`: the book build, checks, trials, searches, launchers."""
