"""Evaluate CaM-HG as the paper does: missing rates 0.0-0.7 (Tables 2-3), the seven available-modality subsets
(Table 7) and confusion matrices (Fig. 4).

    python -m camhg.evaluate runs/camhg/embedded/RUN          # the run's checkpoints/last.pt
    python -m camhg.evaluate runs/camhg/embedded/RUN/checkpoints/best.pt

writes ``missing_rates.{md,json,csv}``, ``conditions.{md,json,csv}`` and ``confusion_eta*.png`` to the run's
``evaluation/`` folder (or to ``--out``). The random masks are drawn from fixed seeds, so two evaluations of one
model agree.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from mer.data import Batch, DatasetInfo, DialogueDataset, collate_dialogues, load_dataset
from mer.metrics import ResultTable, task_metrics, valid_targets
from mer.missing import batch_missing_mask, condition_mask
from mer.protocols import protocol_caption, with_validation
from mer.cli import UserError, add_evaluate_options, checkpoint_of, new_parser, run_command, run_folder_of
from mer.training import CheckpointError, load_checkpoint, progress, select_device

from .config import CaMHGConfig
from .model import CaMHG

# Table 7's rows in the paper's order: {l}, {v}, {a}, {l, v}, {l, a}, {v, a}, {l, v, a} (l = text = our "t").
CONDITION_ORDER = ("t", "v", "a", "tv", "at", "av", "atv")
CONFUSION_MISSING_RATES = (0.1, 0.3, 0.5, 0.7)  # Fig. 4
EVALUATION_SEED = 12345  # the masks of the test set do not depend on the training seed


def headline_metrics(info: DatasetInfo) -> tuple[str, ...]:
    """The metrics a table reports: WA/UA/WAF1 (emotions) or Acc2/F1/MAE/Corr (sentiment)."""
    return ("WA", "UA", "WAF1") if info.task == "classification" else ("Acc2", "F1", "MAE", "Corr")


@torch.no_grad()
def predict(model: CaMHG, dataset: DialogueDataset, mask_of: Callable[[Batch], torch.Tensor], *,
            device: torch.device, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) over the valid utterances of ``dataset``, each batch masked with ``mask_of(batch)``."""
    model.eval()
    truths, preds = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_dialogues)
    for batch in loader:
        batch = batch.to(device)
        masked = batch.with_present(mask_of(batch))
        logits = model(masked.features, masked.present, masked.speakers).logits
        y_true, y_pred = valid_targets(logits, batch.labels, batch.valid)
        truths.append(y_true)
        preds.append(y_pred)
    return np.concatenate(truths), np.concatenate(preds)


def missing_rate_table(model: CaMHG, dataset: DialogueDataset, info: DatasetInfo, missing_rates, *,
                       device: torch.device, title: str, on_predictions=None,
                       show_progress: bool = False, batch_size: int = 32, scores: bool = True) -> ResultTable:
    """Rows: metrics; columns: the missing rates and their average (the layout of paper Tables 2-3)."""
    columns = [f"{eta:.1f}" for eta in missing_rates] + ["Average"]
    by_rate = {}
    for index, eta in enumerate(progress(missing_rates, desc="test: missing rates", enabled=show_progress)):
        rng = np.random.default_rng([EVALUATION_SEED, index])
        y_true, y_pred = predict(model, dataset, lambda batch: batch_missing_mask(batch, eta, rng), device=device,
                                 batch_size=batch_size)
        by_rate[f"{eta:.1f}"] = task_metrics(info.task, y_true, y_pred, scores=scores)
        if on_predictions is not None:
            on_predictions(eta, y_true, y_pred)
    table = ResultTable(title, "metric", columns)
    for metric in headline_metrics(info):
        values = {column: by_rate[column][metric] for column in columns[:-1]}
        table.add_row(metric, {**values, "Average": float(np.mean(list(values.values())))})
    return table


def condition_table(model: CaMHG, dataset: DialogueDataset, info: DatasetInfo, *, device: torch.device,
                    title: str, show_progress: bool = False, batch_size: int = 32, scores: bool = True) -> ResultTable:
    """Rows: the seven available-modality subsets (paper Table 7); columns: metrics. ``scores=False``: the model
    predicts sentiment sign classes (MAE and Corr are NaN, mer.metrics.sentiment_metrics)."""
    table = ResultTable(title, "available", list(headline_metrics(info)))
    for condition in progress(CONDITION_ORDER, desc="test: modality subsets", enabled=show_progress):
        y_true, y_pred = predict(model, dataset, lambda batch: condition_mask(batch, condition), device=device,
                                 batch_size=batch_size)
        table.add_row("{" + ", ".join(condition) + "}", task_metrics(info.task, y_true, y_pred, scores=scores))
    return table


