"""The datasets by name: :func:`load_dataset` returns the train / valid / test splits of the embedded dataset
(:mod:`mer.embedded`, generated from a seed, no files) or of the published features (:mod:`mer.published`, read
from ``data_root``). The containers (:class:`Dialogue`, :class:`Batch`, ...) live in :mod:`mer.dialogues` and are
importable from here too.
"""
from __future__ import annotations

from pathlib import Path

from mer.dialogues import (MODALITIES, Batch, DatasetInfo, DatasetSplits, Dialogue, DialogueDataset,  # noqa: F401
                           collate_dialogues)
from mer.embedded import generate_embedded
from mer.published import load_published

EMBEDDED_NAMES = ("embedded", "embedded6", "embedded-sentiment")
PUBLISHED_NAMES = ("iemocap4", "iemocap6", "mosi", "mosei")
DATASET_NAMES = EMBEDDED_NAMES + PUBLISHED_NAMES


def load_dataset(
    name: str = "embedded", data_root: str | Path | None = None, *, seed: int = 0, **options
) -> DatasetSplits:
    """The splits of dataset ``name`` (one of :data:`DATASET_NAMES`).

    Embedded names are generated from ``seed`` (options: ``dims``, ``num_dialogues`` and the generator's knobs,
    see :func:`mer.embedded.generate_embedded`); published names are read from ``data_root`` (options:
    ``features``, ``fold``, ``valid_fraction``, see :func:`mer.published.load_published`).
    """
    if name in EMBEDDED_NAMES:
        if data_root is not None:
            raise ValueError(f"data_root is not used by the embedded dataset {name!r}; leave it None")
        splits, _ = generate_embedded(name, seed=seed, **options)
        return splits
    if name in PUBLISHED_NAMES:
        return load_published(name, data_root, seed=seed, **options)
    raise ValueError(f"name must be one of {DATASET_NAMES}, got {name!r}")
