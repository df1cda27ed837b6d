"""The command lines of both models, one style for all six entry points (CARN and CaM-HG: train, evaluate, ablations).

Flags that mean the same thing have the same name in both models, every flag says its default, values are checked
by argparse, and every mistake ends in one line on stderr, without a usage block or a traceback, exit status 2:
``prog: error: argument --lr: must be a positive finite number, got -1`` from argparse (:class:`Parser`),
``error: ...`` for mistakes found later (:class:`UserError`). Ctrl-C ends a command with exit status 130
(:func:`run_command`); the training commands first print how to resume. PyTorch runs on ``--threads`` CPU threads,
by default ``$OMP_NUM_THREADS`` when set, else 1 (:func:`set_threads`).

Run folders: ``RUNS_DIR/<model>/<dataset>/<ablation>-seed<seed>-<YYYYmmdd-HHMMSS>`` (:func:`default_run_name`),
each with ``config.json``, ``metrics.csv``, ``checkpoints/`` (``last.pt``, ``best.pt`` and ``epoch_NNN.pt`` for
every ``--keep-checkpoints``-th epoch, epochs counted from 1) and the result tables.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

from mer.precision import PRECISIONS
from mer.protocols import FOLD_DATASETS, FOLDS, SENTIMENT_LOSSES, VALIDATIONS
from mer.training import NonFiniteLossError, RunDirectoryInUseError
from mer.training import reject_options_on_resume  # noqa: F401 -- re-exported: the entry points take their CLI helpers from here

T = TypeVar("T")
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class UserError(Exception):
    """A mistake the user can fix (a missing data folder, an existing run...): printed as one line, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C during a command, raised by its ``main`` with the text to print (how to resume); exit status 130."""


# ---------------------------------------------------------------------------------------------- argument values
def _number(text: str, kind: type, condition: Callable[[float], bool], what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value) or not condition(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse ``type``: an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "a non-negative integer")


def positive_float(text: str) -> float:
    """argparse ``type``: a finite number > 0 (learning rates)."""
    return _number(text, float, lambda v: v > 0, "a positive finite number")


def fraction(text: str) -> float:
    """argparse ``type``: a number in [0, 1) (dropout, missing rates)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def device_name(text: str) -> str:
    """argparse ``type``: ``auto`` or a torch device string (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} asked for, but this machine has no CUDA device (use cpu or auto)")
    return text


# ---------------------------------------------------------------------------------------------------- parsers
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and ends every option's help with its default."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if getattr(action, "exact_count", None):  # --epochs E1 E2, not E1 E2 [E1 E2 ...]
            return action.metavar
        return super()._format_args(action, default_metavar)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.option_strings and action.nargs != 0:
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            return f"{text} (default: {shown})"
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``prog: error: message`` (exit status 2), like every other
    mistake of the commands: argparse's default prints the whole usage block first."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def plain_text(docstring: Optional[str]) -> Optional[str]:
    """A module docstring as a terminal shows it: reStructuredText markup (````code````, ``:func:`name```) removed."""
    if docstring is None:
        return None
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", docstring)
    return text.replace("``", "")


def command_name(module: str) -> str:
    """How the entry point ``module`` (``camhg.train``) was run: its console script ``camhg-train`` or
    ``python -m camhg.train``."""
    script = module.replace(".", "-")
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


def new_parser(module: str, description: Optional[str]) -> argparse.ArgumentParser:
    """A :class:`Parser` for the entry point ``module`` named as it was run (:func:`command_name`), the module's
    docstring as description (:func:`plain_text`)."""
    return Parser(prog=command_name(module), description=plain_text(description), formatter_class=HelpFormatter,
                  allow_abbrev=False)


def add_data_options(parser: argparse.ArgumentParser, datasets: Sequence[str]) -> None:
    """``--dataset --data-root --data-seed --num-dialogues --dims``."""
    parser.add_argument("--dataset", default="embedded", choices=list(datasets),
                        help="embedded* are generated (no files); the others read published features from --data-root")
    parser.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                        help="folder of the published features (GCNet's dataset/ folder or the dataset's own); "
                             "not for the embedded datasets (default: none)")
    parser.add_argument("--data-seed", type=non_negative_int, default=0,
                        help="seed of the embedded dataset and of the validation split (kept across --seed)")
    parser.add_argument("--num-dialogues", type=positive_int, nargs=3, default=None, metavar=("TRAIN", "VALID", "TEST"),
                        help="embedded only: dialogues per split (default: the preset's)")
    parser.add_argument("--dims", choices=("full", "small"), default=None,
                        help="embedded only: feature sizes, full (a 512, t 1024, v 1024) or small (32, 48, 40) "
                             "(default: the preset's)")


def _Exactly(count: int) -> type:
    """An argparse action taking exactly ``count`` values, whose error says how many (``nargs=count`` would leave
    the extra ones to an "unrecognized arguments" error)."""
    class Exactly(argparse.Action):
        exact_count = count

        def __call__(self, parser, namespace, values, option_string=None):
            if len(values) != count:
                raise argparse.ArgumentError(self, f"takes {count} numbers ({self.metavar}), got {len(values)}")
            setattr(namespace, self.dest, values)

    return Exactly


def add_model_options(parser: argparse.ArgumentParser, *, epochs: Sequence[str], epochs_help: str) -> None:
    """``--epochs --batch-size --lr --hidden --dropout --precision``: overrides of the dataset's preset."""
    parser.add_argument("--epochs", type=non_negative_int, nargs="+", action=_Exactly(len(epochs)),
                        metavar=" ".join(epochs), default=None, help=f"{epochs_help} (default: the preset's)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="dialogues per batch (default: the preset's)")
    parser.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the preset's)")
    parser.add_argument("--hidden", type=positive_int, default=None, help="model width (default: the preset's)")
    parser.add_argument("--dropout", type=fraction, default=None, help="dropout rate (default: the preset's)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="training precision: autocast bf16/fp16 (fp16 with a GradScaler), recorded in the "
                             "config and checkpoints (default: the preset's, fp32)")


def add_run_options(parser: argparse.ArgumentParser, *, model: str, ablations: Sequence[str]) -> None:
    """Seed, ablation and the run folder of one training run, resuming, checkpoints kept, device, output."""
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of initialisation, shuffling, dropout and training masks")
    parser.add_argument("--ablation", default="full", choices=list(ablations), help="the model or one of its ablations")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help=f"runs go to RUNS_DIR/{model}/<dataset>/<run-name>")
    parser.add_argument("--run-name", default=None,
                        help="folder name of the run (default: <ablation>-seed<seed>-<date>-<time>)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the stopped run in RUN_DIR with its own configuration (default: a new run)")
    parser.add_argument("--stop-after-epoch", type=positive_int, default=None, metavar="N",
                        help="stop after epoch N, as if interrupted (resume later) (default: train every epoch)")
    parser.add_argument("--keep-checkpoints", type=non_negative_int, default=5, metavar="N",
                        help="keep epoch_NNN.pt of every N-th epoch and of the newest, besides last.pt and best.pt "
                             "(0: the newest only)")
    add_device_options(parser)
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="write the plots (training curves, confusion or per-class accuracy, attention)")


