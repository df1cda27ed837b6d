"""The papers' protocols (mer/protocols.py and the flags built on it): IEMOCAP folds averaged, the validation choice,
CARN's stage 2 per test condition, CaM-HG's phase-3 rates, sentiment as sign cross-entropy, CARN's strict-parents
CSS context and history-only encoders. Tiny sizes, reference backend for training."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camhg.train
import carn.train
from camhg.config import P3_LR_RANGE, PRESETS as CAMHG_PRESETS, preset as camhg_preset
from camhg.model import CaMHG
from carn.config import STAGE2_CONDITIONS, ModelConfig, TrainConfig, model_config_for
from carn.evaluate import CONDITION_ORDER, evaluate_conditions, load_model, stage2_checkpoint_name
from carn.model import CARN, CausalCueEncoder
from mer.data import DatasetInfo, load_dataset
from mer.metrics import ResultTable, sentiment_metrics
from mer.missing import CONDITIONS
from mer.protocols import average_over_folds, sign_cross_entropy
from mer.training import CheckpointManager
from test_data_published import _write_iemocap

TINY = ["--hidden", "8", "--batch-size", "8", "--no-progress", "--no-plots", "--keep-checkpoints", "0"]


def table_numbers(table: ResultTable) -> np.ndarray:
    return np.array([[float(v) for v in row.values()] for row in table.rows.values()])


def cell_means(table: ResultTable) -> np.ndarray:
    return np.array([[float(str(v).split(" ± ")[0]) for v in row.values()] for row in table.rows.values()])


# ------------------------------------------------------------------------------------------------------- folds
@pytest.mark.slow
def test_carn_folds_all_five_runs_disjoint_complete_test_sessions_and_averaged_table(tmp_path, reference_backend,
                                                                                     capsys):
    (tmp_path / "data").mkdir()
    video_ids, *_ = _write_iemocap(tmp_path / "data")
    argv = ["--dataset", "iemocap4", "--data-root", str(tmp_path / "data"), "--folds", "all", "--epochs", "1", "1",
            "--stage2", "random", "--runs-dir", str(tmp_path / "runs"), "--run-name", "folds", *TINY]
    assert carn.train.cli(argv) == 0
    run_dir = tmp_path / "runs" / "carn" / "iemocap4" / "folds"
    tested, tables = [], []
    for fold in (1, 2, 3, 4, 5):
        config = json.loads((run_dir / f"fold{fold}" / "config.json").read_text())
        assert config["data"]["dataset_options"]["fold"] == fold and config["data"]["validation"] == "carved"
        splits = load_dataset("iemocap4", tmp_path / "data", seed=0, **config["data"]["dataset_options"])
        test_vids = {d.vid for d in splits.test}
        assert {vid[4] for vid in test_vids} == {str(fold)}  # one session held out
        assert not test_vids & ({d.vid for d in splits.train} | {d.vid for d in splits.valid})
        tested.append(test_vids)
        tables.append(ResultTable.load(run_dir / f"fold{fold}" / "table1.json"))
    assert sum(map(len, tested)) == len(set().union(*tested)) == len(video_ids)  # disjoint and complete
    averaged = ResultTable.load(run_dir / "table1_folds.json")
    assert "mean ± std over 5" in averaged.title and "leave-one-session-out" in averaged.title
    assert "validation = seeded 0.1 of training dialogues" in averaged.title
    np.testing.assert_allclose(cell_means(averaged), table_numbers_mean(tables), atol=0.006)
    assert averaged.title in capsys.readouterr().out
    # --resume of the set: a finished fold is reused, a stopped one resumed, a missing one trained again
    reused = (run_dir / "fold1" / "table1.json").stat().st_mtime_ns
    (run_dir / "fold2" / "table1.json").unlink()
    shutil.rmtree(run_dir / "fold4")
    assert carn.train.cli(["--resume", str(run_dir), "--no-progress", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "fold 1 of 5: finished, reused" in out and "fold 2 of 5: Session 2 held out, resumed" in out
    assert (run_dir / "fold1" / "table1.json").stat().st_mtime_ns == reused
    assert ResultTable.load(run_dir / "table1_folds.json").rows == averaged.rows  # CPU runs are deterministic


def table_numbers_mean(tables):
    return np.mean([table_numbers(t) for t in tables], axis=0)


@pytest.mark.slow
def test_camhg_folds_all_and_gcnet_validation(tmp_path, reference_backend, capsys):
    (tmp_path / "data").mkdir()
    _write_iemocap(tmp_path / "data")
    argv = ["--dataset", "iemocap4", "--data-root", str(tmp_path / "data"), "--folds", "all", "--epochs", "1", "0",
            "1", "--validation", "test", "--runs-dir", str(tmp_path / "runs"), "--run-name", "folds", *TINY]
    assert camhg.train.cli(argv) == 0
    run_dir = tmp_path / "runs" / "camhg" / "iemocap4" / "folds"
    for name in ("missing_rates", "conditions"):
        per_fold = [ResultTable.load(run_dir / f"fold{k}" / f"{name}.json") for k in (1, 2, 3, 4, 5)]
        averaged = ResultTable.load(run_dir / f"{name}_folds.json")
        assert "(GCNet's protocol)" in averaged.title and "mean ± std over 5" in averaged.title
        np.testing.assert_allclose(cell_means(averaged), table_numbers_mean(per_fold), atol=0.006)
        for k, table in enumerate(per_fold, start=1):
            assert f"Session {k} held out" in table.title
    config = json.loads((run_dir / "fold3" / "config.json").read_text())
    assert config["validation"] == "test" and config["dataset_options"] == {"fold": 3, "valid_fraction": 0.0}
    before = ResultTable.load(run_dir / "conditions_folds.json")
    (run_dir / "fold5" / "missing_rates.json").unlink()
    assert camhg.train.cli(["--resume", str(run_dir), "--no-progress", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "fold 1 of 5: finished, reused" in out and "fold 5 of 5: Session 5 held out, resumed" in out
    assert ResultTable.load(run_dir / "conditions_folds.json").rows == before.rows


def test_average_over_folds_is_mean_and_sample_std():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 100, (5, 2, 3))
    tables = []
    for k, block in enumerate(values):
        table = ResultTable(f"fold {k}", "row", ["x", "y", "z"])
        for name, row in zip(("r1", "r2"), block):
            table.add_row(name, dict(zip(("x", "y", "z"), row.tolist())))
        tables.append(table)
    averaged = average_over_folds(tables, "T")
    assert averaged.title == "T (mean ± std over 5)"
    spreads = np.array([[float(str(v).split(" ± ")[1]) for v in r.values()] for r in averaged.rows.values()])
    np.testing.assert_allclose(cell_means(averaged), values.mean(0), atol=0.006)
    np.testing.assert_allclose(spreads, values.std(0, ddof=1), atol=0.006)


def test_validation_test_is_the_test_split_and_carves_nothing(tmp_path):
    _write_iemocap(tmp_path)
    spec = carn.train.DataSpec("iemocap4", str(tmp_path), 0, {"fold": 2, "valid_fraction": 0.0}, "test")
    splits = spec.load()
    assert splits.valid is splits.test
    assert {d.vid[4] for d in splits.train} == {"1", "3", "4", "5"} and len(splits.train) == 16
    assert "GCNet" in spec.caption() and "Session 2 held out" in spec.caption()


@pytest.mark.parametrize("module", [carn.train, camhg.train])
@pytest.mark.parametrize("flag", [["--folds", "all"], ["--fold", "2"]])
def test_folds_on_a_dataset_without_sessions_is_a_clear_error(module, flag, tmp_path, capsys):
    assert module.cli(["--runs-dir", str(tmp_path), *flag]) == 2
    error = capsys.readouterr().err
    assert "IEMOCAP" in error and "embedded" in error and error.count("\n") == 1
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- CARN stage 2 per condition
def test_carn_stage2_per_condition_trains_each_model_only_under_its_condition(tmp_path, reference_backend,
                                                                             monkeypatch):
    seen = []  # (training, condition pattern of the valid utterances) per forward
    forward = CARN.forward

    def spy(self, features, present, valid, **kwargs):
        patterns = {tuple(row) for row in present[valid].tolist()}
        seen.append((self.training, patterns))
        return forward(self, features, present, valid, **kwargs)

    monkeypatch.setattr(CARN, "forward", spy)
    splits = load_dataset("embedded", seed=0, dims="small", num_dialogues=(6, 2, 3))
    train_config = TrainConfig(epochs_stage1=1, epochs_stage2=2, batch_size=3, lr=1e-3, stage2="per-condition")
    result = carn.train.run_training(carn.train.DataSpec(), model_overrides={"hidden": 8, "num_heads": 2,
                                                                             "css_dim": 4},
                                     train_config=train_config, run_dir=tmp_path, splits=splits, make_plots=False,
                                     verbose=False, show_progress=False)
    assert train_config.epochs == 1 + 6 * 2 and result.completed_epochs == 13
    trained = [patterns for training, patterns in seen if training]
    steps = len(trained) // 13  # batches per epoch
    assert steps == 2 and len(trained) == 13 * steps
    assert all(patterns == {(True, True, True)} for patterns in trained[:steps])  # stage 1: full modalities
    for index, condition in enumerate(STAGE2_CONDITIONS):
        block = trained[steps * (1 + 2 * index): steps * (3 + 2 * index)]
        assert all(patterns == {CONDITIONS[condition]} for patterns in block), condition
    # Table 1 is assembled from the six models, each tested under its own condition
    manager = CheckpointManager(tmp_path / "checkpoints")
    stage1 = manager.load(tmp_path / "checkpoints" / "stage1.pt")["model"]
    models = {}
    for index, condition in enumerate(CONDITION_ORDER):
        state = manager.load(tmp_path / "checkpoints" / stage2_checkpoint_name(condition))
        assert state["epoch"] == 1 + 2 * (index + 1)
        models[condition] = load_model(state, "cpu")
        assert not torch.equal(state["model"]["classifier.1.weight"], stage1["classifier.1.weight"])
    again = evaluate_conditions(models, splits.test, batch_size=3)
    assert again == result.results
    table = json.loads((tmp_path / "table1.json").read_text())
    assert "stage 2 per-condition" in table["title"]


def test_carn_stage2_models_start_from_the_stage1_model(tmp_path, reference_backend, monkeypatch):
    starts = []
    train_epoch = carn.train.train_epoch

    def spy(model, loader, optimizer, **kwargs):
        if kwargs["condition"] is not None:
            starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return train_epoch(model, loader, optimizer, **kwargs)

    monkeypatch.setattr(carn.train, "train_epoch", spy)
    splits = load_dataset("embedded", seed=0, dims="small", num_dialogues=(3, 1, 2))
    train_config = TrainConfig(epochs_stage1=1, epochs_stage2=1, batch_size=3, stage2="per-condition")
    carn.train.run_training(carn.train.DataSpec(), model_overrides={"hidden": 8, "num_heads": 2, "css_dim": 4},
                            train_config=train_config, run_dir=tmp_path, splits=splits, make_plots=False,
                            verbose=False, show_progress=False)
    stage1 = CheckpointManager(tmp_path / "checkpoints").load(tmp_path / "checkpoints" / "stage1.pt")["model"]
    assert len(starts) == 6
    for start in starts:
        assert all(torch.equal(start[k], stage1[k]) for k in stage1)


# ------------------------------------------------------------------------------------------ CaM-HG phase 3 rates
def test_camhg_phase3_optimizer_groups_use_the_reduced_rates():
    config = camhg_preset("iemocap4", hidden=16, heads=2)
    model = CaMHG(config, {"a": 4, "t": 5, "v": 3}, 4)
    groups = model.parameter_groups()
    optimizer = camhg.train.build_optimizer(model, 3, config)
    expected = [(config.p3_lr, groups["projector"] + groups["mining"]), (config.gen_lr, groups["generator"]),
                (config.gate_lr, groups["gate"])]
    assert len(optimizer.param_groups) == 3
    for group, (rate, params) in zip(optimizer.param_groups, expected):
        assert group["lr"] == rate and {id(p) for p in group["params"]} == {id(p) for p in params}
    assert config.p3_lr == 6.41e-5 and config.p3_lr < config.lr
    phase1 = camhg.train.build_optimizer(model, 1, config)
    assert [g["lr"] for g in phase1.param_groups] == [config.lr]
    old = camhg.train.build_optimizer(model, 3, camhg_preset("iemocap4", hidden=16, heads=2, p3_lr=None))
    assert old.param_groups[0]["lr"] == config.lr  # runs saved before the option keep the phase-1 rate
    for name in ("iemocap4", "iemocap6", "mosi", "mosei"):
        assert P3_LR_RANGE[0] <= CAMHG_PRESETS[name]["p3_lr"] <= P3_LR_RANGE[1]


# ------------------------------------------------------------------------------------------------- sentiment
def test_sign_cross_entropy_ignores_zero_labels_and_padding():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 2, generator=generator, requires_grad=True)
    labels = torch.tensor([[1.2, 0.0, -0.4, 2.0, 0.0], [-3.0, 0.6, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    loss = sign_cross_entropy(logits, labels, valid)
    keep = valid & (labels != 0)
    expected = F.cross_entropy(logits[keep], (labels[keep] > 0).long())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep].abs().sum(-1) > 0)
    with pytest.raises(ValueError, match="logits must be"):
        sign_cross_entropy(logits[..., :1], labels, valid)
    empty = sign_cross_entropy(logits, torch.zeros_like(labels), valid)
    assert empty.item() == 0 and empty.requires_grad


def test_sentiment_metrics_of_sign_classes():
    rng = np.random.default_rng(0)
    y_true = np.round(rng.uniform(-3, 3, 50), 0)  # some zeros
    y_pred = rng.integers(0, 2, 50)
    metrics = sentiment_metrics(y_true, y_pred, scores=False)
    non_zero = y_true != 0
    assert metrics["Acc2"] == pytest.approx(100 * np.mean((y_true[non_zero] > 0) == (y_pred[non_zero] == 1)))
    assert math.isnan(metrics["MAE"]) and math.isnan(metrics["Corr"])
    scored = sentiment_metrics(y_true, np.where(y_pred == 1, 1.0, -1.0))
    assert scored["Acc2"] == metrics["Acc2"] and scored["F1"] == metrics["F1"]


def test_sentiment_ce_models_have_two_sign_logits(reference_backend):
    info = DatasetInfo("embedded-sentiment", "regression", 1, ["sentiment"], {"a": 4, "t": 5, "v": 3})
    config = model_config_for(info, "embedded-sentiment", hidden=8, num_heads=2, css_dim=4)
    assert config.sentiment_loss == "ce" and config.num_classes == 2 and not config.predicts_score
    regression = model_config_for(info, "embedded-sentiment", hidden=8, num_heads=2, css_dim=4,
                                  sentiment_loss="regression")
    assert regression.num_classes == 1 and regression.predicts_score
    features = {m: torch.randn(2, 3, d) for m, d in info.dims.items()}
    present, valid = torch.ones(2, 3, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    assert CARN(config)(features, present, valid).logits.shape == (2, 3, 2)
    assert CARN(regression)(features, present, valid).logits.shape == (2, 3)
    camhg_config = camhg_preset("embedded-sentiment")
    assert camhg_config.sentiment_loss == "ce" and camhg_config.num_outputs("regression", 1) == 2
    assert camhg_preset("mosei").sentiment_loss == "ce" and not camhg_config.predicts_score("regression")


# ------------------------------------------------------------------------------------ CARN options beyond the paper
@pytest.mark.parametrize("attention", ["causal_entmax", "vanilla"])
def test_strict_parents_context_has_no_diagonal_term(attention, reference_backend):
    torch.manual_seed(0)
    config = ModelConfig(dims={"a": 6, "t": 6, "v": 6}, num_classes=3, hidden=8, num_heads=2, css_dim=4,
                         dropout=0.0, attention=attention, css_context="strict")
    encoder = CausalCueEncoder(6, config).eval()
    h = torch.randn(2, 5, 8, dtype=torch.float32)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    _, strict, weights = encoder.causal_cue(h, valid)
    full_config = ModelConfig(**{**config.__dict__, "css_context": "full"})
    full_encoder = CausalCueEncoder(6, full_config).eval()
    full_encoder.load_state_dict(encoder.state_dict())
    _, full, _ = full_encoder.causal_cue(h, valid)
    diagonal = weights[:, 0].diagonal(dim1=-2, dim2=-1)  # A_ii, (B, L)
    assert (diagonal[:, 1:] > 0.05).any()  # the diagonal is there to be removed
    if attention == "causal_entmax":  # the paper's context is ctx_i = sum_{j<=i} A_ij h_j: strict = full - A_ii h_i
        torch.testing.assert_close(strict, full - diagonal[..., None] * h, atol=1e-5, rtol=1e-5)
    assert torch.all(strict[:, 0] == 0)  # the first step has no parents
    manual = torch.stack([torch.stack([sum((weights[b, 0, i, j] * h[b, j] for j in range(i)), torch.zeros(8))
                                       for i in range(5)]) for b in range(2)])
    torch.testing.assert_close(strict, manual)


def test_causal_encoders_ignore_future_utterances(reference_backend):
    torch.manual_seed(0)
    config = ModelConfig(dims={"a": 4, "t": 5, "v": 3}, num_classes=3, hidden=8, num_heads=2, css_dim=4,
                         dropout=0.0, encoder_mask="causal")
    model = CARN(config).eval()
    features = {m: torch.randn(1, 6, d) for m, d in config.dims.items()}
    present, valid = torch.ones(1, 6, 3, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)
    changed = {m: x.clone() for m, x in features.items()}
    for x in changed.values():
        x[:, 4:] += 5.0
    with torch.no_grad():
        before, after = model(features, present, valid), model(changed, present, valid)
        torch.testing.assert_close(before.logits[:, :4], after.logits[:, :4])
        torch.testing.assert_close(before.reconstruction["a"][:, :4], after.reconstruction["a"][:, :4])
        assert not torch.allclose(before.logits[:, 4:], after.logits[:, 4:])
        whole = CARN(ModelConfig(**{**config.__dict__, "encoder_mask": "none"})).eval()
        whole.load_state_dict(model.state_dict())
        assert not torch.allclose(whole(features, present, valid).logits[:, :4],
                                  whole(changed, present, valid).logits[:, :4])
