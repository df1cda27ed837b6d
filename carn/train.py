"""Train and evaluate CARN: ``python -m carn.train`` (embedded dataset, a few minutes on a laptop CPU).

Two stages (paper section 3.4): stage 1 on full modalities (per-modality cross-entropies + causal self-supervised
loss), stage 2 on randomly missing modalities (fused cross-entropy + reconstruction MSE of the missing parts).
Then the test split is evaluated under the six available-modality conditions (paper Table 1).

Everything of a run goes to ``runs/carn/<dataset>/<run-name>/``: ``checkpoints/`` (every epoch, ``last.pt``),
``metrics.csv`` (+ TensorBoard when installed), ``table1.{md,json,csv}``, and the plots (causal attention maps of
paper Fig. 4, per-class accuracy of Fig. 3, training curves). ``--resume RUN_DIR`` continues a stopped run exactly
(bit for bit on CPU); ``--dataset iemocap4 --data-root DIR`` trains on published features.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from mer.data import DATASET_NAMES, MODALITIES, DatasetSplits, collate_dialogues, load_dataset
from mer.metrics import ResultTable
from mer.missing import batch_missing_mask
from mer.precision import PRECISIONS, autocast, backward_and_step, grad_scaler
from mer.training import (
    CheckpointManager,
    NonFiniteLossError,
    RunLogger,
    check_finite,
    make_generator,
    progress,
    reject_options_on_resume,
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


def _missing_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """Stage-2 masks from (seed, epoch, step) alone: a resumed run draws the same masks without saving a state."""
    return np.random.default_rng([seed, epoch, step])


def train_epoch(model, loader, optimizer, *, epoch: int, stage: int, seed: int, train_config: TrainConfig, device,
                checkpoints: CheckpointManager, show_progress: bool,
                scaler: Optional[torch.amp.GradScaler] = None) -> dict[str, float]:
    """One epoch of ``stage``; returns the mean of every loss term over the batches."""
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
        check_finite(losses["loss"], where=f"epoch {epoch} step {step} (stage {stage})",
                     last_checkpoint=checkpoints.last_path)
        optimizer.zero_grad()
        backward_and_step(losses["loss"], optimizer, scaler, parameters=model.parameters(),
                          grad_clip=train_config.grad_clip)
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
    return {f"train_{name}": total / len(loader) for name, total in totals.items()}


def run_training(
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
) -> RunResult:
    """Train CARN (both stages), checkpoint every epoch, then evaluate the test split and save Table 1.

    ``resume=True`` continues from ``run_dir/checkpoints/last.pt`` with the configuration saved there.
    ``stop_after_epoch=k`` stops after epoch k as a killed run would (no evaluation): tests resume from there.
    ``splits`` skips loading ``data`` (tests pass an already generated dataset).
    """
    say = print if verbose else (lambda *args, **kwargs: None)
    run_dir = Path(run_dir)
    device = select_device(device) if isinstance(device, str) else device
    checkpoints = CheckpointManager(run_dir / "checkpoints")
    state = checkpoints.latest() if resume else None
    if resume and state is None:
        raise ValueError(f"resume=True but {checkpoints.last_path} does not exist")
    if state is not None:  # the saved run decides the configuration
        data, seed, ablation = DataSpec(**state["data"]), state["seed"], state["ablation"]
        train_config = TrainConfig(**state["train_config"])
    elif checkpoints.last_path.exists():
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
    start = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("grad_scaler", {}))
        shuffle.set_state(state["shuffle"])
        restore_rng_state(state["rng_state"])
        start = state["epoch"] + 1
        logger.drop_after(state["epoch"])
        say(f"resuming {run_dir} after epoch {state['epoch']}")
    say(f"CARN ({ablation}) on {data.dataset}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{train_config.epochs_stage1} + {train_config.epochs_stage2} epochs, device {device}")

    task = model_config.task
    last_epoch = start - 1
    for epoch in range(start, train_config.epochs + 1):
        stage = train_config.stage_of(epoch)
        model.set_stage(stage)
        began = time.perf_counter()
        values = train_epoch(model, loader, optimizer, epoch=epoch, stage=stage, seed=seed, train_config=train_config,
                             device=device, checkpoints=checkpoints, show_progress=show_progress, scaler=scaler)
        values["stage"] = stage
        values["seconds"] = time.perf_counter() - began
        if splits.valid is not None:
            valid_results = evaluate_conditions(model, splits.valid, batch_size=train_config.batch_size, device=device)
            for name in metric_names(task):
                values[f"valid_average_{name}"] = valid_results["Average"][name]
        logger.log(epoch, values)
        checkpoints.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "shuffle": shuffle.get_state(),
            "grad_scaler": scaler.state_dict(),
            "model_config": to_dict(model_config), "train_config": to_dict(train_config),
            "data": dataclasses.asdict(data), "seed": seed, "ablation": ablation,
            "row_name": ABLATION_TITLES[ablation],
        }, epoch=epoch)
        say(f"epoch {epoch} (stage {stage}): " + ", ".join(
            f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float)))
        last_epoch = epoch
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            logger.close()
            return RunResult(model, run_dir, None, None, last_epoch)
    logger.close()

    results = evaluate_conditions(model, splits.test, batch_size=train_config.batch_size, device=device)
    title = (f"CARN on {data.dataset} (test split, seed {seed}, {train_config.epochs_stage1}+"
             f"{train_config.epochs_stage2} epochs, hidden {model_config.hidden})")
    table = results_table({ABLATION_TITLES[ablation]: results}, task, title)
    table.save(run_dir / "table1")
    if make_plots:
        save_plots(model, splits, run_dir, batch_size=train_config.batch_size, device=device)
    return RunResult(model, run_dir, results, table, last_epoch)


@torch.no_grad()
def save_plots(model: CARN, splits: DatasetSplits, run_dir: Path, *, batch_size: int, device) -> None:
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
    plot_training_curves(run_dir / "metrics.csv", run_dir / "training_curves.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="embedded", choices=DATASET_NAMES)
    parser.add_argument("--data-root", default=None, help="directory of the published features")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the embedded dataset / splits")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling, dropout, masks")
    parser.add_argument("--ablation", default="full", choices=sorted(ABLATIONS))
    parser.add_argument("--epochs-stage1", type=int, default=None)
    parser.add_argument("--epochs-stage2", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--missing-rate", type=float, default=None, help="eta of the stage-2 random masks")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="training precision: autocast bf16/fp16 (fp16 with a GradScaler); default fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--run-name", default=None, help="default: the ablation, seed and time")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue this stopped run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(argv=None) -> RunResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    reject_options_on_resume(parser, args, allowed=("data_root", "device", "no_plots", "no_progress"))
    data = DataSpec(args.dataset, args.data_root, args.data_seed, dict(preset(args.dataset).dataset_options))
    overrides = {"epochs_stage1": args.epochs_stage1, "epochs_stage2": args.epochs_stage2,
                 "batch_size": args.batch_size, "lr": args.lr, "missing_rate": args.missing_rate,
                 "precision": args.precision}
    train_config = dataclasses.replace(preset(args.dataset).train, **{k: v for k, v in overrides.items() if v is not None})
    model_overrides = {k: v for k, v in {"hidden": args.hidden, "dropout": args.dropout}.items() if v is not None}
    if args.resume is not None:
        run_dir = args.resume
    else:
        name = args.run_name or f"{args.ablation}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = args.runs_dir / "carn" / args.dataset / name
    began = time.perf_counter()
    try:
        result = run_training(
            data, seed=args.seed, ablation=args.ablation, model_overrides=model_overrides, train_config=train_config,
            run_dir=run_dir, resume=args.resume is not None, device=args.device, show_progress=not args.no_progress,
            make_plots=not args.no_plots,
        )
    except NonFiniteLossError as error:
        sys.exit(f"training stopped: {error}")
    result.table.print()
    print(f"run directory: {result.run_dir} ({time.perf_counter() - began:.0f} s)")
    return result


if __name__ == "__main__":
    main()
