"""Shared fixtures. `precision` runs a test at fp32 and at bf16 whatever the host: on an AVX2-only
CPU bf16 is emulated (slow, but fine for the tiny models these tests use); on a CPU with AMX or
AVX512-BF16 fp32 is forced. Both paths are tested on every machine."""

from __future__ import annotations

import pytest

PRECISIONS = ("fp32", "bf16")


@pytest.fixture(params=PRECISIONS)
def precision(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs at a precision it chooses itself (through `precision` or a
    fixture parametrized by PRECISIONS) `both_precisions`: a second pass of the suite at the
    other precision (.ci/run) skips them, since they already ran at both."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str) and v in PRECISIONS for v in params.values()):
            item.add_marker(pytest.mark.both_precisions)
