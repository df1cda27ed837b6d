"""mer.training: RNG state, exact-resume checkpoints, the metric logger, the loss guard, distributed helpers."""
import argparse
import csv
import gc
import random
import socket
import weakref

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mer.training import (
    CheckpointManager,
    DivergedLossError,
    LossGuard,
    NonFiniteLossError,
    RunLogger,
    all_reduce_mean,
    barrier,
    check_finite,
    cleanup_distributed,
    init_distributed,
    make_generator,
    reject_options_on_resume,
    progress,
    restore_rng_state,
    seed_everything,
    select_device,
)


def _draw_everything() -> tuple:
    """One draw from each RNG that capture_rng_state covers."""
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def _read_csv(path) -> list[list[str]]:
    with open(path, newline="") as file:
        return list(csv.reader(file))


# ----------------------------------------------------------------------------------------------------------
# RNG state and checkpoints
# ----------------------------------------------------------------------------------------------------------
def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    seed_everything(123)
    _draw_everything()
    checkpoints = CheckpointManager(tmp_path)
    weights = torch.randn(5, 3)
    checkpoints.save({"weights": weights}, epoch=4)  # captures the RNG state here
    expected = _draw_everything()
    _draw_everything()  # move every RNG on

    state = checkpoints.latest()
    restore_rng_state(state["rng_state"])
    assert _draw_everything() == expected
    assert state["epoch"] == 4
    assert torch.equal(state["weights"], weights)
    assert torch.equal(checkpoints.load(tmp_path / "epoch_004.pt")["weights"], weights)


def test_checkpoints_hold_only_what_weights_only_loading_builds(tmp_path):
    """No allowlist needed: numpy's RNG state is saved as a tensor, so torch's default weights-only unpickler (which
    builds no numpy object) loads the checkpoint, and the numpy draws after a restore are those after the capture."""
    seed_everything(7)
    np.random.rand(5)
    CheckpointManager(tmp_path).save({"model": {"w": torch.ones(2)}}, epoch=0)
    expected = np.random.rand(4)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    name, key, *_ = state["rng_state"]["numpy"]
    assert name == "MT19937" and isinstance(key, torch.Tensor) and key.shape == (624,)
    np.random.rand(9)
    restore_rng_state(state["rng_state"])
    assert np.random.rand(4).tolist() == expected.tolist()


def test_restore_rng_state_rejects_other_dicts():
    with pytest.raises(ValueError, match="missing"):
        restore_rng_state({"torch": torch.get_rng_state()})


def _train(run_dir, *, epochs: int, stop_after=None, restore_rng: bool = True) -> list[torch.Tensor]:
    """A tiny training loop that uses every RNG (shuffling, dropout, numpy and python noise)."""
    seed_everything(0)
    features, targets = torch.randn(12, 4), torch.randint(0, 2, (12,))
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 2))
    shuffle = make_generator(0)
    loader = DataLoader(TensorDataset(features, targets), batch_size=5, shuffle=True, generator=shuffle)
    checkpoints = CheckpointManager(run_dir)
    start = 0
    if (state := checkpoints.latest()) is not None:
        model.load_state_dict(state["model"])
        if restore_rng:
            shuffle.set_state(state["shuffle"])
            restore_rng_state(state["rng_state"])
        start = state["epoch"] + 1
    for epoch in range(start, epochs):
        for x, y in loader:
            noise = torch.from_numpy(np.random.randn(*x.shape).astype(np.float32)) * random.random()
            loss = nn.functional.cross_entropy(model(x + 0.1 * noise), y)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():  # plain SGD: torch.optim's first use imports torch._dynamo (seconds)
                for parameter in model.parameters():
                    parameter -= 0.1 * parameter.grad
        checkpoints.save({"model": model.state_dict(), "shuffle": shuffle.get_state()}, epoch=epoch)
        if epoch == stop_after:
            break
    return [p.detach().clone() for p in model.parameters()]


