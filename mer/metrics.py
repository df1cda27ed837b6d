"""The field's metrics (scikit-learn inside) and result tables in the papers' layout.

Emotion classes: WA (accuracy), UA (mean per-class recall over the classes present in the labels) and WAF1
(support-weighted F1), in percent. Sentiment (MOSI/MOSEI): Acc2 and weighted F1 of positive vs negative over the
utterances whose label is non-zero (percent), MAE and Pearson correlation over all utterances. Padding never
counts: :func:`valid_targets` flattens a padded batch's valid positions first. Over seeds: mean ± std
(:func:`mean_and_spread`), each row's difference from a baseline row with Welch's t-test
(:func:`differences_from`), and the per-seed tables of several sweeps joined (:func:`merge_seed_tables`).
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score


def _as_numpy(name: str, values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size == 0:
        raise ValueError(f"{name} must not be empty")
    return array.reshape(-1)


def _check_same_size(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same size, got {y_true.size} and {y_pred.size}")


def emotion_metrics(y_true, y_pred) -> dict[str, float]:
    """{"WA", "UA", "WAF1"} in percent for integer class ids (arrays or tensors of the same size)."""
    y_true, y_pred = _as_numpy("y_true", y_true), _as_numpy("y_pred", y_pred)
    _check_same_size(y_true, y_pred)
    return {
        "WA": 100.0 * accuracy_score(y_true, y_pred),
        # labels=classes in y_true: UA is the mean recall of the true classes (balanced accuracy), as the field uses it.
        "UA": 100.0 * recall_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0),
        "WAF1": 100.0 * f1_score(y_true, y_pred, average="weighted", zero_division=0),
    }


def sentiment_metrics(y_true, y_pred, *, scores: bool = True) -> dict[str, float]:
    """{"Acc2", "F1", "MAE", "Corr"} for sentiment scores; Acc2 and F1 (percent) over the non-zero labels,
    positive (> 0) vs not. Corr is NaN when either side is constant (Pearson's r is undefined there).

    ``scores=False``: ``y_pred`` are the class ids of a 2-class sign classifier (1 = positive, see
    :mod:`mer.protocols`): Acc2 and F1 as above, MAE and Corr NaN (no score to compare)."""
    y_true = _as_numpy("y_true", y_true).astype(np.float64)
    y_pred = _as_numpy("y_pred", y_pred).astype(np.float64)
    _check_same_size(y_true, y_pred)
    non_zero = y_true != 0
    if non_zero.any():
        positive_true, positive_pred = y_true[non_zero] > 0, y_pred[non_zero] > 0
        acc2 = 100.0 * accuracy_score(positive_true, positive_pred)
        f1 = 100.0 * f1_score(positive_true, positive_pred, average="weighted", zero_division=0)
    else:
        acc2 = f1 = math.nan
    if not scores:
        return {"Acc2": acc2, "F1": f1, "MAE": math.nan, "Corr": math.nan}
    if y_true.std() == 0 or y_pred.std() == 0:
        corr = math.nan
    else:
        corr = float(np.corrcoef(y_true, y_pred)[0, 1])
    return {"Acc2": acc2, "F1": f1, "MAE": float(np.abs(y_true - y_pred).mean()), "Corr": corr}


def task_metrics(task: str, y_true, y_pred, *, scores: bool = True) -> dict[str, float]:
    """:func:`emotion_metrics` for ``task="classification"``, :func:`sentiment_metrics` for ``"regression"``
    (``scores=False``: the predictions are sign classes, see there)."""
    if task == "classification":
        return emotion_metrics(y_true, y_pred)
    if task == "regression":
        return sentiment_metrics(y_true, y_pred, scores=scores)
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")


def valid_targets(outputs, labels, valid) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) as flat numpy arrays of the valid positions of a padded batch.

    outputs: (B, L, C) class scores (argmax taken), (B, L, 1) or (B, L) predictions; labels, valid: (B, L).
    """
    outputs, labels, valid = (torch.as_tensor(x).detach().cpu() for x in (outputs, labels, valid))
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool mask, got {valid.dtype}")
    if labels.shape != valid.shape:
        shapes = f"{tuple(labels.shape)} and {tuple(valid.shape)}"
        raise ValueError(f"labels and valid must have the same shape, got {shapes}")
    if outputs.dim() == valid.dim() + 1:
        outputs = outputs[..., 0] if outputs.shape[-1] == 1 else outputs.argmax(-1)
    if outputs.shape != valid.shape:
        raise ValueError(f"outputs must have shape {tuple(valid.shape)} (+ a class axis), got {tuple(outputs.shape)}")
    return labels[valid].numpy(), outputs[valid].numpy()


def _format_cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.2f}"
    return str(value)


