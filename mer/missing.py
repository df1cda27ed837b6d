"""Which modalities of which utterances are observed: masks of shape (..., 3), order ``MODALITIES`` = (a, t, v).

Three ways to hide modalities, all keeping at least one modality per utterance:

- :func:`random_missing_mask` / :func:`batch_missing_mask`: the field's random missing rate ``eta`` (GCNet's
  ``random_mask``, also used by MoMKE, SDR-GNN, FedDISC and CaM-HG's tables): eta = 0 keeps everything; when
  1 - eta <= 1/3 every utterance keeps exactly one modality, uniformly chosen; otherwise every utterance keeps
  one uniformly chosen modality plus extra ones, so that the kept fraction of all (utterance, modality) cells is
  the achievable one closest to 1 - eta (within 1 / (6 N) for N utterances, so within 0.005 from N = 34 on).
  GCNet reaches 0.005 by redrawing Bernoulli masks until the kept fraction falls within it (which never ends for
  small N); drawing the extra cells uniformly among the free ones with the count fixed is the same distribution
  conditioned on the count, and it always ends.
- :func:`condition_mask`: the fixed available-modality conditions of the papers' tables (:data:`CONDITIONS`).
- :func:`camhg_training_mask`: CaM-HG's training-time masks (eta ~ U(0, 1) per batch, Bernoulli per modality,
  text dropped with probability 0.25).

Apply a mask with :meth:`mer.data.Batch.with_present`, which zeroes the hidden features and keeps the mask, so
that a model can tell "absent" from "zero".
"""
from __future__ import annotations

import numpy as np
import torch

from mer.data import MODALITIES, Batch

CONDITIONS: dict[str, tuple[bool, bool, bool]] = {
    "a": (True, False, False),
    "t": (False, True, False),
    "v": (False, False, True),
    "at": (True, True, False),
    "av": (True, False, True),
    "tv": (False, True, True),
    "atv": (True, True, True),
}

CAMHG_TEXT_DROP_PROBABILITY = 0.25  # CaM-HG's "text blindness" (paper, section 3 and Algorithm 1)


def _check_eta(eta: float) -> float:
    if not isinstance(eta, (int, float, np.floating)) or isinstance(eta, bool):
        raise TypeError(f"eta must be a float, got {type(eta).__name__}")
    if not 0.0 <= eta < 1.0:
        raise ValueError(f"eta must be in [0, 1) (at least one modality stays), got {eta}")
    return float(eta)


def random_missing_mask(num_utterances: int, eta: float, rng: np.random.Generator | int) -> np.ndarray:
    """GCNet's random missing protocol for ``num_utterances`` utterances: (N, 3) bool, True = observed.

    ``rng`` is a numpy Generator (advanced in place) or a seed.
    """
    if not isinstance(num_utterances, (int, np.integer)) or num_utterances < 0:
        raise ValueError(f"num_utterances must be a non-negative int, got {num_utterances!r}")
    eta = _check_eta(eta)
    rng = np.random.default_rng(rng)
    num_modalities = len(MODALITIES)
    if eta == 0.0:
        return np.ones((num_utterances, num_modalities), dtype=bool)
    mask = np.zeros((num_utterances, num_modalities), dtype=bool)
    mask[np.arange(num_utterances), rng.integers(0, num_modalities, size=num_utterances)] = True
    keep_rate = 1.0 - eta
    # The tolerance makes eta = 2/3, whose 1 - eta rounds to just above 1/3, keep exactly one as the protocol says.
    if keep_rate <= 1.0 / num_modalities + 1e-9:
        return mask
    target_kept = int(np.floor(num_modalities * num_utterances * keep_rate + 0.5))
    free_cells = np.flatnonzero(~mask)
    extra = rng.choice(free_cells, size=target_kept - num_utterances, replace=False)
    mask.reshape(-1)[extra] = True
    return mask


def batch_missing_mask(batch: Batch, eta: float, rng: np.random.Generator | int) -> torch.Tensor:
    """:func:`random_missing_mask` over the batch's valid utterances: (B, L, 3) bool, False at padding."""
    valid = batch.valid.cpu()
    flat = torch.from_numpy(random_missing_mask(int(valid.sum()), eta, rng))
    mask = torch.zeros(*valid.shape, len(MODALITIES), dtype=torch.bool)
    mask[valid] = flat
    return mask.to(batch.valid.device)


def condition_mask(batch: Batch, condition: str) -> torch.Tensor:
    """The fixed condition ``condition`` (a key of :data:`CONDITIONS`, e.g. "at") at every valid utterance."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {list(CONDITIONS)}, got {condition!r}")
    flags = torch.tensor(CONDITIONS[condition], dtype=torch.bool, device=batch.valid.device)
    return batch.valid[..., None] & flags


def camhg_training_mask(batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """CaM-HG's training mask: (B, L, 3) bool (False at padding) and the batch's missing rate eta.

    eta ~ U(0, 1) once per batch; each modality of each utterance is kept with probability 1 - eta; the text is
    then dropped per utterance with probability 0.25. An utterance left with nothing gets one modality back,
    uniformly among a and v when its text was dropped (the drop stands), among all three otherwise.
    ``generator`` is a CPU torch.Generator; the draws do not depend on the batch's device.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    shape = tuple(batch.valid.shape)
    eta = float(torch.rand((), generator=generator))
    keep = torch.rand(*shape, len(MODALITIES), generator=generator) >= eta
    text = MODALITIES.index("t")
    text_dropped = torch.rand(*shape, generator=generator) < CAMHG_TEXT_DROP_PROBABILITY
    keep[..., text] &= ~text_dropped
    # Restore one modality where none is left: a uniform pick among the allowed ones.
    allowed = torch.ones(*shape, len(MODALITIES), dtype=torch.bool)
    allowed[..., text] = ~text_dropped
    scores = torch.rand(*shape, len(MODALITIES), generator=generator).masked_fill(~allowed, -1.0)
    restored = torch.nn.functional.one_hot(scores.argmax(-1), len(MODALITIES)).bool()
    empty = ~keep.any(-1, keepdim=True)
    keep = torch.where(empty, restored, keep)
    return keep.to(batch.valid.device) & batch.valid[..., None], eta
