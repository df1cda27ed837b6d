"""Metrics against hand-computed values; padding never counted; result tables."""
import json
import math

import numpy as np
import pytest
import torch

from mer.metrics import (
    ResultTable,
    emotion_metrics,
    mean_and_spread,
    sentiment_metrics,
    task_metrics,
    valid_targets,
)


def test_emotion_metrics_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    # WA = 4/6; recalls 2/3, 1/2, 1 -> UA = 13/18;
    # F1: class 0 p=1 r=2/3 -> 0.8; class 1 p=1/2 r=1/2 -> 0.5; class 2 p=1/2 r=1 -> 2/3; weights 3, 2, 1.
    metrics = emotion_metrics(y_true, y_pred)
    assert metrics["WA"] == pytest.approx(100 * 4 / 6)
    assert metrics["UA"] == pytest.approx(100 * 13 / 18)
    assert metrics["WAF1"] == pytest.approx(100 * (3 * 0.8 + 2 * 0.5 + 2 / 3) / 6)


def test_emotion_ua_ignores_classes_absent_from_labels():
    # class 3 is only predicted: UA averages the recalls of the true classes 0 and 1 -> (1/2 + 1) / 2
    metrics = emotion_metrics(np.array([0, 0, 1]), np.array([0, 3, 1]))
    assert metrics["UA"] == pytest.approx(75.0)


def test_sentiment_metrics_by_hand():
    y_true = np.array([2.0, -1.0, 0.0, 1.4, -2.6])
    y_pred = np.array([1.0, 0.5, -0.4, 2.0, -2.0])
    # non-zero labels: pos, neg, pos, neg vs predicted pos, pos, pos, neg -> 3/4 correct
    # weighted F1: negatives (2): p=1 r=1/2 -> 2/3; positives (2): p=2/3 r=1 -> 0.8
    metrics = sentiment_metrics(y_true, y_pred)
    assert metrics["Acc2"] == pytest.approx(75.0)
    assert metrics["F1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)
    assert metrics["MAE"] == pytest.approx(np.mean([1.0, 1.5, 0.4, 0.6, 0.6]))
    dt, dp = y_true - y_true.mean(), y_pred - y_pred.mean()
    assert metrics["Corr"] == pytest.approx((dt * dp).sum() / math.sqrt((dt**2).sum() * (dp**2).sum()))


def test_sentiment_corr_undefined_for_constant_prediction():
    assert math.isnan(sentiment_metrics([1.0, -1.0, 2.0], [0.5, 0.5, 0.5])["Corr"])


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same size"):
        emotion_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="y_true"):
        sentiment_metrics([], [])


def test_valid_targets_drop_padding():
    logits = torch.tensor([[[0.1, 0.9], [0.8, 0.2], [5.0, 0.0]], [[0.0, 1.0], [9.0, 0.0], [9.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1], [1, -1, -1]])
    valid = labels >= 0
    y_true, y_pred = valid_targets(logits, labels, valid)
    assert y_true.tolist() == [1, 0, 1] and y_pred.tolist() == [1, 0, 1]
    scores = torch.tensor([[[0.5], [-1.0]]])
    y_true, y_pred = valid_targets(scores, torch.tensor([[1.2, 0.0]]), torch.tensor([[True, False]]))
    assert y_true.tolist() == pytest.approx([1.2]) and y_pred.tolist() == [0.5]
    with pytest.raises(TypeError, match="valid"):
        valid_targets(logits, labels, valid.long())


def test_result_table_save_load_and_spread(tmp_path):
    tables = []
    for seed, offset in enumerate((0.0, 2.0, 4.0)):
        table = ResultTable("IEMOCAP-4", "eta", ["WA", "WAF1"])
        table.add_row("0.0", {"WA": 70.0 + offset, "WAF1": 69.0 + offset})
        table.add_row("0.5", {"WA": 60.0 + offset, "WAF1": 58.5})
        tables.append(table)
    json_path, csv_path, md_path = tables[0].save(tmp_path / "runs" / "table")
    loaded = ResultTable.load(json_path)
    assert loaded.rows == tables[0].rows and loaded.columns == ["WA", "WAF1"]
    assert json.loads(json_path.read_text())["title"] == "IEMOCAP-4"
    assert csv_path.read_text().splitlines() == ["eta,WA,WAF1", "0.0,70.0,69.0", "0.5,60.0,58.5"]
    assert "| 0.5 | 60.00 | 58.50 |" in tables[0].to_markdown()
    assert md_path.read_text() == tables[0].to_markdown() + "\n"
    spread = mean_and_spread(tables)
    assert spread.rows["0.0"]["WA"] == "72.00 ± 2.00"  # sample std of 70, 72, 74
    assert spread.rows["0.5"]["WAF1"] == "58.50 ± 0.00"
    with pytest.raises(ValueError, match="columns"):
        tables[0].add_row("0.7", {"WA": 1.0})


def test_task_metrics_picks_by_task():
    labels, predicted = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])
    assert task_metrics("classification", labels, predicted) == emotion_metrics(labels, predicted)
    scores = np.array([-1.5, 0.4, 2.0, -0.2])
    assert task_metrics("regression", scores, scores[::-1]) == sentiment_metrics(scores, scores[::-1])
    with pytest.raises(ValueError, match="task must be"):
        task_metrics("ranking", labels, predicted)
