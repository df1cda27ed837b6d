"""Training utilities shared by CARN and CaM-HG.

Seeding and device choice, exact-resume checkpoints, a CSV (+ TensorBoard) metric logger, a non-finite loss
guard, a progress bar, and a thin layer over ``torch.distributed`` for ``torchrun``.

Exact resume, the recipe the training scripts follow::

    seed_everything(seed)
    model, optimizer = build(...)                     # consumes RNG: build before restoring the RNG state
    shuffle = make_generator(seed)
    loader = DataLoader(train, shuffle=True, generator=shuffle, ...)
    checkpoints = CheckpointManager(run_dir)
    start = 0
    if (state := checkpoints.latest()) is not None:
        model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optimizer"])
        shuffle.set_state(state["shuffle"]); restore_rng_state(state["rng_state"])
        start = state["epoch"] + 1
    for epoch in range(start, epochs):
        ...train, evaluate...
        checkpoints.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "shuffle": shuffle.get_state()}, epoch=epoch)

On CPU the resumed run then reproduces the uninterrupted one bit for bit (tests/test_training_utils.py).
"""
from __future__ import annotations

import csv
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, TypeVar, Union

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

PathLike = Union[str, os.PathLike]
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------
# Seeds, RNG state, devices
# ----------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, for ``DataLoader(..., generator=...)`` shuffling.

    The DataLoader advances it every epoch, so exact resume needs its state in the checkpoint: save
    ``generator.get_state()`` and, on resume, ``generator.set_state(state)``.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def capture_rng_state() -> dict:
    """The state of python's ``random``, numpy's global RNG, torch's CPU RNG and every CUDA device's RNG."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    """Restore what ``capture_rng_state`` returned; the draws that follow equal those after the capture.

    The CUDA states are restored when both the capture and this machine have CUDA (a CPU checkpoint resumed
    on a GPU, or the reverse, restores the rest).
    """
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(f"state is not an RNG state from capture_rng_state: missing {sorted(missing)}")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(name)`` (``"cpu"``, ``"cuda:1"``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"name must be 'auto' or a torch device string, got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"name={name!r} asks for CUDA, but torch.cuda.is_available() is False")
    return device


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: readers never see a partial file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class CheckpointManager:
    """Checkpoints of one run in ``directory``: ``last.pt``, ``epoch_NNN.pt`` and ``best.pt``.

    ``save`` adds ``"epoch"`` and ``"rng_state"`` (``capture_rng_state()``) to the state it writes; the
    caller puts the rest (model, optimizer, scheduler, the DataLoader generator's ``get_state()``).
    ``keep_last=k`` keeps only the ``k`` newest ``epoch_NNN.pt`` files (None keeps all); ``keep_every=n`` keeps
    the newest one and those of every n-th epoch (0: the newest only).
    Every write is atomic (temporary file + ``os.replace``).
    """

    def __init__(self, directory: PathLike, *, keep_last: Optional[int] = None, keep_every: Optional[int] = None):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be None or >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 0:
            raise ValueError(f"keep_every must be None or >= 0, got {keep_every}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._best_metric: Optional[float] = None
        if self.best_path.exists():  # a resumed run keeps comparing against the best so far
            self._best_metric = self.load(self.best_path)["best_metric"]

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    @property
    def best_metric(self) -> Optional[float]:
        """The metric of ``best.pt``, None before the first ``save_best``."""
        return self._best_metric

    def epoch_path(self, epoch: int) -> Path:
        return self.directory / f"epoch_{epoch:03d}.pt"

    def save(self, state: dict, *, epoch: int) -> Path:
        """Write ``state`` (+ ``epoch``, ``rng_state``) to ``epoch_NNN.pt`` and ``last.pt``; return the former."""
        payload = {**state, "epoch": epoch, "rng_state": capture_rng_state()}
        path = self.epoch_path(epoch)
        _atomic_torch_save(payload, path)
        _atomic_torch_save(payload, self.last_path)
        if self.keep_last is not None:
            for old in self.epoch_files()[: -self.keep_last]:
                old.unlink()
        if self.keep_every is not None:
            for old in self.epoch_files()[:-1]:
                if not self.keep_every or int(old.stem.split("_")[1]) % self.keep_every:
                    old.unlink()
        return path

    def epoch_files(self) -> list[Path]:
        """The ``epoch_NNN.pt`` files present, oldest first."""
        return sorted(self.directory.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))

    def latest(self) -> Optional[dict]:
        """The state of ``last.pt``, or None when the run has not saved yet."""
        return self.load(self.last_path) if self.last_path.exists() else None

    def load(self, path: PathLike) -> dict:
        """Load one of this package's checkpoints on the CPU (``model.load_state_dict`` moves tensors)."""
        # weights_only=False: our checkpoints hold python/numpy RNG states (tuples, numpy arrays), which the
        # weights-only unpickler refuses. Only load files this class wrote: full unpickling can run code.
        return torch.load(path, map_location="cpu", weights_only=False)

    def save_best(self, state: dict, metric: float, *, mode: str = "max") -> bool:
        """Write ``best.pt`` (with ``best_metric``) when ``metric`` beats the best so far; return whether it did."""
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        metric = float(metric)
        if math.isnan(metric):
            raise ValueError("metric is NaN")
        best = self._best_metric
        if best is not None and not (metric > best if mode == "max" else metric < best):
            return False
        _atomic_torch_save({**state, "best_metric": metric}, self.best_path)
        self._best_metric = metric
        return True


# ----------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------
def _scalar(value: Any) -> Any:
    """Plain python scalars for CSV and TensorBoard (0-d tensors and numpy scalars unwrapped)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


class RunLogger:
    """Append metric rows to ``directory/metrics.csv`` and, when it imports, to TensorBoard.

    The first column is ``step_name`` (``"step"`` or ``"epoch"``); the other columns are the union of the
    keys logged so far, in first-seen order. When a row brings new keys the file is rewritten with the wider
    header, so the CSV stays rectangular (cells a row did not log are empty). An existing ``metrics.csv`` is
    continued (a resumed run); ``drop_after(step)`` removes rows a crashed run logged after its checkpoint.
    ``enabled=False`` (non-main ranks) makes every method a no-op.
    """

    def __init__(self, directory: PathLike, *, step_name: str = "step", enabled: bool = True):
        self.directory = Path(directory)
        self.path = self.directory / "metrics.csv"
        self.step_name = step_name
        self.enabled = enabled
        self._columns: list[str] = [step_name]
        self._writer = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with open(self.path, newline="") as file:
                header = next(csv.reader(file), None)
            if header:
                if header[0] != step_name:
                    raise ValueError(f"{self.path} counts {header[0]!r}, not step_name={step_name!r}")
                self._columns = header
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self._writer = SummaryWriter(log_dir=str(self.directory / "tensorboard"))

    def _read_rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as file:
            return list(csv.DictReader(file))

    def _rewrite(self, rows: list[dict]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.path)

    def log(self, step: int, values: dict) -> None:
        """Log ``values`` (name -> number, 0-d tensor or string) at ``step``."""
        if not self.enabled:
            return
        if self.step_name in values:
            raise ValueError(f"values must not contain the step column {self.step_name!r}")
        row = {self.step_name: int(step), **{key: _scalar(value) for key, value in values.items()}}
        new_keys = [key for key in row if key not in self._columns]
        if new_keys or not self.path.exists():
            rows = self._read_rows()
            self._columns = self._columns + new_keys
            self._rewrite(rows + [row])
        else:
            with open(self.path, "a", newline="") as file:
                csv.DictWriter(file, fieldnames=self._columns).writerow(row)
        if self._writer is not None:
            for key, value in row.items():
                if key != self.step_name and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=int(step))

    def drop_after(self, step: int) -> None:
        """Remove the rows logged after ``step`` (call it when resuming from the checkpoint of ``step``)."""
        if not self.enabled or not self.path.exists():
            return
        self._rewrite([row for row in self._read_rows() if int(row[self.step_name]) <= step])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops instead of writing a poisoned checkpoint."""


def reject_options_on_resume(parser, args, allowed: Iterable[str]) -> None:
    """``parser.error`` when ``--resume`` comes with an option outside ``allowed`` (argparse dests) that is not at
    its default: a resumed run keeps the configuration it was started with, so such an option would be ignored."""
    if getattr(args, "resume", None) is None:
        return
    ignored = sorted(f"--{name.replace('_', '-')}" for name, value in vars(args).items()
                     if name != "resume" and name not in allowed and value != parser.get_default(name))
    if ignored:
        parser.error(f"--resume continues a run with the configuration it started with; drop {', '.join(ignored)}")


def check_finite(loss: torch.Tensor, *, where: str, last_checkpoint: Optional[PathLike] = None) -> None:
    """Raise ``NonFiniteLossError`` naming ``where`` (and the last good checkpoint) if ``loss`` is not finite.

    Reads the loss back from the device (one synchronization per call).
    """
    finite = torch.isfinite(loss)
    if bool(finite.all()):
        return
    value = loss[~finite].flatten()[0].item() if loss.ndim else loss.item()
    if last_checkpoint is not None and Path(last_checkpoint).exists():
        kept = f"the last good checkpoint is kept at {last_checkpoint}"
    else:
        kept = "no checkpoint has been written yet"
    raise NonFiniteLossError(f"non-finite loss ({value}) at {where}; {kept}")


def progress(
    iterable: Iterable[T], *, desc: str, total: Optional[int] = None, enabled: bool = True
) -> Iterator[T]:
    """A tqdm progress bar over ``iterable`` (a plain pass-through when ``enabled`` is False)."""
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------
# Distributed (torchrun)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    enabled: bool


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"WORLD_SIZE > 1 but the environment variable {name} is not set (launch with torchrun)")
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from error


