"""Shared data and training layer of CARN and CaM-HG: dialogues, missing modalities, metrics, training utilities.

- :mod:`mer.data`: dialogue containers, batching, :func:`mer.data.load_dataset`;
- :mod:`mer.embedded`: the embedded dataset, generated from a seed with a planted causal process;
- :mod:`mer.published`: readers of the published IEMOCAP / CMU-MOSI / CMU-MOSEI features;
- :mod:`mer.missing`: missing-modality masks (random missing rate, fixed conditions, CaM-HG's training masks);
- :mod:`mer.metrics`: WA / UA / WAF1, Acc2 / F1 / MAE / Corr and result tables;
- :mod:`mer.protocols`: the papers' protocols (IEMOCAP folds averaged, the validation choice, sentiment sign loss);
- :mod:`mer.training`, :mod:`mer.plots`: checkpoints, logging, seeding, distributed helpers, figures;
- :mod:`mer.inputs`: the input checks both models run on a batch (clear errors naming modality, dialogue, utterance).
"""
from mer.data import (
    DATASET_NAMES,
    MODALITIES,
    Batch,
    DatasetInfo,
    DatasetSplits,
    Dialogue,
    DialogueDataset,
    collate_dialogues,
    load_dataset,
)

__all__ = [
    "DATASET_NAMES",
    "MODALITIES",
    "Batch",
    "DatasetInfo",
    "DatasetSplits",
    "Dialogue",
    "DialogueDataset",
    "collate_dialogues",
    "load_dataset",
]
