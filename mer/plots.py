"""Figures of a run: confusion matrices, per-class accuracy, attention maps and training curves.

Figures are drawn with ``matplotlib.figure.Figure`` and saved through the Agg renderer, without pyplot:
importing this module needs no display and leaves the user's matplotlib backend (e.g. Jupyter's) alone.
Each function writes a PNG (parent directories created) and returns its path.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PathLike = Union[str, os.PathLike]
DPI = 120


def _save(figure: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _as_numpy(array) -> np.ndarray:
    """Tensors (any device, with grad) and array-likes as a float64 numpy array."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def plot_confusion_matrix(
    matrix, class_names: Sequence[str], path: PathLike, title: str = "Confusion matrix"
) -> Path:
    """A confusion matrix ``(C, C)`` of counts (rows: true class, columns: predicted class).

    Colours are row-normalised (the recall of each true class, in percent); each cell shows its percentage
    and its count, as in the CaM-HG paper's Fig. 4. Rows without samples stay at 0 %.
    """
    counts = _as_numpy(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"matrix must be square (C, C), got shape {counts.shape}")
    if len(class_names) != counts.shape[0]:
        raise ValueError(f"class_names has {len(class_names)} names for a {counts.shape[0]}-class matrix")
    row_totals = counts.sum(axis=1, keepdims=True)
    percent = 100.0 * np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)

    size = 1.2 + 0.9 * len(class_names)
    figure = Figure(figsize=(size + 1.2, size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(percent, cmap="Blues", vmin=0.0, vmax=100.0)
    figure.colorbar(image, ax=axes, label="% of the true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    axes.set_title(title)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            # white text on dark cells, black on light ones
            colour = "white" if percent[i, j] > 55.0 else "black"
            axes.text(j, i, f"{percent[i, j]:.1f}%\n({counts[i, j]:.0f})", ha="center", va="center",
                      color=colour, fontsize=8)
    return _save(figure, path)


def plot_per_class_accuracy(
    per_class: dict[str, dict[str, float]], path: PathLike, title: str = "Accuracy per class"
) -> Path:
    """Grouped bars: one group per class, one bar per series (a missing condition, or a model).

    ``per_class[series][class_name]`` is an accuracy in percent, as in the CARN paper's Fig. 3. Classes are
    taken in first-seen order; a class a series lacks is left out of that series.
    """
    if not per_class:
        raise ValueError("per_class is empty")
    series_names = list(per_class)
    class_names = list(dict.fromkeys(name for values in per_class.values() for name in values))
    width = 0.8 / len(series_names)
    positions = np.arange(len(class_names))

    figure = Figure(figsize=(max(5.0, 1.0 + 0.35 * len(class_names) * len(series_names)), 4.0),
                    layout="constrained")
    axes = figure.add_subplot()
    for index, series in enumerate(series_names):
        offset = (index - (len(series_names) - 1) / 2) * width
        values = [per_class[series].get(name, math.nan) for name in class_names]
        bars = axes.bar(positions + offset, values, width=width, label=series)
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    axes.set_xticks(positions, labels=class_names)
    axes.set_ylabel("Accuracy (%)")
    axes.set_ylim(0.0, 105.0)
    axes.set_title(title)
    figure.legend(fontsize=8, ncols=min(len(series_names), 6), loc="outside lower center")
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_attention_maps(
    matrices: Sequence, titles: Sequence[str], path: PathLike, *, ncols: Optional[int] = None,
    title: Optional[str] = None
) -> Path:
    """Several ``(T, T)`` attention matrices side by side (rows: queries i, columns: keys j).

    As in the CARN paper's Fig. 4 (vanilla vs. causal attention per modality pipeline): all panels share one
    colour scale and zero weights are white, so sparse lower-triangular causal maps read at a glance.
    ``ncols`` wraps the panels into rows (default: all in one row). Tensors are accepted.
    """
    if len(matrices) == 0:
        raise ValueError("matrices is empty")
    if len(titles) != len(matrices):
        raise ValueError(f"titles has {len(titles)} entries for {len(matrices)} matrices")
    maps = [_as_numpy(matrix) for matrix in matrices]
    for index, weights in enumerate(maps):
        if weights.ndim != 2:
            raise ValueError(f"matrices[{index}] must be 2-D (T, T), got shape {weights.shape}")
    ncols = len(maps) if ncols is None else max(1, min(ncols, len(maps)))
    nrows = math.ceil(len(maps) / ncols)

    # one colour scale for all panels, so that dense and sparse maps compare at a glance
    vmax = max(max(float(weights.max()) for weights in maps), 1e-12)
    figure = Figure(figsize=(3.0 * ncols + 0.8, 3.0 * nrows + (0.4 if title else 0.0)), layout="constrained")
    grid = figure.subplots(nrows, ncols, squeeze=False)
    for axes, weights, panel_title in zip(grid.flat, maps, titles):
        image = axes.imshow(weights, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
        axes.set_title(panel_title, fontsize=10)
        axes.set_xlabel("key j")
        axes.set_ylabel("query i")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in list(grid.flat)[len(maps):]:
        axes.set_axis_off()
    figure.colorbar(image, ax=grid, label="attention weight", shrink=0.8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _read_metrics(csv_path: PathLike) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``metrics.csv`` (RunLogger) -> (step column name, {column: (steps, values)}) for numeric cells."""
    with open(csv_path, newline="") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames:
            raise ValueError(f"{csv_path} has no header")
        step_name, *columns = reader.fieldnames
        rows = list(reader)
    curves = {}
    for column in columns:
        points = []
        for row in rows:
            try:
                points.append((float(row[step_name]), float(row[column])))
            except (TypeError, ValueError):  # an empty cell (not logged at that step) or a string
                continue
        if points:
            steps, values = np.array(points).T
            curves[column] = (steps, values)
    return step_name, curves


_SPLIT_PREFIXES = ("train", "valid", "val", "test")


def panel_of(column: str) -> str:
    """The metric a ``metrics.csv`` column shows, without its split: ``valid/loss`` and ``val_loss`` -> ``loss``,
    ``valid_average_WA`` -> ``average_WA``; a column without a split prefix is its own panel."""
    for separator in ("/", "_"):
        split, _, metric = column.partition(separator)
        if metric and split in _SPLIT_PREFIXES:
            return metric
    return column


_SPLIT_NAMES = {"train": "train", "valid": "validation", "val": "validation", "test": "test"}
PERIOD_COLUMNS = ("phase", "stage")  # drawn as shaded spans behind the curves, not as curves
_SPAN_COLORS = ("#e8eef7", "#f7efe2", "#e9f3e6", "#f3e6ef")


def split_of(column: str) -> Optional[str]:
    """The split a column belongs to, spelled out (``val_loss`` -> ``validation``), None without a split prefix."""
    for separator in ("/", "_"):
        split, _, metric = column.partition(separator)
        if metric and split in _SPLIT_NAMES:
            return _SPLIT_NAMES[split]
    return None


def _periods(steps: np.ndarray, values: np.ndarray) -> list[tuple[float, float, int]]:
    """Runs of one value of a phase/stage column: [(first step - 0.5, last step + 0.5, value)]."""
    spans = []
    for step, value in zip(steps, values):
        if spans and spans[-1][2] == int(value):
            spans[-1] = (spans[-1][0], step + 0.5, int(value))
        else:
            spans.append((step - 0.5, step + 0.5, int(value)))
    return spans


def _with_gaps(steps: np.ndarray, values: np.ndarray, logged_steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A NaN between two points when another metric was logged at a step between them: no line across the epochs
    a metric skipped (e.g. the task loss during CaM-HG's phase 2)."""
    out_steps, out_values = [steps[0]], [values[0]]
    for (before, after), value in zip(zip(steps[:-1], steps[1:]), values[1:]):
        if ((logged_steps > before) & (logged_steps < after)).any():
            out_steps.append((before + after) / 2)
            out_values.append(np.nan)
        out_steps.append(after)
        out_values.append(value)
    return np.asarray(out_steps), np.asarray(out_values)


def plot_training_curves(csv_path: PathLike, path: PathLike, title: Optional[str] = None) -> Path:
    """One panel per metric of a RunLogger ``metrics.csv``, against its first (step or epoch) column.

    The splits of one metric share a panel, labelled train / validation (``train/loss`` and ``valid/loss``, or
    ``train_loss`` and ``val_loss``: see :func:`panel_of`); a ``phase`` or ``stage`` column shades the panels' spans
    of each phase instead of being drawn; the wall-clock ``seconds`` column is left out; the x axis has integer
    ticks. Empty cells (a metric not logged at that step) are skipped.
    """
    step_name, curves = _read_metrics(csv_path)
    curves.pop("seconds", None)
    period_name = next((name for name in PERIOD_COLUMNS if name in curves), None)
    spans = _periods(*curves.pop(period_name)) if period_name else []
    if not curves:
        raise ValueError(f"{csv_path} has no numeric metric column")
    panels: dict[str, list[str]] = {}
    for column in curves:
        panels.setdefault(panel_of(column), []).append(column)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)

    logged_steps = np.unique(np.concatenate([steps for steps, _ in curves.values()]))
    figure = Figure(figsize=(4.2 * ncols, 3.0 * nrows + (0.7 if title or spans else 0.0)), layout="constrained")
    grid = figure.subplots(nrows, ncols, squeeze=False)
    for axes, (metric, columns) in zip(grid.flat, panels.items()):
        for start, stop, value in spans:
            axes.axvspan(start, stop, color=_SPAN_COLORS[(value - 1) % len(_SPAN_COLORS)], zorder=0, linewidth=0)
        for column in columns:
            steps, values = _with_gaps(*curves[column], logged_steps)
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                      label=split_of(column) or column)
        splits = [split_of(column) for column in columns]
        named = " / ".join(s for s in splits if s)
        name = "learning rate" if metric == "lr" else metric
        axes.set_title(f"{name} ({named})" if named else name, fontsize=10)
        axes.set_xlabel(step_name)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len(columns) > 1:
            axes.legend(fontsize=8)
    for axes in list(grid.flat)[len(panels):]:
        axes.set_axis_off()
    if spans:  # one legend for the shaded phases or stages
        from matplotlib.patches import Patch

        values = sorted({value for _, _, value in spans})
        figure.legend([Patch(color=_SPAN_COLORS[(v - 1) % len(_SPAN_COLORS)]) for v in values],
                      [f"{period_name} {v}" for v in values], loc="outside lower center", ncols=len(values),
                      fontsize=8, frameon=False)
    if title:
        figure.suptitle(title)
    return _save(figure, path)
