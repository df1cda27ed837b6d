"""CaM-HG end to end: no future leakage, the curriculum's freezing, training, exact resume, torchrun, backends."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import camhg.ablations as camhg_ablations
import camhg.evaluate as camhg_evaluate
import camhg.train as camhg_train
from camhg import ABLATIONS, CaMHG, CaMHGConfig, preset
from camhg.ablations import sweep
from camhg.model import GATE_BIAS_INIT, PHASES
from mer.cli import UserError
from mer.metrics import ResultTable
from mer.training import CheckpointManager, NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
DIMS = {"a": 6, "t": 9, "v": 5}
TINY_DATA = {"dims": "small", "num_dialogues": (6, 2, 3)}


def tiny_config(**overrides) -> CaMHGConfig:
    """A model small enough for the CPU: d = 16, 2 heads, 1 epoch per phase, the embedded dataset's small dims."""
    values = dict(hidden=16, heads=2, epochs=(1, 1, 1), batch_size=4, dataset_options=TINY_DATA,
                  missing_rates=(0.0, 0.5))
    return preset("embedded", **{**values, **overrides})


def random_inputs(batch=2, length=7, generator=None):
    g = generator or torch.Generator().manual_seed(0)
    features = {m: torch.randn(batch, length, d, generator=g) for m, d in DIMS.items()}
    present = torch.rand(batch, length, 3, generator=g) > 0.4
    present[..., 0] |= ~present.any(-1)  # at least one modality per utterance, like the data layer
    speakers = torch.randint(0, 2, (batch, length), generator=g)
    return features, present, speakers


# ------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("phase", PHASES, ids=lambda p: f"phase{p}")
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_no_future_leakage(reference_backend, ablation, phase):
    """The outputs for utterances <= t do not move when anything about utterances > t changes."""
    torch.manual_seed(0)
    model = CaMHG(tiny_config(ablation=ablation), DIMS, num_classes=4).eval()
    model.set_phase(phase)
    features, present, speakers = random_inputs()
    t = 3
    changed_features = {m: x.clone() for m, x in features.items()}
    for x in changed_features.values():
        x[:, t + 1:] = torch.randn_like(x[:, t + 1:]) * 5
    changed_present, changed_speakers = present.clone(), speakers.clone()
    changed_present[:, t + 1:] = ~present[:, t + 1:] | torch.tensor([True, False, False])
    changed_speakers[:, t + 1:] = 1 - speakers[:, t + 1:]
    with torch.no_grad():
        before = model(features, present, speakers)
        after = model(changed_features, changed_present, changed_speakers)
    compared = 0
    for name in ("logits", "restored", "gate"):
        x, y = getattr(before, name), getattr(after, name)
        if x is None:
            continue
        compared += 1
        torch.testing.assert_close(x[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6, msg=f"{name} leaks the future")
        assert not torch.allclose(x[:, t + 1:], y[:, t + 1:]), f"{name} ignores the changed utterances"
    assert compared >= 1


def test_phase_switching_freezes_and_sets_gate_bias():
    model = CaMHG(tiny_config(), DIMS, num_classes=4)
    groups = model.parameter_groups()
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))  # every parameter in one group
    expected = {1: {"projector", "mining"}, 2: {"generator"}, 3: {"projector", "generator", "gate", "mining"}}
    for phase in PHASES:
        model.set_phase(phase)
        for name, params in groups.items():
            assert all(p.requires_grad == (name in expected[phase]) for p in params), (phase, name)
        if phase == 2:
            with torch.no_grad():
                model.gate[-1].bias.fill_(0.7)  # what training the gate elsewhere would leave behind
    assert torch.all(model.gate[-1].bias == GATE_BIAS_INIT)  # entering phase 3 reset it (Algorithm 1 line 25)
    with torch.no_grad():
        model.gate[-1].bias.fill_(0.7)
    model.set_phase(3)  # staying in phase 3 keeps what training learnt
    assert torch.all(model.gate[-1].bias == 0.7)
    with pytest.raises(ValueError, match="phase must be one of"):
        model.set_phase(4)


