"""Training utilities shared by CARN and CaM-HG.

Seeding and device choice, run-directory claims, exact-resume checkpoints that load without running code, a CSV
(+ TensorBoard) metric logger, a loss guard (non-finite or diverged loss), a progress bar, and a thin layer over
``torch.distributed`` for ``torchrun``.

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
import fcntl
import gc
import math
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Optional, TypeVar, Union

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
    """The state of python's ``random``, numpy's global RNG, torch's CPU RNG and every CUDA device's RNG.

    Plain types only (tensors, tuples, ints, floats, str), which weights-only loading admits: numpy's MT19937 key
    is stored as an int64 tensor instead of the uint32 array ``np.random.get_state()`` returns.
    """
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)),
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
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key).astype(np.uint32), *rest))
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
# Run directories
# ----------------------------------------------------------------------------------------------------------
class RunDirectoryInUseError(FileExistsError):
    """Another process holds the run directory (two runs started with one name, or a resume of a running run)."""


class RunDirectoryClaim:
    """This process's exclusive hold on a run directory, taken by :func:`claim_run_directory`.

    An ``flock`` on ``run_dir/.lock``: taken atomically, released by ``release()`` (or ``with``), and by the
    kernel when the process dies, so a killed run can be resumed at once. The ``.lock`` file itself stays.
    """

    def __init__(self, run_dir: Path, handle):
        self.run_dir = run_dir
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the lock
            self._handle = None

    def __enter__(self) -> "RunDirectoryClaim":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def claim_run_directory(run_dir: PathLike, *, enabled: bool = True, must_exist: bool = False) -> RunDirectoryClaim:
    """Claim ``run_dir`` for this process, before reading or writing anything in it; it is created unless
    ``must_exist`` (a resume), which raises ``FileNotFoundError`` when it is not a directory.

    Of two processes claiming one directory, the second raises :class:`RunDirectoryInUseError` at once and
    changes nothing. Once claimed, the temporary files that a killed save left (``.*.tmp`` in the run directory
    and its ``checkpoints/``) are removed, each with a line on stderr. ``enabled=False`` (non-main ranks of a
    ``torchrun`` job, whose rank 0 holds the claim) claims nothing.
    """
    run_dir = Path(run_dir)
    if must_exist and not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not enabled:
        return RunDirectoryClaim(run_dir, None)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirectoryInUseError(
            f"{run_dir} is in use by another process (it holds the lock on {run_dir / '.lock'}): two runs cannot "
            f"share one run directory; pick another run name, or wait for that run to end before resuming it"
        ) from None
    for stale in sorted([*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp")]):
        stale.unlink(missing_ok=True)
        print(f"removed {stale}, a temporary file left by a save that was killed", file=sys.stderr)
    return RunDirectoryClaim(run_dir, handle)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong with it."""


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


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """The CheckpointError for a ``torch.load`` failure: a refused type, or a damaged / foreign file."""
    text = str(error)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        name = refused.group(1)
        if name.startswith("numpy"):
            origin = ("A checkpoint of an older version of this package (numpy arrays in its RNG state): re-save it "
                      "as docs/models.md says ('Runs: folders, checkpoints, resuming')")
        else:
            origin = "This package's checkpoints never hold it: the file was not written by this package"
        return CheckpointError(f"{path} asks to build {name}, which loading refuses: only tensors and plain python "
                               f"values load, since building other objects can run code. {origin}")
    detail = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0]
    reason = f"{type(error).__name__}: {detail}" if detail else f"{type(error).__name__}, the file ends early"
    return CheckpointError(f"{path} is not a readable checkpoint (truncated, damaged or not written by torch.save; "
                           f"{reason})")