def add_device_options(parser: argparse.ArgumentParser, *, progress: bool = True) -> None:
    """``--device``, ``--threads`` and ``--progress/--no-progress``."""
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N; torchrun picks one per rank")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads of PyTorch (default: $OMP_NUM_THREADS when set, else 1; the embedded "
                             "presets gain little from more)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=progress,
                        help="progress bars while training and evaluating")


def add_evaluate_options(parser: argparse.ArgumentParser, *, model: str) -> None:
    """What both ``evaluate`` commands take: a run folder or checkpoint, the data, the split, where to write."""
    parser.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT",
                        help=f"a run folder of {model}.train (its checkpoints/last.pt is used) or a .pt file in it "
                             f"(last.pt, best.pt, epoch_NNN.pt)")
    parser.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                        help="folder of the published features (default: the one the run was trained on)")
    parser.add_argument("--split", choices=("test", "valid"), default="test", help="the split to evaluate")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="dialogues per batch (CaM-HG draws its random masks batch by batch: keep 32 to "
                             "reproduce the training run's tables)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the result tables and plots (default: RUN_DIR/evaluation)")
    add_device_options(parser)
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the plots")


def add_sweep_options(parser: argparse.ArgumentParser, *, model: str, ablations: Sequence[str]) -> None:
    """What both ``ablations`` commands take besides the data and model options."""
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--ablations", nargs="+", choices=list(ablations), default=list(ablations),
                        help="the variants to train (several processes can share one sweep, each with a few)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help=f"runs go to RUNS_DIR/{model}/<dataset>/ablations/<sweep-name>/<ablation>-seed<seed>")
    parser.add_argument("--sweep-name", default="default",
                        help="sweep folder: a finished run in it is reused, a stopped one resumed")
    parser.add_argument("--collect-only", action="store_true",
                        help="train nothing: build the tables from the finished runs of the sweep (default: off)")
    parser.add_argument("--out", type=Path, default=Path(f"results/{model}"), help="folder of the result tables")
    add_device_options(parser, progress=False)