def evaluate_model(model: CaMHG, dataset: DialogueDataset, info: DatasetInfo, config: CaMHGConfig,
                   out_dir: Path, *, device: torch.device, plots: bool = True,
                   show_progress: bool = False, split: str = "test", batch_size: int = 32) -> dict[str, ResultTable]:
    """Both tables (saved under ``out_dir``) and, for classification with ``plots``, Fig. 4's confusion matrices.

    The random masks of the missing-rate table are drawn batch by batch: another ``batch_size`` draws other masks."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "CaM-HG" if config.ablation == "full" else f"CaM-HG ({config.ablation})"
    matrices = {}

    def keep_confusion(eta, y_true, y_pred):
        if plots and info.task == "classification" and any(abs(eta - r) < 1e-9 for r in CONFUSION_MISSING_RATES):
            matrices[eta] = confusion_matrix(y_true, y_pred, labels=list(range(info.num_classes)))

    protocol = protocol_caption(config.dataset, config.dataset_options, config.validation)
    scores = config.predicts_score(info.task)
    rates = missing_rate_table(model, dataset, info, config.missing_rates, device=device, on_predictions=keep_confusion,
                               title=f"{name} on {info.name} {split}: by missing rate eta ({protocol})",
                               show_progress=show_progress, batch_size=batch_size, scores=scores)
    conditions = condition_table(model, dataset, info, device=device, show_progress=show_progress, scores=scores,
                                 batch_size=batch_size,
                                 title=f"{name} on {info.name} {split}: by available modalities ({protocol})")
    rates.save(out_dir / "missing_rates")
    conditions.save(out_dir / "conditions")
    if matrices:
        from mer.plots import plot_confusion_matrix

        for eta, matrix in matrices.items():
            plot_confusion_matrix(matrix, info.class_names, out_dir / f"confusion_eta{eta:.1f}.png",
                                  title=f"{name}, {info.name}, eta = {eta:.1f}")
    return {"missing_rates": rates, "conditions": conditions}


def load_model(checkpoint: dict, device: torch.device) -> tuple[CaMHG, CaMHGConfig]:
    """The model of a checkpoint written by ``camhg.train``, in the phase it was saved in, in eval mode."""
    if "model_config" in checkpoint and "train_config" in checkpoint:
        raise UserError("this is a CARN checkpoint: evaluate it with python -m carn.evaluate")
    for key in ("config", "info", "model", "phase"):
        if key not in checkpoint:
            raise UserError(f"checkpoint lacks {key!r}: not a camhg.train checkpoint")
    config = CaMHGConfig.from_dict(checkpoint["config"])
    info = checkpoint["info"]
    if checkpoint["phase"] == 2:
        raise UserError("this checkpoint was saved in phase 2 (generative pre-training), whose classifier is not "
                         "trained yet: evaluate a phase-1 or phase-3 checkpoint")
    model = CaMHG(config, info["dims"], config.num_outputs(info["task"], info["num_classes"]))
    model.set_phase(checkpoint["phase"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config


MODULE = "camhg.evaluate"


def build_parser():
    parser = new_parser(MODULE, __doc__)
    add_evaluate_options(parser, model="camhg")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    path = checkpoint_of(args.checkpoint)
    device = select_device(args.device)
    try:  # this file alone, loaded without running code
        model, config = load_model(load_checkpoint(path), device)
    except CheckpointError as error:
        raise UserError(str(error)) from None
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # it loads, but builds no CaM-HG
        raise UserError(f"{path} is not a usable camhg.train checkpoint: {error}") from None
    if args.data_root is not None and not args.data_root.is_dir():
        raise UserError(f"--data-root {args.data_root} is not a folder")
    try:
        splits = with_validation(load_dataset(config.dataset, args.data_root, seed=config.data_seed,
                                              **config.dataset_options), config.validation)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"{error} (the run was trained on {config.dataset}; pass its --data-root)") from None
    dataset = splits.test if args.split == "test" else splits.valid
    if dataset is None or len(dataset) == 0:
        raise UserError(f"dataset {config.dataset} has no {args.split} split")
    out_dir = args.out or run_folder_of(path) / "evaluation"
    print(f"evaluating {path} on {config.dataset} {args.split} ({len(dataset)} dialogues), device {device}; "
          f"results go to {out_dir}", flush=True)
    tables = evaluate_model(model, dataset, splits.info, config, out_dir, device=device, plots=args.plots,
                            show_progress=args.progress, split=args.split, batch_size=args.batch_size)
    for table in tables.values():
        table.print()
    print(f"results saved under {out_dir}")
    return 0


def cli(argv=None) -> int:
    """Console script ``camhg-evaluate``."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
