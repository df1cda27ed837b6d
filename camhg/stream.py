"""CaM-HG streamed one utterance at a time (``CaMHG.stream``; the common interface in :mod:`mer.streaming`).

Every attention of CaM-HG looks back only (the extractor over utterances, eq. 4; the hypergraph over nodes, eq.
9-10), and the rest works per utterance (projection, MoE, gate, head): an utterance's prediction depends on the
earlier ones only through the keys and values of those attentions. Each step runs the model's own modules on the
new utterance and attends its cached keys/values with ``kernels.block_causal_attention_with_kvcache`` (the new
utterance's 3 nodes form one group that sees every cached node and each other, as the block-causal mask j // 3 <=
i // 3 does), so the streamed prediction at utterance t is the offline forward's at t, and an utterance costs
attention over the history only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import kernels
from kernels import BlockCausalTransformerLayer, Top2MoE
from mer.streaming import KVCache, ModelStream, in_projections, merge_heads, split_heads

from .model import NUM_MODALITIES, CaMHG, Hypergraph


class CaMHGStream(ModelStream):
    """B live conversations through a :class:`camhg.model.CaMHG` in eval mode (see :class:`mer.streaming.ModelStream`
    for ``push``/``reset``). The model must be in phase 1 or 3 (phase 2 has no classifier)."""

    def __init__(self, model: CaMHG, batch_size: int = 1):
        if model.phase == 2:
            raise ValueError("the model is in phase 2 (generative pre-training), which predicts no label: stream a "
                             "phase-1 or phase-3 model")
        super().__init__(model, model.dims, batch_size, predicts_score=model.num_classes == 1)
        self.imputes = model.imputes and model.phase >= 2
        self.extractor_caches = [KVCache(1) for _ in (model.extractor or ())] if self.imputes else []
        if isinstance(model.mining, Hypergraph):
            layers = len(model.mining.node_to_edge)
            self.mining_caches = [(KVCache(NUM_MODALITIES), KVCache(NUM_MODALITIES)) for _ in range(layers)]
        else:
            self.mining_caches = [KVCache(NUM_MODALITIES) for _ in model.mining.layers]

    def _layer(self, layer: BlockCausalTransformerLayer, cache: KVCache, x: torch.Tensor,
               context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``layer(x, context)`` in eval mode (no dropout) at the new positions x, context (B, T, d) (T = the group
        of one utterance), with the earlier positions' keys/values from ``cache`` (and the new ones written to it).
        The functional ops run on the layer's weights directly (no module calls: a step is short)."""
        attention, ff = layer.attn, layer.ff
        linear, layer_norm = nn.functional.linear, nn.functional.layer_norm

        def attend(query, keys=None):  # keys None: self-attention
            q, k, v = (split_heads(y, attention.num_heads)
                       for y in in_projections(attention.in_proj_weight, attention.in_proj_bias, query, keys))
            out = kernels.block_causal_attention_with_kvcache(q, *self.cache_arguments(cache, k, v), k=k, v=v)
            return linear(merge_heads(out), attention.out_proj.weight, attention.out_proj.bias)

        def feed_forward(y):  # Linear, GELU, Dropout, Linear
            hidden = nn.functional.gelu(linear(y, ff[0].weight, ff[0].bias), approximate=ff[1].approximate)
            return linear(hidden, ff[3].weight, ff[3].bias)

        def norm(y, module):
            return layer_norm(y, module.normalized_shape, module.weight, module.bias, module.eps)

        if layer.norm_first:  # as BlockCausalTransformerLayer.forward
            query = norm(x, layer.norm1)
            x = x + attend(query, None if context is None else norm(context, layer.norm1))
            return x + feed_forward(norm(x, layer.norm2))
        x = norm(x + attend(x, context), layer.norm1)
        return norm(x + feed_forward(x), layer.norm2)

    def _step(self, features, present, speakers, active) -> torch.Tensor:
        model = self.model
        b, d = present.shape[0], model.config.hidden
        present = present[:, None]  # (B, 1, 3): one utterance
        # eq. 1-2, as CaMHG.forward
        h = torch.where(present[..., None], model.project(features), model.placeholder)
        h = h + model.speaker_embedding(speakers)[:, None, None] + model.modality_embedding  # (B, 1, 3, d)
        nodes = h
        if self.imputes:
            z = model.fuse(h.reshape(b, 1, NUM_MODALITIES * d))  # eq. 3
            for layer, cache in zip(model.extractor or (), self.extractor_caches):  # eq. 4, causal over utterances
                z = self._layer(layer, cache, z)
            z = z[:, :, None].expand(b, 1, NUM_MODALITIES, d)
            query = z + model.modality_embedding
            if isinstance(model.generator, Top2MoE):  # eq. 5-6
                generated = model.generator(query, row_mask=present.any(dim=-1, keepdim=True).expand(
                    b, 1, NUM_MODALITIES))
            else:
                generated = model.generator(query)
            restored = generated + z
            if model.gate is not None:  # eq. 7
                gate = torch.sigmoid(model.gate(torch.cat([restored, z], dim=-1)))
                nodes = gate * restored + (1 - gate) * h
            else:
                nodes = torch.where(present[..., None], h, restored)
        nodes = nodes.reshape(b, NUM_MODALITIES, d)  # the utterance's 3 nodes
        if isinstance(model.mining, Hypergraph):  # eq. 8-10
            edges = model.mining.edge_init(nodes)
            for to_edge, to_node, (edge_cache, node_cache) in zip(model.mining.node_to_edge,
                                                                  model.mining.edge_to_node, self.mining_caches):
                edges = self._layer(to_edge, edge_cache, edges, nodes)
                nodes = self._layer(to_node, node_cache, nodes, edges)
        else:
            for layer, cache in zip(model.mining.layers, self.mining_caches):
                nodes = self._layer(layer, cache, nodes)
        logits = model.head(nodes.reshape(b, NUM_MODALITIES * d))  # (B, C)
        return logits[:, 0] if self.predicts_score else logits