def add_protocol_options(parser: argparse.ArgumentParser) -> None:
    """``--fold K | --folds all``, ``--validation``, ``--sentiment-loss``: the papers' protocols (mer.protocols)."""
    folds = parser.add_mutually_exclusive_group()
    folds.add_argument("--fold", type=int, choices=FOLDS, default=None, metavar="K",
                       help="IEMOCAP only: leave-one-session-out, Session K held out as the test set "
                            "(default: Session 5, the label file's split)")
    folds.add_argument("--folds", choices=("all",), default=None,
                       help="IEMOCAP only: the five leave-one-session-out runs, their tables averaged (mean ± std "
                            "over folds), as both papers report (default: one run)")
    parser.add_argument("--validation", choices=VALIDATIONS, default="carved",
                        help="model selection on a seeded 10%% of the training dialogues (carved), or on the test "
                             "split as GCNet does (test); printed with every table")
    parser.add_argument("--sentiment-loss", choices=SENTIMENT_LOSSES, default=None,
                        help="sentiment datasets: 2-class cross-entropy on the sign of the label (ce, the papers'), "
                             "or regression on the score (default: the preset's)")


def folds_of(args: argparse.Namespace) -> list:
    """The folds ``--fold/--folds`` ask for: [None] (the default split), [K], or [1, 2, 3, 4, 5]."""
    if getattr(args, "folds", None) == "all":
        return list(FOLDS)
    return [getattr(args, "fold", None)]


FOLDS_COMMAND = "folds_command.json"  # what started a --folds all run: its arguments, to resume the whole set


