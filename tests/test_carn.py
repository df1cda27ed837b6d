"""CARN end to end: the model's shapes and masks, causality of the causal-cue encoder, the losses, the two training
stages, exact resume, the Triton backend against the reference, bad inputs and NaN-loss handling.

Training tests run on the ``reference_backend`` at tiny sizes; only the backend-equivalence test runs the Triton
interpreter.
"""
from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch

from carn.config import ABLATIONS, ModelConfig, TrainConfig
from carn.losses import causal_self_supervised_loss, reconstruction_loss, stage_losses
from carn.model import CARN
from carn.train import DataSpec, run_training
from mer.data import MODALITIES, DatasetInfo, DialogueDataset, Dialogue, collate_dialogues, load_dataset
from mer.missing import batch_missing_mask
from mer.training import CheckpointManager, NonFiniteLossError, load_checkpoint

DIMS = {"a": 6, "t": 8, "v": 5}


def tiny_config(**overrides) -> ModelConfig:
    values = dict(dims=DIMS, num_classes=4, hidden=8, num_heads=2, css_dim=4, dropout=0.0)
    return ModelConfig(**{**values, **overrides})


def random_inputs(lengths=(7, 4, 1), seed=0, dims=DIMS):
    """Right-padded random features, all modalities present at valid positions; labels -1 at padding."""
    generator = torch.Generator().manual_seed(seed)
    b, l = len(lengths), max(lengths)
    valid = torch.arange(l)[None, :] < torch.tensor(lengths)[:, None]
    features = {m: torch.randn(b, l, d, generator=generator) * valid[..., None] for m, d in dims.items()}
    present = valid[..., None].expand(b, l, 3).clone()
    labels = torch.randint(0, 4, (b, l), generator=generator).masked_fill(~valid, -1)
    return features, present, valid, labels


# ----------------------------------------------------------------------------------------------------------
# Model: shapes, masks, causality
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, num_classes, ablation",
    [pytest.param("classification", 4, name, id=f"classification-{name}") for name in ABLATIONS]
    + [pytest.param("regression", 1, "full", id="regression-full")],
)
def test_output_shapes(reference_backend, task, num_classes, ablation):
    config = tiny_config(task=task, num_classes=num_classes, **ABLATIONS[ablation])
    features, present, valid, _ = random_inputs()
    out = CARN(config).eval()(features, present, valid, need_weights=True)
    b, l = valid.shape
    class_shape = (b, l) if task == "regression" else (b, l, num_classes)
    assert out.logits.shape == class_shape
    assert all(out.modality_logits[m].shape == class_shape for m in MODALITIES)
    assert all(out.reconstruction[m].shape == (b, l, DIMS[m]) for m in MODALITIES)
    assert set(out.css_prediction) == (set(MODALITIES) if config.uses_css else set())
    assert all(out.css_prediction[m].shape == (b, l, config.css_dim) for m in out.css_prediction)
    assert set(out.attention_weights) == (set(MODALITIES) if config.use_cce else set())
    for weights in out.attention_weights.values():
        assert weights.shape == (b, l, l)
        torch.testing.assert_close(weights.sum(-1), torch.ones(b, l))  # rows are distributions
    assert torch.isfinite(out.logits).all()  # padded rows too


def test_absent_and_padded_features_do_not_matter(reference_backend):
    """Whatever sits in an absent modality or at padding leaves every valid output unchanged."""
    model = CARN(tiny_config()).eval()
    features, present, valid, _ = random_inputs()
    present[0, 2:5, 1] = False  # text absent at three utterances of dialogue 0
    present[1, :, 0] = False  # audio absent in dialogue 1
    reference = model(features, present, valid)
    garbage = {m: x + 100.0 * torch.randn_like(x) * ~(present[..., i] & valid)[..., None]
               for i, (m, x) in enumerate(features.items())}
    changed = model(garbage, present, valid)
    torch.testing.assert_close(changed.logits[valid], reference.logits[valid])
    for m in MODALITIES:
        torch.testing.assert_close(changed.reconstruction[m][valid], reference.reconstruction[m][valid])


