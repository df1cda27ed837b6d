"""CARN's training objectives (paper section 3.3-3.4). Padding never enters a loss: every term averages over the
valid positions (``valid``, (B, L) bool) only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mer.data import MODALITIES, Batch
from mer.protocols import sign_cross_entropy

from .config import ModelConfig, TrainConfig
from .model import CarnOutput


def emotion_loss(prediction: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, task: str,
                 sentiment_loss: str = "regression") -> torch.Tensor:
    """Cross-entropy (eq. 19, 22) for (B, L, C) logits and (B, L) class ids. Sentiment (``task="regression"``):
    ``sentiment_loss="ce"`` 2-class cross-entropy on the sign of the label for (B, L, 2) logits, zero labels
    excluded (:func:`mer.protocols.sign_cross_entropy`); ``"regression"`` MSE for (B, L) scores."""
    if task == "regression":
        if sentiment_loss == "ce":
            return sign_cross_entropy(prediction, labels.to(prediction.dtype), valid)
        return F.mse_loss(prediction[valid], labels[valid].to(prediction.dtype))
    return F.cross_entropy(prediction[valid], labels[valid])


def causal_self_supervised_loss(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *, kind: str, temperature: float
) -> torch.Tensor:
    """Eq. 17 over the N valid positions of the batch: p = F(ctx) (B, L, D), g = G(x) (B, L, D), detached.

    ``kind="infonce"``: each p_i must pick its own g_i among all N targets; the vectors are L2-normalised
    first (cosine similarity), which keeps logits / tau bounded whatever the scale of the features.
    ``kind="mse"``: the "w/ MSE" ablation, mean squared error between p_i and g_i.
    """
    p, g = prediction[valid], target[valid]  # [N, D]
    if kind == "mse":
        return F.mse_loss(p, g)
    if kind != "infonce":
        raise ValueError(f"kind must be 'infonce' or 'mse', got {kind!r}")
    logits = F.normalize(p, dim=-1) @ F.normalize(g, dim=-1).T / temperature  # [N, N]
    return F.cross_entropy(logits, torch.arange(len(p), device=p.device))


def reconstruction_loss(
    reconstruction: dict[str, torch.Tensor], features: dict[str, torch.Tensor], present: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Eq. 23 on the missing parts: sum over modalities of the MSE between x_m and x^_m where m is absent (and the
    utterance valid). ``features`` are the full (unmasked) inputs; a modality absent nowhere adds 0."""
    total = reconstruction[MODALITIES[0]].new_zeros(())
    for index, m in enumerate(MODALITIES):
        missing = valid & ~present[..., index]  # [B, L]
        if missing.any():
            total = total + F.mse_loss(reconstruction[m][missing], features[m][missing])
    return total


def stage_losses(
    output: CarnOutput, full: Batch, observed: Batch, stage: int, model_config: ModelConfig, train_config: TrainConfig
) -> dict[str, torch.Tensor]:
    """The terms of stage 1 (eq. 18-20) or stage 2 (eq. 21-23) and their weighted sum under ``"loss"``.

    ``full`` is the batch with every modality, ``observed`` the one the model saw (``full`` itself in stage 1).
    """
    valid, task, sentiment = full.valid, model_config.task, model_config.sentiment_loss
    if stage == 1:
        emotion = sum(emotion_loss(output.modality_logits[m], full.labels, valid, task, sentiment) for m in MODALITIES)
        terms = {"emotion": emotion}
        total = emotion
        if model_config.uses_css:
            css = sum(
                causal_self_supervised_loss(
                    output.css_prediction[m], output.css_target[m], valid,
                    kind=model_config.css, temperature=model_config.css_temperature,
                )
                for m in MODALITIES
            )
            terms["css"] = css
            total = total + train_config.css_weight * css
    else:
        emotion = emotion_loss(output.logits, full.labels, valid, task, sentiment)
        rec = reconstruction_loss(output.reconstruction, full.features, observed.present, valid)
        terms = {"emotion": emotion, "reconstruction": rec}
        total = emotion + train_config.rec_weight * rec
    return {"loss": total, **terms}
