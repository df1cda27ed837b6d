"""Train CaM-HG with the three-phase curriculum of Algorithm 1, then evaluate it (paper Tables 2-3 and 7, Fig. 4).

    python -m camhg.train                                  # embedded dataset, 1-2 minutes on a CPU
    python -m camhg.train --dataset iemocap4 --data-root DATA
    python -m camhg.train --resume runs/camhg/embedded/RUN # continue a stopped run exactly
    torchrun --nproc-per-node 2 -m camhg.train             # DistributedDataParallel (gloo on CPU)

Everything of a run lands in ``runs/camhg/<dataset>/<run-name>/``: ``config.json``, ``metrics.csv`` (and
TensorBoard), ``checkpoints/`` (``last.pt``, ``best.pt``, every ``--keep-checkpoints``-th ``epoch_NNN.pt``, epochs
counted from 1), the result tables (markdown, JSON, CSV), the training curves and the confusion-matrix plots. Rank 0
alone logs, saves and evaluates.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

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
    new_parser,
    positive_float,
    reject_options_on_resume,
    resumed_folds_arguments,
    run_command,
    run_folds,
    save_folds_command,
    training_run,
)
from mer.data import EMBEDDED_NAMES, Batch, DatasetInfo, DialogueDataset, collate_dialogues, load_dataset
from mer.metrics import ResultTable, task_metrics, valid_targets
from mer.protocols import (
    FOLDS,
    average_over_folds,
    dataset_options_for,
    sign_cross_entropy,
    validation_caption,
    with_validation,
)
from mer.missing import batch_missing_mask, camhg_training_mask
from mer.precision import autocast, clip_and_step, grad_scaler
from mer.training import (
    CheckpointManager,
    DistContext,
    LossGuard,
    NonFiniteLossError,
    RunLogger,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    capture_rng_state,
    claim_run_directory,
    cleanup_distributed,
    init_distributed,
    make_generator,
    progress,
    restore_rng_state,
    seed_everything,
    select_device,
)

from .config import ABLATIONS, PRESETS, CaMHGConfig, preset
from .model import CaMHG, CaMHGOutput

VALIDATION_MISSING_RATE = 0.3  # validation sees a fixed random mask at this rate (the middle of Tables 2-3)
# what every checkpoint of train() holds besides "epoch" and "rng_state": a resume needs them all
RESUME_KEYS = ("config", "info", "model", "optimizer", "scheduler", "phase", "shuffle", "rank_states")


# -------------------------------------------------------------------------------------------------------- losses
def task_loss(logits: torch.Tensor, batch: Batch, info: DatasetInfo, label_smoothing: float,
              sentiment_loss: str = "regression") -> torch.Tensor:
    """Mean over valid utterances: cross-entropy (classification); sentiment: 2-class cross-entropy on the sign of
    the non-zero labels (``sentiment_loss="ce"``, mer.protocols.sign_cross_entropy) or L1 on the score."""
    if info.task == "classification":
        return F.cross_entropy(logits[batch.valid], batch.labels[batch.valid], label_smoothing=label_smoothing)
    if sentiment_loss == "ce":
        return sign_cross_entropy(logits, batch.labels, batch.valid)
    return F.l1_loss(logits[..., 0][batch.valid], batch.labels[batch.valid])


def rdrop_loss(first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor, info: DatasetInfo,
               scores: bool = True) -> torch.Tensor:
    """R-Drop consistency of two dropout passes over the valid utterances: symmetric KL of class logits, or MSE
    of sentiment scores (``info.task == "regression"`` and ``scores``)."""
    first, second = first[valid], second[valid]
    if info.task == "regression" and scores:
        return F.mse_loss(first, second)
    log_p, log_q = first.log_softmax(-1), second.log_softmax(-1)
    return 0.5 * (F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
                  + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))


def reconstruction_loss(restored: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_rec of eq. 11 as a mean squared error over every modality of every valid utterance."""
    return F.mse_loss(restored[valid], target[valid])