def test_training_step_lowers_the_loss(reference_backend):
    """A few AdamW steps on one batch in phase 3 lower L_task + lambda (1 + eta) L_rec."""
    from mer.data import load_dataset, collate_dialogues

    torch.manual_seed(0)
    config = tiny_config(dropout=0.0, rdrop_alpha=0.0, lr=1e-2, gen_lr=1e-2, gate_lr=1e-2, p3_lr=1e-2)
    splits = load_dataset("embedded", seed=0, **TINY_DATA)
    model = CaMHG(config, splits.info.dims, splits.info.num_classes)
    model.set_phase(3)
    optimizer = camhg_train.build_optimizer(model, 3, config)
    batch = collate_dialogues(splits.train.dialogues[:3])
    present, eta = camhg_train.camhg_training_mask(batch, torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss, parts, _ = camhg_train.phase_loss(model, batch, present, eta, 3, config, splits.info, rdrop=False)
        assert set(parts) >= {"task", "rec"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(lambda m, f, p, s: m({k: v for k, v in f.items() if k != "t"}, p, s), ValueError,
                     "features must have exactly the keys", id="missing-modality"),
        pytest.param(lambda m, f, p, s: m({**f, "a": f["a"][..., :-1]}, p, s), ValueError,
                     r"features\['a'\] has shape .* dims\['a'\] = 6", id="wrong-feature-size"),
        pytest.param(lambda m, f, p, s: m(f, p.float(), s), TypeError, "present must be a bool tensor", id="present-float"),
        pytest.param(lambda m, f, p, s: m(f, p[..., :2], s), ValueError, "present must have shape", id="present-2-mods"),
        pytest.param(lambda m, f, p, s: m(f, p, s + 2), ValueError, "speakers must be in", id="speaker-range"),
        pytest.param(lambda m, f, p, s: m(f, p, s[:, :-1]), ValueError, "speakers must have shape", id="speaker-shape"),
        pytest.param(lambda m, f, p, s: m(list(f.values()), p, s), TypeError, "features must be a dict",
                     id="features-list"),
    ],
)
def test_bad_model_input(reference_backend, call, error, match):
    model = CaMHG(tiny_config(), DIMS, num_classes=4)
    with pytest.raises(error, match=match):
        call(model, *random_inputs())


def test_bad_configuration(tmp_path):
    with pytest.raises(ValueError, match="ablation must be one of"):
        tiny_config(ablation="no_everything")
    with pytest.raises(ValueError, match="must be a positive multiple of heads"):
        tiny_config(hidden=18, heads=4)
    with pytest.raises(ValueError, match="epochs must be three"):
        tiny_config(epochs=(1, 1))
    with pytest.raises(ValueError, match="end in phase 2"):
        tiny_config(epochs=(1, 1, 0))
    with pytest.raises(ValueError, match="must be a positive multiple of heads"):
        tiny_config(heads=0)
    with pytest.raises(ValueError, match="dataset must be one of"):
        preset("imdb")
    with pytest.raises(ValueError, match="dims must give a feature size"):
        CaMHG(tiny_config(), {"a": 3, "t": 4}, num_classes=4)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        camhg_train.train(None, run_dir=tmp_path, resume=True)
    with pytest.raises(SystemExit):
        camhg_train.parse_args(["--dataset", "imdb"])
    assert camhg_train.cli(["--data-root", str(tmp_path), "--no-progress"]) == 2  # embedded data has no root
    with pytest.raises(SystemExit):  # a resumed run keeps its configuration: a new one would be silently ignored
        camhg_train.parse_args(["--resume", str(tmp_path), "--epochs", "1", "1", "1"])


