"""Evaluate CaM-HG as the paper does: missing rates 0.0-0.7 (Tables 2-3), the seven available-modality subsets
(Table 7) and confusion matrices (Fig. 4).

    python -m camhg.evaluate runs/camhg/embedded/RUN/checkpoints/last.pt

writes ``missing_rates.{md,json,csv}``, ``conditions.{md,json,csv}`` and ``confusion_eta*.png`` to the run's
``evaluation/`` folder (or to ``--out``). The random masks are drawn from fixed seeds, so two evaluations of one
model agree.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from mer.data import Batch, DatasetInfo, DialogueDataset, collate_dialogues, load_dataset
from mer.metrics import ResultTable, task_metrics, valid_targets
from mer.missing import batch_missing_mask, condition_mask
from mer.training import CheckpointError, load_checkpoint, select_device

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
                       device: torch.device, title: str, on_predictions=None) -> ResultTable:
    """Rows: metrics; columns: the missing rates and their average (the layout of paper Tables 2-3)."""
    columns = [f"{eta:.1f}" for eta in missing_rates] + ["Average"]
    by_rate = {}
    for index, eta in enumerate(missing_rates):
        rng = np.random.default_rng([EVALUATION_SEED, index])
        y_true, y_pred = predict(model, dataset, lambda batch: batch_missing_mask(batch, eta, rng), device=device)
        by_rate[f"{eta:.1f}"] = task_metrics(info.task, y_true, y_pred)
        if on_predictions is not None:
            on_predictions(eta, y_true, y_pred)
    table = ResultTable(title, "metric", columns)
    for metric in headline_metrics(info):
        values = {column: by_rate[column][metric] for column in columns[:-1]}
        table.add_row(metric, {**values, "Average": float(np.mean(list(values.values())))})
    return table


def condition_table(model: CaMHG, dataset: DialogueDataset, info: DatasetInfo, *, device: torch.device,
                    title: str) -> ResultTable:
    """Rows: the seven available-modality subsets (paper Table 7); columns: metrics."""
    table = ResultTable(title, "available", list(headline_metrics(info)))
    for condition in CONDITION_ORDER:
        y_true, y_pred = predict(model, dataset, lambda batch: condition_mask(batch, condition), device=device)
        table.add_row("{" + ", ".join(condition) + "}", task_metrics(info.task, y_true, y_pred))
    return table


def evaluate_model(model: CaMHG, dataset: DialogueDataset, info: DatasetInfo, config: CaMHGConfig,
                   out_dir: Path, *, device: torch.device, plots: bool = True) -> dict[str, ResultTable]:
    """Both tables (saved under ``out_dir``) and, for classification with ``plots``, Fig. 4's confusion matrices."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "CaM-HG" if config.ablation == "full" else f"CaM-HG ({config.ablation})"
    matrices = {}

    def keep_confusion(eta, y_true, y_pred):
        if plots and info.task == "classification" and any(abs(eta - r) < 1e-9 for r in CONFUSION_MISSING_RATES):
            matrices[eta] = confusion_matrix(y_true, y_pred, labels=list(range(info.num_classes)))

    rates = missing_rate_table(model, dataset, info, config.missing_rates, device=device, on_predictions=keep_confusion,
                               title=f"{name} on {info.name} test: by missing rate eta")
    conditions = condition_table(model, dataset, info, device=device,
                                 title=f"{name} on {info.name} test: by available modalities")
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
    for key in ("config", "info", "model", "phase"):
        if key not in checkpoint:
            raise ValueError(f"checkpoint lacks {key!r}: not a camhg.train checkpoint")
    config = CaMHGConfig.from_dict(checkpoint["config"])
    info = checkpoint["info"]
    if checkpoint["phase"] == 2:
        raise ValueError("this checkpoint was saved in phase 2 (generative pre-training), whose classifier is not "
                         "trained yet: evaluate a phase-1 or phase-3 checkpoint")
    model = CaMHG(config, info["dims"], info["num_classes"])
    model.set_phase(checkpoint["phase"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m camhg.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pt file written by camhg.train (e.g. RUN/checkpoints/last.pt)")
    parser.add_argument("--data-root", default=None, help="folder of the published features (not for embedded)")
    parser.add_argument("--out", default=None, help="output folder (default: the run's folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint)
    if not path.is_file():
        parser.error(f"checkpoint {path} does not exist")
    device = select_device(args.device)
    try:  # this file alone, loaded without running code
        model, config = load_model(load_checkpoint(path, required=("config", "info", "model", "phase")), device)
    except CheckpointError as error:
        parser.error(str(error))
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # it loads, but builds no CaM-HG
        parser.error(f"{path} is not a usable camhg.train checkpoint: {error}")
    splits = load_dataset(config.dataset, args.data_root, seed=config.data_seed, **config.dataset_options)
    out_dir = Path(args.out) if args.out else path.parent.parent / "evaluation"
    tables = evaluate_model(model, splits.test, splits.info, config, out_dir, device=device, plots=not args.no_plots)
    for table in tables.values():
        table.print()
    print(f"results saved under {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
