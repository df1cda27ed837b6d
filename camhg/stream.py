"""CaM-HG streamed one utterance at a time (``CaMHG.stream``; the common interface in :mod:`mer.streaming`).

Every attention of CaM-HG looks back only (the extractor over utterances, eq. 4; the hypergraph over nodes, eq.
9-10), and the rest works per utterance (projection, MoE, gate, head): an utterance's prediction depends on the
earlier ones only through the keys and values of those attentions. Each step runs the model's layers on the
new utterance and attends its cached keys/values with ``kernels.block_causal_attention_with_kvcache`` (the new
utterance's 3 nodes form one group that sees every cached node and each other, as the block-causal mask j // 3 <=
i // 3 does), so the streamed prediction at utterance t is the offline forward's at t, and an utterance costs
attention over the history only.

A step reads every weight of the model once (one or three rows per linear map: the utterance, or its 3 nodes), so
its cost is bound by the weights' bytes: the stream takes the weights when it is created (:class:`StreamLinear`,
packed for oneDNN on the CPU) and calls the functional ops on them, no module calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import kernels
from kernels import BlockCausalTransformerLayer, Top2MoE
from kernels.moe import _softmax_of_chosen, _top2_experts
from mer.streaming import KVCache, ModelStream, StreamLinear, merge_heads, split_heads

from .model import NUM_MODALITIES, CaMHG, Hypergraph, MLPGenerator


class CaMHGStream(ModelStream):
    """B live conversations through a :class:`camhg.model.CaMHG` in eval mode (see :class:`mer.streaming.ModelStream`
    for ``push``/``reset``). The model must be in phase 1 or 3 (phase 2 has no classifier). The stream takes the
    weights when it is created: create a new stream after changing them."""

    def __init__(self, model: CaMHG, batch_size: int = 1):
        if model.phase == 2:
            raise ValueError("the model is in phase 2 (generative pre-training), which predicts no label: stream a "
                             "phase-1 or phase-3 model")
        super().__init__(model, model.dims, batch_size, predicts_score=model.num_classes == 1)
        nodes = NUM_MODALITIES * batch_size  # rows of the per-node maps
        self.imputes = model.imputes and model.phase >= 2
        self.projectors = {m: (StreamLinear(p[0].weight, p[0].bias, batch_size), _norm(p[1]))
                           for m, p in model.projectors.items()}
        if self.imputes:
            self.fuse = StreamLinear(model.fuse.weight, model.fuse.bias, batch_size)
            self.extractor = [(_Layer(layer, batch_size, cross=False), KVCache(1)) for layer in model.extractor or ()]
            if model.gate is not None:
                self.gate = _mlp(model.gate, nodes)
            if isinstance(model.generator, MLPGenerator):
                self.generator = _mlp(model.generator.net, nodes)
            elif self.device.type == "cpu":
                self.generator = _ChosenExperts(model.generator)
        if isinstance(model.mining, Hypergraph):
            self.edge_init = _mlp(model.mining.edge_init, nodes)
            self.mining = [(_Layer(to_edge, nodes, cross=True), KVCache(NUM_MODALITIES),
                            _Layer(to_node, nodes, cross=True), KVCache(NUM_MODALITIES))
                           for to_edge, to_node in zip(model.mining.node_to_edge, model.mining.edge_to_node)]
        else:
            self.mining = [(_Layer(layer, nodes, cross=False), KVCache(NUM_MODALITIES))
                           for layer in model.mining.layers]
        self.head = _mlp(model.head, batch_size)

    def _layer(self, layer: "_Layer", cache: KVCache, x: torch.Tensor,
               context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``layer(x, context)`` in eval mode (no dropout) at the new positions x, context (B, T, d) (T = the group
        of one utterance), with the earlier positions' keys/values from ``cache`` (and the new ones written to it)."""

        def attend(query, keys=None):  # keys None: self-attention
            if keys is None:
                q, k, v = layer.qkv(query).chunk(3, dim=-1)
            else:
                q, (k, v) = layer.q(query), layer.kv(keys).chunk(2, dim=-1)
            q, k, v = (split_heads(y, layer.heads) for y in (q, k, v))
            out = kernels.block_causal_attention_with_kvcache(q, *self.cache_arguments(cache, k, v), k=k, v=v)
            return layer.out(merge_heads(out))

        def feed_forward(y):  # Linear, GELU, Dropout, Linear
            return layer.ff2(nn.functional.gelu(layer.ff1(y), approximate=layer.approximate))

        norm1, norm2 = layer.norm1, layer.norm2
        if layer.norm_first:  # as BlockCausalTransformerLayer.forward
            query = _layer_norm(x, norm1)
            x = x + attend(query, None if context is None else _layer_norm(context, norm1))
            return x + feed_forward(_layer_norm(x, norm2))
        x = _layer_norm(x + attend(x, context), norm1)
        return _layer_norm(x + feed_forward(x), norm2)

    def _step(self, features, present, speakers, active) -> torch.Tensor:
        model = self.model
        b, d = present.shape[0], model.config.hidden
        present = present[:, None]  # (B, 1, 3): one utterance
        # eq. 1-2, as CaMHG.forward
        projected = torch.stack([_layer_norm(linear(features[m]), norm) for m, (linear, norm) in
                                 self.projectors.items()], dim=2)
        h = torch.where(present[..., None], projected, model.placeholder)
        h = h + model.speaker_embedding(speakers)[:, None, None] + model.modality_embedding  # (B, 1, 3, d)
        nodes = h
        if self.imputes:
            z = self.fuse(h.reshape(b, 1, NUM_MODALITIES * d))  # eq. 3
            for layer, cache in self.extractor:  # eq. 4, causal over utterances
                z = self._layer(layer, cache, z)
            z = z[:, :, None].expand(b, 1, NUM_MODALITIES, d)
            query = z + model.modality_embedding
            if isinstance(model.generator, Top2MoE):  # eq. 5-6
                row_mask = present.any(dim=-1, keepdim=True).expand(b, 1, NUM_MODALITIES)
                generated = self.generator(query, row_mask) if query.device.type == "cpu" \
                    else model.generator(query, row_mask=row_mask)
            else:
                generated = self.generator(query)
            restored = generated + z
            if model.gate is not None:  # eq. 7
                gate = torch.sigmoid(self.gate(torch.cat([restored, z], dim=-1)))
                nodes = gate * restored + (1 - gate) * h
            else:
                nodes = torch.where(present[..., None], h, restored)
        nodes = nodes.reshape(b, NUM_MODALITIES, d)  # the utterance's 3 nodes
        if isinstance(model.mining, Hypergraph):  # eq. 8-10
            edges = self.edge_init(nodes)
            for to_edge, edge_cache, to_node, node_cache in self.mining:
                edges = self._layer(to_edge, edge_cache, edges, nodes)
                nodes = self._layer(to_node, node_cache, nodes, edges)
        else:
            for layer, cache in self.mining:
                nodes = self._layer(layer, cache, nodes)
        logits = self.head(nodes.reshape(b, NUM_MODALITIES * d))  # (B, C)
        return logits[:, 0] if self.predicts_score else logits


