"""Figures of the paper, each a function that returns a matplotlib `Figure`.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never through
``pyplot``: nothing is registered with a GUI backend, nothing needs ``plt.show`` or
``plt.close``, and ``fig.savefig("x.png")`` renders with Agg on any machine (a notebook still
displays a returned figure). Pass ``ax=`` to draw into an axis of your own figure instead.
Colours come from seaborn's colour-blind palette.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from first_lib.calibration import CoefficientSearch
from first_lib.metrics import RankwiseCalibration, reliability_bins, to_numpy

__all__ = [
    "PALETTE",
    "reliability_diagram",
    "coverage_curve",
    "rankwise_bars",
    "coefficient_curve",
]

_C = sns.color_palette("colorblind")
PALETTE: dict[str, Any] = {
    "accuracy": _C[0],  # blue
    "over": _C[3],  # red-orange: over-confident (accuracy below the diagonal)
    "under": _C[2],  # green: under-confident (accuracy above the diagonal)
    "count": "0.55",
    "prob": _C[1],  # orange
    "coarse": _C[0],
    "fine": _C[1],
    "best": _C[3],
    "disk": _C[2],
}

_COEF_LABEL = {"ts": "temperature c (eq. 4)", "power": "power temperature T", "ls": "delta (eq. 3)"}


def _new_figure(figsize: tuple[float, float]) -> Figure:
    return Figure(figsize=figsize, layout="constrained")


def _style_axis(ax: Axes) -> None:
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def reliability_diagram(
    confidence: Any,
    correct: Any,
    n_bins: int = 10,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Reliability diagram in the style of the paper's Figure 4.

    Per equal-width bin: a bar of the accuracy, and a bar spanning the gap between accuracy
    and the bin's mean confidence, coloured by its direction: over-confident (accuracy below
    the mean confidence) in ``PALETTE["over"]``, under-confident (above) in
    ``PALETTE["under"]``. The diagonal is perfect calibration. A count histogram sits in a
    small axis below (or, when ``ax`` is given, as a grey line on a right-hand twin axis).
    The title ends with the ECE in percent, e.g. ``"ECE = 6.3%"``.

    Args:
        confidence: [N] confidence of each prediction.
        correct: [N] bool, whether each prediction was right.
        n_bins: number of bins (10 in the paper).
        title: text before the ECE in the title.
        ax: draw into this axis instead of a new figure.

    Returns:
        The Figure. Its main axis holds the bar containers labelled "Accuracy",
        "Over-confident" and "Under-confident", each with ``n_bins`` bars (empty bins and bins
        gapped the other way have height 0).
    """
    bins = reliability_bins(confidence, correct, n_bins)
    width = 1.0 / n_bins
    centers = bins.edges[:-1] + width / 2
    filled = bins.count > 0
    acc = np.where(filled, bins.accuracy, 0.0)
    conf = np.where(filled, bins.mean_confidence, 0.0)
    over = filled & (acc < conf)
    under = filled & (acc > conf)
    gap_bottom = np.minimum(acc, conf)
    gap_height = np.abs(acc - conf)

    own_figure = ax is None
    if ax is None:
        fig = _new_figure((4.2, 4.8))
        ax, ax_count = fig.subplots(
            2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]}, squeeze=True
        )
    else:
        fig = ax.figure
        ax_count = ax.twinx()

    _style_axis(ax)
    ax.bar(centers, acc, width=width * 0.95, color=PALETTE["accuracy"], label="Accuracy")
    gaps = [(over, "over", "//", "Over-confident"), (under, "under", "\\\\", "Under-confident")]
    for side, colour, hatch, label in gaps:  # the gap to the diagonal, each way
        ax.bar(
            centers,
            np.where(side, gap_height, 0.0),
            bottom=gap_bottom,
            width=width * 0.95,
            color=PALETTE[colour],
            alpha=0.55,
            hatch=hatch,
            edgecolor=PALETTE[colour],
            label=label,
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1.2, label="Perfect")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ece_text = f"ECE = {100 * bins.ece:.1f}%"
    ax.set_title(f"{title} ({ece_text})" if title else ece_text)

    if own_figure:
        _style_axis(ax_count)
        ax_count.bar(centers, bins.count, width=width * 0.95, color=PALETTE["count"])
        ax_count.set_ylabel("Count")
        ax_count.set_xlabel("Confidence")
    else:  # a twin axis: counts as a grey line in the bottom quarter, scale on the right
        ax_count.plot(
            centers, bins.count, marker="o", markersize=3, color="0.25", linewidth=1, label="Count"
        )
        ax_count.set_ylim(0, max(1, bins.count.max()) * 4)
        ax_count.set_ylabel("Count", color=PALETTE["count"])
        ax.set_xlabel("Confidence")
    return fig


def _as_series(x: Any) -> dict[str, np.ndarray] | None:
    if x is None:
        return None
    if isinstance(x, Mapping):
        return {str(k): to_numpy(v, str(k)) for k, v in x.items()}
    return {"": to_numpy(x, "series")}


