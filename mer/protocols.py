"""The evaluation protocols of the papers, shared by both models: IEMOCAP folds, the validation choice, sentiment
as the sign of the label.

- Folds: IEMOCAP is reported as 5-fold leave-one-session-out, averaged (GCNet, MoMKE, both papers). ``fold=k``
  holds Session k out as the test set (:func:`mer.published.load_published`); :func:`average_over_folds` turns
  the five runs' tables into one of "mean ± std over folds" cells.
- Validation: ``"carved"`` (default) validates on a seeded 10% of the training dialogues (IEMOCAP; MOSI/MOSEI and
  the embedded data have their own valid split); ``"test"`` is GCNet's protocol, whose validation loaders are the
  test loaders (IEMOCAP then trains on every non-test dialogue). Model selection on the test set flatters the
  numbers: every table title says which was used (:func:`protocol_caption`).
- Sentiment: both papers train 2-class cross-entropy on the sign of the label (CaM-HG Algorithm 1 and Table 1,
  CARN eq. 19, 22); :func:`sign_cross_entropy` ignores the zero labels, as Acc-2 and F1 do
  (:func:`mer.metrics.sentiment_metrics`). A 2-logit model predicts class 1 = positive, so the predicted class ids
  feed the Acc-2/F1 metrics unchanged; MAE and Corr need a score and are NaN then.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from mer.data import DatasetSplits
from mer.metrics import ResultTable, mean_and_spread

FOLDS = (1, 2, 3, 4, 5)  # the IEMOCAP sessions, each held out once
FOLD_DATASETS = ("iemocap4", "iemocap6")
VALIDATIONS = ("carved", "test")
SENTIMENT_LOSSES = ("ce", "regression")
CARVED_FRACTION = 0.1  # mer.published's default valid_fraction


def check_fold_dataset(dataset: str, fold) -> None:
    """ValueError unless folds apply to ``dataset`` (IEMOCAP) and ``fold`` is one of :data:`FOLDS` (or None)."""
    if fold is None:
        return
    if dataset not in FOLD_DATASETS:
        raise ValueError(f"folds are IEMOCAP's leave-one-session-out protocol ({', '.join(FOLD_DATASETS)}); "
                         f"{dataset} has fixed train/valid/test splits")
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS} (the held-out IEMOCAP session), got {fold!r}")


def dataset_options_for(dataset: str, options: dict, *, fold=None, validation: str = "carved") -> dict:
    """``options`` for :func:`mer.data.load_dataset` with ``fold`` and the validation choice applied: GCNet's
    ``"test"`` validation carves nothing out of IEMOCAP's training dialogues (``valid_fraction=0``)."""
    check_fold_dataset(dataset, fold)
    if validation not in VALIDATIONS:
        raise ValueError(f"validation must be one of {VALIDATIONS}, got {validation!r}")
    options = dict(options)
    if fold is not None:
        options["fold"] = fold
    if validation == "test" and dataset in FOLD_DATASETS:
        options["valid_fraction"] = 0.0
    return options


def with_validation(splits: DatasetSplits, validation: str) -> DatasetSplits:
    """``splits`` whose valid split is the test split for ``validation="test"`` (GCNet), unchanged for "carved"."""
    if validation not in VALIDATIONS:
        raise ValueError(f"validation must be one of {VALIDATIONS}, got {validation!r}")
    return dataclasses.replace(splits, valid=splits.test) if validation == "test" else splits


def validation_caption(dataset: str, options: dict, validation: str) -> str:
    """What a table title says about the validation choice."""
    if validation == "test":
        return "validation = test split (GCNet's protocol)"
    if dataset in FOLD_DATASETS:
        return f"validation = seeded {options.get('valid_fraction', CARVED_FRACTION):g} of training dialogues"
    return "validation = the dataset's valid split"


def protocol_caption(dataset: str, options: dict, validation: str) -> str:
    """What a table title says about the split: the held-out session and the validation choice."""
    fold = options.get("fold")
    if dataset in FOLD_DATASETS:
        held_out = f"fold {fold}: Session {fold} held out" if fold is not None else "Session 5 held out"
    else:
        held_out = "the dataset's test split"
    return f"{held_out}; {validation_caption(dataset, options, validation)}"


def average_over_folds(tables: Sequence[ResultTable], title: str) -> ResultTable:
    """One table of "mean ± std over folds" cells from the per-fold tables (same rows and columns), titled
    ``title`` (+ " (mean ± std over N)")."""
    renamed = []
    for table in tables:
        copy = ResultTable(title, table.row_name, table.columns)
        for name, values in table.rows.items():
            copy.add_row(name, values)
        renamed.append(copy)
    return mean_and_spread(renamed)


def sign_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """2-class cross-entropy on the sign of sentiment ``labels`` over the valid utterances whose label is non-zero.

    logits (B, L, 2) (class 1 = positive), labels (B, L) float scores, valid (B, L) bool. Zero labels have no sign
    and are excluded; a batch without any non-zero label gives 0 (with a gradient graph, so backward works).
    """
    if logits.shape[-1] != 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits must be (B, L, 2) for labels of shape {tuple(labels.shape)}, "
                         f"got {tuple(logits.shape)}")
    signed = valid & (labels != 0)
    if not bool(signed.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[signed], (labels[signed] > 0).long())
