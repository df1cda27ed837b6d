"""The field's metrics (scikit-learn inside) and result tables in the papers' layout.

Emotion classes: WA (accuracy), UA (mean per-class recall over the classes present in the labels) and WAF1
(support-weighted F1), in percent. Sentiment (MOSI/MOSEI): Acc2 and weighted F1 of positive vs negative over the
utterances whose label is non-zero (percent), MAE and Pearson correlation over all utterances. Padding never
counts: :func:`valid_targets` flattens a padded batch's valid positions first.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

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


def mean_and_spread(tables: list[ResultTable]) -> ResultTable:
    """One table of "mean ± std" cells (sample std over the tables, e.g. seeds; 0 for a single table).

    The tables must share title, rows and columns, with numeric values.
    """
    if len(tables) == 0:
        raise ValueError("tables must not be empty")
    first = tables[0]
    for table in tables[1:]:
        if table.columns != first.columns or list(table.rows) != list(first.rows):
            raise ValueError("tables must have the same rows and columns to be averaged")
    result = ResultTable(f"{first.title} (mean ± std over {len(tables)})", first.row_name, first.columns)
    for name in first.rows:
        cells = {}
        for column in first.columns:
            values = np.array([float(t.rows[name][column]) for t in tables])
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            cells[column] = f"{values.mean():.2f} ± {spread:.2f}"
        result.add_row(name, cells)
    return result