class ResultTable:
    """Rows x columns of results, e.g. missing rate x metric or available-modality condition x metric.

    ``row_name`` heads the first column (e.g. "eta" or "condition"); values are numbers or strings.
    """

    def __init__(self, title: str, row_name: str, columns: list[str]):
        self.title = title
        self.row_name = row_name
        self.columns = list(columns)
        self.rows: dict[str, dict[str, object]] = {}

    def add_row(self, name, values: dict) -> None:
        """Add (or replace) row ``name``; ``values`` must hold every column and nothing else."""
        if set(values) != set(self.columns):
            raise ValueError(f"values must have exactly the columns {self.columns}, got {list(values)}")
        self.rows[str(name)] = {column: values[column] for column in self.columns}

    def to_markdown(self) -> str:
        header = [self.row_name, *self.columns]
        lines = [f"**{self.title}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for name, values in self.rows.items():
            lines.append("| " + " | ".join([name, *(_format_cell(values[c]) for c in self.columns)]) + " |")
        return "\n".join(lines)

    def print(self) -> None:
        print(self.to_markdown())

    def to_dict(self) -> dict:
        return {"title": self.title, "row_name": self.row_name, "columns": self.columns, "rows": self.rows}

    def save(self, path_stem) -> tuple[Path, Path, Path]:
        """Write ``<path_stem>.json`` (exact, loadable by :meth:`load`), ``<path_stem>.csv`` and ``<path_stem>.md``
        (:meth:`to_markdown`); returns the three paths."""
        stem = Path(path_stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        json_path, csv_path, md_path = (stem.with_name(stem.name + suffix) for suffix in (".json", ".csv", ".md"))
        md_path.write_text(self.to_markdown() + "\n", encoding="utf-8")
        json_path.write_text(json.dumps(self.to_dict(), indent=2, default=float), encoding="utf-8")
        with open(csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([self.row_name, *self.columns])
            for name, values in self.rows.items():
                writer.writerow([name, *(values[c] for c in self.columns)])
        return json_path, csv_path, md_path

    @classmethod
    def load(cls, path) -> ResultTable:
        """Read a table written by :meth:`save` (the ``.json`` file)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        table = cls(data["title"], data["row_name"], data["columns"])
        for name, values in data["rows"].items():
            table.add_row(name, values)
        return table


def _check_same_layout(tables: list[ResultTable], purpose: str) -> None:
    first = tables[0]
    for table in tables[1:]:
        if table.columns != first.columns or list(table.rows) != list(first.rows):
            raise ValueError(f"tables must have the same rows and columns to be {purpose}")


def mean_and_spread(tables: list[ResultTable]) -> ResultTable:
    """One table of "mean ± std" cells (sample std over the tables, e.g. seeds; 0 for a single table).

    The tables must share title, rows and columns, with numeric values.
    """
    if len(tables) == 0:
        raise ValueError("tables must not be empty")
    _check_same_layout(tables, "averaged")
    first = tables[0]
    result = ResultTable(f"{first.title} (mean ± std over {len(tables)})", first.row_name, first.columns)
    for name in first.rows:
        cells = {}
        for column in first.columns:
            values = np.array([float(t.rows[name][column]) for t in tables])
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            cells[column] = f"{values.mean():.2f} ± {spread:.2f}"
        result.add_row(name, cells)
    return result


def welch_detectable_spreads(runs: int, level: float = 0.05) -> float:
    """The smallest difference of means, in units of the common sample std, that Welch's t-test calls significant
    at ``level`` (two-sided) with ``runs`` + ``runs`` runs of equal spread:
    t(1 - level / 2, 2 runs - 2) sqrt(2 / runs)."""
    from scipy import stats

    if runs < 2:
        raise ValueError(f"runs must be at least 2, got {runs}")
    return float(stats.t.ppf(1 - level / 2, 2 * runs - 2) * math.sqrt(2 / runs))


def differences_from(tables: list[ResultTable], baseline: str, columns: Sequence[str]) -> ResultTable:
    """How each row of per-run ``tables`` (e.g. one per seed: the same rows and columns, numeric) differs from row
    ``baseline`` in ``columns``, over the runs: the mean difference (row - baseline), its 95 % confidence interval
    and the two-sided p-value of Welch's t-test (unequal variances; "-" when both rows have no spread), and the
    difference in units of the rows' common spread sqrt((s_row^2 + s_baseline^2) / 2). The title says how many
    spreads a difference needs to reach p < 0.05 with this many runs (:func:`welch_detectable_spreads`)."""
    from scipy import stats

    if len(tables) < 2:
        raise ValueError(f"differences need at least 2 runs per row, got {len(tables)}")
    first = tables[0]
    if baseline not in first.rows:
        raise ValueError(f"baseline row {baseline!r} is not in the tables (rows: {list(first.rows)})")
    unknown = [column for column in columns if column not in first.columns]
    if unknown:
        raise ValueError(f"columns {unknown} are not in the tables (columns: {first.columns})")
    _check_same_layout(tables, "compared")
    runs = len(tables)
    title = (f"{first.title}: difference from {baseline} over {runs} + {runs} runs (Welch's t-test; p < 0.05 needs "
             f"about {welch_detectable_spreads(runs):.2f} spreads)")
    headers = [f"{column} {part}" for column in columns for part in ("difference", "95 % CI", "p", "spreads")]
    result = ResultTable(title, first.row_name, headers)

    def values(name, column):
        return np.array([float(table.rows[name][column]) for table in tables])

    for name in first.rows:
        if name == baseline:
            continue
        cells = {}
        for column in columns:
            row, base = values(name, column), values(baseline, column)
            difference = row.mean() - base.mean()
            var_row, var_base = row.var(ddof=1) / runs, base.var(ddof=1) / runs
            error = math.sqrt(var_row + var_base)
            spread = math.sqrt((row.var(ddof=1) + base.var(ddof=1)) / 2)
            if error > 0:
                dof = error ** 4 / ((var_row ** 2 + var_base ** 2) / (runs - 1))
                half = float(stats.t.ppf(0.975, dof)) * error
                p = f"{2 * float(stats.t.sf(abs(difference) / error, dof)):.3f}"
            else:
                half, p = 0.0, "-"
            cells.update({f"{column} difference": f"{difference:+.2f}",
                          f"{column} 95 % CI": f"{difference - half:+.2f} to {difference + half:+.2f}",
                          f"{column} p": p,
                          f"{column} spreads": f"{difference / spread:+.2f}" if spread > 0 else "-"})
        result.add_row(name, cells)
    return result


def merge_seed_tables(folders: Sequence[Path], stem: str) -> dict[str, ResultTable]:
    """The per-seed tables ``<stem>_seed<S>[-fold<k>].json`` of several sweeps' result folders, joined per seed
    (and fold): {"<S>[-fold<k>]": table with the rows of every folder}, in seed order. A row that two folders hold
    for the same seed must be identical (the same deterministic run), and every seed must end up with the same rows
    and columns; otherwise ValueError."""
    pattern = re.compile(re.escape(stem) + r"_seed(\d+(?:-fold\d+)?)\.json")
    joined: dict[str, ResultTable] = {}
    origin: dict[tuple[str, str], Path] = {}  # (seed, row) -> the file it came from
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        found = sorted(path for path in folder.iterdir() if pattern.fullmatch(path.name))
        if not found:
            raise ValueError(f"{folder} holds no {stem}_seed<S>.json table")
        for path in found:
            seed, table = pattern.fullmatch(path.name).group(1), ResultTable.load(path)
            target = joined.setdefault(seed, ResultTable(table.title, table.row_name, table.columns))
            if (table.title, table.row_name, table.columns) != (target.title, target.row_name, target.columns):
                raise ValueError(f"{path}: title, row name or columns differ from the other seed {seed} tables")
            for name, values in table.rows.items():
                if name in target.rows and target.rows[name] != values:
                    raise ValueError(f"seed {seed}: row {name!r} of {path} differs from {origin[seed, name]}")
                origin.setdefault((seed, name), path)
                target.add_row(name, values)
    union = list(dict.fromkeys(name for table in joined.values() for name in table.rows))
    for seed, table in joined.items():
        missing = [name for name in union if name not in table.rows]
        if missing:
            raise ValueError(f"seed {seed} lacks rows {missing}")
        table.rows = {name: table.rows[name] for name in union}
    return dict(sorted(joined.items(), key=lambda item: tuple(int(n) for n in re.findall(r"\d+", item[0]))))