def load_checkpoint(path: PathLike, *, required: Iterable[str] = ()) -> dict:
    """The checkpoint dict at ``path``, on the CPU, loaded without running code.

    ``torch.load(weights_only=True)``: tensors and plain python values (dict, list, tuple, str, numbers, None)
    load, anything else is refused, so a crafted file cannot run code. Raises ``FileNotFoundError`` when ``path``
    is not a file and :class:`CheckpointError` (naming ``path``) when it is truncated, damaged, not a
    ``torch.save`` file, asks for another type, is not a dict or lacks a key of ``required``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as error:  # torch reports damage as RuntimeError, UnpicklingError, EOFError, KeyError...
        raise _unreadable(path, error) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint (a dict)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: not a checkpoint of this kind of run")
    return state


class CheckpointManager:
    """Checkpoints of one run in ``directory``: ``last.pt``, ``epoch_NNN.pt`` and ``best.pt``.

    ``save`` adds ``"epoch"`` and ``"rng_state"`` (``capture_rng_state()``) to the state it writes; the
    caller puts the rest (model, optimizer, scheduler, the DataLoader generator's ``get_state()``), as tensors
    and plain python values, which is all :func:`load_checkpoint` admits.
    ``keep_last=k`` keeps only the ``k`` newest ``epoch_NNN.pt`` files (None keeps all); ``keep_every=n`` keeps
    the newest one and those of every n-th epoch (0: the newest only).
    Every write is atomic (temporary file + ``os.replace``). Nothing is read until asked for: ``best.pt`` only
    by ``best_metric`` / ``save_best``.
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
        self._best_read = False

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    @property
    def best_metric(self) -> Optional[float]:
        """The metric of ``best.pt`` (read on first use: a resumed run compares against it), None before any."""
        if not self._best_read:
            if self.best_path.exists():
                self._best_metric = float(load_checkpoint(self.best_path, required=("best_metric",))["best_metric"])
            self._best_read = True
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

    def epoch_files(self, *, before: Optional[int] = None) -> list[Path]:
        """The ``epoch_NNN.pt`` files present (only those of epochs < ``before`` if given), oldest first."""
        numbered = [(int(p.stem[6:]), p) for p in self.directory.glob("epoch_*.pt") if p.stem[6:].isdigit()]
        return [p for epoch, p in sorted(numbered) if before is None or epoch < before]

    def has_checkpoints(self) -> bool:
        """Whether the directory holds ``last.pt`` or an ``epoch_NNN.pt`` (intact or not)."""
        return self.last_path.exists() or bool(self.epoch_files())

    def latest(self, *, required: Iterable[str] = ()) -> Optional[dict]:
        """The state to resume from: ``last.pt``; when it is missing or damaged, the newest intact ``epoch_NNN.pt``,
        with a line on stderr naming both. None when the directory holds no checkpoint.

        Intact: :func:`load_checkpoint` reads it, with ``"epoch"``, ``"rng_state"`` and the keys of ``required``.
        Raises :class:`CheckpointError` listing every file and its problem when none is intact.
        """
        required = ("epoch", "rng_state", *required)
        problems = []
        for path in [self.last_path, *reversed(self.epoch_files())]:
            if path == self.last_path and not path.exists():
                problems.append(f"{path} does not exist")
                continue
            try:
                state = load_checkpoint(path, required=required)
            except CheckpointError as error:
                problems.append(str(error))
                continue
            if problems:
                print(f"{'; '.join(problems)}: resuming from {path} (epoch {state['epoch']}), the newest intact "
                      f"checkpoint", file=sys.stderr)
            return state
        if self.epoch_files():
            raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(problems))
        if self.last_path.exists():
            raise CheckpointError(problems[0])
        return None

    def load(self, path: PathLike) -> dict:
        """:func:`load_checkpoint` (on the CPU, runs no code; ``model.load_state_dict`` moves tensors)."""
        return load_checkpoint(path)

    def save_best(self, state: dict, metric: float, *, mode: str = "max") -> bool:
        """Write ``best.pt`` (with ``best_metric``) when ``metric`` beats the best so far; return whether it did."""
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        metric = float(metric)
        if math.isnan(metric):
            raise ValueError("metric is NaN")
        best = self.best_metric
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


class DivergedLossError(NonFiniteLossError):
    """The loss grew ``LossGuard.factor`` times over its reference; training stops. A ``NonFiniteLossError`` so that
    one ``except`` catches every stop of the loss guard."""


def reject_options_on_resume(parser, args, allowed: Iterable[str]) -> None:
    """``parser.error`` when ``--resume`` comes with an option outside ``allowed`` (argparse dests) that is not at
    its default: a resumed run keeps the configuration it was started with, so such an option would be ignored."""
    if getattr(args, "resume", None) is None:
        return
    ignored = sorted(f"--{name.replace('_', '-')}" for name, value in vars(args).items()
                     if name != "resume" and name not in allowed and value != parser.get_default(name))
    if ignored:
        parser.error(f"--resume continues a run with the configuration it started with; drop {', '.join(ignored)}")


def _kept(last_checkpoint: Optional[PathLike]) -> str:
    if last_checkpoint is not None and Path(last_checkpoint).exists():
        return f"the last good checkpoint is kept at {last_checkpoint}"
    return "no checkpoint has been written yet"


def check_finite(loss: torch.Tensor, *, where: str, last_checkpoint: Optional[PathLike] = None) -> None:
    """Raise ``NonFiniteLossError`` naming ``where`` (and the last good checkpoint) if ``loss`` is not finite.

    Reads the loss back from the device (one synchronization per call).
    """
    finite = torch.isfinite(loss)
    if bool(finite.all()):
        return
    value = loss[~finite].flatten()[0].item() if loss.ndim else loss.item()
    raise NonFiniteLossError(f"non-finite loss ({value}) at {where}; {_kept(last_checkpoint)}")


DIVERGENCE_FACTOR = 1e3


