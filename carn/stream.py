"""CARN streamed one utterance at a time (``CARN.stream``; the common interface in :mod:`mer.streaming`).

The prediction (eq. 10-12) reads each modality's latent f_m^l (eq. 1-9); the reconstruction decoder (eq. 13-14)
and the CSS heads are not needed for it. Two cases:

- causal (``encoder_mask="causal"`` with the causal entmax attention, or "w/o CCE"): every attention looks back
  only, so each step runs the model's modules on the new utterance and attends the cached keys/values, the
  causal-cue attention (eq. 1-6) with ``kernels.entmax_attention_with_kvcache`` and the Transformer encoders
  (eq. 9) with ``kernels.block_causal_attention_with_kvcache`` (a group of one query: softmax over the history and
  itself). The streamed prediction at utterance t is the offline forward's at t; an utterance costs attention over
  the history only.
- non-causal (the default ``encoder_mask="none"``, whose encoders let an utterance see later ones, and the
  "w/ vanilla attention" ablation): the stream keeps the history and re-encodes it at every utterance (one forward
  pass over utterances <= t, cost growing with t); its prediction at t is what the model says knowing the
  utterances <= t, which the offline forward over the whole dialogue may revise.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.kvcache import MAX_HEAD_DIM
from mer.dialogues import MODALITIES
from mer.streaming import KVCache, ModelStream, in_projections, merge_heads, split_heads

from .model import CARN, CausalCueEncoder


class CarnStream(ModelStream):
    """B live conversations through a :class:`carn.model.CARN` in eval mode (see :class:`mer.streaming.ModelStream`
    for ``push``/``reset``; CARN does not read speakers). ``causal`` says whether the stream runs on caches (the
    offline prediction at every utterance) or re-encodes the history (module docstring)."""

    def __init__(self, model: CARN, batch_size: int = 1):
        config = model.config
        super().__init__(model, config.dims, batch_size, predicts_score=config.predicts_score)
        self.causal = config.encoder_mask == "causal" and not (config.use_cce and config.attention == "vanilla")
        if self.causal:
            self.cue_caches = {m: KVCache() for m in MODALITIES}
            self.encoder_caches = {m: [KVCache() for _ in model.encoders[m].encoder.layers] for m in MODALITIES}
        else:
            self.history: dict[str, torch.Tensor] = {}  # m -> (B, capacity, d_m) features; "present" (B, capacity, 3)

    # ------------------------------------------------------------------------------------------ causal: caches
    def _cue(self, encoder: CausalCueEncoder, cache: KVCache, h: torch.Tensor) -> torch.Tensor:
        """Eq. 1-8 at the new utterance, h (B, 1, H) -> f (B, 1, H)."""
        attention = encoder.attention
        q, k, v = (split_heads(proj(h), attention.num_heads)
                   for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        # the decoding kernels hold a head in one tile (D <= kernels.kvcache.MAX_HEAD_DIM); CARN's one-head
        # attention is hidden wide, so wider models take the reference
        attend = kernels.entmax_attention_with_kvcache if q.shape[-1] <= MAX_HEAD_DIM \
            else kernels.reference.entmax_attention_with_kvcache_reference
        z = merge_heads(attend(q, *self.cache_arguments(cache, k, v), k=k, v=v, alpha=1.5, causal=True))  # eq. 1-6
        gamma = torch.sigmoid(encoder.gate(torch.cat([h, z], dim=-1)))  # eq. 7
        return encoder.norm(h + gamma * z)  # eq. 8

    def _encoder_layer(self, layer: nn.TransformerEncoderLayer, cache: KVCache, x: torch.Tensor) -> torch.Tensor:
        """``layer`` (post- or pre-norm) at the new utterance x (B, 1, W) under the causal mask."""
        attention = layer.self_attn

        def attend(y):
            q, k, v = (split_heads(p, attention.num_heads)
                       for p in in_projections(attention.in_proj_weight, attention.in_proj_bias, y))
            out = kernels.block_causal_attention_with_kvcache(q, *self.cache_arguments(cache, k, v), k=k, v=v)
            return layer.dropout1(attention.out_proj(merge_heads(out)))

        def feed_forward(y):
            return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(y)))))

        if layer.norm_first:
            x = x + attend(layer.norm1(x))
            return x + feed_forward(layer.norm2(x))
        x = layer.norm1(x + attend(x))
        return layer.norm2(x + feed_forward(x))

    def _latent(self, m: str, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Eq. 1-9 of modality m at the new utterance: x (B, 1, d_m), present (B,) -> f_m^l (B, 1, H)."""
        encoder = self.model.encoders[m]
        h = torch.where(present[:, None, None], encoder.input_proj(x), encoder.missing_embedding)
        f = self._cue(encoder, self.cue_caches[m], h) if self.model.config.use_cce else h
        for layer, cache in zip(encoder.encoder.layers, self.encoder_caches[m]):  # eq. 9
            f = self._encoder_layer(layer, cache, f)
        return f if encoder.encoder.norm is None else encoder.encoder.norm(f)

    def _step(self, features, present, speakers, active) -> torch.Tensor:
        if not self.causal:
            return self._reencode(features, present, active)
        model = self.model
        joint = torch.cat([self._latent(m, features[m], present[:, i]) for i, m in enumerate(MODALITIES)], dim=-1)
        fused = joint + torch.relu(model.fusion(joint))  # eq. 10-11
        logits = model.classifier(fused)[:, 0]  # eq. 12, (B, C)
        return logits[:, 0] if self.predicts_score else logits

    # ------------------------------------------------------------------------------------ non-causal: history
    def _reencode(self, features, present, active) -> torch.Tensor:
        """Append the utterance to each active row's history and run the model over it; the outputs at the new
        utterance (rows not active: zeros)."""
        b = self.batch_size
        new = {**{m: features[m][:, 0] for m in MODALITIES}, "present": present}
        capacity = self.max_length + 1
        if not self.history or self.history["present"].shape[1] < capacity:
            size = max(2 * capacity, 16)
            grown = {key: value.new_zeros(b, size, *value.shape[1:]) for key, value in new.items()}
            for key, old in self.history.items():
                grown[key][:, :old.shape[1]] = old
            self.history = grown
        rows = torch.arange(b, device=self.device)
        for key, value in new.items():
            self.history[key][rows, self.lengths.long()] = value
        lengths = self.lengths.long() + 1
        steps = torch.arange(capacity, device=self.device)
        valid = (steps < lengths[:, None])[active]
        output = self.model({m: self.history[m][active, :capacity] for m in MODALITIES},
                            self.history["present"][active, :capacity] & valid[..., None], valid).logits
        last = output[torch.arange(output.shape[0], device=self.device), lengths[active] - 1]
        outputs = last.new_zeros(b, *last.shape[1:])
        outputs[active] = last
        return outputs
