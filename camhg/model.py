"""CaM-HG: Causal-Enhanced MoE imputation and an Asymmetric Causal Dynamic Hypergraph (paper section 3.2).

Shapes: B dialogues, L utterances (right-padded), d = ``hidden``, M = 3 modalities in ``mer.data.MODALITIES``
order (a, t, v). The hypergraph has 3L nodes in temporal order: node ``3 * t + m`` is modality m of utterance t.
Every attention only looks backwards in time (group 1 over utterances, group 3 over nodes), so the prediction
for utterance t never depends on a later utterance, and right padding needs no mask (docs/design.md section 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kernels import BlockCausalTransformerLayer, Top2MoE
from mer.data import MODALITIES
from mer.inputs import check_dialogue_inputs

from .config import CaMHGConfig

NUM_MODALITIES = len(MODALITIES)
NUM_SPEAKERS = 2
GATE_BIAS_INIT = -2.0  # Appendix A.3: sigmoid(-2) ~ 0.12, trust the observed features first
PHASES = (1, 2, 3)


@dataclass
class CaMHGOutput:
    """What one forward pass produces (None where the phase or the ablation skips that part).

    logits: (B, L, C) class scores, C = 1 for the sentiment regressor; None in phase 2.
    restored: (B, L, 3, d) the generator's h_hat (eq. 6); None in phase 1 and without imputation.
    gate: (B, L, 3, d) sigma of eq. 7; None when the gate is not used.
    aux_loss: the MoE router's load-balancing loss over the valid utterances (1 when balanced), None without the
    MoE or in phase 1.
    """

    logits: Optional[torch.Tensor]
    restored: Optional[torch.Tensor]
    gate: Optional[torch.Tensor]
    aux_loss: Optional[torch.Tensor] = None


class Hypergraph(nn.Module):
    """Asymmetric causal dynamic hypergraph (eq. 8-10): nodes (B, 3L, d) -> nodes (B, 3L, d).

    Hyperedges start as MLP-GELU-MLP of the nodes (eq. 8); each layer lets the edges attend the nodes, then the
    nodes attend the updated edges, both under the block-causal mask j // 3 <= i // 3 (eq. 9-10).
    """

    def __init__(self, hidden: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.edge_init = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.node_to_edge = nn.ModuleList(
            BlockCausalTransformerLayer(hidden, heads, dropout=dropout, group_size=NUM_MODALITIES)
            for _ in range(layers))
        self.edge_to_node = nn.ModuleList(
            BlockCausalTransformerLayer(hidden, heads, dropout=dropout, group_size=NUM_MODALITIES)
            for _ in range(layers))

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        edges = self.edge_init(nodes)  # eq. 8
        for to_edge, to_node in zip(self.node_to_edge, self.edge_to_node):
            edges = to_edge(edges, nodes)  # eq. 10, node-to-edge aggregation
            nodes = to_node(nodes, edges)  # eq. 10, edge-to-node distribution
        return nodes


class NodeTransformer(nn.Module):
    """The w/o-hypergraph ablation: plain self-attention over the 3L nodes under the same block-causal mask."""

    def __init__(self, hidden: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            BlockCausalTransformerLayer(hidden, heads, dropout=dropout, group_size=NUM_MODALITIES)
            for _ in range(layers))

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            nodes = layer(nodes)
        return nodes


class MLPGenerator(nn.Module):
    """The w/o-MoE ablation: one expert-sized MLP instead of the routed mixture."""

    def __init__(self, hidden: int, expert_hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, expert_hidden), nn.GELU(), nn.Linear(expert_hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CaMHG(nn.Module):
    """The CaM-HG model; ``config.ablation`` selects a Table 4 variant, ``set_phase`` an Algorithm 1 phase.

    forward(features, present, speakers, *, valid=None): features {modality: (B, L, d_m) float}, present (B, L, 3)
    bool (True where the modality is observed), speakers (B, L) int in {0, 1}, valid (B, L) bool (None: the
    utterances up to each dialogue's last one with a modality present) -> CaMHGOutput. Bad input (see
    ``mer.inputs.check_dialogue_inputs``: NaN/inf features, a valid utterance with no modality, an empty dialogue,
    sizes other than ``dims``) gets a TypeError/ValueError naming the modality, dialogue and utterance; floating-point
    features of another dtype are cast to the parameters' dtype.
    """

    def __init__(self, config: CaMHGConfig, dims: dict[str, int], num_classes: int):
        super().__init__()
        missing = [m for m in MODALITIES if m not in dims]
        if missing:
            raise ValueError(f"dims must give a feature size for every modality {MODALITIES}, missing {missing}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (1 for regression), got {num_classes}")
        self.config, self.dims, self.num_classes = config, {m: int(dims[m]) for m in MODALITIES}, num_classes
        d, ablation = config.hidden, config.ablation
        expert_hidden = config.expert_hidden or d
        self.phase = 3

        # Input projector (eq. 1-2) and the placeholder anchors of absent modalities.
        self.projectors = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(self.dims[m], d), nn.LayerNorm(d)) for m in MODALITIES})
        self.speaker_embedding = nn.Embedding(NUM_SPEAKERS, d)
        self.modality_embedding = nn.Parameter(torch.randn(NUM_MODALITIES, d) * 0.02)
        self.placeholder = nn.Parameter(torch.zeros(NUM_MODALITIES, d))
        self.input_dropout = nn.Dropout(config.dropout)

        # Causal-enhanced MoE imputation (eq. 3-7).
        self.imputes = ablation != "no_imputation"
        self.fuse = self.extractor = self.generator = self.gate = None
        if self.imputes:
            self.fuse = nn.Linear(NUM_MODALITIES * d, d)  # eq. 3
            if ablation != "no_causal_factor":
                self.extractor = nn.ModuleList(  # eq. 4: causal mask = block-causal with group 1
                    BlockCausalTransformerLayer(d, config.heads, dropout=config.dropout, group_size=1)
                    for _ in range(config.extractor_layers))
            if ablation == "no_moe":
                self.generator = MLPGenerator(d, expert_hidden)
            else:
                self.generator = Top2MoE(d, num_experts=config.num_experts, hidden=expert_hidden, d_out=d)
            if ablation != "no_gating":
                self.gate = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
                self.reset_gate_bias()

        # Mining and the per-utterance head over the utterance's 3 nodes.
        mining = NodeTransformer if ablation == "no_hypergraph" else Hypergraph
        self.mining = mining(d, config.heads, config.hypergraph_layers, config.dropout)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(NUM_MODALITIES * d, d), nn.GELU(),
                                  nn.Dropout(config.dropout), nn.Linear(d, num_classes))

    # ----------------------------------------------------------------------------------------------- groups
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role: ``projector`` (eq. 1-2), ``generator`` (eq. 3-6), ``gate`` (eq. 7), ``mining``
        (hypergraph or its ablation, and the head). Every parameter is in exactly one group."""
        def params(*modules):
            return [p for module in modules if module is not None for p in module.parameters()]

        return {
            "projector": params(self.projectors, self.speaker_embedding)
            + [self.modality_embedding, self.placeholder],
            "generator": params(self.fuse, self.extractor, self.generator),
            "gate": params(self.gate),
            "mining": params(self.mining, self.head),
        }

    def reset_gate_bias(self) -> None:
        """Set the confidence gate's output bias to -2.0 (Algorithm 1 line 25)."""
        if self.gate is not None:
            with torch.no_grad():
                self.gate[-1].bias.fill_(GATE_BIAS_INIT)

    def set_phase(self, phase: int) -> None:
        """Switch to an Algorithm 1 phase and freeze what it does not train.

        1 (discriminative warm-up): projector and mining train on the observed modalities, no imputation.
        2 (generative pre-training): projector frozen; only the generator trains, on reconstruction.
        3 (joint fine-tuning): everything trains; the gate bias is (re)set to -2.0.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        trainable = {1: ("projector", "mining"), 2: ("generator",), 3: ("projector", "generator", "gate", "mining")}
        for name, group in self.parameter_groups().items():
            for p in group:
                p.requires_grad_(name in trainable[phase])
        if phase == 3 and self.phase != 3:
            self.reset_gate_bias()
        self.phase = phase

    def stream(self, batch_size: int = 1):
        """A :class:`camhg.stream.CaMHGStream` of ``batch_size`` live conversations (model in eval mode):
        ``stream.push(audio=..., text=..., video=..., speaker=...)`` returns the prediction at each new utterance,
        the offline forward's at that utterance, at attention work proportional to the history."""
        from .stream import CaMHGStream

        return CaMHGStream(self, batch_size)

    # ---------------------------------------------------------------------------------------------- forward
    def project(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 1: LayerNorm(W_m x + b_m) per modality -> (B, L, 3, d); also the reconstruction target of eq. 11."""
        return torch.stack([self.projectors[m](features[m]) for m in MODALITIES], dim=2)

    def forward(self, features: dict[str, torch.Tensor], present: torch.Tensor, speakers: torch.Tensor, *,
                valid: Optional[torch.Tensor] = None) -> CaMHGOutput:
        # clear errors naming the modality, dialogue and utterance (mer.inputs); float64 features are cast
        features, _ = check_dialogue_inputs(features, present, valid=valid, speakers=speakers,
                                            num_speakers=NUM_SPEAKERS, dims=self.dims, dtype=self.placeholder.dtype)
        b, l, _ = present.shape
        d = self.config.hidden
        # Eq. 1-2; absent modalities take the learnable placeholder, not the projection of zeros.
        h = torch.where(present[..., None], self.project(features), self.placeholder)
        h = h + self.speaker_embedding(speakers.long())[:, :, None] + self.modality_embedding
        h = self.input_dropout(h)  # (B, L, 3, d) = h~

        restored = gate = aux_loss = None
        nodes = h
        if self.imputes and self.phase >= 2:
            u = self.fuse(h.reshape(b, l, NUM_MODALITIES * d))  # eq. 3, (B, L, d)
            z = u
            for layer in self.extractor or ():  # eq. 4, causal over utterances
                z = layer(z)
            z = z[:, :, None].expand(b, l, NUM_MODALITIES, d)
            query = z + self.modality_embedding  # q = z_c + P_mod(m)
            if isinstance(self.generator, Top2MoE):  # eq. 5-6; the router's load-balancing loss rides along
                # padding (utterances with no observed modality: the data keeps one in every valid utterance)
                # takes no part in routing or the load-balancing loss, and generates zeros
                valid = present.any(dim=-1, keepdim=True).expand(b, l, NUM_MODALITIES)
                generated, routing = self.generator(query, row_mask=valid, return_routing=True)
                aux_loss = routing.aux_loss
            else:
                generated = self.generator(query)
            restored = generated + z  # eq. 6: residual to the context anchor, (B, L, 3, d)
            if self.phase == 2:
                return CaMHGOutput(None, restored, None, aux_loss)
            if self.gate is not None:
                gate = torch.sigmoid(self.gate(torch.cat([restored, z], dim=-1)))  # eq. 7
                nodes = gate * restored + (1 - gate) * h
            else:  # w/o gating: the generator's output replaces exactly the absent modalities
                nodes = torch.where(present[..., None], h, restored)

        nodes = self.mining(nodes.reshape(b, l * NUM_MODALITIES, d))  # (B, 3L, d), eq. 8-10
        logits = self.head(nodes.reshape(b, l, NUM_MODALITIES * d))  # (B, L, C)
        return CaMHGOutput(logits, restored, gate, aux_loss)