def test_resumed_run_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    uninterrupted = _train(tmp_path / "straight", epochs=2)
    _train(tmp_path / "resumed", epochs=2, stop_after=0)
    resumed = _train(tmp_path / "resumed", epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))

    # the comparison is sensitive: resuming without the RNG states takes another path
    _train(tmp_path / "careless", epochs=2, stop_after=0)
    careless = _train(tmp_path / "careless", epochs=2, restore_rng=False)
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted, careless))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    checkpoints = CheckpointManager(tmp_path)
    checkpoints.save({"value": torch.tensor(1.0)}, epoch=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000.pt", "last.pt"]

    def crash_midway(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save({"value": torch.tensor(2.0)}, epoch=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000.pt", "last.pt"]  # no temporary file left
    assert checkpoints.latest()["value"].item() == 1.0  # the last good checkpoint is intact


def test_keep_last_prunes_old_epoch_files(tmp_path):
    checkpoints = CheckpointManager(tmp_path, keep_last=2)
    for epoch in range(9, 12):  # 9 -> 11 also checks numeric (not lexicographic) ordering
        checkpoints.save({}, epoch=epoch)
    assert [p.name for p in checkpoints.epoch_files()] == ["epoch_010.pt", "epoch_011.pt"]
    assert checkpoints.latest()["epoch"] == 11
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


@pytest.mark.parametrize(
    "mode, metrics, expected_improved, expected_best",
    [
        pytest.param("max", [0.5, 0.7, 0.6], [True, True, False], 0.7, id="max"),
        pytest.param("min", [0.5, 0.7, 0.3], [True, False, True], 0.3, id="min"),
    ],
)
def test_save_best_keeps_the_best_metric_across_instances(tmp_path, mode, metrics, expected_improved,
                                                         expected_best):
    checkpoints = CheckpointManager(tmp_path)
    assert [checkpoints.save_best({"metric_seen": m}, m, mode=mode) for m in metrics] == expected_improved
    best = checkpoints.load(checkpoints.best_path)
    assert best["best_metric"] == best["metric_seen"] == expected_best

    reopened = CheckpointManager(tmp_path)  # a resumed run compares against the best on disk
    assert reopened.best_metric == expected_best
    assert not reopened.save_best({}, expected_best, mode=mode)  # a tie is not an improvement


def test_save_best_rejects_bad_arguments(tmp_path):
    checkpoints = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="mode"):
        checkpoints.save_best({}, 1.0, mode="largest")
    with pytest.raises(ValueError, match="metric"):
        checkpoints.save_best({}, float("nan"))


def test_latest_is_none_before_the_first_save(tmp_path):
    assert CheckpointManager(tmp_path / "new").latest() is None


# ----------------------------------------------------------------------------------------------------------
# Logging, loss guard, progress, devices
# ----------------------------------------------------------------------------------------------------------
def test_run_logger_keeps_the_csv_rectangular_when_keys_change(tmp_path):
    logger = RunLogger(tmp_path, step_name="epoch")
    logger.log(0, {"train/loss": torch.tensor(0.5)})
    logger.log(1, {"train/loss": np.float32(0.25), "valid/WA": 61.5})
    logger.log(2, {"valid/WA": 63.0})
    logger.close()
    assert _read_csv(tmp_path / "metrics.csv") == [
        ["epoch", "train/loss", "valid/WA"],
        ["0", "0.5", ""],
        ["1", "0.25", "61.5"],
        ["2", "", "63.0"],
    ]

    resumed = RunLogger(tmp_path, step_name="epoch")  # a resumed run continues the same file
    resumed.drop_after(1)  # rows logged after the checkpoint it resumes from
    resumed.log(2, {"valid/WA": 64.0, "lr": 0.001})
    resumed.close()
    assert _read_csv(tmp_path / "metrics.csv") == [
        ["epoch", "train/loss", "valid/WA", "lr"],
        ["0", "0.5", "", ""],
        ["1", "0.25", "61.5", ""],
        ["2", "", "64.0", "0.001"],
    ]


def test_run_logger_rejects_a_mismatched_step_column(tmp_path):
    RunLogger(tmp_path, step_name="epoch").log(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="step_name"):
        RunLogger(tmp_path, step_name="step")
    with pytest.raises(ValueError, match="step column"):
        RunLogger(tmp_path / "other", step_name="epoch").log(0, {"epoch": 3})


def test_disabled_run_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path / "rank1", enabled=False)
    logger.log(0, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "rank1").exists()


@pytest.mark.parametrize(
    "value, shown",
    [
        pytest.param(float("nan"), "nan", id="nan"),
        pytest.param(float("inf"), "inf", id="inf"),
        pytest.param(float("-inf"), "-inf", id="minus-inf"),
    ],
)
def test_check_finite_names_where_and_the_last_checkpoint(tmp_path, value, shown):
    checkpoints = CheckpointManager(tmp_path)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss \({shown}\) at epoch 2 step 7; "
                                                 r"no checkpoint has been written yet"):
        check_finite(torch.tensor(value), where="epoch 2 step 7", last_checkpoint=checkpoints.last_path)
    checkpoints.save({}, epoch=1)
    losses = torch.tensor([0.5, value, 1.0])  # per-sample losses: the first non-finite one is shown
    with pytest.raises(NonFiniteLossError, match=rf"\({shown}\) at valid.*kept at .*last\.pt"):
        check_finite(losses, where="valid", last_checkpoint=checkpoints.last_path)


