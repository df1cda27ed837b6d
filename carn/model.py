"""The Causal-Aware Reconstruction Network (CARN, paper section 3; equation numbers in the comments).

Per modality a Causal-Cue Encoder (causal entmax-1.5 attention through ``kernels.FusedEntmaxCausalAttention``,
gated residual fusion, Transformer encoder), concatenation fusion with a residual MLP, an emotion classifier
(a regressor for sentiment), one head per modality for stage 1, and a reconstruction decoder. The causal
self-supervised loss (eq. 15-17) reads ``ctx = A x`` from the same fused attention call as ``z = A V``.

Shapes: B dialogues, L utterances (right-padded), H = ``config.hidden``, C = classes (1 for sentiment regression,
2 for the sentiment sign classifier).
One code path for every backend: the attention op dispatches on ``KERNELS_BACKEND`` by itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import FusedEntmaxCausalAttention
from kernels.entmax import EntmaxAttentionOutput
from mer.data import MODALITIES
from mer.inputs import check_dialogue_inputs

from .config import ModelConfig


@dataclass
class CarnOutput:
    """Everything the two training stages and the evaluation read from one forward pass."""

    logits: torch.Tensor  # (B, L, C) fused prediction (eq. 12); (B, L) for sentiment regression
    modality_logits: dict[str, torch.Tensor]  # m -> (B, L, C) or (B, L): stage-1 heads on f_m^l (eq. 19)
    reconstruction: dict[str, torch.Tensor]  # m -> (B, L, d_m) (eq. 13-14)
    css_prediction: dict[str, torch.Tensor]  # m -> (B, L, css_dim) p = F(ctx) (eq. 16); empty without CSS
    css_target: dict[str, torch.Tensor]  # m -> (B, L, css_dim) g = G(x), detached (eq. 16); empty without CSS
    attention_weights: dict[str, torch.Tensor]  # m -> (B, L, L) A_m, only when asked for (paper Fig. 4)


class SoftmaxAttention(nn.Module):
    """The "w/ vanilla attention" ablation: one-head softmax attention without the causal mask.

    Same outputs as ``FusedEntmaxCausalAttention(..., out_proj=False)``: z = A V, ctx = A x and optionally A.
    Padded keys are hidden (unlike the causal mask, a full mask would let valid steps see the padding).
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, *, need_weights: bool = False) -> EntmaxAttentionOutput:
        scores = self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) * x.shape[-1] ** -0.5  # [B, L, L]
        weights = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
        return EntmaxAttentionOutput(weights @ self.v_proj(x), weights @ x, weights[:, None] if need_weights else None)


def transformer_encoder(width: int, num_heads: int, num_layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, num_heads, 2 * width, dropout, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


def encode(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor, encoder_mask: str) -> torch.Tensor:
    """``encoder`` on (B, L, W) ``x`` with padding hidden; ``encoder_mask="causal"``: step i sees steps <= i only."""
    if encoder_mask == "causal":
        future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        return encoder(x, mask=future, src_key_padding_mask=~valid)
    return encoder(x, src_key_padding_mask=~valid)


def strict_parents_context(weights: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """ctx_i = sum_{j<i} A_ij h_j: the causal context without the diagonal term A_ii h_i (not renormalised; the
    first step has no parent and gets 0). weights (B, L, L) A, h (B, L, H) -> (B, L, H)."""
    return weights.tril(-1).to(h.dtype) @ h


class CausalCueEncoder(nn.Module):
    """One modality's pipeline (eq. 1-9): (B, L, d_m) features -> (B, L, H) latent f_m^l.

    Absent inputs (``present`` False) are replaced by a learned "missing" embedding after the input projection,
    so that the model sees the mask and not only zeros.
    """

    def __init__(self, in_dim: int, config: ModelConfig):
        super().__init__()
        hidden = config.hidden
        self.config = config
        self.input_proj = nn.Linear(in_dim, hidden)
        self.missing_embedding = nn.Parameter(torch.zeros(hidden))
        if config.use_cce:
            if config.attention == "vanilla":
                self.attention = SoftmaxAttention(hidden)
            else:  # eq. 1-6: Q/K/V, causal mask, entmax-1.5, z = A V
                self.attention = FusedEntmaxCausalAttention(hidden, 1, out_proj=False)
            self.gate = nn.Linear(2 * hidden, hidden)  # eq. 7
            self.norm = nn.LayerNorm(hidden)  # eq. 8
        if config.uses_css:
            # eq. 16: F predicts the current step from its causal parents; G embeds the target. G's output is
            # detached (the paper's stabilisation), so G never gets a gradient: it is a fixed random projection.
            self.css_predictor = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.css_dim))
            self.css_target = nn.Linear(hidden, config.css_dim)
            self.css_target.requires_grad_(False)
        self.encoder = transformer_encoder(hidden, config.num_heads, config.encoder_layers, config.dropout)  # eq. 9

    def causal_cue(self, h: torch.Tensor, valid: torch.Tensor, *, need_weights: bool = False):
        """Eq. 1-8 on the projected input h (B, L, H) -> f (B, L, H), ctx = A h (B, L, H), A (B, 1, L, L) or None.

        ``css_context="strict"``: ctx_i = sum_{j<i} A_ij h_j (:func:`strict_parents_context`), and A is returned.

        With the causal attention, f at step t depends on h at steps <= t only.
        """
        strict = self.config.css_context == "strict"
        if self.config.attention == "vanilla":
            z, context, weights = self.attention(h, valid, need_weights=need_weights or strict)
        else:
            z, context, weights = self.attention.forward_with_context(h, need_weights=need_weights or strict)
        if strict:  # the weights' O(L^2) matrix: short dialogues, and only with this option
            context = strict_parents_context(weights[:, 0], h)
        gamma = torch.sigmoid(self.gate(torch.cat([h, z], dim=-1)))  # eq. 7
        return self.norm(h + gamma * z), context, weights  # eq. 8

    def forward(self, x: torch.Tensor, present: torch.Tensor, valid: torch.Tensor, *, need_weights: bool = False):
        """x (B, L, d_m), present (B, L) bool, valid (B, L) bool -> (latent, css_prediction, css_target, weights)."""
        h = torch.where(present[..., None], self.input_proj(x), self.missing_embedding)  # [B, L, H]
        prediction = target = weights = None
        if self.config.use_cce:
            f, context, weights = self.causal_cue(h, valid, need_weights=need_weights)
            if self.config.uses_css:
                prediction = self.css_predictor(context)  # eq. 15-16: ctx_i = sum_j A_ij h_j (docs/design.md section 2)
                target = self.css_target(h).detach()
        else:  # "w/o CCE": the Transformer encoder alone
            f = h
        latent = encode(self.encoder, f, valid, self.config.encoder_mask)  # eq. 9
        weights = weights[:, 0] if need_weights and weights is not None else None  # one head: [B, L, L]
        return latent, prediction, target, weights