class LossGuard:
    """Stops training, before the step updates the model, when a step's loss is non-finite or has diverged.

    Diverged: the loss exceeds ``factor`` times its reference, the smallest epoch-mean loss of the current phase
    so far (the phase's first loss until its first epoch ends). The reference restarts whenever ``phase`` changes
    (a new objective has its own scale: CARN's stages, CaM-HG's phases) and in a resumed run. Losses are taken to
    be positive (cross-entropy, MSE, L1); with a reference <= 0 only finiteness is checked.

    Raises ``NonFiniteLossError`` / ``DivergedLossError`` naming where and the checkpoints of ``checkpoints`` (None
    on ranks that do not save). Call ``checkpoint_saved(epoch)`` after each save and after resuming: a checkpoint
    is known good once a step after it passed; when the failing step is the first since the save, the loss was
    computed with that checkpoint's weights, and the message names the epoch file before it as the last good one.

    Under torchrun (``ctx`` enabled) each rank checks its own loss, and the decision is collective (one all-reduce
    of a flag per step): when any rank stops, every rank raises at the same step (the others a
    ``NonFiniteLossError`` naming the rank that stopped), so that no rank is left waiting in the next collective.
    """

    def __init__(self, checkpoints: Optional[CheckpointManager], *, factor: float = DIVERGENCE_FACTOR,
                 ctx: Optional[DistContext] = None):
        if not factor > 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        self.checkpoints = checkpoints
        self.ctx = ctx
        self.factor = float(factor)
        self._phase = self._epoch = None
        self._reference: Optional[float] = None
        self._epoch_sum, self._epoch_steps = 0.0, 0
        self._saved_epoch: Optional[int] = None
        self._checked_since_save = False

    def checkpoint_saved(self, epoch: int) -> None:
        """The model was just saved (or resumed from) as the checkpoint of ``epoch``."""
        self._saved_epoch = epoch
        self._checked_since_save = False

    def check(self, loss: torch.Tensor, *, epoch: int, phase: Hashable = 0, where: str) -> float:
        """The step's (scalar) loss as a float, after checking it (one synchronization)."""
        if phase != self._phase:
            self._phase, self._epoch, self._reference = phase, epoch, None
            self._epoch_sum, self._epoch_steps = 0.0, 0
        elif epoch != self._epoch:
            if self._epoch_steps:
                self._reference = min(self._reference, self._epoch_sum / self._epoch_steps)
            self._epoch, self._epoch_sum, self._epoch_steps = epoch, 0.0, 0
        value = float(loss.detach())
        error = None
        if not math.isfinite(value):
            error = NonFiniteLossError(f"non-finite loss ({value}) at {where}; {self._kept()}")
        elif self._reference is not None and self._reference > 0 and value > self.factor * self._reference:
            error = DivergedLossError(
                f"diverged loss ({value:.4g}, over {self.factor:g} x {self._reference:.4g}, the smallest epoch-mean "
                f"loss of this phase so far or its first loss; try a lower learning rate) at {where}; {self._kept()}"
            )
        if self.ctx is not None and self.ctx.enabled:
            error = self._agree(error, where)
        if error is not None:
            raise error
        if self._reference is None:
            self._reference = value
        self._epoch_sum += value
        self._epoch_steps += 1
        self._checked_since_save = True
        return value

    def _agree(self, error: Optional[NonFiniteLossError], where: str) -> Optional[NonFiniteLossError]:
        """Every rank's verdict on this step: ``error`` if this rank stops, another rank's stop if one does."""
        flag = torch.tensor(0.0 if error is None else self.ctx.rank + 1.0, device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the highest stopping rank + 1, or 0
        stopping = int(flag.item()) - 1
        if error is None and stopping >= 0:
            error = NonFiniteLossError(f"process {stopping} stopped the run at {where} (its loss is not finite or "
                                       f"diverged, see its message); {self._kept()}")
        return error

    def _kept(self) -> str:
        if self.checkpoints is None:
            return "the main process keeps the checkpoints"
        if self._saved_epoch is None:
            return "no checkpoint has been written yet"
        saved = self.checkpoints.epoch_path(self._saved_epoch)
        if not saved.exists():  # not kept (``keep_every``): last.pt holds the same state
            saved = self.checkpoints.last_path
        if self._checked_since_save:
            return f"the last good checkpoint is kept at {saved}"
        earlier = self.checkpoints.epoch_files(before=self._saved_epoch)
        previous = f"the last good checkpoint is kept at {earlier[-1]}" if earlier else "no earlier checkpoint exists"
        return f"{saved} holds the weights this loss was computed with (no step had run since it was saved); {previous}"


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
    """Leave the process group (no-op in a single-process run).

    ``DistributedDataParallel`` sits in a reference cycle, so a wrapper outlives its last name until the cyclic
    garbage collector runs, and its reducer keeps the process group alive: destroyed then, during interpreter
    shutdown, the gloo group's worker threads could abort the process at exit ("terminate called without an active
    exception", SIGABRT). The collection here frees those wrappers first, so the group is torn down now.
    """
    if ctx.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