def test_check_finite_passes_finite_losses():
    check_finite(torch.tensor(3.0), where="train")
    check_finite(torch.tensor([0.0, -1e30]), where="train")


def test_progress_yields_every_item_enabled_or_not():
    items = list(range(5))
    assert list(progress(items, desc="train", enabled=False)) == items
    assert list(progress(iter(items), desc="train", total=5)) == items


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="name"):
        select_device("gpu-please")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_select_device_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="CUDA"):
        select_device("cuda")


# ----------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [pytest.param(None, id="unset"), pytest.param("1", id="one")])
def test_init_distributed_is_a_single_process_no_op(monkeypatch, world_size):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.enabled) == (0, 1, 0, True, False)
    assert not torch.distributed.is_initialized()
    values = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(values, ctx) is values
    barrier(ctx)
    cleanup_distributed(ctx)


def test_init_distributed_names_a_missing_torchrun_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK"):
        init_distributed()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _all_reduce_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One spawned process: torchrun's environment, then all_reduce_mean of rank-dependent tensors."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = init_distributed(backend="gloo")
    floats = torch.tensor([rank + 1.0, 2.0 * (rank + 1)])
    counts = torch.tensor([rank, 10])
    result = {"ctx": (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled),
              "floats": all_reduce_mean(floats, ctx), "counts": all_reduce_mean(counts, ctx),
              "input_kept": floats.tolist()}
    barrier(ctx)
    cleanup_distributed(ctx)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_all_reduce_mean_over_two_gloo_processes(tmp_path):
    world_size = 2
    # fork, not spawn: a spawned child re-imports torch, which alone takes seconds on a busy CI machine
    mp.start_processes(_all_reduce_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size,
                       start_method="fork")
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["ctx"] == (rank, world_size, rank == 0, True)
        # exact: means of small integers are representable (torch.testing's first use costs seconds of imports)
        assert result["floats"].tolist() == [1.5, 3.0]
        assert result["counts"].dtype == torch.float32 and result["counts"].tolist() == [0.5, 10.0]
        assert result["input_kept"] == [rank + 1.0, 2.0 * (rank + 1)]


def _trained_ddp_wrapper() -> weakref.ref:
    """A trained DDP wrapper that only a reference cycle keeps alive. In camhg.train a step alone makes that cycle
    (DDP's hooks); with torch._dynamo loaded it does not, so the test makes one of its own."""
    model = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    model(torch.randn(3, 2)).sum().backward()
    model.cycle = [model]
    return weakref.ref(model)


def _loss_guard_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank 1's loss diverges at step 3 (of epoch 1), rank 0's stays finite: where each rank's guard stops, and
    whether cleanup_distributed freed a DDP wrapper that only a reference cycle kept alive."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = init_distributed(backend="gloo")
    guard, stopped = LossGuard(None, factor=10.0, ctx=ctx), None
    losses = {0: [1.0, 1.5, 2.0, 1.0], 1: [1.0, 1.2, 50.0, 1.0]}[rank]
    for step, loss in enumerate(losses):
        try:
            guard.check(torch.tensor(loss), epoch=1, where=f"step {step}")
        except NonFiniteLossError as error:
            stopped = (step, type(error).__name__, str(error))
            break
    gc.disable()  # as for a long-lived wrapper, which sits in the oldest generation, collected rarely
    wrapper = _trained_ddp_wrapper()
    alive_before = wrapper() is not None
    cleanup_distributed(ctx)
    torch.save({"stopped": stopped, "ddp": (alive_before, wrapper() is not None)},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_loss_guard_stops_every_rank_at_the_same_step_and_cleanup_frees_ddp(tmp_path):
    """Without the collective decision rank 0 would run on into the next collective and wait there forever."""
    world_size = 2
    mp.start_processes(_loss_guard_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size,
                       start_method="fork")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    assert results[1]["stopped"][:2] == (2, DivergedLossError.__name__)
    assert results[0]["stopped"][:2] == (2, NonFiniteLossError.__name__)
    assert "process 1 stopped the run at step 2" in results[0]["stopped"][2]
    # the wrapper outlived its last name (a reference cycle) until cleanup_distributed collected it
    assert all(result["ddp"] == (True, False) for result in results)


def test_resume_rejects_options_it_would_ignore(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--device", default="auto")
    allowed = ("device",)
    reject_options_on_resume(parser, parser.parse_args(["--resume", "run", "--device", "cpu"]), allowed)
    reject_options_on_resume(parser, parser.parse_args(["--epochs", "3"]), allowed)  # a fresh run: anything goes
    with pytest.raises(SystemExit):
        reject_options_on_resume(parser, parser.parse_args(["--resume", "run", "--epochs", "3"]), allowed)
    assert "drop --epochs" in capsys.readouterr().err
