"""Train and evaluate CARN: ``python -m carn.train`` (embedded dataset, a few minutes on a laptop CPU).

Two stages (paper section 3.4): stage 1 on full modalities (per-modality cross-entropies + causal self-supervised
loss), stage 2 on randomly missing modalities (fused cross-entropy + reconstruction MSE of the missing parts).
Then the test split is evaluated under the six available-modality conditions (paper Table 1).

    python -m carn.train                                   # embedded dataset, CPU-sized, under a minute
    python -m carn.train --dataset iemocap4 --data-root DATA
    python -m carn.train --resume runs/carn/embedded/RUN   # continue a stopped run exactly

Everything of a run goes to ``runs/carn/<dataset>/<run-name>/``: ``config.json``, ``checkpoints/`` (``last.pt``,
``best.pt``, every ``--keep-checkpoints``-th ``epoch_NNN.pt``), ``metrics.csv`` (+ TensorBoard when installed),
``table1.{md,json,csv}``, and the plots (causal attention maps of paper Fig. 4, per-class accuracy of Fig. 3,
training curves). ``--resume RUN_DIR`` continues a stopped run exactly (bit for bit on CPU).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from mer.cli import (
    Interrupted,
    UserError,
    add_data_options,
    add_model_options,
    add_run_options,
    check_data_options,
    check_new_run,
    check_resumable,
    cleanup_on_failure,
    command_name,
    default_run_name,
    deferred_interrupt,
    epoch_line,
    fraction,
    new_parser,
    reject_options_on_resume,
    resume_hint,
    run_command,
)
from mer.data import DATASET_NAMES, EMBEDDED_NAMES, MODALITIES, DatasetSplits, collate_dialogues, load_dataset
from mer.metrics import ResultTable
from mer.missing import batch_missing_mask
from mer.precision import autocast, backward_and_step, grad_scaler
from mer.training import (
    CheckpointManager,
    LossGuard,
    NonFiniteLossError,
    RunLogger,
    claim_run_directory,
    make_generator,
    progress,
    restore_rng_state,
    seed_everything,
    select_device,
)

from .config import ABLATION_TITLES, ABLATIONS, ModelConfig, TrainConfig, model_config_for, preset, to_dict
from .evaluate import evaluate_conditions, metric_names, per_class_accuracy, results_table
from .losses import stage_losses
from .model import CARN


@dataclass
class DataSpec:
    """Which data a run reads; stored in every checkpoint so that ``carn.evaluate`` can reload it."""

    dataset: str = "embedded"
    data_root: Optional[str] = None
    data_seed: int = 0
    dataset_options: dict = dataclasses.field(default_factory=dict)

    def load(self) -> DatasetSplits:
        return load_dataset(self.dataset, self.data_root, seed=self.data_seed, **self.dataset_options)


@dataclass
class RunResult:
    model: CARN
    run_dir: Path
    results: Optional[dict]  # evaluate_conditions on the test split; None when stopped early
    table: Optional[ResultTable]
    completed_epochs: int


# what every checkpoint of run_training holds besides "epoch" and "rng_state": a resume needs them all
RESUME_KEYS = ("model", "optimizer", "shuffle", "model_config", "train_config", "data", "seed", "ablation")


def _missing_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """Stage-2 masks from (seed, epoch, step) alone: a resumed run draws the same masks without saving a state."""
    return np.random.default_rng([seed, epoch, step])


def train_epoch(model, loader, optimizer, *, epoch: int, stage: int, seed: int, train_config: TrainConfig, device,
                guard: LossGuard, show_progress: bool,
                scaler: Optional[torch.amp.GradScaler] = None) -> dict[str, float]:
    """One epoch of ``stage``; returns the mean of every loss term over the batches. ``guard`` stops a non-finite or
    diverged loss; ``scaler`` (default: the one of ``train_config.precision``) scales fp16 losses."""
    model.train()
    scaler = scaler if scaler is not None else grad_scaler(train_config.precision, device)
    totals: dict[str, float] = {}
    batches = progress(loader, desc=f"epoch {epoch}/{train_config.epochs} (stage {stage})", enabled=show_progress)
    for step, batch in enumerate(batches):
        full = batch.to(device)
        if stage == 1:
            observed = full
        else:
            observed = full.with_present(batch_missing_mask(full, train_config.missing_rate, _missing_rng(seed, epoch, step)))
        with autocast(train_config.precision, device):
            output = model(observed.features, observed.present, observed.valid)
            losses = stage_losses(output, full, observed, stage, model.config, train_config)
        guard.check(losses["loss"], epoch=epoch, phase=stage, where=f"epoch {epoch} step {step} (stage {stage})")
        optimizer.zero_grad()
        backward_and_step(losses["loss"], optimizer, scaler, parameters=model.parameters(),
                          grad_clip=train_config.grad_clip)
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
    return {f"train_{name}": total / len(loader) for name, total in totals.items()}


def run_training(data: DataSpec, *, run_dir: Path, **options) -> RunResult:
    """Train CARN (both stages), checkpoint every epoch, then evaluate the test split and save Table 1.

    Options: ``seed``, ``ablation``, ``model_overrides``, ``train_config``, ``resume``, ``device``,
    ``show_progress``, ``stop_after_epoch``, ``make_plots``, ``splits``, ``verbose`` (see ``_run_training``).
    ``run_dir`` is claimed for this process first (``claim_run_directory``): a second run on it fails at once.
    """
    with claim_run_directory(run_dir, must_exist=options.get("resume", False)):
        return _run_training(data, run_dir=Path(run_dir), **options)


def _run_training(
    data: DataSpec,
    *,
    seed: int = 0,
    ablation: str = "full",
    model_overrides: Optional[dict] = None,
    train_config: Optional[TrainConfig] = None,
    run_dir: Path,
    resume: bool = False,
    device="auto",
    show_progress: bool = True,
    stop_after_epoch: Optional[int] = None,
    make_plots: bool = True,
    splits: Optional[DatasetSplits] = None,
    verbose: bool = True,
    keep_every: Optional[int] = None,
) -> RunResult:
    """``run_training`` once ``run_dir`` is claimed.

    ``resume=True`` continues from ``run_dir/checkpoints/last.pt`` (the newest intact ``epoch_NNN.pt`` when that
    is damaged) with the configuration saved there. A non-finite or diverged loss (``LossGuard``) raises
    ``NonFiniteLossError`` with the checkpoints written so far left in place.
    ``stop_after_epoch=k`` stops after epoch k as a killed run would (no evaluation): tests resume from there.
    ``splits`` skips loading ``data`` (tests pass an already generated dataset).
    Checkpoints: ``last.pt``, ``best.pt`` (best stage-2 validation average WA, or Acc2) and ``epoch_NNN.pt`` for every
    ``keep_every``-th epoch (None: every epoch, 0: none).
    """
    say = print if verbose else (lambda *args, **kwargs: None)
    device = select_device(device) if isinstance(device, str) else device
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_every=keep_every)
    state = checkpoints.latest(required=RESUME_KEYS) if resume else None
    if resume and state is None:
        raise ValueError(f"resume=True but {checkpoints.last_path} does not exist")
    if state is not None:  # the saved run decides the configuration
        data_root = data.data_root  # the data may have moved since: a given root wins
        data, seed, ablation = DataSpec(**state["data"]), state["seed"], state["ablation"]
        data.data_root = data_root or data.data_root
        train_config = TrainConfig(**state["train_config"])
    elif checkpoints.has_checkpoints():
        raise ValueError(f"{run_dir} already holds a run; pass resume=True (--resume) or choose another run name")
    splits = splits if splits is not None else data.load()
    train_config = train_config or preset(data.dataset).train

    seed_everything(seed)
    if state is not None:
        model_config = ModelConfig(**state["model_config"])
    else:
        model_config = model_config_for(splits.info, data.dataset, ablation=ablation, **(model_overrides or {}))
    model = CARN(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    scaler = grad_scaler(train_config.precision, device)
    shuffle = make_generator(seed)
    loader = DataLoader(splits.train, batch_size=train_config.batch_size, shuffle=True, generator=shuffle,
                        collate_fn=collate_dialogues)
    logger = RunLogger(run_dir, step_name="epoch")
    guard = LossGuard(checkpoints)
    start = 1
    if state is not None:
        guard.checkpoint_saved(state["epoch"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("grad_scaler", {}))
        shuffle.set_state(state["shuffle"])
        restore_rng_state(state["rng_state"])
        start = state["epoch"] + 1
        logger.drop_after(state["epoch"])
    else:
        (run_dir / "config.json").write_text(json.dumps({
            "model_config": to_dict(model_config), "train_config": to_dict(train_config),
            "data": dataclasses.asdict(data), "seed": seed, "ablation": ablation}, indent=2, default=str))
    valid_size = len(splits.valid) if splits.valid is not None else 0
    say(f"CARN ({ablation}) on {data.dataset}: {len(splits.train)} / {valid_size} / {len(splits.test)} train / valid / "
        f"test dialogues, {sum(p.numel() for p in model.parameters()):,} parameters (float32), hidden "
        f"{model_config.hidden}, epochs {train_config.epochs_stage1} + {train_config.epochs_stage2} (stages 1-2), "
        f"device {device}; run folder {run_dir}", flush=True)
    if state is not None:
        say(f"resuming after epoch {state['epoch']} of {train_config.epochs} "
            f"(stage {train_config.stage_of(state['epoch'])})", flush=True)
    main_metric = "valid_average_" + metric_names(model_config.task)[0]

    task = model_config.task
    last_epoch = start - 1
    for epoch in range(start, train_config.epochs + 1):
        stage = train_config.stage_of(epoch)
        model.set_stage(stage)
        began = time.perf_counter()
        values = train_epoch(model, loader, optimizer, epoch=epoch, stage=stage, seed=seed, train_config=train_config,
                             device=device, guard=guard, show_progress=show_progress, scaler=scaler)
        values["stage"] = stage
        values["seconds"] = time.perf_counter() - began
        if splits.valid is not None:
            valid_results = evaluate_conditions(model, splits.valid, batch_size=train_config.batch_size, device=device)
            for name in metric_names(task):
                values[f"valid_average_{name}"] = valid_results["Average"][name]
        logger.log(epoch, values)
        payload = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "shuffle": shuffle.get_state(),
            "grad_scaler": scaler.state_dict(),
            "model_config": to_dict(model_config), "train_config": to_dict(train_config),
            "data": dataclasses.asdict(data), "seed": seed, "ablation": ablation,
            "row_name": ABLATION_TITLES[ablation],
        }
        with deferred_interrupt():  # Ctrl-C waits for the checkpoint of this epoch
            checkpoints.save(payload, epoch=epoch)
            if stage == 2 and main_metric in values:  # stage 1 does not train the fused classifier
                checkpoints.save_best({**payload, "epoch": epoch}, values[main_metric])
        guard.checkpoint_saved(epoch)
        say(epoch_line(epoch, train_config.epochs, f"stage {stage}", values), flush=True)
        last_epoch = epoch
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            logger.close()
            return RunResult(model, run_dir, None, None, last_epoch)
    logger.close()

    results = evaluate_conditions(model, splits.test, batch_size=train_config.batch_size, device=device,
                                  show_progress=show_progress)
    title = (f"CARN on {data.dataset} (test split, seed {seed}, {train_config.epochs_stage1}+"
             f"{train_config.epochs_stage2} epochs, hidden {model_config.hidden})")
    table = results_table({ABLATION_TITLES[ablation]: results}, task, title)
    table.save(run_dir / "table1")
    if make_plots:
        save_plots(model, splits, run_dir, batch_size=train_config.batch_size, device=device, ablation=ablation)
    return RunResult(model, run_dir, results, table, last_epoch)


@torch.no_grad()
def save_plots(model: CARN, splits: DatasetSplits, run_dir: Path, *, batch_size: int, device,
               ablation: str = "full") -> None:
    """Paper Fig. 4 (causal attention per modality on the first test dialogue), Fig. 3 (per-class accuracy per
    condition) and the training curves."""
    from mer.plots import plot_attention_maps, plot_per_class_accuracy, plot_training_curves

    model.eval()
    if model.config.use_cce:
        dialogue = collate_dialogues([splits.test[0]]).to(device)
        output = model(dialogue.features, dialogue.present, dialogue.valid, need_weights=True)
        kind = "causal entmax-1.5" if model.config.attention == "causal_entmax" else "vanilla softmax"
        plot_attention_maps([output.attention_weights[m][0].cpu() for m in MODALITIES],
                            [f"{m}: {kind}" for m in MODALITIES], run_dir / "attention_maps.png",
                            title=f"CARN attention, dialogue {dialogue.vids[0]}")
    if model.config.task == "classification":
        per_class = per_class_accuracy(model, splits.test, splits.info.class_names, batch_size=batch_size, device=device)
        plot_per_class_accuracy(per_class, run_dir / "per_class_accuracy.png",
                                title="CARN accuracy per class and available modalities")
    plot_training_curves(run_dir / "metrics.csv", run_dir / "training_curves.png",
                         title=f"CARN ({ablation}) on {splits.info.name}")


MODULE = "carn.train"
RESUME_OPTIONS = ("data_root", "stop_after_epoch", "device", "plots", "progress", "keep_checkpoints")


def build_parser():
    parser = new_parser(MODULE, __doc__)
    add_data_options(parser, DATASET_NAMES)
    add_model_options(parser, epochs=("E1", "E2"),
                      epochs_help="epochs of the two stages: full modalities, then randomly missing ones (section 3.4)")
    parser.add_argument("--missing-rate", type=fraction, default=None,
                        help="CARN only: eta of the stage-2 random masks (default: the preset's)")
    add_run_options(parser, model="carn", ablations=sorted(ABLATIONS))
    return parser


def data_spec(args) -> DataSpec:
    """The data that ``--dataset --data-root --data-seed --dims --num-dialogues`` describe."""
    options = dict(preset(args.dataset).dataset_options)
    if args.dims is not None:
        options["dims"] = args.dims
    if args.num_dialogues is not None:
        options["num_dialogues"] = tuple(args.num_dialogues)
    return DataSpec(args.dataset, None if args.data_root is None else str(args.data_root), args.data_seed, options)


def train_config_of(args) -> TrainConfig:
    """The preset's TrainConfig with ``--epochs --batch-size --lr --missing-rate --precision`` applied."""
    overrides = {"batch_size": args.batch_size, "lr": args.lr, "missing_rate": getattr(args, "missing_rate", None),
                 "precision": args.precision}
    if args.epochs is not None:
        overrides.update(epochs_stage1=args.epochs[0], epochs_stage2=args.epochs[1])
    try:
        return dataclasses.replace(preset(args.dataset).train, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as error:  # e.g. --epochs 0 0
        raise UserError(f"--epochs: {error}") from None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reject_options_on_resume(parser, args, allowed=RESUME_OPTIONS)
    if args.resume is not None:
        run_dir = args.resume
        check_resumable(run_dir, finished_marker="table1.json", evaluate_command="python -m carn.evaluate")
        data, train_config = DataSpec(), None  # the run's own, from its checkpoint
        if args.data_root is not None:
            data = DataSpec(data_root=str(args.data_root))
    else:
        check_data_options(args, EMBEDDED_NAMES)
        data, train_config = data_spec(args), train_config_of(args)
        run_dir = args.runs_dir / "carn" / args.dataset / (args.run_name or default_run_name(args.ablation, args.seed))
        check_new_run(run_dir)
    model_overrides = {k: v for k, v in {"hidden": args.hidden, "dropout": args.dropout}.items() if v is not None}
    began = time.perf_counter()
    try:
        with cleanup_on_failure(run_dir):
            result = run_training(
                data, seed=args.seed, ablation=args.ablation, model_overrides=model_overrides,
                train_config=train_config, run_dir=run_dir, resume=args.resume is not None, device=args.device,
                show_progress=args.progress, make_plots=args.plots, stop_after_epoch=args.stop_after_epoch,
                keep_every=args.keep_checkpoints,
            )
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(command_name(MODULE), run_dir)) from None
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad data or run folder: one line
        raise UserError(str(error)) from None
    if result.table is not None:
        result.table.print()
    else:
        print(f"stopped after epoch {result.completed_epochs}; resume with: {command_name(MODULE)} --resume {run_dir}")
    print(f"run folder: {result.run_dir} ({time.perf_counter() - began:.0f} s)")
    return 0


def cli(argv=None) -> int:
    """Console script ``carn-train``."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
