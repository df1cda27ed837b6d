"""Train CaM-HG with the three-phase curriculum of Algorithm 1, then evaluate it (paper Tables 2-3 and 7, Fig. 4).

    python -m camhg.train                                  # embedded dataset, CPU-sized, a few minutes
    python -m camhg.train --dataset iemocap4 --data-root DATA
    python -m camhg.train --resume runs/camhg/embedded/RUN # continue a stopped run exactly
    torchrun --nproc-per-node 2 -m camhg.train             # DistributedDataParallel (gloo on CPU)

Everything of a run lands in ``runs/camhg/<dataset>/<run-name>/``: ``config.json``, ``metrics.csv`` (and
TensorBoard), ``checkpoints/`` (``last.pt``, ``epoch_NNN.pt``), the result tables (markdown, JSON, CSV) and the
confusion-matrix plots. Rank 0 alone logs, saves and evaluates.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from mer.data import Batch, DatasetInfo, DialogueDataset, collate_dialogues, load_dataset
from mer.metrics import task_metrics, valid_targets
from mer.missing import batch_missing_mask, camhg_training_mask
from mer.precision import PRECISIONS, autocast, backward_and_step, grad_scaler
from mer.training import (
    CheckpointManager,
    DistContext,
    NonFiniteLossError,
    RunLogger,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    capture_rng_state,
    check_finite,
    cleanup_distributed,
    init_distributed,
    make_generator,
    progress,
    reject_options_on_resume,
    restore_rng_state,
    seed_everything,
    select_device,
)

from .config import PRESETS, CaMHGConfig, preset
from .model import CaMHG, CaMHGOutput

VALIDATION_MISSING_RATE = 0.3  # validation sees a fixed random mask at this rate (the middle of Tables 2-3)


# -------------------------------------------------------------------------------------------------------- losses
def task_loss(logits: torch.Tensor, batch: Batch, info: DatasetInfo, label_smoothing: float) -> torch.Tensor:
    """Mean over valid utterances: cross-entropy (classification) or L1 (sentiment regression)."""
    if info.task == "classification":
        return F.cross_entropy(logits[batch.valid], batch.labels[batch.valid], label_smoothing=label_smoothing)
    return F.l1_loss(logits[..., 0][batch.valid], batch.labels[batch.valid])


def rdrop_loss(first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """R-Drop consistency of two dropout passes over the valid utterances: symmetric KL, or MSE for regression."""
    first, second = first[valid], second[valid]
    if info.task == "regression":
        return F.mse_loss(first, second)
    log_p, log_q = first.log_softmax(-1), second.log_softmax(-1)
    return 0.5 * (F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
                  + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))


def reconstruction_loss(restored: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_rec of eq. 11 as a mean squared error over every modality of every valid utterance."""
    return F.mse_loss(restored[valid], target[valid])