def coverage_curve(
    ks: Sequence[int] | Any,
    mean_mass: Any,
    lo: Any = None,
    hi: Any = None,
    bytes_per_token: Any = None,
    title: str | None = None,
    disk_label: str = "bytes per position",
    ax: Axes | None = None,
) -> Figure:
    """Mean cumulative top-k probability mass against k, with its range (the paper's Figure 2).

    ``mean_mass``, ``lo`` and ``hi`` are arrays over ``ks`` (lo/hi: the shaded range, e.g.
    min/max or percentiles), or dicts ``{name: array}`` to draw several curves (one per model
    or data set; ``lo``/``hi`` then dicts with the same names, or None). ``bytes_per_token``
    (array over ``ks``) adds the disk use on a second y-axis.
    """
    k = to_numpy(ks, "ks")
    means = _as_series(mean_mass)
    los, his = _as_series(lo), _as_series(hi)
    if ax is None:
        fig = _new_figure((5.2, 3.6))
        ax = fig.subplots()
    else:
        fig = ax.figure
    _style_axis(ax)
    colours = sns.color_palette("colorblind", max(3, len(means)))
    for i, (name, m) in enumerate(means.items()):
        if m.shape != k.shape:
            raise ValueError(f"mean_mass {name!r} has shape {m.shape}, ks has {k.shape}")
        ax.plot(k, m, marker="o", markersize=3, color=colours[i], label=name or "mean mass")
        if los is not None and his is not None:
            # several overlapping fills turn to mud: then outline each range over a faint fill
            alpha = 0.2 if len(means) == 1 else 0.06
            ax.fill_between(k, los[name], his[name], color=colours[i], alpha=alpha, linewidth=0)
            for edge in (los[name], his[name]) if len(means) > 1 else ():
                ax.plot(k, edge, color=colours[i], linewidth=0.8, linestyle=":")
    ax.set_xlabel("k (top-k tokens kept)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cumulative probability of the top-k")
    ax.set_ylim(0, 1.02)
    handles, labels = ax.get_legend_handles_labels()
    if bytes_per_token is not None:
        disk = to_numpy(bytes_per_token, "bytes_per_token")
        ax2 = ax.twinx()
        (line,) = ax2.plot(k, disk, color=PALETTE["disk"], linestyle="--", label="disk use")
        ax2.set_ylabel(disk_label, color=PALETTE["disk"])
        ax2.set_ylim(0, disk.max() * 1.05 if disk.max() > 0 else 1)
        handles, labels = handles + [line], labels + ["disk use"]
    ax.legend(handles, labels, loc="lower right", fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    return fig


def _rankwise_on(ax: Axes, r: RankwiseCalibration, title: str | None, log: bool) -> None:
    _style_axis(ax)
    x = np.arange(len(r.rank))
    w = 0.4
    ax.bar(x - w / 2, r.mean_prob, width=w, color=PALETTE["prob"], label="Mean probability")
    ax.bar(x + w / 2, r.accuracy, width=w, color=PALETTE["accuracy"], label="Accuracy")
    ax.set_xticks(x, [str(i) for i in r.rank])
    ax.set_xlabel("rank")
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title)


def rankwise_bars(
    result: RankwiseCalibration | Mapping[str, RankwiseCalibration],
    title: str | None = None,
    ncols: int = 3,
    log: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Position-wise calibration (the paper's Figure 3): for ranks 1..k, the mean probability
    of the rank-i token beside how often it is the ground truth.

    ``result`` is one `RankwiseCalibration`, or a dict ``{model name: result}`` drawn on a grid
    of ``ncols`` columns (``ax`` is then not allowed). ``log=True`` uses a log y-axis, which
    shows ranks 2..k better.
    """
    if isinstance(result, RankwiseCalibration):
        if ax is None:
            fig = _new_figure((4.2, 3.2))
            ax = fig.subplots()
        else:
            fig = ax.figure
        _rankwise_on(ax, result, title, log)
        return fig
    if ax is not None:
        raise ValueError("pass ax only with a single RankwiseCalibration")
    names = list(result)
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    fig = _new_figure((3.6 * ncols, 3.0 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for a, name in zip(axes, names, strict=False):
        _rankwise_on(a, result[name], name, log)
    for a in axes[len(names) :]:
        a.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def coefficient_curve(
    search: CoefficientSearch, title: str | None = None, ax: Axes | None = None
) -> Figure:
    """Validation ECE against the coefficient (the paper's Figure 5, left): the coarse grid,
    the fine grid around its best, the chosen value starred, and the untransformed ECE as a
    horizontal reference line."""
    if ax is None:
        fig = _new_figure((5.0, 3.4))
        ax = fig.subplots()
    else:
        fig = ax.figure
    _style_axis(ax)
    cx, cy = np.array(search.coarse).T
    ax.plot(cx, 100 * cy, marker="o", color=PALETTE["coarse"], label="coarse grid")
    if search.fine:
        fx, fy = np.array(search.fine).T
        ax.plot(fx, 100 * fy, marker=".", color=PALETTE["fine"], label="fine grid")
    ax.plot(
        [search.best],
        [100 * search.best_ece],
        marker="*",
        markersize=14,
        linestyle="none",
        color=PALETTE["best"],
        label=f"best {search.best:g} (ECE {100 * search.best_ece:.1f}%)",
    )
    if np.isfinite(search.baseline_ece):
        ax.axhline(100 * search.baseline_ece, color="0.5", linestyle=":", label="no transform")
    ax.set_xlabel(_COEF_LABEL.get(search.kind, "coefficient"))
    ax.set_ylabel("validation ECE (%)")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or f"{search.kind}: ECE vs coefficient (n = {search.n})")
    return fig