def test_triton_backend_matches_reference(triton_backend):
    """The model on the Triton kernels (the interpreter on CPU) equals the reference path, forward and backward."""
    from kernels import use_backend

    torch.manual_seed(0)
    model = CaMHG(tiny_config(hidden=8, heads=2, extractor_layers=1, hypergraph_layers=1, expert_hidden=8),
                  DIMS, num_classes=3).eval()
    features, present, speakers = random_inputs(batch=2, length=5)
    outputs = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with use_backend(backend):
            try:
                out = model(features, present, speakers)
            except NotImplementedError as error:  # a placeholder op of the kernel package, not a failure of ours
                pytest.skip(f"Triton kernel not available yet: {error}")
            (out.logits.square().sum() + out.restored.square().sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        outputs[backend] = (out.logits.detach(), out.restored.detach(), grads)
    (ref_logits, ref_restored, ref_grads), (tri_logits, tri_restored, tri_grads) = outputs.values()
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tri_restored, ref_restored, rtol=1e-4, atol=1e-4)
    assert tri_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], rtol=1e-3, atol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_short_run_beats_chance(reference_backend, tmp_path):
    config = tiny_config(hidden=32, heads=4, epochs=(3, 1, 3), batch_size=4, lr=3e-3, gen_lr=1e-3,
                         dropout=0.1, dataset_options={"dims": "small", "num_dialogues": (16, 2, 6)})
    result = camhg_train.train(config, run_dir=tmp_path / "run", plots=False, show_progress=False)
    rates = result.tables["missing_rates"]
    # chance: 25 % WA on 4 balanced classes; UA rules out predicting the majority class everywhere
    assert rates.rows["WA"]["0.0"] > 40.0 and rates.rows["UA"]["0.0"] > 35.0, rates.to_markdown()
    for name in ("missing_rates.md", "missing_rates.json", "missing_rates.csv", "conditions.json", "metrics.csv"):
        assert (tmp_path / "run" / name).is_file(), name


def test_resume_equals_uninterrupted_run_and_evaluate_cli(reference_backend, tmp_path):
    config = tiny_config(epochs=(1, 1, 2))
    whole = camhg_train.train(config, run_dir=tmp_path / "whole", evaluate=False, show_progress=False)
    stopped = camhg_train.train(config, run_dir=tmp_path / "split", evaluate=False, show_progress=False,
                                stop_after_epoch=3)  # killed inside phase 3: its optimizer and schedule resume
    assert CheckpointManager(tmp_path / "split" / "checkpoints").latest()["epoch"] == 3  # counted from 1
    with pytest.raises(FileExistsError, match="already holds a run"):  # a fresh run never writes over a run
        camhg_train.train(config, run_dir=tmp_path / "split", evaluate=False, show_progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(stopped.model.state_dict().values(),
                                                      whole.model.state_dict().values()))
    resumed = camhg_train.train(None, run_dir=tmp_path / "split", resume=True, evaluate=False, show_progress=False)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"

    checkpoint = tmp_path / "split" / "checkpoints" / "last.pt"
    assert camhg_evaluate.main([str(checkpoint), "--out", str(tmp_path / "eval"), "--no-plots"]) == 0
    for name in ("missing_rates.md", "conditions.csv"):
        assert (tmp_path / "eval" / name).is_file(), name


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(reference_backend, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    camhg_train.train(tiny_config(epochs=(2, 0, 0)), run_dir=run_dir, evaluate=False, show_progress=False,
                      stop_after_epoch=1)
    good = CheckpointManager(run_dir / "checkpoints").latest()
    monkeypatch.setattr(camhg_train, "task_loss", lambda *args: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at phase 1, epoch 2, step 1"):
        camhg_train.train(None, run_dir=run_dir, resume=True, evaluate=False, show_progress=False)
    kept = CheckpointManager(run_dir / "checkpoints").latest()
    assert kept["epoch"] == good["epoch"] == 1
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])
    assert camhg_train.main(["--resume", str(run_dir), "--no-progress"]) == 1
    assert "training stopped: non-finite loss" in capsys.readouterr().err