def predictions(logits: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """(B, L) class ids, or sentiment scores for regression."""
    return logits.argmax(-1) if info.task == "classification" else logits[..., 0]


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
        parts["task"] = sum(task_loss(x, batch, info, config.label_smoothing) for x in logits) / copies
        loss = loss + parts["task"]
        if copies == 2:
            parts["rdrop"] = rdrop_loss(logits[0], logits[1], batch.valid, info)
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


# ------------------------------------------------------------------------------------------------ optimisation
def build_optimizer(model: CaMHG, phase: int, config: CaMHGConfig) -> torch.optim.Optimizer:
    """AdamW over what ``phase`` trains; phase 3 uses the differential learning rates of Table 6."""
    groups = model.parameter_groups()
    if phase == 1:
        param_groups = [{"params": groups["projector"] + groups["mining"], "lr": config.lr}]
    elif phase == 2:
        param_groups = [{"params": groups["generator"], "lr": config.lr}]
    else:
        param_groups = [{"params": groups["projector"] + groups["mining"], "lr": config.lr},
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
        metrics = task_metrics(info.task, y_true, y_pred)
        result.update({f"val_{k}": v for k, v in metrics.items()})
    return result


def default_run_name(config: CaMHGConfig) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "" if config.ablation == "full" else f"-{config.ablation}"
    return f"{stamp}-seed{config.seed}{suffix}"


def train(config: Optional[CaMHGConfig], *, run_dir: Path, data_root: Optional[str] = None, resume: bool = False,
          stop_after_epoch: Optional[int] = None, evaluate: bool = True, plots: bool = True,
          device: str = "auto", show_progress: bool = True, ctx: Optional[DistContext] = None) -> RunResult:
    """Train (or resume) one run in ``run_dir``; evaluate the final model on the test split when ``evaluate``.

    With ``resume`` the configuration comes from the run's last checkpoint (``config`` is ignored, may be None).

    ``stop_after_epoch=k`` stops after the (1-based) k-th epoch, as a kill would (tests of exact resume).
    Raises NonFiniteLossError, with the last good checkpoint left in place, when a loss turns NaN or infinite.
    """
    ctx = ctx or init_distributed()
    torch_device = ctx.device if ctx.enabled else select_device(device)
    run_dir = Path(run_dir)
    checkpoints_dir = run_dir / "checkpoints"
    state = None
    if resume:
        if not (checkpoints_dir / "last.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoints_dir / 'last.pt'}")
        state = CheckpointManager(checkpoints_dir).latest()
        config = CaMHGConfig.from_dict(state["config"])
        if len(state["rank_states"]) != ctx.world_size:
            raise ValueError(f"--resume: the run was trained by {len(state['rank_states'])} process(es); resume it "
                             f"with as many (got {ctx.world_size}) so that every rank gets its random streams back")
    elif (checkpoints_dir / "last.pt").exists() or (run_dir / "metrics.csv").exists():
        raise FileExistsError(f"{run_dir} already holds a run: resume it (--resume {run_dir}) or pick another "
                              f"--run-name")

    splits = load_dataset(config.dataset, data_root, seed=config.data_seed, **config.dataset_options)
    info = splits.info
    seed_everything(config.seed + ctx.rank)
    model = CaMHG(config, info.dims, info.num_classes).to(torch_device)
    checkpoints = CheckpointManager(checkpoints_dir) if ctx.is_main else None
    logger = RunLogger(run_dir, step_name="epoch", enabled=ctx.is_main)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    shuffle = make_generator(config.seed)
    mask_generator = make_generator(config.seed * 7919 + 1 + ctx.rank)
    sampler = (DistributedSampler(splits.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                  seed=config.seed) if ctx.enabled else None)
    loader = make_loader(splits.train, config.batch_size, shuffle_generator=shuffle, sampler=sampler)

    epochs = effective_epochs(config, model)
    total_epochs, start = sum(epochs), 0
    optimizer = scheduler = None
    scaler = grad_scaler(config.precision, torch_device)
    if state is not None:
        model.set_phase(state["phase"])  # so that entering phase 3 after a resume still resets the gate bias
        model.load_state_dict(state["model"])
        start = state["epoch"] + 1
        shuffle.set_state(state["shuffle"])
        scaler.load_state_dict(state.get("grad_scaler", {}))
        mask_generator.set_state(state["rank_states"][ctx.rank]["mask_generator"])
        logger.drop_after(state["epoch"] + 1)
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
                train_model = (DistributedDataParallel(model, find_unused_parameters=True) if ctx.enabled
                               else model)
            if state is not None and epoch == start:
                # after every build step that consumed random numbers; each rank gets its own streams back
                restore_rng_state(state["rank_states"][ctx.rank]["rng_state"])
            if sampler is not None:
                sampler.set_epoch(epoch)
            train_model.train()
            running = torch.zeros((), device=torch_device)
            steps = 0
            for step, batch in enumerate(progress(loader, desc=f"phase {phase} epoch {epoch + 1}/{total_epochs}",
                                                  enabled=show_progress and ctx.is_main)):
                batch = batch.to(torch_device)
                present, eta = camhg_training_mask(batch, mask_generator)
                with autocast(config.precision, torch_device):
                    loss, _, _ = phase_loss(train_model, batch, present, eta, phase, config, info,
                                            rdrop=config.rdrop_alpha > 0)
                check_finite(loss, where=f"phase {phase}, epoch {epoch + 1}, step {step + 1}",
                             last_checkpoint=checkpoints_dir / "last.pt")
                optimizer.zero_grad(set_to_none=True)
                trained = (p for p in model.parameters() if p.requires_grad)
                backward_and_step(loss, optimizer, scaler, parameters=trained, grad_clip=config.grad_clip)
                running += loss.detach()
                steps += 1
            train_loss = all_reduce_mean(running / max(steps, 1), ctx).item()
            values = {"phase": phase, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}
            if splits.valid is not None and len(splits.valid) > 0:
                values.update(validate(model, splits.valid, phase, config, info, torch_device))
            plateau_value = values.get("val_loss", train_loss)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(plateau_value)
            else:
                scheduler.step()
            logger.log(epoch + 1, values)
            # every rank's random streams (dropout, training masks) differ: the checkpoint keeps them all
            rank_states = all_gather_objects({"rng_state": capture_rng_state(),
                                              "mask_generator": mask_generator.get_state()}, ctx)
            if ctx.is_main:
                checkpoints.save({"config": config.to_dict(), "info": vars(info), "model": model.state_dict(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "grad_scaler": scaler.state_dict(),
                                  "phase": phase, "shuffle": shuffle.get_state(), "rank_states": rank_states},
                                 epoch=epoch)
            barrier(ctx)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:
        logger.close()

    tables = {}
    finished = stop_after_epoch is None or stop_after_epoch >= total_epochs
    if evaluate and finished and ctx.is_main:
        from .evaluate import evaluate_model

        tables = evaluate_model(model, splits.test, info, config, run_dir, device=torch_device, plots=plots)
    barrier(ctx)
    return RunResult(run_dir, model, info, tables)


# --------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m camhg.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="embedded", choices=sorted(PRESETS),
                        help="dataset and its Table 6 preset (default: embedded, generated, no files)")
    parser.add_argument("--data-root", default=None, help="folder of the published features (not for embedded)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, shuffling, dropout, training masks")
    parser.add_argument("--data-seed", type=int, default=0, help="the embedded dataset and the validation split")
    parser.add_argument("--ablation", default="full", help="full or a Table 4 variant (see camhg.config.ABLATIONS)")
    parser.add_argument("--epochs", type=int, nargs=3, metavar=("K1", "K2", "K3"), default=None,
                        help="epochs of the warm-up, generative pre-training and joint fine-tuning phases")
    parser.add_argument("--hidden", type=int, default=None, help="model width d (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="training precision: autocast bf16/fp16 (fp16 with a GradScaler); default fp32")
    parser.add_argument("--dims", default=None, help="embedded only: 'full' or 'small' feature sizes")
    parser.add_argument("--num-dialogues", type=int, default=None, help="embedded only: dataset size")
    parser.add_argument("--runs-dir", default="runs", help="runs land in RUNS_DIR/camhg/<dataset>/<run-name>")
    parser.add_argument("--run-name", default=None, help="default: a timestamp and the seed")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    parser.add_argument("--stop-after-epoch", type=int, default=None, help="stop after this many epochs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (torchrun picks per rank)")
    parser.add_argument("--no-plots", action="store_true", help="skip the confusion-matrix plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    reject_options_on_resume(parser, args, allowed=("data_root", "stop_after_epoch", "device", "no_plots",
                                                    "no_progress"))
    return args


def preset_overrides(args: argparse.Namespace) -> dict:
    """The preset overrides that the command-line options ``--epochs --hidden --batch-size --dims --num-dialogues``
    ask for (shared by ``camhg.train`` and ``camhg.ablations``)."""
    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = tuple(args.epochs)
    if args.hidden is not None:
        overrides["hidden"] = args.hidden
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if getattr(args, "precision", None) is not None:
        overrides["precision"] = args.precision
    options = dict(PRESETS[args.dataset].get("dataset_options", {}))
    if args.dims is not None:
        options["dims"] = args.dims
    if args.num_dialogues is not None:
        options["num_dialogues"] = args.num_dialogues
    if options:
        overrides["dataset_options"] = options
    return overrides


def config_from_args(args: argparse.Namespace) -> CaMHGConfig:
    return preset(args.dataset, seed=args.seed, data_seed=args.data_seed, ablation=args.ablation,
                  **preset_overrides(args))


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = init_distributed()
    try:
        if args.resume is not None:
            result = train(None, run_dir=Path(args.resume), resume=True, data_root=args.data_root,
                           stop_after_epoch=args.stop_after_epoch, plots=not args.no_plots, device=args.device,
                           show_progress=not args.no_progress, ctx=ctx)
        else:
            config = config_from_args(args)
            run_dir = Path(args.runs_dir) / "camhg" / config.dataset / (args.run_name or default_run_name(config))
            result = train(config, run_dir=run_dir, data_root=args.data_root,
                           stop_after_epoch=args.stop_after_epoch, plots=not args.no_plots, device=args.device,
                           show_progress=not args.no_progress, ctx=ctx)
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    # bad arguments, data or run folder: say so, no traceback
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(ctx)
    if ctx.is_main:
        for table in result.tables.values():
            table.print()
        print(f"run saved under {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
