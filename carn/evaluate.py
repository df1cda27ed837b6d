"""Evaluate CARN under the paper's six fixed available-modality conditions (Table 1 layout).

    python -m carn.evaluate runs/carn/embedded/RUN                        # the run's checkpoints/last.pt
    python -m carn.evaluate runs/carn/embedded/RUN/checkpoints/best.pt

rebuilds the model from a checkpoint written by ``carn.train``, evaluates it on the test split and prints (and saves
to the run's ``evaluation/`` folder, or ``--out``) the table: WA/UA per condition and their average for emotion
classes, Acc2/F1 for sentiment, and the per-class accuracy plot.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader

from mer.data import MODALITIES, DialogueDataset, collate_dialogues, load_dataset
from mer.metrics import ResultTable, task_metrics, valid_targets
from mer.missing import condition_mask
from mer.protocols import protocol_caption, with_validation
from mer.cli import UserError, add_evaluate_options, checkpoint_of, new_parser, run_command, run_folder_of
from mer.training import CheckpointError, load_checkpoint, progress, select_device

from .config import STAGE2_CONDITIONS, ModelConfig
from .model import CARN

# Paper Table 1's column order; "vt" there is mer.missing's "tv".
CONDITION_ORDER = STAGE2_CONDITIONS  # ("a", "v", "t", "av", "at", "tv"), each its own model with per-condition
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


def evaluate_conditions(model: CARN | dict[str, CARN], dataset: DialogueDataset, *, batch_size: int = 16,
                        device="cpu", show_progress: bool = False) -> dict:
    """{condition: metrics} for the six conditions, plus "Average" of the two table metrics over them.

    ``model``: one model for every condition, or {condition: its model} (stage 2 per condition, MoMKE's protocol).
    """
    models = model if isinstance(model, dict) else {condition: model for condition in CONDITION_ORDER}
    config = models[CONDITION_ORDER[0]].config
    task = config.task
    results = {}
    for condition in progress(CONDITION_ORDER, desc="test: modality conditions", enabled=show_progress):
        y_true, y_pred = predict(models[condition], dataset, condition, batch_size=batch_size, device=device)
        results[condition] = task_metrics(task, y_true, y_pred, scores=config.predicts_score)
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
def per_class_accuracy(model: CARN | dict[str, CARN], dataset: DialogueDataset, class_names: list[str], *,
                       batch_size: int, device) -> dict:
    """{condition label: {class name: accuracy %}} (paper Fig. 3), classification only; ``model`` as in
    :func:`evaluate_conditions`."""
    per_class = {}
    for condition in CONDITION_ORDER:
        tested = model[condition] if isinstance(model, dict) else model
        y_true, y_pred = predict(tested, dataset, condition, batch_size=batch_size, device=device)
        per_class[CONDITION_LABELS[condition]] = {
            name: float(100.0 * (y_pred[y_true == k] == k).mean())
            for k, name in enumerate(class_names)
            if (y_true == k).any()
        }
    return per_class


@torch.no_grad()
def mean_self_attention(model: CARN, dataset: DialogueDataset, *, batch_size: int, device) -> dict[str, float]:
    """{modality: mean A_ii} over the valid utterances of ``dataset`` with every modality present: how much of the
    causal context ``ctx_i`` is the step itself (the CSS shortcut, docs/models.md: CARN)."""
    model.eval()
    totals, count = {m: 0.0 for m in MODALITIES}, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_dialogues):
        batch = batch.to(device)
        output = model(batch.features, batch.present, batch.valid, need_weights=True)
        for m in MODALITIES:
            totals[m] += float(output.attention_weights[m].diagonal(dim1=-2, dim2=-1)[batch.valid].sum())
        count += int(batch.valid.sum())
    return {m: total / count for m, total in totals.items()}


def stage2_checkpoint_name(condition: str) -> str:
    """File, beside ``last.pt``, of the stage-2 model fine-tuned for ``condition`` (stage 2 per condition)."""
    return f"stage2_{condition}.pt"


def load_model(checkpoint: dict, device) -> CARN:
    """The CARN of a ``carn.train`` checkpoint, on ``device``, in eval mode."""
    if "config" in checkpoint and "phase" in checkpoint:
        raise UserError("this is a CaM-HG checkpoint: evaluate it with python -m camhg.evaluate")
    missing = [key for key in ("model_config", "model", "data", "epoch") if key not in checkpoint]
    if missing:
        raise UserError(f"checkpoint lacks {missing}: not a carn.train checkpoint")
    model = CARN(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


MODULE = "carn.evaluate"


def build_parser():
    parser = new_parser(MODULE, __doc__)
    add_evaluate_options(parser, model="carn")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    path = checkpoint_of(args.checkpoint)
    try:  # this file alone, loaded without running code
        state = load_checkpoint(path)
    except CheckpointError as error:
        raise UserError(str(error)) from None
    device = select_device(args.device)
    try:
        model = load_model(state, device)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # it loads, but builds no CARN
        raise UserError(f"{path} is not a usable carn.train checkpoint: {error}") from None
    if state.get("train_config", {}).get("stage2") == "per-condition":  # one model per condition
        files = {c: path.parent / stage2_checkpoint_name(c) for c in CONDITION_ORDER}
        absent = [str(f) for f in files.values() if not f.is_file()]
        if absent:
            raise UserError(f"this run trains one stage-2 model per condition and {absent[0]} is missing: the run "
                            f"has not finished (resume it with carn.train --resume)")
        try:
            model = {c: load_model(load_checkpoint(f), device) for c, f in files.items()}
        except CheckpointError as error:
            raise UserError(str(error)) from None
    data = state["data"]
    if args.data_root is not None and not args.data_root.is_dir():
        raise UserError(f"--data-root {args.data_root} is not a folder")
    try:
        splits = load_dataset(data["dataset"], args.data_root or data["data_root"], seed=data["data_seed"],
                              **data["dataset_options"])
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"{error} (the run was trained on {data['dataset']}; pass its --data-root)") from None
    splits = with_validation(splits, data.get("validation", "carved"))
    dataset = splits.test if args.split == "test" else splits.valid
    if dataset is None or len(dataset) == 0:
        raise UserError(f"dataset {data['dataset']} has no {args.split} split")
    out_dir = args.out or run_folder_of(path) / "evaluation"
    print(f"evaluating {path} on {data['dataset']} {args.split} ({len(dataset)} dialogues), device {device}; "
          f"results go to {out_dir}", flush=True)
    results = evaluate_conditions(model, dataset, batch_size=args.batch_size, device=device,
                                  show_progress=args.progress)
    title = (f"CARN on {data['dataset']} ({args.split} split, checkpoint epoch {state['epoch']}; "
             f"{protocol_caption(data['dataset'], data['dataset_options'], data.get('validation', 'carved'))})")
    task = next(iter(model.values())).config.task if isinstance(model, dict) else model.config.task
    table = results_table({state.get("row_name", "CARN"): results}, task, title)
    table.print()
    out_dir.mkdir(parents=True, exist_ok=True)
    table.save(out_dir / f"table1_{path.stem}_{args.split}")
    if args.plots and task == "classification":
        from mer.plots import plot_per_class_accuracy

        per_class = per_class_accuracy(model, dataset, splits.info.class_names, batch_size=args.batch_size,
                                       device=device)
        plot_per_class_accuracy(per_class, out_dir / f"per_class_accuracy_{path.stem}_{args.split}.png",
                                title="CARN accuracy per class and available modalities")
    print(f"results saved under {out_dir}")
    return 0


def cli(argv=None) -> int:
    """Console script ``carn-evaluate``."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
