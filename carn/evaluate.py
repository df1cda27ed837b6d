"""Evaluate CARN under the paper's six fixed available-modality conditions (Table 1 layout).

``python -m carn.evaluate runs/carn/embedded/<run>/checkpoints/last.pt`` rebuilds the model from a checkpoint
written by ``carn.train``, evaluates it on the test split and prints (and saves beside the checkpoint's run) the
table: WA/UA per condition and their average for emotion classes, Acc2/F1 for sentiment.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mer.data import DialogueDataset, collate_dialogues, load_dataset
from mer.metrics import ResultTable, task_metrics, valid_targets
from mer.missing import condition_mask
from mer.training import CheckpointError, load_checkpoint, select_device

from .config import ModelConfig
from .model import CARN

# Paper Table 1's column order; "vt" there is mer.missing's "tv".
CONDITION_ORDER = ("a", "v", "t", "av", "at", "tv")
CONDITION_LABELS = {"a": "a", "v": "v", "t": "t", "av": "av", "at": "at", "tv": "vt"}


def metric_names(task: str) -> tuple[str, str]:
    """The two numbers per condition: WA/UA for emotion classes, Acc2/F1 for sentiment."""
    return ("Acc2", "F1") if task == "regression" else ("WA", "UA")


def table_columns(task: str) -> list[str]:
    names = metric_names(task)
    return [f"{CONDITION_LABELS[c]} {n}" for c in CONDITION_ORDER for n in names] + [f"Average {n}" for n in names]


@torch.no_grad()
def predict(model: CARN, dataset: DialogueDataset, condition: str, *, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) over every valid utterance of ``dataset`` with only ``condition``'s modalities present."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_dialogues)
    truths, predictions = [], []
    for batch in loader:
        batch = batch.to(device)
        observed = batch.with_present(condition_mask(batch, condition))
        output = model(observed.features, observed.present, observed.valid)
        y_true, y_pred = valid_targets(output.logits, batch.labels, batch.valid)
        truths.append(y_true)
        predictions.append(y_pred)
    return np.concatenate(truths), np.concatenate(predictions)


def evaluate_conditions(model: CARN, dataset: DialogueDataset, *, batch_size: int = 16, device="cpu") -> dict:
    """{condition: metrics} for the six conditions, plus "Average" of the two table metrics over them."""
    task = model.config.task
    results = {}
    for condition in CONDITION_ORDER:
        y_true, y_pred = predict(model, dataset, condition, batch_size=batch_size, device=device)
        results[condition] = task_metrics(task, y_true, y_pred)
    results["Average"] = {n: float(np.mean([results[c][n] for c in CONDITION_ORDER])) for n in metric_names(task)}
    return results


def table_row(results: dict, task: str) -> dict[str, float]:
    """One Table 1 row from ``evaluate_conditions``' output."""
    row = {}
    for condition in CONDITION_ORDER:
        for name in metric_names(task):
            row[f"{CONDITION_LABELS[condition]} {name}"] = results[condition][name]
    for name in metric_names(task):
        row[f"Average {name}"] = results["Average"][name]
    return row


def results_table(rows: dict[str, dict], task: str, title: str) -> ResultTable:
    """Table 1 / Table 2 layout: one row per model, two metrics per available-modality condition + average."""
    table = ResultTable(title, "model", table_columns(task))
    for name, results in rows.items():
        table.add_row(name, table_row(results, task))
    return table


@torch.no_grad()
def per_class_accuracy(model: CARN, dataset: DialogueDataset, class_names: list[str], *, batch_size: int, device) -> dict:
    """{condition label: {class name: accuracy %}} (paper Fig. 3), classification only."""
    per_class = {}
    for condition in CONDITION_ORDER:
        y_true, y_pred = predict(model, dataset, condition, batch_size=batch_size, device=device)
        per_class[CONDITION_LABELS[condition]] = {
            name: float(100.0 * (y_pred[y_true == k] == k).mean())
            for k, name in enumerate(class_names)
            if (y_true == k).any()
        }
    return per_class


def load_model(checkpoint: dict, device) -> CARN:
    """The CARN of a ``carn.train`` checkpoint, on ``device``, in eval mode."""
    model = CARN(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def main(argv=None) -> ResultTable:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .pt file written by carn.train (last.pt, epoch_NNN.pt)")
    parser.add_argument("--data-root", default=None, help="published features (defaults to the training run's)")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    try:  # this file alone, loaded without running code
        state = load_checkpoint(args.checkpoint, required=("model", "model_config", "data", "epoch"))
    except CheckpointError as error:
        parser.error(str(error))
    data = state["data"]
    splits = load_dataset(
        data["dataset"], args.data_root or data["data_root"], seed=data["data_seed"], **data["dataset_options"]
    )
    dataset = splits.test if args.split == "test" else splits.valid
    if dataset is None:
        parser.error(f"dataset {data['dataset']!r} has no {args.split} split")
    device = select_device(args.device)
    try:
        model = load_model(state, device)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # it loads, but builds no CARN
        parser.error(f"{args.checkpoint} is not a usable carn.train checkpoint: {error}")
    results = evaluate_conditions(model, dataset, batch_size=args.batch_size, device=device)
    title = f"CARN on {data['dataset']} ({args.split} split, checkpoint epoch {state['epoch']})"
    table = results_table({state.get("row_name", "CARN"): results}, model.config.task, title)
    table.print()
    stem = args.checkpoint.parent.parent / f"evaluation_{args.checkpoint.stem}_{args.split}"
    table.save(stem)
    return table


if __name__ == "__main__":
    main()