class CARN(nn.Module):
    """forward(features {m: (B, L, d_m)}, present (B, L, 3) bool, valid (B, L) bool or None) -> CarnOutput.
    valid None: the utterances up to each dialogue's last one with a modality present.

    Bad input (see ``mer.inputs.check_dialogue_inputs``) gets a TypeError/ValueError naming the modality, dialogue and
    utterance; floating-point features of another dtype are cast to the parameters' dtype."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hidden, joint, out = config.hidden, 3 * config.hidden, config.num_classes
        self.encoders = nn.ModuleDict({m: CausalCueEncoder(config.dims[m], config) for m in MODALITIES})
        self.modality_heads = nn.ModuleDict(
            {m: nn.Sequential(nn.Dropout(config.dropout), nn.Linear(hidden, out)) for m in MODALITIES}
        )  # eq. 19
        self.fusion = nn.Sequential(
            nn.Linear(joint, joint), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(joint, joint)
        )  # eq. 11
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(joint, out))  # eq. 12
        self.decoder = transformer_encoder(joint, config.num_heads, config.decoder_layers, config.dropout)  # eq. 13
        self.decoder_head = nn.Sequential(
            nn.Linear(joint, joint), nn.ReLU(), nn.Linear(joint, sum(config.dims[m] for m in MODALITIES))
        )
        self.set_stage(1)

    # Parameters each stage trains (section 3.4); the rest is frozen, and G (css_target) always is.
    def stage_modules(self, stage: int) -> list[nn.Module]:
        encoders = [self.encoders]
        if stage == 1:
            return encoders + [self.modality_heads]
        return encoders + [self.fusion, self.classifier, self.decoder, self.decoder_head]

    def set_stage(self, stage: int) -> None:
        """Stage 1: encoders + per-modality heads (+ CSS predictor F); stage 2: encoders + fusion, classifier,
        reconstruction decoder."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.requires_grad_(False)
        for module in self.stage_modules(stage):
            module.requires_grad_(True)
        for encoder in self.encoders.values():
            if hasattr(encoder, "css_predictor"):
                encoder.css_predictor.requires_grad_(stage == 1)
                encoder.css_target.requires_grad_(False)

    def stream(self, batch_size: int = 1):
        """A :class:`carn.stream.CarnStream` of ``batch_size`` live conversations (model in eval mode):
        ``stream.push(audio=..., text=..., video=...)`` returns the prediction at each new utterance. With
        ``encoder_mask="causal"`` it is the offline forward's at that utterance, at attention work proportional to
        the history; with the default non-causal encoders the stream re-encodes the history at every utterance
        (the prediction knowing the utterances so far)."""
        from .stream import CarnStream

        return CarnStream(self, batch_size)

    def forward(
        self, features: dict, present: torch.Tensor, valid: torch.Tensor, *, need_weights: bool = False
    ) -> CarnOutput:
        # clear errors naming the modality, dialogue and utterance (mer.inputs); float64 features are cast
        features, valid = check_dialogue_inputs(features, present, valid=valid, dims=self.config.dims,
                                                dtype=self.decoder_head[0].weight.dtype)
        latents, predictions, targets, weights = {}, {}, {}, {}
        for index, m in enumerate(MODALITIES):
            x = features[m] * present[..., index, None]  # absent modalities enter as zeros
            latent, prediction, target, weight = self.encoders[m](x, present[..., index], valid, need_weights=need_weights)
            latents[m] = latent
            if prediction is not None:
                predictions[m], targets[m] = prediction, target
            if weight is not None:
                weights[m] = weight
        joint = torch.cat([latents[m] for m in MODALITIES], dim=-1)  # eq. 10: [B, L, 3H]
        fused = joint + F.relu(self.fusion(joint))  # eq. 11
        decoded = self.decoder_head(encode(self.decoder, fused, valid, self.config.encoder_mask))  # eq. 13
        sizes = [self.config.dims[m] for m in MODALITIES]
        reconstruction = dict(zip(MODALITIES, decoded.split(sizes, dim=-1)))  # eq. 14
        squeeze = (lambda y: y.squeeze(-1)) if self.config.predicts_score else (lambda y: y)
        return CarnOutput(
            logits=squeeze(self.classifier(fused)),
            modality_logits={m: squeeze(self.modality_heads[m](latents[m])) for m in MODALITIES},
            reconstruction=reconstruction,
            css_prediction=predictions,
            css_target=targets,
            attention_weights=weights,
        )
