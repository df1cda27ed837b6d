"""Hostile and broken files and runs: crafted and corrupt checkpoints, crafted label pickles, resume fallback, stale
temporary files, run directories claimed by one process, and the loss guard that stops a non-finite or diverged loss (both models)."""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pathlib
import pickle
import time

import numpy as np
import pytest
import torch

import camhg.evaluate as camhg_evaluate
import camhg.train as camhg_train
import carn.evaluate as carn_evaluate
from camhg import preset
from carn.config import TrainConfig
from carn.train import DataSpec, run_training
from mer.data import load_dataset
from mer.training import (
    CheckpointError,
    CheckpointManager,
    DivergedLossError,
    LossGuard,
    NonFiniteLossError,
    RunDirectoryInUseError,
    claim_run_directory,
    load_checkpoint,
)

TINY_CAMHG = dict(hidden=16, heads=2, epochs=(1, 1, 1), batch_size=4, missing_rates=(0.0, 0.5),
                  dataset_options={"dims": "small", "num_dialogues": (6, 2, 3)})


class _Planted:
    """Unpickling it would run ``function(*arguments)``: a crafted file's payload."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def _payloads(marker: pathlib.Path) -> dict:
    """Two ways a crafted file creates ``marker`` when fully unpickled: a shell command and a method call."""
    return {"os.system": _Planted(os.system, f"touch {marker}"), "Path.touch": _Planted(pathlib.Path.touch, marker)}


def _real_checkpoint(directory: pathlib.Path, epochs=(0,)) -> CheckpointManager:
    checkpoints = CheckpointManager(directory)
    for epoch in epochs:
        checkpoints.save({"model": {"weight": torch.full((2,), float(epoch))}}, epoch=epoch)
    return checkpoints


# ------------------------------------------------------------------------------------------ crafted checkpoints
@pytest.mark.parametrize("payload", ["os.system", "Path.touch"])
def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, payload):
    marker, control = tmp_path / "marker", tmp_path / "control"
    torch.save({"epoch": 0, "model": _payloads(control)[payload]}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # the payload works when the file is fully unpickled
    assert control.exists()

    crafted = tmp_path / "run" / "checkpoints" / "last.pt"
    crafted.parent.mkdir(parents=True)
    torch.save({"epoch": 0, "rng_state": {}, "model": _payloads(marker)[payload]}, crafted)
    with pytest.raises(CheckpointError, match=rf"{crafted}.* loading refuses"):
        load_checkpoint(crafted)
    with pytest.raises(CheckpointError, match="no intact checkpoint|loading refuses"):  # --resume
        camhg_train.train(None, run_dir=tmp_path / "run", resume=True, evaluate=False, show_progress=False)
    for evaluate in (camhg_evaluate.cli, carn_evaluate.cli):
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            assert evaluate([str(crafted)]) == 2
        assert "loading refuses" in stderr.getvalue() and str(crafted) in stderr.getvalue()
    assert not marker.exists()


def test_best_pt_beside_the_named_file_is_never_read(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    checkpoints = _real_checkpoint(tmp_path, epochs=(0,))
    torch.save({"best_metric": 1.0, "model": _payloads(marker)["os.system"]}, checkpoints.best_path)
    read = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: read.append(pathlib.Path(path))
                        or real_load(path, *args, **kwargs))

    named = checkpoints.epoch_path(0)
    assert torch.equal(CheckpointManager(tmp_path).load(named)["model"]["weight"], torch.zeros(2))
    assert load_checkpoint(named)["epoch"] == 0
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert camhg_evaluate.cli([str(named)]) == 2  # refused for lacking CaM-HG's keys, after reading that file alone
    assert "checkpoint lacks 'config'" in stderr.getvalue()
    assert set(read) == {named} and not marker.exists()
    with pytest.raises(CheckpointError, match=r"best\.pt.*loading refuses"):  # read when asked for, still safely
        CheckpointManager(tmp_path).best_metric
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- crafted label files
@pytest.mark.parametrize("payload, refused", [
    pytest.param(lambda marker: _Planted(os.system, f"touch {marker}"), f"{os.system.__module__}.system",
                 id="os.system"),
    pytest.param(lambda marker: _Planted(pathlib.Path.touch, marker), "__builtin__.getattr", id="Path.touch"),
    pytest.param(lambda marker: _Planted(eval, f"open({str(marker)!r}, 'w')"), "__builtin__.eval", id="eval"),
])
def test_crafted_label_file_is_refused_without_running_code(tmp_path, payload, refused):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload(control), protocol=2))  # fully unpickled, the payload works
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "CMUMOSI_features_raw_2way.pkl"
    with open(path, "wb") as handle:  # the payload inside a label file of the right layout
        pickle.dump([{"vid0": payload(marker)}, {}, {}, {}, set(), set(), set()], handle, protocol=2)
    with pytest.raises(ValueError, match=rf"{path}.*asks for {refused}.*refused"):
        load_dataset("mosi", tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ corrupt checkpoints
def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, reason", [
    pytest.param(_truncated, "not a readable checkpoint", id="truncated"),
    pytest.param(lambda p: p.write_bytes(np.random.default_rng(0).bytes(300)), "not a readable checkpoint",
                 id="garbage"),
    pytest.param(lambda p: p.write_bytes(b""), "not a readable checkpoint.*EOFError", id="empty"),
    pytest.param(lambda p: p.write_text("epoch: 3\n"), "not a readable checkpoint", id="text"),
    pytest.param(lambda p: torch.save([torch.ones(2)], p), "holds a list, not a checkpoint", id="list"),
    pytest.param(lambda p: torch.save({"weights": torch.ones(2)}, p), r"lacks \['epoch', 'rng_state'\]",
                 id="other-dict"),
    pytest.param(lambda p: torch.save({"epoch": 0, "rng_state": {"numpy": np.random.get_state()}}, p),
                 r"numpy.*multiarray\._reconstruct.*re-save it as docs/models.md says", id="older-version"),
])
def test_damaged_checkpoint_error_names_the_file_and_the_problem(tmp_path, damage, reason):
    checkpoints = _real_checkpoint(tmp_path, epochs=(0,))
    checkpoints.epoch_path(0).unlink()
    damage(checkpoints.last_path)
    with pytest.raises(CheckpointError, match=rf"{checkpoints.last_path}.*{reason}"):
        checkpoints.latest()


def test_evaluate_names_a_checkpoint_that_loads_but_builds_no_model(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"epoch": 0, "config": {}, "info": {"name": "embedded"}, "model": {}, "phase": 1}, path)
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert camhg_evaluate.cli([str(path)]) == 2
    assert f"{path} is not a usable camhg.train checkpoint: 'dims'" in stderr.getvalue()
    data = {"dataset": "embedded", "data_root": None, "data_seed": 0,
            "dataset_options": {"dims": "small", "num_dialogues": (2, 1, 1)}}
    torch.save({"epoch": 0, "model_config": {"hidden": 8}, "data": data, "model": {}}, path)
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert carn_evaluate.cli([str(path)]) == 2
    assert f"{path} is not a usable carn.train checkpoint" in stderr.getvalue()


def test_latest_falls_back_to_the_newest_intact_epoch_file_and_says_so(tmp_path, capsys):
    checkpoints = _real_checkpoint(tmp_path, epochs=(0, 1, 2))
    assert checkpoints.latest()["epoch"] == 2 and capsys.readouterr().err == ""
    _truncated(checkpoints.last_path)
    checkpoints.epoch_path(2).write_bytes(b"garbage")
    state = checkpoints.latest()
    assert state["epoch"] == 1 and torch.equal(state["model"]["weight"], torch.ones(2))
    said = capsys.readouterr().err
    assert "last.pt is not a readable" in said and "epoch_002.pt is not a readable" in said
    assert f"resuming from {checkpoints.epoch_path(1)} (epoch 1)" in said
    checkpoints.last_path.unlink()  # a missing last.pt falls back too
    assert checkpoints.latest()["epoch"] == 1 and "last.pt does not exist" in capsys.readouterr().err
    for epoch in (0, 1):
        _truncated(checkpoints.epoch_path(epoch))
    with pytest.raises(CheckpointError, match=rf"no intact checkpoint in {tmp_path}.*epoch_000\.pt"):
        checkpoints.latest()


def test_resume_falls_back_to_an_intact_epoch_file_and_removes_stale_temporaries(reference_backend, tmp_path,
                                                                                capsys):
    config = preset("embedded", **TINY_CAMHG)
    common = dict(evaluate=False, show_progress=False)
    whole = camhg_train.train(config, run_dir=tmp_path / "whole", **common)
    camhg_train.train(config, run_dir=tmp_path / "split", stop_after_epoch=2, **common)
    checkpoints = CheckpointManager(tmp_path / "split" / "checkpoints")
    _truncated(checkpoints.last_path)  # killed while the disk failed: last.pt and epoch 2 are damaged
    checkpoints.epoch_path(2).write_bytes(b"\0" * 64)
    stale = [checkpoints.directory / ".last.pt.k1ll3d.tmp", tmp_path / "split" / ".metrics.csv.tmp"]
    for path in stale:  # what a save killed midway leaves
        path.write_bytes(b"half a file")
    capsys.readouterr()

    resumed = camhg_train.train(None, run_dir=tmp_path / "split", resume=True, **common)
    said = capsys.readouterr().err
    assert f"resuming from {checkpoints.epoch_path(1)} (epoch 1)" in said
    assert all(f"removed {path}" in said for path in stale) and not any(path.exists() for path in stale)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming from epoch_001.pt"


# ----------------------------------------------------------------------------------------------- run directories
def test_a_claimed_run_directory_refuses_a_second_claim_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with claim_run_directory(run_dir):
        (run_dir / "metrics.csv").write_text("epoch\n")
        (run_dir / ".metrics.csv.tmp").write_text("being written")
        before = {path: path.read_bytes() for path in run_dir.iterdir()}
        with pytest.raises(RunDirectoryInUseError, match=rf"{run_dir} is in use by another process"):
            claim_run_directory(run_dir)
        with pytest.raises(RunDirectoryInUseError):  # a resume of a running run as well
            run_training(DataSpec("embedded"), run_dir=run_dir, resume=True)
        assert {path: path.read_bytes() for path in run_dir.iterdir()} == before
    with claim_run_directory(run_dir):  # released: claimed again, and the orphaned temporary file removed
        assert not (run_dir / ".metrics.csv.tmp").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        claim_run_directory(tmp_path / "typo", must_exist=True)
    assert not (tmp_path / "typo").exists()


RACE_ARGUMENTS = ["--dims", "small", "--num-dialogues", "4", "2", "2", "--epochs", "1", "1", "1", "--hidden", "16",
                  "--batch-size", "2", "--run-name", "same", "--keep-checkpoints", "1", "--no-plots", "--no-progress"]


def _race(runs_dir: str, start: multiprocessing.Barrier, results: multiprocessing.Queue) -> None:
    """One of two processes that start ``camhg.train`` with one run name at the same moment."""
    torch.set_num_threads(1)
    with contextlib.redirect_stderr(io.StringIO()) as stderr, contextlib.redirect_stdout(io.StringIO()):
        start.wait()
        began = time.perf_counter()
        code = camhg_train.cli([*RACE_ARGUMENTS, "--runs-dir", runs_dir])
        results.put((code, time.perf_counter() - began, stderr.getvalue()))


def test_two_processes_started_with_one_run_name(reference_backend, tmp_path):
    context = multiprocessing.get_context("fork")  # a forked child keeps the imports (and the reference backend)
    start, results = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_race, args=(str(tmp_path), start, results)) for _ in range(2)]
    for racer in racers:
        racer.start()
    outcomes = sorted(results.get(timeout=300) for _ in racers)
    for racer in racers:
        racer.join(timeout=30)
    (won, won_seconds, _), (lost, lost_seconds, complaint) = outcomes
    assert (won, lost) == (0, 2), outcomes
    # the loser meets the lock, or (when the winner claimed the folder first) the folder the winner holds
    assert ("is in use by another process" in complaint or "already exists" in complaint), outcomes
    assert lost_seconds < won_seconds, outcomes
    run_dir = tmp_path / "camhg" / "embedded" / "same"
    with open(run_dir / "metrics.csv") as file:
        assert [line.split(",")[0] for line in file][1:] == ["1", "2", "3"]  # one run's epochs, none twice
    assert [p.name for p in CheckpointManager(run_dir / "checkpoints").epoch_files()] == \
        ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    assert (run_dir / "missing_rates.json").is_file()


# ------------------------------------------------------------------------------------------------- loss guard
def test_loss_guard_rule():
    guard = LossGuard(None, factor=100.0)
    assert guard.check(torch.tensor(2.0), epoch=0, phase=1, where="a") == 2.0  # the phase's first loss: reference
    guard.check(torch.tensor(199.0), epoch=0, phase=1, where="b")
    guard.check(torch.tensor(1.0), epoch=1, phase=1, where="c")  # epoch 0's mean, 100.5, leaves the reference at 2
    with pytest.raises(DivergedLossError, match=r"diverged loss \(201, over 100 x 2,.* at d; the main process"):
        guard.check(torch.tensor(201.0), epoch=1, phase=1, where="d")
    guard.check(torch.tensor(1.0), epoch=2, phase=1, where="e")  # epoch 1's mean, 1: the new reference
    with pytest.raises(DivergedLossError, match=r"over 100 x 1,"):
        guard.check(torch.tensor(150.0), epoch=2, phase=1, where="f")
    guard.check(torch.tensor(150.0), epoch=3, phase=2, where="g")  # a new phase, a new scale
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(inf\) at h"):
        guard.check(torch.tensor(float("inf")), epoch=3, phase=2, where="h")
    with pytest.raises(ValueError, match="factor"):
        LossGuard(None, factor=1.0)


def test_loss_guard_names_the_last_good_checkpoint(tmp_path):
    checkpoints = CheckpointManager(tmp_path)
    guard = LossGuard(checkpoints)
    with pytest.raises(NonFiniteLossError, match="no checkpoint has been written yet"):
        guard.check(torch.tensor(float("nan")), epoch=0, where="start")
    for epoch in (0, 1):
        checkpoints.save({}, epoch=epoch)
        guard.checkpoint_saved(epoch)
        guard.check(torch.tensor(1.0), epoch=epoch + 1, where="fine")
    with pytest.raises(NonFiniteLossError, match=r"the last good checkpoint is kept at .*epoch_001\.pt$"):
        guard.check(torch.tensor(float("nan")), epoch=2, where="mid-epoch")
    checkpoints.save({}, epoch=2)
    guard.checkpoint_saved(2)  # the next loss is computed with these weights
    with pytest.raises(DivergedLossError, match=r"epoch_002\.pt holds the weights this loss was computed with.*"
                                                r"last good checkpoint is kept at .*epoch_001\.pt$"):
        guard.check(torch.tensor(1e6), epoch=3, where="first step")


def test_camhg_divergence_stops_and_keeps_the_last_good_checkpoint(reference_backend, tmp_path):
    # phases 1-2 train at lr 1e-3; phase 3's generator and gate learning rates of 1e3 blow the loss up
    config = preset("embedded", **{**TINY_CAMHG, "gen_lr": 1e3, "gate_lr": 1e3})
    with pytest.raises(DivergedLossError, match=r"diverged loss .* at phase 3, epoch 3, step 2; the last good "
                                                r"checkpoint is kept at .*epoch_002\.pt"):
        camhg_train.train(config, run_dir=tmp_path, evaluate=False, show_progress=False)
    checkpoints = CheckpointManager(tmp_path / "checkpoints")
    kept = checkpoints.latest(required=camhg_train.RESUME_KEYS)
    assert kept["epoch"] == 2 and kept["phase"] == 2 and not checkpoints.epoch_path(3).exists()
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_carn_divergence_stops(reference_backend, tmp_path):
    splits = load_dataset("embedded", dims="small", num_dialogues=(8, 2, 2), seed=0)
    with pytest.raises(DivergedLossError, match=r"diverged loss .* at epoch 1 step 1 \(stage 1\); no checkpoint"):
        run_training(DataSpec("embedded"), run_dir=tmp_path, splits=splits, show_progress=False, make_plots=False,
                     model_overrides={"hidden": 16, "num_heads": 2, "css_dim": 8}, verbose=False,
                     train_config=TrainConfig(epochs_stage1=1, epochs_stage2=1, batch_size=4, lr=1e3))
    assert not CheckpointManager(tmp_path / "checkpoints").has_checkpoints()
