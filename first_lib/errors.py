"""One exception type for problems a user can fix; the `first` command prints it as one line."""


class FirstError(ValueError):
    """A clear, user-facing error (bad input, missing asset, mismatch). Never a bug."""