def save_folds_command(run_dir: Path, argv: Optional[Sequence[str]]) -> None:
    """Keep the arguments of a ``--folds all`` run in ``run_dir`` (``--resume run_dir`` reruns them)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    arguments = list(sys.argv[1:] if argv is None else argv)
    (Path(run_dir) / FOLDS_COMMAND).write_text(json.dumps({"argv": arguments}, indent=2))


def folds_command(run_dir: Path) -> Optional[list]:
    """The arguments a ``--folds all`` run in ``run_dir`` was started with, or None for a single run."""
    path = Path(run_dir) / FOLDS_COMMAND
    return json.loads(path.read_text())["argv"] if path.is_file() else None


# what a resume of a --folds all run may change
FOLDS_RESUME_OPTIONS = ("data_root", "device", "threads", "plots", "progress")


def resumed_folds_arguments(parser: argparse.ArgumentParser,
                            args: argparse.Namespace) -> Optional[argparse.Namespace]:
    """For ``--resume RUN_DIR`` of a ``--folds all`` run: the arguments it was started with, with those of
    ``FOLDS_RESUME_OPTIONS`` that ``args`` gives (not at their default) taken from ``args``; None otherwise."""
    command = None if args.resume is None else folds_command(args.resume)
    if command is None:
        return None
    started = parser.parse_args(command)
    for name in FOLDS_RESUME_OPTIONS:
        if getattr(args, name) != parser.get_default(name):
            setattr(started, name, getattr(args, name))
    return started


def check_data_options(args: argparse.Namespace, embedded_names: Sequence[str]) -> None:
    """UserError for data flags that do not fit ``--dataset`` (before anything is created)."""
    embedded = args.dataset in embedded_names
    if embedded and args.data_root is not None:
        raise UserError(f"--data-root is for the published datasets; --dataset {args.dataset} is generated, "
                        f"drop --data-root or pick a published --dataset")
    if not embedded:
        if getattr(args, "num_dialogues", None) is not None or getattr(args, "dims", None) is not None:
            raise UserError(f"--num-dialogues and --dims apply to the embedded datasets, not to {args.dataset}")
        if args.data_root is None:
            raise UserError(f"--dataset {args.dataset} reads published features: add --data-root DIR (the folder "
                            f"of its label file and features/, e.g. GCNet's dataset/)")
        if not args.data_root.is_dir():
            raise UserError(f"--data-root {args.data_root} is not a folder")
    if (getattr(args, "fold", None) is not None or getattr(args, "folds", None) is not None) \
            and args.dataset not in FOLD_DATASETS:
        raise UserError(f"--fold/--folds are IEMOCAP's leave-one-session-out protocol ({', '.join(FOLD_DATASETS)}); "
                        f"--dataset {args.dataset} has fixed train/valid/test splits")


# ------------------------------------------------------------------------------------------------- run folders
def default_run_name(ablation: str, seed: int) -> str:
    """``<ablation>-seed<seed>-<YYYYmmdd-HHMMSS>``, the run-folder name of both models."""
    return f"{ablation}-seed{seed}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume from (``last.pt`` or an ``epoch_NNN.pt``)."""
    folder = Path(run_dir) / CHECKPOINTS
    return (folder / LAST_CHECKPOINT).is_file() or any(folder.glob("epoch_*.pt"))


def check_new_run(run_dir: Path) -> None:
    """UserError when ``run_dir`` already holds something: a fresh run never writes into another run's folder."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(f"{run_dir} already exists: resume it with --resume {run_dir}, or choose another --run-name")


def check_resumable(run_dir: Path, *, finished_marker: str, evaluate_command: str) -> None:
    """UserError when ``--resume RUN_DIR`` has nothing to resume, or the run finished (``finished_marker``, a
    result file the run writes last, exists)."""
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such folder")
    if not has_checkpoint(run_dir):
        raise UserError(f"--resume {run_dir}: nothing to resume, no checkpoint in {run_dir / CHECKPOINTS} "
                        f"(start a new run without --resume)")
    if (run_dir / finished_marker).is_file():
        raise UserError(f"--resume {run_dir}: this run is finished (trained and evaluated); evaluate it again with "
                        f"`{evaluate_command} {run_dir}`, or start a new run")


def checkpoint_of(path: Path) -> Path:
    """The checkpoint file that ``evaluate`` reads for ``path``: the file itself, or a run folder's last.pt."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / CHECKPOINTS / LAST_CHECKPOINT, path / LAST_CHECKPOINT):
            if candidate.is_file():
                return candidate
        raise UserError(f"{path} holds no {CHECKPOINTS}/{LAST_CHECKPOINT}: give a run folder of a training run or "
                        f"one of its .pt files")
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a run folder or a checkpoint (.pt) file")
    return path


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to (``RUN/checkpoints/x.pt`` -> ``RUN``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent


def resume_hint(command: str, run_dir: Path) -> str:
    """What to print after Ctrl-C."""
    if has_checkpoint(run_dir):
        return f"interrupted; the finished epochs are saved. Resume with:\n  {command} --resume {run_dir}"
    return "interrupted before the first epoch was saved; nothing to resume"


@contextmanager
def cleanup_on_failure(run_dir: Path) -> Iterator[None]:
    """Remove ``run_dir`` when the body fails (error or Ctrl-C) before it saved a checkpoint and the folder did not
    exist before, and the empty folders above it that the body created (``runs/<model>/<dataset>``): a failed start
    leaves nothing behind."""
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    created = [folder for folder in run_dir.parents if not folder.exists()]  # nearest first
    try:
        yield
    except RunDirectoryInUseError:  # another process claimed the folder first: it is that run's, not ours
        raise
    except BaseException:
        if not existed and run_dir.is_dir() and not has_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in created:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise


@contextmanager
def training_run(module: str, run_dir: Path, *, fold: Optional[int] = None) -> Iterator[None]:
    """How a training command runs one training in ``run_dir``: the folder is removed when it fails before its
    first checkpoint (:func:`cleanup_on_failure`); Ctrl-C becomes :class:`Interrupted` with the command that resumes
    it; bad data or run folder (ValueError, FileNotFoundError, FileExistsError) a one-line :class:`UserError`; a stop
    of the loss guard (``NonFiniteLossError``) a UserError naming ``fold`` in a ``--folds all`` run, and is left to
    the caller otherwise (it prints it and exits with status 1)."""
    try:
        with cleanup_on_failure(run_dir):
            yield
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(command_name(module), run_dir)) from None
    except NonFiniteLossError as error:
        if fold is None:
            raise
        raise UserError(f"training stopped in fold {fold}: {error}") from None
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise UserError(str(error)) from None