def predictions(logits: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """(B, L) class ids (sign classes for a 2-logit sentiment model), or sentiment scores of a 1-output one."""
    return logits[..., 0] if logits.shape[-1] == 1 and info.task == "regression" else logits.argmax(-1)


def unwrap(model: torch.nn.Module) -> CaMHG:
    return model.module if isinstance(model, DistributedDataParallel) else model


def phase_loss(model: torch.nn.Module, batch: Batch, present: torch.Tensor, eta: float, phase: int,
               config: CaMHGConfig, info: DatasetInfo, *, rdrop: bool) -> tuple[torch.Tensor, dict, CaMHGOutput]:
    """The loss Algorithm 1 minimises in ``phase`` on ``batch`` under the mask ``present``; its parts; the output.

    Phase 1: L_task (+ R-Drop); phase 2: L_rec; phase 3: L_task (+ R-Drop) + lambda (1 + eta) L_rec (eq. 11).
    With R-Drop the batch runs twice through one forward call (stacked), so DDP sees one forward per backward.
    """
    core = unwrap(model)
    masked = batch.with_present(present)
    features, speakers = masked.features, masked.speakers
    copies = 2 if rdrop and phase != 2 else 1
    if copies == 2:
        features = {m: torch.cat([x, x]) for m, x in features.items()}
        present, speakers = torch.cat([masked.present, masked.present]), torch.cat([speakers, speakers])
    else:
        present = masked.present
    out: CaMHGOutput = model(features, present, speakers)
    parts = {}
    loss = torch.zeros((), device=present.device)
    if out.logits is not None:
        logits = out.logits.chunk(copies)
        parts["task"] = sum(task_loss(x, batch, info, config.label_smoothing, config.sentiment_loss)
                            for x in logits) / copies
        loss = loss + parts["task"]
        if copies == 2:
            parts["rdrop"] = rdrop_loss(logits[0], logits[1], batch.valid, info, config.predicts_score(info.task))
            loss = loss + config.rdrop_alpha * parts["rdrop"]
    if out.restored is not None:
        with torch.no_grad():  # h^{m,o}: the projection of the unmasked input, a fixed target (eq. 11)
            target = core.project(batch.features)
        restored = out.restored.chunk(copies)
        parts["rec"] = sum(reconstruction_loss(x, target, batch.valid) for x in restored) / copies
        loss = loss + (parts["rec"] if phase == 2 else config.rec_weight * (1.0 + eta) * parts["rec"])
    if out.aux_loss is not None:
        parts["moe_aux"] = out.aux_loss
        loss = loss + config.moe_aux_weight * out.aux_loss
    return loss, parts, out


def dialogues_slice(batch: Batch, start: int, stop: int) -> Batch:
    """Dialogues ``start:stop`` of ``batch``, trimmed to the longest of them (right padding: the valid utterances'
    outputs do not change, the causal masks never let them see padding)."""
    length = int(batch.lengths[start:stop].max())
    return Batch(features={m: x[start:stop, :length] for m, x in batch.features.items()},
                 present=batch.present[start:stop, :length], speakers=batch.speakers[start:stop, :length],
                 labels=batch.labels[start:stop, :length], valid=batch.valid[start:stop, :length],
                 lengths=batch.lengths[start:stop], vids=batch.vids[start:stop])


def backward_in_chunks(model: torch.nn.Module, batch: Batch, present: torch.Tensor, eta: float, phase: int,
                       config: CaMHGConfig, info: DatasetInfo, *, rdrop: bool,
                       scaler: Optional[torch.amp.GradScaler] = None) -> tuple[torch.Tensor, dict]:
    """``phase_loss(...).backward()`` for ``batch`` run over chunks of ``config.chunk_size`` dialogues, each loss
    weighted by its share of the valid utterances; returns the weighted loss and parts (detached). The forward runs
    under the autocast of ``config.precision`` (``mer.precision``); ``scaler`` (fp16) scales the losses backpropagated.

    Every loss term is a mean over valid utterances, so the gradients equal those of the whole batch (up to float
    rounding) except the MoE load-balancing term, which becomes the weighted mean of the chunks' ones. Memory grows
    with the chunk, not the batch: the dense attention of the CPU path holds (chunk, heads, 3L, 3L) scores per layer.
    """
    size = config.chunk_size or batch.batch_size
    starts = list(range(0, batch.batch_size, size))
    total_valid = batch.valid.sum()
    loss_sum, parts_sum = torch.zeros((), device=present.device), {}
    for index, start in enumerate(starts):
        chunk = dialogues_slice(batch, start, start + size)
        weight = chunk.valid.sum() / total_valid
        last = index == len(starts) - 1
        synced = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with synced:
            with autocast(config.precision, present.device):
                loss, parts, _ = phase_loss(model, chunk, present[start:start + size, :chunk.max_len], eta, phase,
                                            config, info, rdrop=rdrop)
            weighted = loss * weight
            (weighted if scaler is None else scaler.scale(weighted)).backward()
        loss_sum = loss_sum + weight * loss.detach()
        for name, value in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + weight * value.detach()
    return loss_sum, parts_sum


# ------------------------------------------------------------------------------------------------ optimisation
def build_optimizer(model: CaMHG, phase: int, config: CaMHGConfig) -> torch.optim.Optimizer:
    """AdamW over what ``phase`` trains; phase 3 uses the differential learning rates of Table 6, the projector,
    hypergraph and classifier at the reduced ``p3_lr`` (section 4.1.3; the phase-1 ``lr`` when None)."""
    groups = model.parameter_groups()
    if phase == 1:
        param_groups = [{"params": groups["projector"] + groups["mining"], "lr": config.lr}]
    elif phase == 2:
        param_groups = [{"params": groups["generator"], "lr": config.lr}]
    else:
        base = config.lr if config.p3_lr is None else config.p3_lr
        param_groups = [{"params": groups["projector"] + groups["mining"], "lr": base},
                        {"params": groups["generator"], "lr": config.gen_lr},
                        {"params": groups["gate"], "lr": config.gate_lr}]
    param_groups = [g for g in param_groups if g["params"]]
    return torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, config: CaMHGConfig):
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)


