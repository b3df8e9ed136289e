"""Figures: the expected artists are there and each saves to PNG."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from first_lib.calibration import search_coefficient
from first_lib.metrics import ece, rankwise_calibration
from first_lib.plots import (
    coefficient_curve,
    coverage_curve,
    rankwise_bars,
    reliability_diagram,
)


def bars(ax) -> dict[str, BarContainer]:
    return {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}


def saves(fig: Figure, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def overconfident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 1.0, size=3000)
    return conf, rng.random(3000) < conf**2


def test_reliability_diagram(overconfident, tmp_path):
    conf, correct = overconfident
    fig = reliability_diagram(conf, correct, n_bins=10, title="Distill")
    assert isinstance(fig, Figure)
    main, counts = fig.axes
    b = bars(main)
    assert set(b) == {"Accuracy", "Over-confident", "Under-confident"}
    assert all(len(c) == 10 for c in b.values())
    assert main.get_title() == f"Distill (ECE = {100 * ece(conf, correct):.1f}%)"
    heights = {k: np.array([p.get_height() for p in c]) for k, c in b.items()}
    # accuracy below the diagonal everywhere: every filled bin is over-confident
    assert (heights["Over-confident"][2:] > 0).all() and (heights["Under-confident"] == 0).all()
    assert (heights["Accuracy"][:2] == 0).all()  # empty bins below 0.2
    assert len(counts.patches) == 10 and counts.patches[5].get_height() > 0
    saves(fig, tmp_path, "reliability")


def test_reliability_diagram_underconfident_into_given_axis(tmp_path):
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, size=2000)
    correct = rng.random(2000) < np.sqrt(conf)
    fig = Figure()
    ax = fig.subplots()
    assert reliability_diagram(conf, correct, n_bins=5, ax=ax) is fig
    b = bars(ax)
    assert all(len(c) == 5 for c in b.values())
    assert all(p.get_height() > 0 for p in b["Under-confident"])
    assert ax.get_title().startswith("ECE = ")
    saves(fig, tmp_path, "reliability_ax")


def test_figures_do_not_touch_pyplot(overconfident):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    reliability_diagram(*overconfident)
    assert plt.get_fignums() == before


def test_coverage_curve(tmp_path):
    ks = np.arange(1, 21)
    mean = 1 - 0.5**ks
    fig = coverage_curve(ks, mean, mean * 0.9, np.minimum(mean * 1.05, 1), title="teacher")
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 1
    assert len(fig.axes[0].collections) == 1  # the shaded range
    saves(fig, tmp_path, "coverage")
    several = coverage_curve(
        ks,
        {"teacher": mean, "student": mean**2},
        {"teacher": mean * 0.9, "student": mean**2 * 0.8},
        {"teacher": mean, "student": mean**2},
        bytes_per_token=ks * 6.0,
    )
    main, disk = several.axes
    # a mean line and two outlined range edges per curve, one faint fill each
    assert len(main.lines) == 6 and len(main.collections) == 2 and len(disk.lines) == 1
    np.testing.assert_allclose(disk.lines[0].get_ydata(), ks * 6.0)
    assert {t.get_text() for t in main.get_legend().get_texts()} == {
        "teacher",
        "student",
        "disk use",
    }
    saves(several, tmp_path, "coverage_several")


def test_rankwise_bars(tmp_path):
    rng = np.random.default_rng(2)
    probs = -np.sort(-rng.dirichlet(np.ones(5) * 0.3, size=500), axis=1)
    ids = rng.permuted(np.tile(np.arange(5), (500, 1)), axis=1)
    res = rankwise_calibration(probs, ids, rng.integers(0, 5, size=500))
    fig = rankwise_bars(res, title="Fine-tune")
    b = bars(fig.axes[0])
    assert set(b) == {"Mean probability", "Accuracy"} and all(len(c) == 5 for c in b.values())
    np.testing.assert_allclose([p.get_height() for p in b["Accuracy"]], res.accuracy)
    saves(fig, tmp_path, "rankwise")
    grid = rankwise_bars({"a": res, "b": res, "c": res, "d": res}, ncols=3, log=True)
    visible = [a for a in grid.axes if a.get_visible()]
    assert len(visible) == 4 and [a.get_title() for a in visible] == ["a", "b", "c", "d"]
    saves(grid, tmp_path, "rankwise_grid")


def test_coefficient_curve(tmp_path):
    rng = np.random.default_rng(3)
    probs = -np.sort(-rng.dirichlet(np.ones(5) * 0.3, size=3000), axis=1)
    search = search_coefficient(probs, rng.integers(0, 5, size=3000), kind="ts")
    fig = coefficient_curve(search)
    ax = fig.axes[0]
    coarse, fine, best = ax.lines[:3]
    assert len(coarse.get_xdata()) == len(search.coarse) == 10
    assert len(fine.get_xdata()) == len(search.fine)
    assert best.get_xdata()[0] == search.best
    assert best.get_ydata()[0] == pytest.approx(100 * search.best_ece)
    saves(fig, tmp_path, "coefficient")
