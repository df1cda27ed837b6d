"""CARN streamed one utterance at a time (``CARN.stream``; the common interface in :mod:`mer.streaming`).

The prediction (eq. 10-12) reads each modality's latent f_m^l (eq. 1-9); the reconstruction decoder (eq. 13-14)
and the CSS heads are not needed for it. Two cases:

- causal (``encoder_mask="causal"`` with the causal entmax attention, or "w/o CCE"): every attention looks back
  only, so each step runs the model's layers on the new utterance and attends the cached keys/values, the
  causal-cue attention (eq. 1-6) with ``kernels.entmax_attention_with_kvcache`` and the Transformer encoders
  (eq. 9) with ``kernels.block_causal_attention_with_kvcache`` (a group of one query: softmax over the history and
  itself). The three modalities' encoders go as one batch (their weights stacked when the stream is created; one
  attention call per layer). The streamed prediction at utterance t is the offline forward's at t; an utterance
  costs attention over the history only.
- non-causal (the default ``encoder_mask="none"``, whose encoders let an utterance see later ones, and the
  "w/ vanilla attention" ablation): the stream keeps the history and re-encodes it at every utterance (one forward
  pass over utterances <= t, cost growing with t); its prediction at t is what the model says knowing the
  utterances <= t, which the offline forward over the whole dialogue may revise.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from mer.dialogues import MODALITIES
from mer.streaming import KVCache, ModelStream, StreamLinear, merge_heads, split_heads

from .model import CARN


class CarnStream(ModelStream):
    """B live conversations through a :class:`carn.model.CARN` in eval mode (see :class:`mer.streaming.ModelStream`
    for ``push``/``reset``; CARN does not read speakers). ``causal`` says whether the stream runs on caches (the
    offline prediction at every utterance) or re-encodes the history (module docstring). A causal stream takes the
    weights when it is created: create a new stream after changing them."""

    def __init__(self, model: CARN, batch_size: int = 1):
        config = model.config
        super().__init__(model, config.dims, batch_size, predicts_score=config.predicts_score)
        self.causal = config.encoder_mask == "causal" and not (config.use_cce and config.attention == "vanilla")
        if self.causal:
            self.cue_cache = KVCache()
            self.encoder_caches = [KVCache() for _ in model.encoders[MODALITIES[0]].encoder.layers]
            self._stack_weights()
        else:
            self.history: dict[str, torch.Tensor] = {}  # m -> (B, capacity, d_m) features; "present" (B, capacity, 3)

    # ------------------------------------------------------------------------------------------ causal: caches
    # The three modalities' encoders have the same shapes past the input projection: a step runs them as one batch,
    # a modality axis first (M = 3, batched matrix products over their stacked weights, one attention call over the
    # 3B rows per layer, the caches' rows modality-major).
    def _stack_weights(self) -> None:
        """Stack the encoders' weights (taken when the stream is created) on a leading modality axis; the linear
        maps' weights are stored transposed, (M, in, out), for ``baddbmm``."""
        encoders = [self.model.encoders[m] for m in MODALITIES]

        def stack(get) -> torch.Tensor:
            return torch.stack([get(encoder).detach() for encoder in encoders])

        def linear(get) -> tuple[torch.Tensor, torch.Tensor]:  # (M, in, out), (M, 1, out)
            return (stack(lambda e: get(e).weight.t()).contiguous(), stack(lambda e: get(e).bias)[:, None])

        def norm(get) -> tuple[torch.Tensor, torch.Tensor, float]:  # (M, 1, W) weight and bias, eps
            return stack(lambda e: get(e).weight)[:, None], stack(lambda e: get(e).bias)[:, None], get(encoders[0]).eps

        self.missing = stack(lambda e: e.missing_embedding)[:, None]  # (M, 1, H)
        if self.model.config.use_cce:
            attention = encoders[0].attention
            self.cue_heads = attention.num_heads
            self.cue_qkv = linear(lambda e: e.attention.qkv_proj)
            self.cue_gate, self.cue_norm = linear(lambda e: e.gate), norm(lambda e: e.norm)
        self.layers = []
        for i, layer in enumerate(encoders[0].encoder.layers):
            def get(e, name, i=i):
                return getattr(e.encoder.layers[i], name)
            self.layers.append({
                "heads": layer.self_attn.num_heads, "norm_first": layer.norm_first, "activation": layer.activation,
                "in_proj": (stack(lambda e: get(e, "self_attn").in_proj_weight.t()).contiguous(),
                            stack(lambda e: get(e, "self_attn").in_proj_bias)[:, None]),
                "out_proj": linear(lambda e: get(e, "self_attn").out_proj),
                "linear1": linear(lambda e: get(e, "linear1")), "linear2": linear(lambda e: get(e, "linear2")),
                "norm1": norm(lambda e: get(e, "norm1")), "norm2": norm(lambda e: get(e, "norm2"))})
        self.final_norm = None if encoders[0].encoder.norm is None else norm(lambda e: e.encoder.norm)
        # eq. 11-12 (Linear, ReLU, Dropout, Linear; Dropout, Linear), one row per stream
        fusion, classifier = self.model.fusion, self.model.classifier[1]
        self.fusion = [StreamLinear(fusion[i].weight, fusion[i].bias, self.batch_size) for i in (0, 3)]
        self.classifier = StreamLinear(classifier.weight, classifier.bias, self.batch_size)

    def _attention_arguments(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """(k_cache, v_cache, cache_seqlens) of the 3B modality-major rows."""
        return self.cache_arguments(cache, k, v, self.row_lengths)

    def _cue(self, h: torch.Tensor) -> torch.Tensor:
        """Eq. 1-8 at the new utterance, h (M, B, H) -> f (M, B, H)."""
        q, k, v = (split_heads(y.reshape(-1, 1, y.shape[-1]), self.cue_heads)
                   for y in _linear(h, self.cue_qkv).chunk(3, dim=-1))
        z = kernels.entmax_attention_with_kvcache(q, *self._attention_arguments(self.cue_cache, k, v), k=k, v=v,
                                                  alpha=1.5, causal=True)  # eq. 1-6
        z = merge_heads(z).reshape(h.shape)
        gamma = torch.sigmoid(_linear(torch.cat([h, z], dim=-1), self.cue_gate))  # eq. 7
        return _layer_norm(h + gamma * z, self.cue_norm)  # eq. 8

    def _encoder_layer(self, layer: dict, cache: KVCache, x: torch.Tensor) -> torch.Tensor:
        """One ``nn.TransformerEncoderLayer`` (post- or pre-norm, eval mode) at the new utterance x (M, B, W) under
        the causal mask."""

        def attend(y):
            q, k, v = (split_heads(p.reshape(-1, 1, p.shape[-1]), layer["heads"])
                       for p in _linear(y, layer["in_proj"]).chunk(3, dim=-1))
            out = kernels.block_causal_attention_with_kvcache(q, *self._attention_arguments(cache, k, v), k=k, v=v)
            return _linear(merge_heads(out).reshape(y.shape), layer["out_proj"])

        def feed_forward(y):
            return _linear(layer["activation"](_linear(y, layer["linear1"])), layer["linear2"])

        if layer["norm_first"]:
            x = x + attend(_layer_norm(x, layer["norm1"]))
            return x + feed_forward(_layer_norm(x, layer["norm2"]))
        x = _layer_norm(x + attend(x), layer["norm1"])
        return _layer_norm(x + feed_forward(x), layer["norm2"])

    def _step(self, features, present, speakers, active) -> torch.Tensor:
        if not self.causal:
            return self._reencode(features, present, active)
        model = self.model
        projected = torch.stack([nn.functional.linear(features[m][:, 0], model.encoders[m].input_proj.weight,
                                                      model.encoders[m].input_proj.bias) for m in MODALITIES])
        h = torch.where(present.t()[..., None], projected, self.missing)  # (M, B, H)
        self.row_lengths = self.lengths.repeat(len(MODALITIES))
        f = self._cue(h) if model.config.use_cce else h
        for layer, cache in zip(self.layers, self.encoder_caches):  # eq. 9
            f = self._encoder_layer(layer, cache, f)
        if self.final_norm is not None:
            f = _layer_norm(f, self.final_norm)
        joint = f.transpose(0, 1).reshape(f.shape[1], -1)  # (B, M H), the modalities in MODALITIES order
        fused = joint + torch.relu(self.fusion[1](torch.relu(self.fusion[0](joint))))  # eq. 10-11
        logits = self.classifier(fused)  # eq. 12, (B, C)
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


def _linear(x: torch.Tensor, weight_and_bias: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-modality linear maps: x (M, B, in), weight (M, in, out), bias (M, 1, out) -> (M, B, out)."""
    weight, bias = weight_and_bias
    return torch.baddbmm(bias, x, weight)


def _layer_norm(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    """Per-modality LayerNorm over the last axis: x (M, B, W), weight and bias (M, 1, W)."""
    weight, bias, eps = norm
    return torch.addcmul(bias, nn.functional.layer_norm(x, x.shape[-1:], eps=eps), weight)