def phase_of(epoch: int, config: CaMHGConfig, model: CaMHG) -> int:
    """The phase of 0-based global ``epoch``; phase 2 has no epochs when the model does not impute."""
    bounds = list(effective_epochs(config, model))
    for phase, count in zip((1, 2, 3), bounds):
        if epoch < count:
            return phase
        epoch -= count
    raise ValueError(f"epoch {epoch} is past the last epoch")


def effective_epochs(config: CaMHGConfig, model: CaMHG) -> tuple[int, int, int]:
    k1, k2, k3 = config.epochs
    return (k1, k2 if model.imputes else 0, k3)


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    run_dir: Path
    model: CaMHG
    info: DatasetInfo
    tables: dict  # name -> mer.metrics.ResultTable (empty on non-main ranks or with evaluate=False)


def make_loader(dataset: DialogueDataset, batch_size: int, *, shuffle_generator: Optional[torch.Generator] = None,
                sampler=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle_generator is not None and sampler is None,
                      generator=shuffle_generator, sampler=sampler, collate_fn=collate_dialogues)


@torch.no_grad()
def validate(model: CaMHG, dataset: DialogueDataset, phase: int, config: CaMHGConfig, info: DatasetInfo,
             device: torch.device) -> dict:
    """The phase's loss and the task metric on ``dataset`` under a fixed random mask (VALIDATION_MISSING_RATE)."""
    model.eval()
    total, count, outputs, labels, valids = 0.0, 0, [], [], []
    for index, batch in enumerate(make_loader(dataset, config.batch_size)):
        batch = batch.to(device)
        present = batch_missing_mask(batch, VALIDATION_MISSING_RATE, config.data_seed * 1000 + index)
        loss, _, out = phase_loss(model, batch, present, VALIDATION_MISSING_RATE, phase, config, info, rdrop=False)
        total, count = total + loss.item() * batch.batch_size, count + batch.batch_size
        if out.logits is not None:
            outputs.append(predictions(out.logits, info).flatten().cpu())
            labels.append(batch.labels.flatten().cpu())
            valids.append(batch.valid.flatten().cpu())
    result = {"val_loss": total / max(count, 1)}
    if outputs:
        y_true, y_pred = valid_targets(torch.cat(outputs), torch.cat(labels), torch.cat(valids))
        metrics = task_metrics(info.task, y_true, y_pred, scores=config.predicts_score(info.task))
        result.update({f"val_{k}": v for k, v in metrics.items()})
    return result