class _Layer:
    """A :class:`BlockCausalTransformerLayer`'s weights for ``rows`` rows per step: the in-projection whole (``qkv``,
    self-attention) or split into the queries' and the keys'/values' maps (``q``, ``kv``, ``cross``: keys and
    values from another sequence), ``out``, ``ff1``, ``ff2``, the norms (weight, bias, eps)."""

    def __init__(self, layer: BlockCausalTransformerLayer, rows: int, cross: bool):
        attention, ff = layer.attn, layer.ff
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        if cross:
            e = attention.embed_dim
            self.q = StreamLinear(weight[:e], None if bias is None else bias[:e], rows)
            self.kv = StreamLinear(weight[e:], None if bias is None else bias[e:], rows)
        else:
            self.qkv = StreamLinear(weight, bias, rows)
        self.heads, self.norm_first, self.approximate = attention.num_heads, layer.norm_first, ff[1].approximate
        self.out = StreamLinear(attention.out_proj.weight, attention.out_proj.bias, rows)
        self.ff1, self.ff2 = StreamLinear(ff[0].weight, ff[0].bias, rows), StreamLinear(ff[3].weight, ff[3].bias, rows)
        self.norm1, self.norm2 = _norm(layer.norm1), _norm(layer.norm2)


class _ChosenExperts:
    """``moe(x, row_mask=row_mask)`` for the few rows of a step on the CPU: the routing of ``kernels.moe_top2``,
    then each expert on the rows that chose it only (chosen experts read on the host; the reference runs every expert
    on every row), a row's two terms added in expert order as there, in the reference's arithmetic (float32, float64
    for float64 weights). The weights are taken when the stream is created. x (..., d), row_mask (...) -> (..., d_out)."""

    def __init__(self, moe: Top2MoE):
        self.dtype = torch.float64 if moe.w1.dtype == torch.float64 else torch.float32  # as the reference
        self.gate_weight, self.d_out = moe.gate_weight.detach().to(self.dtype).t(), moe.d_out
        self.experts = [tuple(p[e].detach().to(self.dtype) for p in (moe.w1, moe.b1, moe.w2, moe.b2))
                        for e in range(moe.num_experts)]

    def __call__(self, x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        rows = rows if rows.dtype == self.dtype else rows.to(self.dtype)
        logits = rows @ self.gate_weight
        experts = _top2_experts(logits).masked_fill(~row_mask.reshape(-1, 1), -1)  # (N, 2), -1: left out
        weights = _softmax_of_chosen(logits, experts.clamp(min=0))
        y = rows.new_zeros(rows.shape[0], self.d_out)
        for e in sorted(set(experts.flatten().tolist()) - {-1}):
            w1, b1, w2, b2 = self.experts[e]
            chose, slot = (experts == e).nonzero(as_tuple=True)
            hidden = nn.functional.gelu(torch.addmm(b1, rows[chose], w1))
            y.index_add_(0, chose, weights[chose, slot, None] * torch.addmm(b2, hidden, w2))
        y = y.reshape(*x.shape[:-1], self.d_out)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _mlp(sequential: nn.Sequential, rows: int):
    """An eval-mode ``Sequential`` of Linear, GELU and Dropout layers as a function of x, on :class:`StreamLinear`s."""
    steps = []
    for module in sequential:
        if isinstance(module, nn.Linear):
            steps.append(StreamLinear(module.weight, module.bias, rows))
        elif isinstance(module, nn.GELU):
            steps.append(lambda y, approximate=module.approximate: nn.functional.gelu(y, approximate=approximate))
        elif not isinstance(module, nn.Dropout):  # dropout: the identity in eval mode
            raise TypeError(f"cannot stream a {type(module).__name__} layer")

    def run(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return run


def _norm(norm: nn.LayerNorm) -> tuple:
    return norm.normalized_shape, norm.weight.detach(), norm.bias.detach(), norm.eps


def _layer_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    return nn.functional.layer_norm(x, *norm)
