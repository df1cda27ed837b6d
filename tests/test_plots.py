"""mer.plots: each figure is written as a readable PNG of a sane size; bad inputs are refused."""
import matplotlib.image
import numpy as np
import pytest
import torch

from mer.plots import (
    DPI,
    _periods,
    _read_metrics,
    _with_gaps,
    plot_attention_maps,
    plot_confusion_matrix,
    plot_per_class_accuracy,
    panel_of,
    plot_training_curves,
    split_of,
)
from mer.training import RunLogger

CLASSES = ["angry", "happy", "neutral", "sad"]


def _read_png(path) -> np.ndarray:
    """The written image as (H, W, channels), after checking it is a non-blank PNG of a sane size."""
    assert path.suffix == ".png" and path.stat().st_size > 0
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 2 * DPI <= height <= 30 * DPI and 2 * DPI <= width <= 30 * DPI, image.shape
    assert image[..., :3].std() > 0.01  # something was drawn
    return image


def _causal_attention(length: int, rng: np.random.Generator) -> np.ndarray:
    """A sparse lower-triangular row-stochastic matrix, like CARN's causal entmax attention."""
    weights = np.tril(rng.random((length, length)) ** 6)
    return weights / weights.sum(axis=1, keepdims=True)


def test_confusion_matrix(tmp_path):
    counts = np.random.default_rng(0).integers(0, 40, size=(4, 4))
    counts[2] = 0  # a class without test samples must not divide by zero
    path = plot_confusion_matrix(counts, CLASSES, tmp_path / "figures" / "confusion.png", title="eta = 0.3")
    assert path == tmp_path / "figures" / "confusion.png"
    _read_png(path)


@pytest.mark.parametrize(
    "matrix, names, match",
    [
        pytest.param(np.zeros((3, 4)), CLASSES[:3], "square", id="not-square"),
        pytest.param(np.zeros((4, 4)), CLASSES[:3], "class_names", id="names-mismatch"),
    ],
)
def test_confusion_matrix_rejects_bad_input(tmp_path, matrix, names, match):
    with pytest.raises(ValueError, match=match):
        plot_confusion_matrix(matrix, names, tmp_path / "bad.png")


def test_per_class_accuracy(tmp_path):
    rng = np.random.default_rng(1)
    per_class = {condition: {name: float(rng.uniform(30, 90)) for name in CLASSES}
                 for condition in ("a", "t", "v", "at", "av", "tv", "atv")}
    del per_class["v"]["sad"]  # a missing cell is left out, not drawn as zero
    image = _read_png(plot_per_class_accuracy(per_class, tmp_path / "per_class.png"))
    assert image.shape[1] > image.shape[0]  # 4 groups of 7 bars: a wide figure
    with pytest.raises(ValueError, match="per_class"):
        plot_per_class_accuracy({}, tmp_path / "empty.png")


def test_attention_maps_side_by_side_and_wrapped(tmp_path):
    rng = np.random.default_rng(2)
    dense = np.full((9, 9), 1 / 9)
    maps = [dense, _causal_attention(9, rng), torch.tensor(_causal_attention(9, rng), requires_grad=True),
            _causal_attention(9, rng)]
    titles = ["vanilla a", "causal a", "vanilla t", "causal t"]
    one_row = _read_png(plot_attention_maps(maps, titles, tmp_path / "row.png"))
    wrapped = _read_png(plot_attention_maps(maps[:3], titles[:3], tmp_path / "grid.png", ncols=2, title="CCE"))
    assert one_row.shape[1] > 3 * one_row.shape[0]
    assert wrapped.shape[0] > one_row.shape[0] and wrapped.shape[1] < one_row.shape[1]


@pytest.mark.parametrize(
    "matrices, titles, match",
    [
        pytest.param([], [], "empty", id="empty"),
        pytest.param([np.eye(3)], ["a", "b"], "titles", id="titles-mismatch"),
        pytest.param([np.ones(3)], ["a"], r"matrices\[0\]", id="not-2d"),
    ],
)
def test_attention_maps_reject_bad_input(tmp_path, matrices, titles, match):
    with pytest.raises(ValueError, match=match):
        plot_attention_maps(matrices, titles, tmp_path / "bad.png")


def test_training_curves_from_a_run_logger_csv(tmp_path):
    logger = RunLogger(tmp_path, step_name="epoch")
    for epoch in range(6):
        values = {"train/loss": 1.0 / (epoch + 1), "lr": 1e-3, "note": "warm-up"}
        if epoch % 2 == 1:  # validation every other epoch leaves empty cells
            values.update({"valid/loss": 1.2 / (epoch + 1), "valid/WA": 50.0 + epoch})
        logger.log(epoch, values)
    logger.close()

    step_name, curves = _read_metrics(tmp_path / "metrics.csv")
    assert step_name == "epoch"
    assert sorted(curves) == ["lr", "train/loss", "valid/WA", "valid/loss"]  # the string column is dropped
    np.testing.assert_array_equal(curves["valid/WA"][0], [1.0, 3.0, 5.0])
    np.testing.assert_allclose(curves["valid/loss"][1], [0.6, 0.3, 0.2])

    _read_png(plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", title="CaM-HG"))


@pytest.mark.parametrize("column, panel", [
    ("train/loss", "loss"), ("valid/loss", "loss"), ("train_loss", "loss"), ("val_loss", "loss"),
    ("valid_average_WA", "average_WA"), ("lr", "lr"), ("stage", "stage"), ("training_speed", "training_speed"),
])
def test_splits_of_a_metric_share_a_panel(column, panel):
    assert panel_of(column) == panel


def test_training_curves_need_a_numeric_column(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,note\n0,start\n")
    with pytest.raises(ValueError, match="numeric"):
        plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")


def test_training_curves_shade_phases_and_name_splits(tmp_path):
    """A phase column becomes shaded spans, not a panel; panels say train / validation; no line across the epochs
    a metric skipped."""
    logger = RunLogger(tmp_path, step_name="epoch")
    for epoch, phase in enumerate((1, 1, 2, 3, 3), start=1):
        values = {"phase": phase, "train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch}
        if phase != 2:
            values["train_task"] = 2.0 / epoch
        logger.log(epoch, values)
    logger.close()
    _read_png(plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png"))
    assert _periods(np.array([1.0, 2, 3, 4, 5]), np.array([1.0, 1, 2, 3, 3])) == [(0.5, 2.5, 1), (2.5, 3.5, 2),
                                                                                   (3.5, 5.5, 3)]
    assert [split_of(c) for c in ("train_loss", "val_loss", "valid/WA", "lr")] == ["train", "validation",
                                                                                  "validation", None]
    steps, values = _with_gaps(np.array([1.0, 2, 4]), np.array([0.5, 0.4, 0.3]), np.array([1.0, 2, 3, 4]))
    assert steps.tolist() == [1.0, 2.0, 3.0, 4.0] and np.isnan(values[2]) and values[3] == 0.3
