"""Input checks shared by CARN and CaM-HG: a clear ``TypeError``/``ValueError`` that names what is wrong and where
(modality, dialogue, utterance) instead of a silent NaN or a shape error deep inside a model.

The value checks (NaN/inf features, utterances without a modality, padding, speaker ids) read the tensors: they
cost one host-device synchronization per call in all, and are skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

from typing import Optional

import torch

from mer.data import MODALITIES


def _first_location(where: torch.Tensor) -> str:
    """'dialogue d, utterance u' of the first True entry of a (B, L) map, and how many there are."""
    hits = where.nonzero()
    d, u = hits[0].tolist()
    more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
    return f"dialogue {d}, utterance {u}{more}"


def check_dialogue_inputs(
    features,
    present,
    *,
    dims: dict[str, int],
    dtype: torch.dtype,
    valid: Optional[torch.Tensor] = None,
    speakers: Optional[torch.Tensor] = None,
    num_speakers: int = 2,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Check one right-padded batch of B dialogues of L utterances; return the features cast to ``dtype`` and the
    (B, L) bool valid mask (``valid``, or the one inferred when it is None).

    features: {m: (B, L, dims[m]) floating-point tensor} for m in ``MODALITIES`` (a, t, v), finite everywhere (also
    at padding and where absent: masks multiply, and 0 * NaN is NaN); float64 or float16 features are cast to
    ``dtype`` (the model's parameter dtype). present: (B, L, 3) bool, every valid utterance has at least one
    modality. valid: (B, L) bool marking a non-empty prefix of every dialogue; None takes the utterances up to each
    dialogue's last one with a modality present as valid (padding has none). speakers (optional): (B, L) int32/int64
    in [0, num_speakers).
    """
    if not isinstance(features, dict):
        raise TypeError(f"features must be a dict of modality -> (B, L, d_m) tensors, got {type(features).__name__}")
    if set(features) != set(MODALITIES):
        raise ValueError(f"features must have exactly the keys {MODALITIES}, got {sorted(map(str, features))}")
    if not isinstance(present, torch.Tensor):
        raise TypeError(f"present must be a (B, L, 3) bool tensor, got {type(present).__name__}")
    if present.dtype != torch.bool:
        raise TypeError(f"present must be a bool tensor, got dtype {str(present.dtype).replace('torch.', '')}")
    if present.dim() != 3 or present.shape[-1] != len(MODALITIES):
        raise ValueError(f"present must have shape (B, L, {len(MODALITIES)}), got {tuple(present.shape)}")
    b, l = present.shape[:2]
    if b == 0:
        raise ValueError("the batch holds no dialogue (B = 0)")
    if l == 0:
        raise ValueError(f"every dialogue of the batch is empty (L = 0, shape {tuple(present.shape)}); a dialogue "
                         "needs at least one utterance")
    if valid is not None:
        if not isinstance(valid, torch.Tensor):
            raise TypeError(f"valid must be a (B, L) bool tensor, got {type(valid).__name__}")
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got dtype {str(valid.dtype).replace('torch.', '')}")
        if tuple(valid.shape) != (b, l):
            raise ValueError(f"valid must have shape (B, L) = {(b, l)} like present, got {tuple(valid.shape)}")
    if speakers is not None:
        if not isinstance(speakers, torch.Tensor) or speakers.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"speakers must be an int32 or int64 tensor, got {getattr(speakers, 'dtype', type(speakers))}")
        if tuple(speakers.shape) != (b, l):
            raise ValueError(f"speakers must have shape (B, L) = {(b, l)} like present, got {tuple(speakers.shape)}")
    cast = {}
    for m in MODALITIES:
        x = features[m]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = str(x.dtype).replace("torch.", "") if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"features[{m!r}] must be a floating-point tensor, got {what}")
        expected = (b, l, dims[m])
        if tuple(x.shape) != expected:
            raise ValueError(f"features[{m!r}] has shape {tuple(x.shape)}, expected (B, L, d_{m}) = {expected}: the "
                             f"model was built for dims[{m!r}] = {dims[m]} features and present is {(b, l, 3)}")
        cast[m] = x.to(dtype)
    steps = torch.arange(l, device=present.device)
    has_modality = present.any(dim=-1)  # (B, L)
    if valid is None:  # padding: the utterances after each dialogue's last one with a modality
        valid = steps <= torch.where(has_modality, steps, -1).amax(dim=1, keepdim=True)
    if not torch.compiler.is_compiling() and not _capturing_cuda_graph():  # the checks sync: not while capturing
        _check_values(cast, has_modality, valid, speakers, num_speakers)
    return cast, valid


def _capturing_cuda_graph() -> bool:
    """Whether the current CUDA stream is capturing a graph (``torch.cuda.graph``), where a host sync is an error."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_values(features, has_modality, valid, speakers, num_speakers) -> None:
    """The checks that read values: every failure map is built on the device, and one ``.any()`` syncs for all."""
    steps = torch.arange(valid.shape[1], device=valid.device)
    failures = {}  # message -> (B, L) map of where it fails, or (B,) for dialogue-level failures
    for m in MODALITIES:
        failures[f"features[{m!r}] contains NaN or infinite values at"] = ~torch.isfinite(features[m]).all(dim=-1)
    failures["a dialogue is empty (no valid utterance, or none with a modality present):"] = ~valid.any(dim=1)
    failures["valid must mark a non-empty prefix of every dialogue (right padding), but a padded step comes before "
             "a valid one at"] = valid != (steps < valid.sum(dim=1, keepdim=True))
    failures["an utterance has no modality present (present is all False; at least one is needed) at"] = (
        valid & ~has_modality)
    if speakers is not None:
        failures[f"speakers must be in [0, {num_speakers}), got another value at"] = (
            (speakers < 0) | (speakers >= num_speakers))
    if not bool(torch.stack([where.any() for where in failures.values()]).any()):
        return
    for message, where in failures.items():
        if where.any():
            location = f" dialogue {int(where.nonzero()[0, 0])}" if where.dim() == 1 else f" {_first_location(where)}"
            raise ValueError(message + location)
