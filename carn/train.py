"""Train and evaluate CARN: ``python -m carn.train`` (embedded dataset, under a minute on one CPU thread).

Two stages (paper section 3.4): stage 1 on full modalities (per-modality cross-entropies + causal self-supervised
loss), stage 2 on randomly missing modalities (fused cross-entropy + reconstruction MSE of the missing parts).
Then the test split is evaluated under the six available-modality conditions (paper Table 1).

    python -m carn.train                                   # embedded dataset, under a minute on a CPU
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
    UserError,
    add_data_options,
    add_model_options,
    add_protocol_options,
    add_run_options,
    check_data_options,
    check_new_run,
    check_resumable,
    command_name,
    default_run_name,
    deferred_interrupt,
    epoch_line,
    fraction,
    new_parser,
    reject_options_on_resume,
    resumed_folds_arguments,
    run_command,
    run_folds,
    save_folds_command,
    training_run,
)
from mer.data import DATASET_NAMES, EMBEDDED_NAMES, MODALITIES, DatasetSplits, collate_dialogues, load_dataset
from mer.metrics import ResultTable
from mer.missing import batch_missing_mask, condition_mask
from mer.precision import autocast, backward_and_step, grad_scaler
from mer.protocols import (
    FOLDS,
    average_over_folds,
    dataset_options_for,
    protocol_caption,
    validation_caption,
    with_validation,
)
from mer.training import (
    CheckpointManager,
    LossGuard,
    NonFiniteLossError,
    RunLogger,
    _atomic_torch_save,
    claim_run_directory,
    make_generator,
    progress,
    restore_rng_state,
    seed_everything,
    select_device,
)

from .config import (
    ABLATION_TITLES,
    ABLATIONS,
    CSS_CONTEXTS,
    ENCODER_MASKS,
    STAGE2_CONDITIONS,
    STAGE2_KINDS,
    ModelConfig,
    TrainConfig,
    model_config_for,
    preset,
    to_dict,
)
from .evaluate import (
    evaluate_conditions,
    load_model,
    mean_self_attention,
    metric_names,
    per_class_accuracy,
    results_table,
    stage2_checkpoint_name,
)
from .losses import stage_losses
from .model import CARN


@dataclass
class DataSpec:
    """Which data a run reads; stored in every checkpoint so that ``carn.evaluate`` can reload it.

    ``dataset_options`` hold an IEMOCAP ``fold``; ``validation`` is "carved" or "test" (GCNet's: the valid split is
    the test split), see :mod:`mer.protocols`.
    """

    dataset: str = "embedded"
    data_root: Optional[str] = None
    data_seed: int = 0
    dataset_options: dict = dataclasses.field(default_factory=dict)
    validation: str = "carved"

    def load(self) -> DatasetSplits:
        splits = load_dataset(self.dataset, self.data_root, seed=self.data_seed, **self.dataset_options)
        return with_validation(splits, self.validation)

    def caption(self) -> str:
        """The held-out part and the validation choice, for table titles."""
        return protocol_caption(self.dataset, self.dataset_options, self.validation)


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
                guard: LossGuard, show_progress: bool, condition: Optional[str] = None,
                scaler: Optional[torch.amp.GradScaler] = None) -> dict[str, float]:
    """One epoch of ``stage``; returns the mean of every loss term over the batches. Stage 2 masks every utterance
    with ``condition`` when given (stage 2 per condition), else draws random masks. ``guard`` stops a non-finite or
    diverged loss; ``scaler`` (default: the one of ``train_config.precision``) scales fp16 losses."""
    model.train()
    scaler = scaler if scaler is not None else grad_scaler(train_config.precision, device)
    totals: dict[str, float] = {}
    batches = progress(loader, desc=f"epoch {epoch}/{train_config.epochs} (stage {stage})", enabled=show_progress)
    for step, batch in enumerate(batches):
        full = batch.to(device)
        if stage == 1:
            observed = full
        elif condition is not None:
            observed = full.with_present(condition_mask(full, condition))
        else:
            observed = full.with_present(batch_missing_mask(full, train_config.missing_rate, _missing_rng(seed, epoch, step)))
        with autocast(train_config.precision, device):
            output = model(observed.features, observed.present, observed.valid)
            losses = stage_losses(output, full, observed, stage, model.config, train_config)
        # each stage-2 model of a condition is its own objective for the guard
        guard.check(losses["loss"], epoch=epoch, phase=stage if condition is None else (stage, condition),
                    where=f"epoch {epoch} step {step} (stage {stage})")
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

    def new_optimizer():
        return torch.optim.Adam(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)

    optimizer = new_optimizer()
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
    per_condition = train_config.stage2 == "per-condition"
    stage1_path = checkpoints.directory / "stage1.pt"  # the model every stage-2 model starts from (per condition)
    if per_condition and train_config.epochs_stage1 == 0 and start == 1:
        _atomic_torch_save({"model": model.state_dict()}, stage1_path)
    valid_size = len(splits.valid) if splits.valid is not None else 0
    stage2_kind = "one model per test condition" if per_condition else f"random masks, eta {train_config.missing_rate}"
    say(f"CARN ({ablation}) on {data.dataset}: {len(splits.train)} / {valid_size} / {len(splits.test)} train / valid / "
        f"test dialogues ({data.caption()}), {sum(p.numel() for p in model.parameters()):,} parameters (float32), "
        f"hidden {model_config.hidden}, epochs {train_config.epochs_stage1} + {train_config.epochs_stage2} (stages "
        f"1-2; stage 2: {stage2_kind}), device {device}; run folder {run_dir}", flush=True)
    if state is not None:
        say(f"resuming after epoch {state['epoch']} of {train_config.epochs} "
            f"(stage {train_config.stage_of(state['epoch'])})", flush=True)
    main_metric = "valid_average_" + metric_names(model_config.task)[0]

    task = model_config.task
    last_epoch = start - 1

    def payload_now(epoch_model) -> dict:
        return {
            "model": epoch_model.state_dict(), "optimizer": optimizer.state_dict(), "shuffle": shuffle.get_state(),
            "grad_scaler": scaler.state_dict(),
            "model_config": to_dict(model_config), "train_config": to_dict(train_config),
            "data": dataclasses.asdict(data), "seed": seed, "ablation": ablation,
            "row_name": ABLATION_TITLES[ablation],
        }

    for epoch in range(start, train_config.epochs + 1):
        stage = train_config.stage_of(epoch)
        condition = train_config.condition_of(epoch)
        if condition is not None and (epoch - train_config.epochs_stage1 - 1) % train_config.epochs_stage2 == 0:
            # the first epoch of this condition's model: fine-tune from the stage-1 model with a fresh optimizer
            model.load_state_dict(CheckpointManager(checkpoints.directory).load(stage1_path)["model"])
            optimizer = new_optimizer()
        model.set_stage(stage)
        began = time.perf_counter()
        values = train_epoch(model, loader, optimizer, epoch=epoch, stage=stage, seed=seed, train_config=train_config,
                             device=device, guard=guard, show_progress=show_progress, condition=condition,
                             scaler=scaler)
        values["stage"] = stage
        values["seconds"] = time.perf_counter() - began
        if splits.valid is not None:
            if condition is None:
                valid_results = evaluate_conditions(model, splits.valid, batch_size=train_config.batch_size,
                                                    device=device)
                for name in metric_names(task):
                    values[f"valid_average_{name}"] = valid_results["Average"][name]
            else:  # this model is tested under its own condition only
                valid_results = evaluate_conditions({c: model for c in STAGE2_CONDITIONS}, splits.valid,
                                                    batch_size=train_config.batch_size, device=device)
                for name in metric_names(task):
                    values[f"valid_condition_{name}"] = valid_results[condition][name]
        logger.log(epoch, values)
        payload = payload_now(model)
        with deferred_interrupt():  # Ctrl-C waits for the checkpoint of this epoch
            checkpoints.save(payload, epoch=epoch)
            if stage == 2 and main_metric in values:  # stage 1 does not train the fused classifier
                checkpoints.save_best({**payload, "epoch": epoch}, values[main_metric])
            if per_condition and epoch == train_config.epochs_stage1:
                _atomic_torch_save({"model": model.state_dict()}, stage1_path)
            if condition is not None and train_config.condition_of(epoch + 1) != condition:
                _atomic_torch_save({**payload, "epoch": epoch},
                                   checkpoints.directory / stage2_checkpoint_name(condition))
        guard.checkpoint_saved(epoch)
        part = f"stage {stage}" + (f", condition {condition}" if condition is not None else "")
        say(epoch_line(epoch, train_config.epochs, part, values), flush=True)
        last_epoch = epoch
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            logger.close()
            return RunResult(model, run_dir, None, None, last_epoch)
    logger.close()

    tested = model
    if per_condition:
        manager = CheckpointManager(checkpoints.directory)
        tested = {c: load_model(manager.load(checkpoints.directory / stage2_checkpoint_name(c)), device)
                  for c in STAGE2_CONDITIONS}
    results = evaluate_conditions(tested, splits.test, batch_size=train_config.batch_size, device=device,
                                  show_progress=show_progress)
    title = (f"CARN on {data.dataset} (test, seed {seed}, {train_config.epochs_stage1}+"
             f"{train_config.epochs_stage2} epochs, hidden {model_config.hidden}, stage 2 {train_config.stage2}; "
             f"{data.caption()})")
    table = results_table({ABLATION_TITLES[ablation]: results}, task, title)
    table.save(run_dir / "table1")
    if model_config.use_cce:
        diagonal = mean_self_attention(model, splits.test, batch_size=train_config.batch_size, device=device)
        (run_dir / "attention_diagonal.json").write_text(json.dumps(diagonal, indent=2))
        say("mean A_ii over the test utterances (full modalities): "
            + ", ".join(f"{m} {value:.2f}" for m, value in diagonal.items()), flush=True)
    if make_plots:
        save_plots(tested, splits, run_dir, batch_size=train_config.batch_size, device=device, ablation=ablation)
    return RunResult(model, run_dir, results, table, last_epoch)


@torch.no_grad()
def save_plots(model: CARN | dict[str, CARN], splits: DatasetSplits, run_dir: Path, *, batch_size: int, device,
               ablation: str = "full") -> None:
    """Paper Fig. 4 (causal attention per modality on the first test dialogue), Fig. 3 (per-class accuracy per
    condition) and the training curves. ``model``: one model, or {condition: its model} (stage 2 per condition,
    whose attention maps are drawn from the last condition's model)."""
    from mer.plots import plot_attention_maps, plot_per_class_accuracy, plot_training_curves

    tested = model
    model = list(model.values())[-1] if isinstance(model, dict) else model
    model.eval()
    if model.config.use_cce:
        dialogue = collate_dialogues([splits.test[0]]).to(device)
        output = model(dialogue.features, dialogue.present, dialogue.valid, need_weights=True)
        kind = "causal entmax-1.5" if model.config.attention == "causal_entmax" else "vanilla softmax"
        plot_attention_maps([output.attention_weights[m][0].cpu() for m in MODALITIES],
                            [f"{m}: {kind}" for m in MODALITIES], run_dir / "attention_maps.png",
                            title=f"CARN attention, dialogue {dialogue.vids[0]}")
    if model.config.task == "classification":
        per_class = per_class_accuracy(tested, splits.test, splits.info.class_names, batch_size=batch_size, device=device)
        plot_per_class_accuracy(per_class, run_dir / "per_class_accuracy.png",
                                title="CARN accuracy per class and available modalities")
    plot_training_curves(run_dir / "metrics.csv", run_dir / "training_curves.png",
                         title=f"CARN ({ablation}) on {splits.info.name}")


MODULE = "carn.train"
RESUME_OPTIONS = ("data_root", "stop_after_epoch", "device", "threads", "plots", "progress", "keep_checkpoints")


def add_carn_protocol_options(parser) -> None:
    """CARN's protocol flags besides mer.cli's (shared by ``carn.train`` and ``carn.ablations``)."""
    add_protocol_options(parser)
    parser.add_argument("--stage2", choices=STAGE2_KINDS, default=None,
                        help="stage 2 as one model on random masks (random), or one model per test condition "
                             "fine-tuned from stage 1 (per-condition, MoMKE's protocol) (default: the preset's: "
                             "per-condition for the published features, random for the embedded data)")
    parser.add_argument("--css-context", choices=CSS_CONTEXTS, default="full",
                        help="context of the causal self-supervised loss: sum_j<=i A_ij x_j as in eq. 15 (full), "
                             "or strictly earlier steps, sum_j<i A_ij x_j (strict)")
    parser.add_argument("--encoder-mask", choices=ENCODER_MASKS, default="none",
                        help="the Transformer encoders of eq. 9 and 13 see the whole dialogue (none), or only past "
                             "and present utterances (causal)")


def model_overrides_of(args) -> dict:
    """ModelConfig overrides from ``--hidden --dropout --sentiment-loss --css-context --encoder-mask``."""
    values = {"hidden": args.hidden, "dropout": args.dropout, "sentiment_loss": args.sentiment_loss,
              "css_context": args.css_context, "encoder_mask": args.encoder_mask}
    return {k: v for k, v in values.items() if v is not None}


def build_parser():
    parser = new_parser(MODULE, __doc__)
    add_data_options(parser, DATASET_NAMES)
    add_model_options(parser, epochs=("E1", "E2"),
                      epochs_help="epochs of the two stages: full modalities, then randomly missing ones (section 3.4)")
    parser.add_argument("--missing-rate", type=fraction, default=None,
                        help="CARN only: eta of the stage-2 random masks (default: the preset's)")
    add_carn_protocol_options(parser)
    add_run_options(parser, model="carn", ablations=sorted(ABLATIONS))
    return parser


def data_spec(args, fold: Optional[int] = None) -> DataSpec:
    """The data that ``--dataset --data-root --data-seed --dims --num-dialogues --validation`` and ``fold`` (an
    IEMOCAP session held out, None for the default split) describe."""
    options = dict(preset(args.dataset).dataset_options)
    if args.dims is not None:
        options["dims"] = args.dims
    if args.num_dialogues is not None:
        options["num_dialogues"] = tuple(args.num_dialogues)
    try:
        options = dataset_options_for(args.dataset, options, fold=fold, validation=args.validation)
    except ValueError as error:
        raise UserError(str(error)) from None
    return DataSpec(args.dataset, None if args.data_root is None else str(args.data_root), args.data_seed, options,
                    args.validation)


def train_config_of(args) -> TrainConfig:
    """The preset's TrainConfig with ``--epochs --batch-size --lr --missing-rate --stage2 --precision`` applied."""
    overrides = {"batch_size": args.batch_size, "lr": args.lr, "missing_rate": getattr(args, "missing_rate", None),
                 "stage2": getattr(args, "stage2", None), "precision": args.precision}
    if args.epochs is not None:
        overrides.update(epochs_stage1=args.epochs[0], epochs_stage2=args.epochs[1])
    try:
        return dataclasses.replace(preset(args.dataset).train, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as error:  # e.g. --epochs 0 0
        raise UserError(f"--epochs: {error}") from None


def train_folds(args, train_config: TrainConfig, model_overrides: dict, run_dir: Path) -> ResultTable:
    """``--folds all``: one run per IEMOCAP session held out, in ``run_dir/fold<k>``; saves and returns their Table 1
    averaged over the folds (``run_dir/table1_folds``). A finished fold is reused, a stopped one resumed (``--resume
    RUN_DIR`` of a ``--folds all`` run comes here with the arguments it started with)."""
    def train(fold: int, fold_dir: Path, resume: bool) -> ResultTable:
        return run_training(
            data_spec(args, fold), seed=args.seed, ablation=args.ablation, model_overrides=model_overrides,
            train_config=train_config, run_dir=fold_dir, resume=resume, device=args.device,
            show_progress=args.progress, make_plots=args.plots, keep_every=args.keep_checkpoints).table

    tables = run_folds(MODULE, run_dir, finished="table1.json",
                       load=lambda fold_dir: ResultTable.load(fold_dir / "table1.json"), train=train)
    data = data_spec(args, FOLDS[0])
    title = (f"CARN on {args.dataset} (test sessions, seed {args.seed}, {train_config.epochs_stage1}+"
             f"{train_config.epochs_stage2} epochs, stage 2 {train_config.stage2}; 5-fold leave-one-session-out; "
             f"{validation_caption(args.dataset, data.dataset_options, args.validation)})")
    table = average_over_folds(tables, title)
    table.save(run_dir / "table1_folds")
    return table


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reject_options_on_resume(parser, args, allowed=RESUME_OPTIONS)
    started = resumed_folds_arguments(parser, args)
    if started is not None:  # --resume of a --folds all run: the whole set
        began = time.perf_counter()
        table = train_folds(started, train_config_of(started), model_overrides_of(started), args.resume)
        table.print()
        print(f"run folder: {args.resume} (one folder per fold; {time.perf_counter() - began:.0f} s)")
        return 0
    if args.resume is not None:
        run_dir = args.resume
        check_resumable(run_dir, finished_marker="table1.json", evaluate_command="python -m carn.evaluate")
        data, train_config = DataSpec(), None  # the run's own, from its checkpoint
        if args.data_root is not None:
            data = DataSpec(data_root=str(args.data_root))
    else:
        check_data_options(args, EMBEDDED_NAMES)
        data, train_config = data_spec(args, args.fold), train_config_of(args)
        run_dir = args.runs_dir / "carn" / args.dataset / (args.run_name or default_run_name(args.ablation, args.seed))
        check_new_run(run_dir)
    model_overrides = model_overrides_of(args)
    began = time.perf_counter()
    if args.folds == "all":
        if args.stop_after_epoch is not None:
            raise UserError("--stop-after-epoch stops one run; with --folds all resume a fold's folder instead")
        save_folds_command(run_dir, argv)
        table = train_folds(args, train_config, model_overrides, run_dir)
        table.print()
        print(f"run folder: {run_dir} (one folder per fold; {time.perf_counter() - began:.0f} s)")
        return 0
    try:
        with training_run(MODULE, run_dir):
            result = run_training(
                data, seed=args.seed, ablation=args.ablation, model_overrides=model_overrides,
                train_config=train_config, run_dir=run_dir, resume=args.resume is not None, device=args.device,
                show_progress=args.progress, make_plots=args.plots, stop_after_epoch=args.stop_after_epoch,
                keep_every=args.keep_checkpoints,
            )
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
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