def train(config: Optional[CaMHGConfig], *, run_dir: Path, resume: bool = False, ctx: Optional[DistContext] = None,
          **options) -> RunResult:
    """Train (or resume) one run in ``run_dir``; evaluate the final model on the test split when ``evaluate``.

    Options: ``data_root``, ``stop_after_epoch``, ``evaluate``, ``plots``, ``device``, ``show_progress``,
    ``keep_every``, ``verbose`` (see ``_train``). The main process claims ``run_dir`` first
    (``claim_run_directory``): a second run on it fails at once, changing nothing.
    """
    ctx = ctx or init_distributed()
    with claim_run_directory(run_dir, enabled=ctx.is_main, must_exist=resume):
        return _train(config, run_dir=Path(run_dir), resume=resume, ctx=ctx, **options)


def _train(config: Optional[CaMHGConfig], *, run_dir: Path, data_root: Optional[str] = None, resume: bool = False,
           stop_after_epoch: Optional[int] = None, evaluate: bool = True, plots: bool = True,
           device: str = "auto", show_progress: bool = True, ctx: DistContext, keep_every: Optional[int] = None,
           verbose: bool = False) -> RunResult:
    """``train`` once ``run_dir`` is claimed.

    With ``resume`` the configuration comes from the run's last checkpoint, the newest intact ``epoch_NNN.pt``
    when ``last.pt`` is damaged (``config`` is ignored, may be None).

    ``stop_after_epoch=k`` stops after the (1-based) k-th epoch, as a kill would (tests of exact resume).
    Checkpoints: ``last.pt``, ``best.pt`` (best validation metric) and ``epoch_NNN.pt`` (epochs counted from 1) for
    every ``keep_every``-th epoch (None: every epoch, 0: none). ``verbose``: an opening line and one line per epoch.
    Raises NonFiniteLossError (DivergedLossError), with the checkpoints written so far left in place, when a loss
    turns NaN or infinite or diverges (``LossGuard``).
    """
    torch_device = ctx.device if ctx.enabled else select_device(device)
    checkpoints_dir = run_dir / "checkpoints"
    state = None
    if resume:
        state = CheckpointManager(checkpoints_dir).latest(required=RESUME_KEYS)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoints_dir / 'last.pt'}")
        config = CaMHGConfig.from_dict(state["config"])
        if len(state["rank_states"]) != ctx.world_size:
            raise ValueError(f"--resume: the run was trained by {len(state['rank_states'])} process(es); resume it "
                             f"with as many (got {ctx.world_size}) so that every rank gets its random streams back")
    elif (checkpoints_dir / "last.pt").exists() or (run_dir / "metrics.csv").exists():
        raise FileExistsError(f"{run_dir} already holds a run: resume it (--resume {run_dir}) or pick another "
                              f"--run-name")

    splits = load_dataset(config.dataset, data_root, seed=config.data_seed, **config.dataset_options)
    splits = with_validation(splits, config.validation)
    info = splits.info
    seed_everything(config.seed + ctx.rank)
    model = CaMHG(config, info.dims, config.num_outputs(info.task, info.num_classes)).to(torch_device)
    checkpoints = CheckpointManager(checkpoints_dir, keep_every=keep_every) if ctx.is_main else None
    logger = RunLogger(run_dir, step_name="epoch", enabled=ctx.is_main)
    guard = LossGuard(checkpoints, ctx=ctx)  # one stop decision for all ranks
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    shuffle = make_generator(config.seed)
    mask_generator = make_generator(config.seed * 7919 + 1 + ctx.rank)
    sampler = (DistributedSampler(splits.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                  seed=config.seed) if ctx.enabled else None)
    loader = make_loader(splits.train, config.batch_size, shuffle_generator=shuffle, sampler=sampler)

    epochs = effective_epochs(config, model)
    total_epochs, start = sum(epochs), 0  # epochs are counted from 1; ``epoch`` below is the 0-based index
    optimizer = scheduler = None
    say = print if verbose and ctx.is_main else (lambda *args, **kwargs: None)
    say(f"CaM-HG ({config.ablation}) on {info.name}: {len(splits.train)} / "
        f"{len(splits.valid) if splits.valid is not None else 0} / {len(splits.test)} train / valid / test dialogues, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters (float32), d = {config.hidden}, epochs "
        f"{' + '.join(map(str, epochs))} (phases 1-3), device {torch_device}"
        f"{f' x {ctx.world_size} processes' if ctx.enabled else ''}; run folder {run_dir}", flush=True)
    scaler = grad_scaler(config.precision, torch_device)
    if state is not None:
        model.set_phase(state["phase"])  # so that entering phase 3 after a resume still resets the gate bias
        model.load_state_dict(state["model"])
        start = state["epoch"]
        guard.checkpoint_saved(state["epoch"])
        shuffle.set_state(state["shuffle"])
        scaler.load_state_dict(state.get("grad_scaler", {}))
        mask_generator.set_state(state["rank_states"][ctx.rank]["mask_generator"])
        logger.drop_after(state["epoch"])
        say(f"resuming after epoch {state['epoch']} of {total_epochs} (phase {state['phase']})", flush=True)
    main_metric = "val_WAF1" if info.task == "classification" else "val_Acc2"
    current_phase = None
    try:
        for epoch in range(start, total_epochs):
            phase = phase_of(epoch, config, model)
            if phase != current_phase:
                model.set_phase(phase)
                optimizer = build_optimizer(model, phase, config)
                scheduler = build_scheduler(optimizer, epochs[phase - 1], config)
                if state is not None and state["phase"] == phase:  # resuming inside the phase it stopped in
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
                current_phase = phase
                # every parameter that requires a gradient gets one in each phase (set_phase freezes the rest)
                train_model = DistributedDataParallel(model) if ctx.enabled else model
            if state is not None and epoch == start:
                # after every build step that consumed random numbers; each rank gets its own streams back
                restore_rng_state(state["rank_states"][ctx.rank]["rng_state"])
            if sampler is not None:
                sampler.set_epoch(epoch)
            train_model.train()
            began = time.perf_counter()
            running = {"loss": torch.zeros((), device=torch_device)}
            steps = 0
            for step, batch in enumerate(progress(loader, desc=f"phase {phase} epoch {epoch + 1}/{total_epochs}",
                                                  enabled=show_progress and ctx.is_main)):
                batch = batch.to(torch_device)
                present, eta = camhg_training_mask(batch, mask_generator)
                optimizer.zero_grad(set_to_none=True)
                loss, parts = backward_in_chunks(train_model, batch, present, eta, phase, config, info,
                                                 rdrop=config.rdrop_alpha > 0, scaler=scaler)
                # after the backward, before the step: the model is unchanged when the guard stops the run
                guard.check(loss, epoch=epoch, phase=phase, where=f"phase {phase}, epoch {epoch + 1}, step {step + 1}")
                trained = (p for p in model.parameters() if p.requires_grad)
                clip_and_step(optimizer, scaler, parameters=trained, grad_clip=config.grad_clip)
                for name, value in {"loss": loss, **parts}.items():
                    running[name] = running.get(name, 0.0) + value.detach()
                steps += 1
            means = {f"train_{name}": all_reduce_mean(total / max(steps, 1), ctx).item()
                     for name, total in running.items()}
            values = {"phase": phase, **means, "lr": optimizer.param_groups[0]["lr"]}
            if splits.valid is not None and len(splits.valid) > 0:
                values.update(validate(model, splits.valid, phase, config, info, torch_device))
            values["seconds"] = time.perf_counter() - began
            plateau_value = values.get("val_loss", values["train_loss"])
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(plateau_value)
            else:
                scheduler.step()
            logger.log(epoch + 1, values)
            # every rank's random streams (dropout, training masks) differ: the checkpoint keeps them all
            rank_states = all_gather_objects({"rng_state": capture_rng_state(),
                                              "mask_generator": mask_generator.get_state()}, ctx)
            if ctx.is_main:
                payload = {"config": config.to_dict(), "info": vars(info), "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "grad_scaler": scaler.state_dict(),
                           "phase": phase, "shuffle": shuffle.get_state(), "rank_states": rank_states}
                with deferred_interrupt():  # Ctrl-C waits for the checkpoint of this epoch
                    checkpoints.save(payload, epoch=epoch + 1)
                    if main_metric in values:
                        checkpoints.save_best({**payload, "epoch": epoch + 1}, values[main_metric])
                say(epoch_line(epoch + 1, total_epochs, f"phase {phase}", values), flush=True)
            guard.checkpoint_saved(epoch + 1)
            barrier(ctx)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:
        logger.close()
    if plots and ctx.is_main and (run_dir / "metrics.csv").is_file():
        from mer.plots import plot_training_curves

        plot_training_curves(run_dir / "metrics.csv", run_dir / "training_curves.png",
                             title=f"CaM-HG ({config.ablation}) on {info.name}")

    tables = {}
    finished = stop_after_epoch is None or stop_after_epoch >= total_epochs
    if evaluate and finished and ctx.is_main:
        from .evaluate import evaluate_model

        tables = evaluate_model(model, splits.test, info, config, run_dir, device=torch_device, plots=plots,
                                show_progress=show_progress)
    barrier(ctx)
    return RunResult(run_dir, model, info, tables)