def init_distributed(backend: Optional[str] = None) -> DistContext:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` without; with CUDA the process uses
    ``cuda:LOCAL_RANK``. Without WORLD_SIZE (or with WORLD_SIZE=1) nothing is initialised and the context
    is the single-process one (rank 0, ``enabled=False``, device ``select_device("auto")``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, 0, select_device("auto"), is_main=True, enabled=False)
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    _env_int("MASTER_PORT")
    if "MASTER_ADDR" not in os.environ:
        raise ValueError("WORLD_SIZE > 1 but the environment variable MASTER_ADDR is not set (launch with torchrun)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA; use 'gloo' on CPU")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device, is_main=rank == 0, enabled=True)


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of ``tensor`` over all processes, as a new tensor (integers averaged as float32).

    In a single-process run ``tensor`` itself is returned.
    """
    if not ctx.enabled:
        return tensor
    reduced = tensor.detach().clone()
    if not reduced.is_floating_point():
        reduced = reduced.float()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / ctx.world_size


def all_gather_objects(obj: Any, ctx: DistContext) -> list:
    """``obj`` of every process, indexed by rank (picklable objects; ``[obj]`` in a single-process run)."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op in a single-process run)."""
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()


def cleanup_distributed(ctx: DistContext) -> None:
    """Leave the process group (no-op in a single-process run)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