def run_folds(module: str, run_dir: Path, *, finished: str, load: Callable[[Path], T],
              train: Callable[[int, Path, bool], T]) -> list[T]:
    """``--folds all``: one run per IEMOCAP session held out, in ``run_dir/fold<k>``, one after the other. A fold
    whose ``finished`` file exists is reused (``load(fold_dir)``); ``train(fold, fold_dir, resume)`` trains the
    others, resuming a started one (under :func:`training_run`). Returns the results in fold order."""
    results = []
    for fold in FOLDS:
        fold_dir = run_dir / f"fold{fold}"
        if (fold_dir / finished).is_file():
            print(f"fold {fold} of {len(FOLDS)}: finished, reused", flush=True)
            results.append(load(fold_dir))
            continue
        started = has_checkpoint(fold_dir)
        print(f"fold {fold} of {len(FOLDS)}: Session {fold} held out{', resumed' if started else ''}", flush=True)
        with training_run(module, fold_dir, fold=fold):
            results.append(train(fold, fold_dir, started))
    return results


def sweep_run(run_dir: Path, *, finished: str, configuration: Callable[[], dict], collect_only: bool,
              train: Callable[[bool], str]) -> Path:
    """One (variant, seed) run of an ablation sweep: reused when it finished (``run_dir/finished`` exists) with the
    same ``configuration()`` as its config.json, resumed when it was stopped, trained otherwise by
    ``train(resume)`` (which returns what to print after "trained"/"resumed"); ``collect_only``: only reused.
    Returns the finished run's ``finished`` file."""
    done, started = run_dir / finished, has_checkpoint(run_dir)
    if (done.exists() or started) and (json.loads((run_dir / "config.json").read_text())
                                       != json.loads(json.dumps(configuration(), default=str))):
        raise UserError(f"{run_dir} holds a run with another configuration: delete it or pass another --sweep-name")
    if collect_only and not done.exists():
        raise UserError(f"--collect-only: {run_dir} holds no finished run; train it first (without --collect-only)")
    if done.exists():
        print(f"{run_dir.name}: reusing the finished run", flush=True)
    else:
        began = time.perf_counter()
        detail = train(started)
        print(f"{run_dir.name}: {'resumed' if started else 'trained'}{detail} ({time.perf_counter() - began:.0f} s)",
              flush=True)
    return done


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the body (a checkpoint save) is done, then raise KeyboardInterrupt (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------------ entry points
MMAP_THRESHOLD = 4 << 20  # bytes
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def configure_cpu_memory() -> None:
    """Have glibc's malloc serve blocks of 4 MB and more from their own mappings, unmapped when freed, and PyTorch
    back CPU tensors of 2 MB and more with transparent huge pages.

    By default glibc raises that threshold (up to 32 MB) as large blocks are freed and keeps the freed ones in its
    heap, where the differently sized activation buffers of padded batches fragment it: the default CaM-HG job's
    peak memory then grows from epoch to epoch (docs/performance.md). Each fresh mapping is paged in by the kernel
    on first touch, though, one fault per 4 KB page: 40 % of the CaM-HG job's CPU time went to those faults.
    ``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch's CPU allocator at its first allocation: the entry modules allocate
    no tensor at import, ``tests/test_cli.py``; an explicit value in the environment is kept) has it ask for 2 MB
    pages for those tensors (``madvise``; smaller ones get page-aligned): one fault per 2 MB where the kernel's
    transparent huge pages are not ``never``: the default CaM-HG job's system time fell from 32 to 15 s, 17 to 2
    million faults, with the same results and peak memory (1.01 GB). Without glibc the mallopt does nothing.
    """
    import ctypes

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


DEFAULT_THREADS = 1


def set_threads(threads: Optional[int]) -> None:
    """Have PyTorch compute on ``threads`` CPU threads; None: ``$OMP_NUM_THREADS`` when set, else
    ``DEFAULT_THREADS`` (1). One thread: the embedded presets' tensors are too small for more to pay. The default
    CaM-HG job on 2 cores: 2 threads took 14 % less wall time for twice the CPU time on an idle machine, and ten
    times the wall time and four times the CPU time on a busy one (docs/performance.md)."""
    import torch

    if threads is None:
        environment = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(environment) if environment.isdigit() and int(environment) >= 1 else DEFAULT_THREADS
    torch.set_num_threads(threads)


def _threads_argument(argv: Optional[Sequence[str]]) -> Optional[int]:
    """The value of ``--threads N`` / ``--threads=N`` in ``argv`` when it is a positive integer (the entry point's
    own parser reports a bad one), else None."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    for index, argument in enumerate(arguments):
        value = None
        if argument == "--threads" and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif argument.startswith("--threads="):
            value = argument.split("=", 1)[1]
        if value is not None and value.isdigit() and int(value) >= 1:
            return int(value)
    return None


def run_command(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run an entry point's ``main`` on ``--threads`` CPU threads (:func:`set_threads`; the previous count is
    restored after it): UserError -> one line, exit 2; Ctrl-C -> exit 130 (``main`` prints how to resume when there
    is something to resume)."""
    import torch

    configure_cpu_memory()
    previous_threads = torch.get_num_threads()
    set_threads(_threads_argument(argv))
    try:
        return main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as interrupted:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(previous_threads)


def run_sweep_command(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """``run_command`` for an ablation sweep: after Ctrl-C it says that the same command continues the sweep."""

    def resumable(args: Optional[Sequence[str]]) -> int:
        try:
            return main(args)
        except KeyboardInterrupt:
            raise Interrupted("interrupted; the same command continues the sweep (finished runs are reused, the "
                              "stopped one resumes from its last checkpoint)") from None

    return run_command(resumable, argv)


def epoch_line(epoch: int, total: int, part: str, values: dict) -> str:
    """One line per epoch: ``epoch 3/8 (phase 1) | train loss 1.2 task 1.1 | valid loss 1.3 WAF1 52.10 | 4.2 s``
    from a metrics row whose keys start with ``train_`` and ``val_`` / ``valid_``, plus ``seconds``."""
    def numbers(prefixes):
        shown = []
        for key, value in values.items():
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is not None and isinstance(value, float):
                name = key[len(prefix):].replace("average_", "avg ")
                shown.append(f"{name} {value:.4f}" if abs(value) < 10 else f"{name} {value:.2f}")
        return " ".join(shown)

    line = f"epoch {epoch}/{total} ({part}) | train {numbers(('train_',))}"
    valid = numbers(("val_", "valid_"))
    if valid:
        line += f" | valid {valid}"
    if "seconds" in values:
        line += f" | {values['seconds']:.1f} s"
    return line