# --------------------------------------------------------------------------------------------------------- CLI
MODULE = "camhg.train"
RESUME_OPTIONS = ("data_root", "stop_after_epoch", "device", "threads", "plots", "progress", "keep_checkpoints")


def build_parser():
    parser = new_parser(MODULE, __doc__)
    add_data_options(parser, sorted(PRESETS))
    add_model_options(parser, epochs=("K1", "K2", "K3"),
                      epochs_help="epochs of the three phases: discriminative warm-up, generative pre-training, "
                                  "joint fine-tuning (Algorithm 1)")
    add_camhg_protocol_options(parser)
    add_run_options(parser, model="camhg", ablations=ABLATIONS)
    return parser


def add_camhg_protocol_options(parser) -> None:
    """CaM-HG's protocol flags besides mer.cli's (shared by ``camhg.train`` and ``camhg.ablations``)."""
    add_protocol_options(parser)
    parser.add_argument("--p3-lr", type=positive_float, default=None,
                        help="phase 3's learning rate of the projector, hypergraph and classifier (section 4.1.3: "
                             "reduced to [2e-5, 8e-5]) (default: the preset's, see camhg/config.py)")


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    reject_options_on_resume(parser, args, allowed=RESUME_OPTIONS)
    return args


def preset_overrides(args, fold: Optional[int] = None) -> dict:
    """The preset overrides that ``--epochs --batch-size --lr --hidden --dropout --dims --num-dialogues --p3-lr
    --sentiment-loss --validation`` and ``fold`` (an IEMOCAP session held out, None: the default split) ask for
    (shared by ``camhg.train`` and ``camhg.ablations``)."""
    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = tuple(args.epochs)
    for name in ("batch_size", "lr", "hidden", "dropout", "p3_lr", "sentiment_loss", "precision"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    overrides["validation"] = args.validation
    options = dict(PRESETS[args.dataset].get("dataset_options", {}))
    if args.dims is not None:
        options["dims"] = args.dims
    if args.num_dialogues is not None:
        options["num_dialogues"] = tuple(args.num_dialogues)
    try:
        options = dataset_options_for(args.dataset, options, fold=fold, validation=args.validation)
    except ValueError as error:
        raise UserError(str(error)) from None
    if options:
        overrides["dataset_options"] = options
    return overrides


def config_from_args(args, fold: Optional[int] = None) -> CaMHGConfig:
    try:
        return preset(args.dataset, seed=args.seed, data_seed=args.data_seed, ablation=args.ablation,
                      **preset_overrides(args, fold))
    except ValueError as error:  # combinations argparse cannot see (e.g. --hidden not a multiple of the heads)
        raise UserError(str(error)) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    started = resumed_folds_arguments(build_parser(), args)
    if started is not None:  # --resume of a --folds all run: the whole set
        for table in train_folds(started, args.resume).values():
            table.print()
        print(f"run folder: {args.resume} (one folder per fold)")
        return 0
    if args.resume is not None:
        run_dir = args.resume
        check_resumable(run_dir, finished_marker="missing_rates.json", evaluate_command="python -m camhg.evaluate")
        config = None
    else:
        check_data_options(args, EMBEDDED_NAMES)
        config = config_from_args(args, args.fold)
        run_dir = args.runs_dir / "camhg" / config.dataset / (args.run_name or default_run_name(config.ablation,
                                                                                                config.seed))
        if launch_rank() == 0:  # under torchrun rank 0 alone claims the folder
            check_new_run(run_dir)
    if args.folds == "all":
        if args.stop_after_epoch is not None:
            raise UserError("--stop-after-epoch stops one run; with --folds all resume a fold's folder instead")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--folds all trains the folds one after the other in one process; under torchrun run "
                            "each fold with --fold K")
        save_folds_command(run_dir, argv)
        for table in train_folds(args, run_dir).values():
            table.print()
        print(f"run folder: {run_dir} (one folder per fold)")
        return 0
    ctx = init_distributed()
    try:
        with training_run(MODULE, run_dir):
            result = train(config, run_dir=run_dir, resume=args.resume is not None, data_root=args.data_root,
                           stop_after_epoch=args.stop_after_epoch, plots=args.plots, device=args.device,
                           show_progress=args.progress, ctx=ctx, keep_every=args.keep_checkpoints, verbose=True)
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed(ctx)
    if ctx.is_main:
        for table in result.tables.values():
            table.print()
        if args.stop_after_epoch is not None and not result.tables:
            print(f"stopped after epoch {args.stop_after_epoch}; resume with: "
                  f"{command_name(MODULE)} --resume {run_dir}")
        print(f"run folder: {result.run_dir}")
    return 0


