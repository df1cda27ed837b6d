"""Metrics against hand-computed values; padding never counted; result tables."""
import json
import math

import numpy as np
import pytest
import torch

from mer.metrics import (
    ResultTable,
    differences_from,
    emotion_metrics,
    mean_and_spread,
    merge_seed_tables,
    sentiment_metrics,
    task_metrics,
    valid_targets,
    welch_detectable_spreads,
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


def _runs(values_by_row: dict, columns=("0.0", "Average"), title="sweep") -> list[ResultTable]:
    """One table per run from {row: [value per run]} (the same value in every column but the first, shifted)."""
    runs = len(next(iter(values_by_row.values())))
    tables = []
    for run in range(runs):
        table = ResultTable(title, "model", list(columns))
        for name, values in values_by_row.items():
            table.add_row(name, {columns[0]: values[run] + 1.0, **{c: values[run] for c in columns[1:]}})
        tables.append(table)
    return tables


def test_differences_from_match_welchs_test_on_fresh_samples():
    from scipy import stats

    rng = np.random.default_rng(0)
    full, same, better = rng.normal(54, 0.6, 9), rng.normal(54, 0.6, 9), rng.normal(56, 1.2, 9)
    result = differences_from(_runs({"full": full, "same": same, "better": better}), "full", ["Average"])
    assert list(result.rows) == ["same", "better"] and "over 9 + 9 runs" in result.title
    for name, values in (("same", same), ("better", better)):
        row = result.rows[name]
        difference = values.mean() - full.mean()
        assert float(row["Average difference"]) == pytest.approx(difference, abs=0.005)
        expected_p = stats.ttest_ind(values, full, equal_var=False).pvalue
        assert float(row["Average p"]) == pytest.approx(expected_p, abs=0.0005)
        low, high = (float(x) for x in row["Average 95 % CI"].split(" to "))
        assert (low + high) / 2 == pytest.approx(difference, abs=0.01)
        assert (low > 0 or high < 0) == (expected_p < 0.05)  # the interval excludes 0 exactly when p < 0.05
        spread = np.sqrt((values.var(ddof=1) + full.var(ddof=1)) / 2)
        assert float(row["Average spreads"]) == pytest.approx(difference / spread, abs=0.005)
    assert float(result.rows["better"]["Average p"]) < 0.05  # 3 spreads apart


def test_detectable_spreads_is_where_welchs_test_reaches_5_percent():
    from scipy import stats

    base = np.array([-1.0, 0.0, 1.0] * 3)  # 9 runs, sample std s
    for runs in (3, 6, 9):
        sample = base[:runs] - base[:runs].mean()
        spreads = welch_detectable_spreads(runs)
        shifted = sample + spreads * sample.std(ddof=1)
        assert stats.ttest_ind(shifted, sample, equal_var=False).pvalue == pytest.approx(0.05, abs=1e-9)
    assert welch_detectable_spreads(9) < 1.01 < welch_detectable_spreads(6)  # 9 seeds tell one spread apart
    with pytest.raises(ValueError, match="at least 2"):
        welch_detectable_spreads(1)


def test_differences_from_bad_input_and_rows_without_spread():
    tables = _runs({"full": [1.0, 1.0], "copy": [1.0, 1.0]})
    row = differences_from(tables, "full", ["Average"]).rows["copy"]
    assert row == {"Average difference": "+0.00", "Average 95 % CI": "+0.00 to +0.00", "Average p": "-",
                   "Average spreads": "-"}
    with pytest.raises(ValueError, match="at least 2 runs"):
        differences_from(tables[:1], "full", ["Average"])
    with pytest.raises(ValueError, match="baseline row 'nope'"):
        differences_from(tables, "nope", ["Average"])
    with pytest.raises(ValueError, match=r"columns \['WA'\]"):
        differences_from(tables, "full", ["WA"])
    with pytest.raises(ValueError, match="same rows"):
        differences_from([tables[0], _runs({"other": [1.0]})[0]], "full", ["Average"])


def test_merge_seed_tables_joins_sweeps_and_checks_shared_rows(tmp_path):
    first = _runs({"full": [54.0, 55.0], "no_a": [53.0, 56.0]})
    second = _runs({"full": [54.0, 55.0], "no_b": [52.0, 57.0]})
    later_seeds = _runs({"full": [53.5, 54.5, 56.0], "no_a": [52.0, 54.0, 53.0], "no_b": [55.0, 53.0, 54.5]})
    for folder, tables, seeds in (("a", first, (0, 1)), ("b", second, (0, 1)), ("c", later_seeds, (2, 10, 3))):
        for seed, table in zip(seeds, tables):
            table.save(tmp_path / folder / f"ablations_embedded_seed{seed}")
    (tmp_path / "a" / "ablations_embedded.json").write_text("{}")  # the summary beside them is not a seed table
    joined = merge_seed_tables([tmp_path / f for f in "abc"], "ablations_embedded")
    assert list(joined) == ["0", "1", "2", "3", "10"]  # in seed order
    assert all(list(table.rows) == ["full", "no_a", "no_b"] for table in joined.values())
    assert joined["1"].rows["no_b"] == second[1].rows["no_b"] and joined["10"].rows == later_seeds[1].rows
    # a row that two sweeps hold for one seed must be the same run
    changed = _runs({"full": [54.0, 55.5]})[1]
    changed.save(tmp_path / "d" / "ablations_embedded_seed1")
    with pytest.raises(ValueError, match="seed 1: row 'full' of .*d/ablations_embedded_seed1.json differs from .*a/"):
        merge_seed_tables([tmp_path / "a", tmp_path / "d"], "ablations_embedded")
    with pytest.raises(ValueError, match=r"seed 0 lacks rows \['no_b'\]"):
        merge_seed_tables([tmp_path / "a", tmp_path / "c"], "ablations_embedded")
    with pytest.raises(ValueError, match="holds no ablations_iemocap4_seed"):
        merge_seed_tables([tmp_path / "a"], "ablations_iemocap4")
    with pytest.raises(ValueError, match="is not a folder"):
        merge_seed_tables([tmp_path / "missing"], "ablations_embedded")
    (tmp_path / "e").mkdir()
    _runs({"full": [1.0]}, columns=("0.0", "0.5", "Average"))[0].save(tmp_path / "e" / "ablations_embedded_seed0")
    with pytest.raises(ValueError, match="columns differ"):
        merge_seed_tables([tmp_path / "a", tmp_path / "e"], "ablations_embedded")


def test_combine_command_writes_the_joined_tables_and_differences(tmp_path, capsys):
    from mer import combine

    for seed, table in enumerate(_runs({"CaM-HG (full)": [54.0, 55.0, 53.0], "w/o MoE": [53.0, 56.0, 52.5]})):
        table.save(tmp_path / "sweep" / f"ablations_embedded_seed{seed}")
    assert combine.cli([str(tmp_path / "sweep"), "--out", str(tmp_path / "joined")]) == 0
    summary = ResultTable.load(tmp_path / "joined" / "ablations_embedded.json")
    assert summary.rows["w/o MoE"]["Average"] == "53.83 ± 1.89"
    differences = ResultTable.load(tmp_path / "joined" / "ablations_embedded_differences.json")
    assert differences.rows["w/o MoE"]["Average difference"] == "-0.17"
    assert (tmp_path / "joined" / "ablations_embedded_seed2.json").is_file()
    assert "Welch" in capsys.readouterr().out
    assert combine.cli([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is not a folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_task_metrics_picks_by_task():
    labels, predicted = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])
    assert task_metrics("classification", labels, predicted) == emotion_metrics(labels, predicted)
    scores = np.array([-1.5, 0.4, 2.0, -0.2])
    assert task_metrics("regression", scores, scores[::-1]) == sentiment_metrics(scores, scores[::-1])
    with pytest.raises(ValueError, match="task must be"):
        task_metrics("ranking", labels, predicted)