@pytest.mark.parametrize("attention, causal", [
    pytest.param("causal_entmax", True, id="causal-entmax"),
    pytest.param("vanilla", False, id="vanilla-softmax-sees-the-future"),
])
def test_causal_cue_at_step_t_ignores_later_steps(reference_backend, attention, causal):
    encoder = CARN(tiny_config(attention=attention)).encoders["t"].eval()
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, 8, generator=generator)
    valid = torch.ones(2, 9, dtype=torch.bool)
    f, context, _ = encoder.causal_cue(h, valid)
    for t in (0, 4, 7):
        later = h.clone()
        later[:, t + 1:] = torch.randn(2, 9 - t - 1, 8, generator=generator)
        f_later, context_later, _ = encoder.causal_cue(later, valid)
        unchanged = torch.allclose(f_later[:, : t + 1], f[:, : t + 1], atol=1e-6) and torch.allclose(
            context_later[:, : t + 1], context[:, : t + 1], atol=1e-6)
        assert unchanged == causal, f"step {t}"


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["infonce", "mse"])
def test_css_loss_counts_valid_positions_only(kind):
    generator = torch.Generator().manual_seed(2)
    p, g = torch.randn(2, 6, 4, generator=generator), torch.randn(2, 6, 4, generator=generator)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    loss = causal_self_supervised_loss(p, g, valid, kind=kind, temperature=0.5)
    noisy = causal_self_supervised_loss(p + 50 * ~valid[..., None], g - 50 * ~valid[..., None], valid,
                                        kind=kind, temperature=0.5)
    torch.testing.assert_close(noisy, loss)
    pv, gv = p[valid], g[valid]
    if kind == "infonce":  # eq. 17 written out with cosine similarities
        sim = torch.nn.functional.cosine_similarity(pv[:, None], gv[None], dim=-1) / 0.5
        expected = -(sim.diagonal() - sim.logsumexp(dim=1)).mean()
    else:
        expected = ((pv - gv) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_reconstruction_loss_only_on_missing_valid_parts():
    features, present, valid, _ = random_inputs()
    present[0, 1:3, 2] = False
    present = present & valid[..., None]
    reconstruction = {m: torch.randn_like(x) for m, x in features.items()}
    loss = reconstruction_loss(reconstruction, features, present, valid)
    observed = ~(valid[..., None] & ~present)  # positions the loss must ignore
    shifted = {m: r + 9.0 * observed[..., i, None] for i, (m, r) in enumerate(reconstruction.items())}
    torch.testing.assert_close(reconstruction_loss(shifted, features, present, valid), loss)
    missing = valid & ~present[..., 2]
    torch.testing.assert_close(loss, ((reconstruction["v"][missing] - features["v"][missing]) ** 2).mean())


# ----------------------------------------------------------------------------------------------------------
# Training: one step, stages, a short run, exact resume, NaN loss
# ----------------------------------------------------------------------------------------------------------
def _tiny_batch(seed=0):
    """A collated batch of 4 random dialogues (labels tied to the features, so that there is something to learn)."""
    rng = np.random.default_rng(seed)
    dialogues = []
    for index, length in enumerate((9, 6, 4, 1)):
        labels = rng.integers(0, 4, length)
        features = {m: (rng.normal(size=(length, d)) + labels[:, None]).astype(np.float32) for m, d in DIMS.items()}
        dialogues.append(Dialogue(f"d{index}", features, rng.integers(0, 2, length), labels))
    info = DatasetInfo("tiny", "classification", 4, ["c0", "c1", "c2", "c3"], dict(DIMS))
    return collate_dialogues(dialogues), info


@pytest.mark.parametrize("stage", [1, 2])
def test_training_steps_lower_the_loss(reference_backend, stage):
    torch.manual_seed(0)
    full, _ = _tiny_batch()
    model_config = tiny_config(hidden=16, css_dim=8)
    train_config = TrainConfig(epochs_stage1=1, epochs_stage2=1)
    model = CARN(model_config)
    model.set_stage(stage)
    observed = full if stage == 1 else full.with_present(batch_missing_mask(full, 0.5, 0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        terms = stage_losses(model(observed.features, observed.present, observed.valid), full, observed, stage,
                             model_config, train_config)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_stage_switching_freezes_the_right_parameters(reference_backend):
    full, _ = _tiny_batch()
    model_config = tiny_config(dropout=0.5)
    model = CARN(model_config)
    stage1 = {"encoders", "modality_heads"}
    stage2 = {"encoders", "fusion", "classifier", "decoder", "decoder_head"}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for stage, trained in ((1, stage1), (2, stage2)):
        model.set_stage(stage)
        for name, parameter in model.named_parameters():
            expected = name.split(".")[0] in trained and ".css_target." not in name
            if ".css_predictor." in name:
                expected = stage == 1
            assert parameter.requires_grad == expected, (stage, name)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        observed = full if stage == 1 else full.with_present(batch_missing_mask(full, 0.5, 0))
        terms = stage_losses(model(observed.features, observed.present, observed.valid), full, observed, stage,
                             model_config, TrainConfig())
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        for name, parameter in model.named_parameters():
            moved = not torch.equal(parameter, before[name])
            if not parameter.requires_grad:
                assert not moved, (stage, name)
        assert not torch.equal(model.encoders["a"].input_proj.weight, before["encoders.a.input_proj.weight"])


@pytest.fixture(scope="module")
def small_embedded():
    return load_dataset("embedded", dims="small", num_dialogues=(32, 4, 10), seed=0)


@pytest.fixture(scope="module")
def tiny_embedded(small_embedded):
    """A few dialogues and no valid split (no per-epoch validation): for the checkpoint tests."""
    train = DialogueDataset(small_embedded.train.dialogues[:6], small_embedded.info)
    return dataclasses.replace(small_embedded, train=train, valid=None)


TINY_MODEL = {"hidden": 16, "num_heads": 2, "css_dim": 8}


@pytest.mark.slow
def test_short_run_beats_chance(reference_backend, small_embedded, tmp_path):
    # Seeds 0-2 reach WA 48-50 % and UA 37-39 % here (majority-class WA 38.6 %, chance UA 25 %).
    config = TrainConfig(epochs_stage1=3, epochs_stage2=8, batch_size=4, lr=5e-3)
    result = run_training(DataSpec("embedded", dataset_options={"dims": "small"}), model_overrides=TINY_MODEL,
                          train_config=config, run_dir=tmp_path, splits=small_embedded, show_progress=False,
                          make_plots=False, verbose=False)
    labels = np.concatenate([d.labels for d in small_embedded.test.dialogues])
    majority = 100.0 * np.bincount(labels).max() / len(labels)  # WA of always answering the commonest class
    table = result.table.to_markdown()
    assert result.results["Average"]["WA"] > majority + 5, (majority, table)
    assert result.results["Average"]["UA"] > 100.0 / small_embedded.info.num_classes + 5, table
    assert (tmp_path / "table1.md").exists() and (tmp_path / "metrics.csv").exists()


def test_stop_and_resume_equals_uninterrupted_run(reference_backend, tiny_embedded, tmp_path):
    config = TrainConfig(epochs_stage1=1, epochs_stage2=2, batch_size=4, lr=1e-3)
    common = dict(model_overrides=TINY_MODEL, train_config=config, splits=tiny_embedded, show_progress=False,
                  make_plots=False, verbose=False)
    data = DataSpec("embedded", dataset_options={"dims": "small"})
    whole = run_training(data, run_dir=tmp_path / "whole", **common)
    stopped = run_training(data, run_dir=tmp_path / "resumed", stop_after_epoch=2, **common)
    assert stopped.completed_epochs == 2 and stopped.results is None
    resumed = run_training(data, run_dir=tmp_path / "resumed", resume=True, **common)
    whole_state, resumed_state = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)
    assert resumed.results == whole.results
    def logged(run):  # metrics.csv without the wall-clock column
        with open(tmp_path / run / "metrics.csv", newline="") as file:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]

    assert len(logged("resumed")) == 3 and logged("resumed") == logged("whole")  # 3 epochs, none duplicated


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(reference_backend, tiny_embedded, tmp_path, monkeypatch):
    import carn.train

    real = carn.train.stage_losses

    def poisoned(output, full, observed, stage, *args):
        terms = real(output, full, observed, stage, *args)
        if stage == 2:  # the first epoch (stage 1) goes well, then the loss turns NaN
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(carn.train, "stage_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 step 0 \(stage 2\).*epoch_001\.pt holds the weights"):
        run_training(DataSpec("embedded"), model_overrides=TINY_MODEL, splits=tiny_embedded, run_dir=tmp_path,
                     train_config=TrainConfig(epochs_stage1=1, epochs_stage2=1, batch_size=8), show_progress=False,
                     make_plots=False, verbose=False)
    state = CheckpointManager(tmp_path / "checkpoints").latest()
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_diverging_run_stops_with_the_non_finite_loss_message(reference_backend, tiny_embedded, tmp_path):
    # a learning rate of 1e12 sends the weights to inf within two steps; the entmax reference must give NaN rows
    # (not crash), so that the loss check names where training diverged
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at epoch 1 step \d+ \(stage 1\)"):
        run_training(DataSpec("embedded"), model_overrides=TINY_MODEL, splits=tiny_embedded, run_dir=tmp_path,
                     train_config=TrainConfig(epochs_stage1=1, epochs_stage2=0, batch_size=2, lr=1e12, grad_clip=0.0),
                     show_progress=False, make_plots=False, verbose=False)


def test_checkpoint_with_separate_attention_projections_loads(reference_backend, tmp_path):
    """A checkpoint whose causal-cue attention holds separate q_proj, k_proj, v_proj (earlier versions) passes the
    restricted loader (``mer.training.load_checkpoint``), loads strictly into the fused ``qkv_proj`` and the model
    then computes what the one it was saved from computes."""
    torch.manual_seed(0)
    model = CARN(tiny_config()).eval()
    old = {}
    for key, value in model.state_dict().items():
        if ".attention.qkv_proj." in key:  # [W_q; W_k; W_v] of one head: three equal parts
            prefix, name = key.split("qkv_proj.")
            old.update({f"{prefix}{proj}.{name}": part.clone() for proj, part in
                        zip(("q_proj", "k_proj", "v_proj"), value.chunk(3))})
        else:
            old[key] = value
    assert sum(".q_proj." in key for key in old) == 2 * len(MODALITIES) and not any("qkv" in key for key in old)
    path = tmp_path / "old.pt"
    torch.save({"model": old}, path)
    torch.manual_seed(1)
    loaded = CARN(tiny_config()).eval()
    loaded.load_state_dict(load_checkpoint(path, required=("model",))["model"])
    features, present, valid, _ = random_inputs()
    with torch.no_grad():
        want, got = model(features, present, valid), loaded(features, present, valid)
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
    for m in MODALITIES:
        torch.testing.assert_close(got.css_prediction[m], want.css_prediction[m], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Backends and bad inputs
# ----------------------------------------------------------------------------------------------------------
def test_triton_backend_matches_reference(triton_backend):
    from kernels import use_backend

    torch.manual_seed(0)
    model = CARN(tiny_config())
    features, present, valid, labels = random_inputs(lengths=(5, 3))
    present[0, 1, 0] = False

    def run():
        model.zero_grad()
        out = model(features, present, valid, need_weights=True)
        loss = (out.logits.square().mean() + sum(out.css_prediction[m].square().mean() for m in MODALITIES)
                + sum(out.reconstruction[m].square().mean() for m in MODALITIES))
        loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused_out, fused_grads = run()
    with use_backend("reference"):
        reference_out, reference_grads = run()
    tolerance = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused_out.logits, reference_out.logits, **tolerance)
    for m in MODALITIES:
        torch.testing.assert_close(fused_out.css_prediction[m], reference_out.css_prediction[m], **tolerance)
        torch.testing.assert_close(fused_out.attention_weights[m], reference_out.attention_weights[m], **tolerance)
    assert fused_grads.keys() == reference_grads.keys()
    for name in reference_grads:
        torch.testing.assert_close(fused_grads[name], reference_grads[name], **tolerance, msg=name)


def _bad(features, present, valid, kind):
    features = dict(features)
    if kind == "wrong-dim":
        features["t"] = torch.zeros(*valid.shape, DIMS["t"] + 1)
    elif kind == "missing-key":
        del features["v"]
    elif kind == "nan":
        features["a"] = features["a"].clone()
        features["a"][0, 0, 0] = float("nan")
    elif kind == "no-modality":
        present = present.clone()
        present[1, 2] = False
    elif kind == "mask-dtype":
        present = present.float()
    elif kind == "valid-gap":  # a padded step before a valid one: not right padding
        valid = valid.clone()
        valid[0, 2] = False
    elif kind == "features-list":
        features = [features[m] for m in MODALITIES]
    return features, present, valid


@pytest.mark.parametrize("kind, error, match", [
    pytest.param("wrong-dim", ValueError, r"features\['t'\] has shape .* dims\['t'\] = 8", id="feature-size"),
    pytest.param("missing-key", ValueError, r"features must have exactly the keys", id="missing-modality-key"),
    pytest.param("features-list", TypeError, r"features must be a dict", id="features-not-a-dict"),
    pytest.param("valid-gap", ValueError, r"valid must mark a non-empty prefix", id="valid-not-a-prefix"),
    pytest.param("nan", ValueError, r"features\['a'\] contains NaN", id="nan-features"),
    pytest.param("no-modality", ValueError, r"no modality present", id="mask-without-modality"),
    pytest.param("mask-dtype", TypeError, r"present must be a bool tensor", id="mask-dtype"),
])
def test_bad_inputs_raise_clear_errors(reference_backend, kind, error, match):
    model = CARN(tiny_config())
    with pytest.raises(error, match=match):
        model(*_bad(*random_inputs()[:3], kind))


@pytest.mark.parametrize("field, value, match", [
    pytest.param("css", "l1", r"css must be one of", id="css-kind"),
    pytest.param("attention", "linear", r"attention must be one of", id="attention-kind"),
    pytest.param("num_heads", 3, r"num_heads=3 must divide hidden=8", id="heads"),
    pytest.param("dims", {"a": 3, "t": 4}, r"dims must map 'a', 't', 'v'", id="dims"),
    pytest.param("task", "regression", r"num_classes must be 1 for regression", id="regression-classes"),
])
def test_bad_configs_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_ablation_command_writes_tables_and_differences(reference_backend, tmp_path, capsys):
    """Table 2 over two seeds, and each variant's averages against the full model (Welch's t-test) beside it."""
    import carn.ablations
    from mer.metrics import ResultTable

    argv = ["--dims", "small", "--num-dialogues", "4", "1", "2", "--hidden", "8", "--batch-size", "2", "--epochs",
            "1", "1", "--seeds", "0", "1", "--ablations", "full", "no_cce", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "results"), "--no-progress"]
    assert carn.ablations.cli(argv) == 0
    table2 = ResultTable.load(tmp_path / "results" / "table2.json")
    differences = ResultTable.load(tmp_path / "results" / "table2_differences.json")
    (variant,) = differences.rows
    assert list(table2.rows) == ["CARN", variant] and "over 2 + 2 runs" in differences.title
    assert set(differences.columns) == {f"Average {metric} {part}" for metric in ("WA", "UA")
                                        for part in ("difference", "95 % CI", "p", "spreads")}
    for metric in ("WA", "UA"):
        means = [float(table2.rows[name][f"Average {metric}"].split(" ± ")[0]) for name in ("CARN", variant)]
        assert float(differences.rows[variant][f"Average {metric} difference"]) == pytest.approx(
            means[1] - means[0], abs=0.011)
    assert "Welch" in capsys.readouterr().out
