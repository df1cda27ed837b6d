"""Conversations of utterances with three modality features: the containers both models read.

A dataset is a list of :class:`Dialogue` (one conversation: per-utterance features of each modality,
speaker ids and labels) with a :class:`DatasetInfo`. :func:`collate_dialogues` right-pads a list of them into
a :class:`Batch`, whose ``present`` mask says which modality of which utterance is observed, so that a model can
tell "absent" from "zero" (:mod:`mer.missing` builds such masks).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

MODALITIES = ("a", "t", "v")  # acoustic, textual, visual: the order of every mask's last axis


@dataclass
class Dialogue:
    """One conversation of L utterances.

    features: modality -> (L, d_m) float32; speakers: (L,) int64 in {0, 1};
    labels: (L,) int64 class ids, or (L,) float32 sentiment scores in [-3, 3].
    """

    vid: str
    features: dict[str, np.ndarray]
    speakers: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetInfo:
    """What a dataset predicts and the size of each modality's features."""

    name: str
    task: Literal["classification", "regression"]
    num_classes: int  # 1 for regression
    class_names: list[str]
    dims: dict[str, int]  # modality -> feature size


class DialogueDataset(torch.utils.data.Dataset):
    """A list of dialogues with their :class:`DatasetInfo`; items are :class:`Dialogue`, batched by
    :func:`collate_dialogues`."""

    def __init__(self, dialogues: list[Dialogue], info: DatasetInfo):
        self.dialogues = list(dialogues)
        self.info = info

    def __getitem__(self, index: int) -> Dialogue:
        return self.dialogues[index]

    def __len__(self) -> int:
        return len(self.dialogues)

    @property
    def num_utterances(self) -> int:
        return sum(len(dialogue) for dialogue in self.dialogues)


@dataclass
class Batch:
    """Right-padded dialogues. B dialogues, L = the longest one's length.

    features: modality -> (B, L, d_m) float32, zero at padding and where the modality is absent;
    present: (B, L, 3) bool, True where the modality is observed (False at padding);
    speakers: (B, L) long, 0 at padding; labels: (B, L) long with -1 at padding (classification) or float32
    with 0 at padding (regression); valid: (B, L) bool; lengths: (B,) long; vids: the dialogue ids.
    """

    features: dict[str, torch.Tensor]
    present: torch.Tensor
    speakers: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor
    vids: list[str]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def to(self, device) -> Batch:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            features={m: x.to(device) for m, x in self.features.items()},
            present=self.present.to(device),
            speakers=self.speakers.to(device),
            labels=self.labels.to(device),
            valid=self.valid.to(device),
            lengths=self.lengths.to(device),
            vids=list(self.vids),
        )

    def with_present(self, present: torch.Tensor) -> Batch:
        """A copy whose ``present`` is ``present & valid`` and whose absent modalities' features are zeroed.

        present: (B, L, 3) bool, modality order :data:`MODALITIES`.
        """
        if not isinstance(present, torch.Tensor) or present.dtype != torch.bool:
            raise TypeError(f"present must be a bool tensor, got {getattr(present, 'dtype', type(present).__name__)}")
        expected = (self.batch_size, self.max_len, len(MODALITIES))
        if tuple(present.shape) != expected:
            raise ValueError(f"present must have shape {expected}, got {tuple(present.shape)}")
        present = present.to(self.valid.device) & self.valid[..., None]
        features = {m: self.features[m].masked_fill(~present[..., i, None], 0.0) for i, m in enumerate(MODALITIES)}
        return dataclasses.replace(self, features=features, present=present)


def collate_dialogues(dialogues: list[Dialogue]) -> Batch:
    """Right-pad ``dialogues`` to the longest one; every modality of every valid utterance is present."""
    if len(dialogues) == 0:
        raise ValueError("dialogues must not be empty")
    lengths = torch.tensor([len(d) for d in dialogues], dtype=torch.long)
    batch_size, max_len = len(dialogues), int(lengths.max())
    regression = np.issubdtype(dialogues[0].labels.dtype, np.floating)
    if regression:
        labels = torch.zeros(batch_size, max_len, dtype=torch.float32)
    else:
        labels = torch.full((batch_size, max_len), -1, dtype=torch.long)
    speakers = torch.zeros(batch_size, max_len, dtype=torch.long)
    features = {
        m: torch.zeros(batch_size, max_len, dialogues[0].features[m].shape[1], dtype=torch.float32) for m in MODALITIES
    }
    for b, dialogue in enumerate(dialogues):
        length = len(dialogue)
        labels[b, :length] = torch.as_tensor(dialogue.labels, dtype=labels.dtype)
        speakers[b, :length] = torch.as_tensor(dialogue.speakers, dtype=torch.long)
        for m in MODALITIES:
            features[m][b, :length] = torch.as_tensor(dialogue.features[m], dtype=torch.float32)
    valid = torch.arange(max_len)[None, :] < lengths[:, None]
    present = valid[..., None].expand(batch_size, max_len, len(MODALITIES)).clone()
    return Batch(
        features=features,
        present=present,
        speakers=speakers,
        labels=labels,
        valid=valid,
        lengths=lengths,
        vids=[d.vid for d in dialogues],
    )


@dataclass
class DatasetSplits:
    """The train / valid / test splits of one dataset (``valid`` is None when the protocol has none)."""

    train: DialogueDataset
    valid: DialogueDataset | None
    test: DialogueDataset
    info: DatasetInfo