def test_ablation_sweep_writes_mean_and_spread(reference_backend, tmp_path, monkeypatch):
    arguments = dict(overrides=dict(hidden=16, heads=2, epochs=(1, 1, 1), batch_size=4, dataset_options=TINY_DATA,
                                    missing_rates=(0.0, 0.5)),
                     runs_dir=tmp_path / "runs", out_dir=tmp_path / "results")
    summary = sweep("embedded", [0, 1], ["full", "no_imputation"], **arguments)
    assert list(summary.rows) == ["CaM-HG (full)", "w/o imputation (I)"]
    assert summary.columns == ["0.0", "0.5", "Average"]
    assert all("±" in cell for row in summary.rows.values() for cell in row.values())
    for suffix in ("md", "json", "csv"):
        assert (tmp_path / "results" / f"ablations_embedded.{suffix}").is_file()
    # the variant's average against the full model over the two seeds, from the per-seed tables beside it
    per_seed = [ResultTable.load(tmp_path / "results" / f"ablations_embedded_seed{seed}.json") for seed in (0, 1)]
    differences = ResultTable.load(tmp_path / "results" / "ablations_embedded_differences.json")
    assert list(differences.rows) == ["w/o imputation (I)"] and "over 2 + 2 runs" in differences.title
    expected = np.mean([t.rows["w/o imputation (I)"]["Average"] - t.rows["CaM-HG (full)"]["Average"] for t in per_seed])
    assert float(differences.rows["w/o imputation (I)"]["Average difference"]) == pytest.approx(expected, abs=0.005)
    # a rerun reuses the finished runs (no training: the model cannot be built) and gives the same table
    monkeypatch.setattr(camhg_ablations, "train", lambda *args, **kwargs: pytest.fail("retrained a finished run"))
    assert sweep("embedded", [0, 1], ["full", "no_imputation"], **arguments).rows == summary.rows
    # a finished run of another configuration is never mistaken for this one
    arguments["overrides"] = dict(arguments["overrides"], hidden=8)
    with pytest.raises(UserError, match="another configuration"):
        sweep("embedded", [0], ["full"], **arguments)


@pytest.mark.slow
def test_torchrun_two_processes_train(tmp_path):
    """2 processes, gloo on CPU: DDP trains, rank 0 alone writes the checkpoint and the tables."""
    with socket.socket() as probe:  # torchrun's --master-port 0 does not work with its static rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "KERNELS_BACKEND": "reference", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
              "-m", "camhg.train", "--no-plots", "--no-progress"]
    configuration = ["--dims", "small", "--num-dialogues", "4", "1", "1", "--epochs", "1", "1", "1", "--hidden", "16",
                     "--batch-size", "2", "--runs-dir", str(tmp_path)]
    def torchrun(*arguments):
        done = subprocess.run(launch + list(arguments), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=90)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "find_unused_parameters" not in done.stderr  # DDP's warning: every trained parameter gets a gradient

    torchrun(*configuration, "--run-name", "ddp")
    run_dir = tmp_path / "camhg" / "embedded" / "ddp"
    state = CheckpointManager(run_dir / "checkpoints").latest()
    assert state["epoch"] == 3 and state["phase"] == 3 and len(state["rank_states"]) == 2
    assert (run_dir / "missing_rates.json").is_file()
    # killed after phase 2 and resumed by 2 processes: each rank gets its own random streams back
    torchrun(*configuration, "--run-name", "split", "--stop-after-epoch", "2")
    torchrun("--resume", str(tmp_path / "camhg" / "embedded" / "split"))
    resumed = CheckpointManager(tmp_path / "camhg" / "embedded" / "split" / "checkpoints").latest()
    assert all(torch.equal(resumed["model"][k], state["model"][k]) for k in state["model"])
