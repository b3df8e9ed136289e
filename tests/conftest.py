"""Shared fixtures. `precision` runs a test at fp32 and at bf16 whatever the host: on an AVX2-only
CPU bf16 is emulated (slow, but fine for the tiny models these tests use); on a CPU with AMX or
AVX512-BF16 fp32 is forced. Both paths are tested on every machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

PRECISIONS = ("fp32", "bf16")
REPO = Path(__file__).resolve().parents[1]
# What `python -m scripts.test_assets` (run by `make test` before the suite) fetched once.
TEST_ASSETS = Path(os.environ.get("FIRST_TEST_ASSETS", REPO / ".cache" / "test-assets"))
_HOME: Path | None = None


def pytest_configure(config):
    """The suite runs in a FIRST_HOME of its own (a fresh temporary folder whose wheels/ and
    sdists/ are the set-up's cache), offline: it never writes into the user's $FIRST_HOME and
    never reaches the network (tests marked `network` lift the second rule)."""
    global _HOME
    _HOME = Path(tempfile.mkdtemp(prefix="first-test-home-"))
    for name in ("wheels", "sdists"):
        shared = TEST_ASSETS / name
        shared.mkdir(parents=True, exist_ok=True)
        (_HOME / name).symlink_to(shared.resolve(), target_is_directory=True)
    os.environ["FIRST_HOME"] = str(_HOME)
    os.environ["FIRST_OFFLINE"] = "1"  # first_lib's own downloads refuse
    os.environ["PIP_NO_INDEX"] = "1"  # and so does any pip a test starts


def isolated_home(tmp: Path) -> Path:
    """A fresh FIRST_HOME under `tmp` whose wheels/ folder is the suite's (downloads shared)."""
    from first_lib.paths import first_home

    shared = first_home() / "wheels"
    shared.mkdir(parents=True, exist_ok=True)
    home = tmp / "home"
    home.mkdir()
    (home / "wheels").symlink_to(shared, target_is_directory=True)
    return home


def pytest_unconfigure(config):
    if _HOME is not None:
        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _network_allowed(request, monkeypatch):
    """Tests marked `network` may download (into the suite's own FIRST_HOME)."""
    if request.node.get_closest_marker("network"):
        monkeypatch.delenv("FIRST_OFFLINE", raising=False)
        monkeypatch.delenv("PIP_NO_INDEX", raising=False)


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


@pytest.fixture
def downloads_faked(monkeypatch):
    """For a test that replaces the downloader itself (a fake urlopen or pip): lift FIRST_OFFLINE
    so the library calls the fake. Nothing reaches the network: PIP_NO_INDEX stays set."""
    monkeypatch.delenv("FIRST_OFFLINE", raising=False)