FOLD_TABLES = ("missing_rates", "conditions")  # the tables camhg.evaluate.evaluate_model writes


def train_folds(args, run_dir: Path) -> dict:
    """``--folds all``: one run per IEMOCAP session held out, in ``run_dir/fold<k>`` (one process); saves and returns
    each result table averaged over the folds (``run_dir/<table>_folds``). A finished fold is reused, a stopped one
    resumed (``--resume RUN_DIR`` of a ``--folds all`` run comes here with the arguments it started with)."""
    def train_fold(fold: int, fold_dir: Path, resume: bool) -> dict:
        return train(None if resume else config_from_args(args, fold), run_dir=fold_dir, resume=resume,
                     data_root=args.data_root, plots=args.plots, device=args.device, show_progress=args.progress,
                     keep_every=args.keep_checkpoints, verbose=True).tables

    def load(fold_dir: Path) -> dict:
        return {name: ResultTable.load(fold_dir / f"{name}.json") for name in FOLD_TABLES}

    per_fold = run_folds(MODULE, run_dir, finished="missing_rates.json", load=load, train=train_fold)
    config = config_from_args(args, FOLDS[0])
    validation = validation_caption(config.dataset, config.dataset_options, config.validation)
    averaged = {}
    for name, first in per_fold[0].items():
        title = (f"{first.title.split(' (')[0]} (5-fold leave-one-session-out, test sessions; seed {config.seed}; "
                 f"{validation})")
        averaged[name] = average_over_folds([tables[name] for tables in per_fold], title)
        averaged[name].save(run_dir / f"{name}_folds")
    return averaged


def launch_rank() -> int:
    """This process's torchrun rank before the process group exists (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def cli(argv=None) -> int:
    """Console script ``camhg-train``."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
